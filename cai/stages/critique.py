"""SL-CAI, the critique-and-revise stage (Bai et al. 2022, section 3.1).

The model answers each red-team prompt. Then, K times, a principle is drawn at random
from the constitution; the model is asked to critique its latest answer against it,
then to revise the answer in the light of its critique. The constitution's few-shot
examples go first, as earlier chat turns, to show a small model the format. The final
revisions become the SFT set; "final revision over first answer" a preference set.

A round whose critique or revision is degenerate, or whose "revision" comments on the
answer instead of being one, is recorded but not kept: the answer stays as it was.

Prompts are processed in fixed chunks of `batch_size` (sorted by length) through the
resumable chunk loop (`cai.chunks`): a chunk's records are committed when all its
rounds are done, so a killed run resumes losing at most the chunk in flight, and
produces exactly what an uninterrupted run would. The model is any engine: weights
in-process or `server:NAME`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from cai.config import setting
from cai.chunks import ChunkLedger, chunked_by_length, run_chunks
from cai.engines import Engine, Sampling, is_degenerate
from cai.rundir import atomic_write_jsonl

UPSTREAM: tuple = ()


@dataclass
class Config:
    num_revisions: int = setting(2, "K: critique-and-revise rounds per prompt", ge=1)
    few_shot: int = setting(2, "how many of the constitution's critique/revision examples go first", ge=0)
    batch_size: int = setting(8, "prompts per generation batch (and per resume chunk)", ge=1)
    max_new_tokens: int = setting(128, "for answers and revisions", ge=1)
    critique_max_new_tokens: int = setting(96, "for critiques", ge=1)
    temperature: float = setting(0.7, "sampling temperature (0 = greedy)", ge=0)
    top_p: float = setting(0.95, "nucleus sampling: the smallest token set with this probability", gt=0, le=1)
    model: str | None = setting(None, "the model that answers, critiques and revises: null = the run's model, "
                                      "or a model spec or server:NAME", model_reference=True)


_LABEL = re.compile(r"^\s*(revision|revised (answer|response)|new answer|answer)\s*:\s*", re.IGNORECASE)


_META = re.compile(r"^\W*(the|this|my|your) (original |last |previous |revised |new |assistant's )?"
                   r"(answer|response|reply|revision)\b", re.IGNORECASE)


def clean_revision(text: str) -> str:
    """Drop a leading 'Revision:' label small models like to echo."""
    return _LABEL.sub("", text, count=1).strip()


def is_meta_revision(text: str) -> bool:
    """A 'revision' that talks about the answer ("The answer is not harmful...") instead of
    being one: small models often write these; training on them teaches commentary."""
    return bool(_META.match(text))


def draw_principle(constitution, seed: int, prompt_id: str, round_index: int):
    """Seeded per prompt and round, so the draw does not depend on batching or resume."""
    return random.Random(f"{seed}:{prompt_id}:{round_index}").choice(constitution.critique_revision)


def system_turns(constitution) -> list[dict]:
    return [{"role": "system", "content": constitution.system_prompt}] if constitution.system_prompt else []


def few_shot_turns(constitution, n: int) -> list[dict]:
    return [turn for example in constitution.critique_examples[:n] for turn in example.messages]


def critique_chunk(chunk, generator: Engine, constitution, cfg: Config, seed: int, chunk_seed: int,
                   model_name: str) -> tuple[list[dict], dict]:
    """All K rounds for one chunk of prompts; returns their records and counts."""
    counts = {"dropped_prompts": 0, "dropped_rounds": 0}
    answer = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    critic = Sampling(cfg.critique_max_new_tokens, cfg.temperature, cfg.top_p)
    system = system_turns(constitution)
    shots = few_shot_turns(constitution, cfg.few_shot)

    first = generator.generate([system + [{"role": "user", "content": p.text}] for p in chunk], answer,
                               seed=chunk_seed)
    records = [{"id": p.id, "prompt": p.text, "category": p.category, "initial_response": a.text,
                "rounds": [], "final_revision": a.text, "model": model_name, "seed": seed}
               for p, a in zip(chunk, first)]
    live = []
    for record, a in zip(records, first):
        if is_degenerate(a.text):
            record["dropped"] = "degenerate initial answer"
            counts["dropped_prompts"] += 1
        else:
            live.append(record)

    for round_index in range(cfg.num_revisions):
        principles = [draw_principle(constitution, seed, r["id"], round_index) for r in live]
        asked = [system + shots + [{"role": "user", "content": r["prompt"]},
                                   {"role": "assistant", "content": r["final_revision"]},
                                   {"role": "user", "content": p.critique}]
                 for r, p in zip(live, principles)]
        critiques = generator.generate(asked, critic, seed=chunk_seed + 2 * round_index + 1)
        revise = [turns + [{"role": "assistant", "content": c.text}, {"role": "user", "content": p.revision}]
                  for turns, c, p in zip(asked, critiques, principles)]
        revisions = generator.generate(revise, answer, seed=chunk_seed + 2 * round_index + 2)
        for record, principle, critique, revision in zip(live, principles, critiques, revisions):
            text = clean_revision(revision.text)
            kept = not (is_degenerate(critique.text) or is_degenerate(text) or is_meta_revision(text))
            counts["dropped_rounds"] += not kept
            record["rounds"].append({"round": round_index + 1, "principle": principle.id,
                                     "critique_request": principle.critique, "critique": critique.text,
                                     "revision_request": principle.revision, "revision": text, "kept": kept})
            if kept:
                record["final_revision"] = text
    for record in live:
        record["num_revisions"] = sum(r["kept"] for r in record["rounds"])
    return records, counts


def training_sets(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """SFT rows (prompt -> final revision) and preference rows (final revision over first answer)."""
    sft, prefs = [], []
    for r in records:
        if r.get("dropped"):
            continue
        principles = [x["principle"] for x in r["rounds"] if x["kept"]]
        user = [{"role": "user", "content": r["prompt"]}]
        sft.append({"messages": user + [{"role": "assistant", "content": r["final_revision"]}],
                    "id": r["id"], "principles": principles, "num_revisions": r["num_revisions"]})
        if r["num_revisions"] and r["final_revision"] != r["initial_response"]:
            prefs.append({"prompt": user, "chosen": [{"role": "assistant", "content": r["final_revision"]}],
                          "rejected": [{"role": "assistant", "content": r["initial_response"]}],
                          "id": r["id"], "principles": principles, "source": "critique"})
    return sft, prefs


def run(ctx) -> dict:
    cfg: Config = ctx.config
    constitution = ctx.constitution
    model_name = cfg.model or ctx.run.model
    prompts = ctx.prompts.red_team_train
    ledger = ChunkLedger(ctx.dir.path, "critique", ["records.jsonl"])
    chunks = chunked_by_length(prompts, cfg.batch_size)
    engine = None

    def work(index: int, chunk) -> dict:
        nonlocal engine
        engine = engine or ctx.engine(model_name, cfg.batch_size)
        records, _ = critique_chunk(chunk, engine, constitution, cfg, ctx.run.seed,
                                    ctx.run.seed * 100_003 + index * 101, model_name)
        return {"records.jsonl": records}

    run_chunks(ledger, chunks, work, desc="critique")
    records = ledger.rows("records.jsonl")
    sft, prefs = training_sets(records)
    atomic_write_jsonl(ctx.dir / "sft.jsonl", sft)
    atomic_write_jsonl(ctx.dir / "prefs.jsonl", prefs)
    counts = {"prompts": len(prompts), "records": len(records),
              "dropped_prompts": sum(1 for r in records if r.get("dropped")),
              "dropped_rounds": sum(not x["kept"] for r in records for x in r["rounds"]),
              "sft_rows": len(sft), "pref_rows": len(prefs), "model": model_name}
    if engine is not None:
        counts.update(tokens_generated_this_session=engine.tokens_generated,
                      generation_seconds_this_session=round(engine.seconds, 2),
                      tokens_per_second=round(engine.tokens_per_second, 2))
    return counts
