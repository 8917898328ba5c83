"""What runs a model in an evaluation: each model answers every prompt, the run's reward
model scores the answers (and the critique stage's kept revisions), and the judge (the
feedback model) compares pairs of models and rates answers alone. Every step is resumable
chunk by chunk (`cai.chunks`), so a killed evaluation keeps what it finished.
"""

from __future__ import annotations

import gc
from itertools import combinations

from cai.chunks import ChunkLedger, OnFirstChunk, chunk_seed, chunked_by_length, run_chunks
from cai.constitution import as_system_prompt
from cai.engines import Sampling
from cai.evaluation.figures import PRINCIPLE_SETS
from cai.judge.judge import comparison_key, draw_principles
from cai.registry import PROMPTED_BASE
from cai.rundir import atomic_write_jsonl, read_jsonl


def generate_answers(ctx, cfg, models: dict[str, str], prompts) -> list[dict]:
    """Each model answers every prompt, chunk by chunk (`cai.chunks`): a model's engine is
    opened when its first unfinished chunk comes and released before the next model's."""
    ledger = ChunkLedger(ctx.dir.path, "generations", ["generations.jsonl"])
    plain = ([{"role": "system", "content": ctx.constitution.system_prompt}]
             if cfg.system_prompt and ctx.constitution.system_prompt else [])
    system = {name: [{"role": "system", "content": as_system_prompt(ctx.constitution)}] if name == PROMPTED_BASE
              else plain for name in models}
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    items = [(key, (name, index, chunk)) for name in models
             for index, (key, chunk) in enumerate(chunked_by_length(prompts, cfg.batch_size, prefix=f"{name}/"))]
    loaded: list[str] = []

    def work(_, item) -> dict:
        name, index, chunk = item
        if loaded and loaded[-1] != name:
            ctx.release(models[loaded.pop()])
        if not loaded:
            loaded.append(name)
        engine = ctx.engine(models[name], cfg.batch_size)
        # The same seed for the same prompts, whichever model answers them.
        answers = engine.generate([system[name] + [{"role": "user", "content": p.text}] for p in chunk], sampling,
                                  seed=chunk_seed(ctx.run.seed, index))
        return {"generations.jsonl": [{"model": name, "id": p.id, "kind": p.kind, "prompt": p.text,
                                       "response": a.text, "num_tokens": a.num_tokens, "finished": a.finished,
                                       "spec": models[name]} for p, a in zip(chunk, answers)]}

    run_chunks(ledger, items, work, desc="evaluate: answers", size=lambda item: len(item[2]))
    for name in loaded:
        ctx.release(models[name])
    wanted = {p.id for p in prompts}
    return [r for r in ledger.rows("generations.jsonl") if r["model"] in models and r["id"] in wanted]


def kept_revisions(records: list[dict]) -> list[dict]:
    """Each kept critique round: its principle, the revision and the answer it replaced."""
    rows = []
    for record in records:
        if record.get("dropped"):
            continue
        replaced = record["initial_response"]
        for step in record.get("rounds", []):
            if step.get("kept"):
                rows.append({"id": record["id"], "prompt": record["prompt"], "round": step["round"],
                             "principle": step["principle"], "revision": step["revision"], "replaced": replaced})
                replaced = step["revision"]
    return rows


def reward_scores(ctx, cfg, answers: dict, prompts) -> tuple[dict | None, list[dict]]:
    """{(model, prompt id): score} from the run's reward model (None without one), and
    the scores of the critique stage's kept revisions and of the answers they replaced."""
    stage = ctx.stage("reward")
    if not stage.complete() or stage.saved_model() is None:
        return None, []
    from cai.training.models import RewardScorer

    # its merged model, or its LoRA adapter when merge_adapter was false
    scorer = RewardScorer.from_path(ctx.model_spec("reward"), device=ctx.run.device, batch_size=cfg.batch_size,
                                    options=ctx.model_options, work=ctx.work)
    keys = [(name, p.id) for name in answers for p in prompts]
    scores = scorer.score([[{"role": "user", "content": p.text}] for _ in answers for p in prompts],
                          [answers[name][p.id]["response"] for name in answers for p in prompts])
    atomic_write_jsonl(ctx.dir / "rewards.jsonl", [{"model": m, "id": i, "reward": s}
                                                   for (m, i), s in zip(keys, scores)])
    critique = ctx.stage("critique")
    revisions = kept_revisions(read_jsonl(critique / "records.jsonl")) if critique.complete() else []
    revision_rows = []
    if revisions:
        conversations = [[{"role": "user", "content": r["prompt"]}] for r in revisions]
        after = scorer.score(conversations, [r["revision"] for r in revisions])
        before = scorer.score(conversations, [r["replaced"] for r in revisions])
        revision_rows = [{"id": r["id"], "round": r["round"], "principle": r["principle"], "reward": a,
                          "reward_replaced": b} for r, a, b in zip(revisions, after, before)]
    atomic_write_jsonl(ctx.dir / "revision_rewards.jsonl", revision_rows)
    del scorer
    gc.collect()
    return dict(zip(keys, scores)), revision_rows


def anchor_of(names: list[str]) -> str:
    """The model others are compared with and Elo is anchored at: base, else the first."""
    return "base" if "base" in names else names[0]


def model_pairs(names: list[str], which: str) -> list[tuple[str, str]]:
    """The pairs of models the judge compares: every pair, or (`base`) each model with
    the anchor (`anchor_of`) only."""
    if which == "base":
        anchor = anchor_of(names)
        return [(anchor, name) for name in names if name != anchor]
    return list(combinations(names, 2))


def judge_pairs(ctx, cfg, answers: dict, prompts, judge: OnFirstChunk) -> list[dict]:
    """The feedback model compares the pairs of models `judge_pairs` names on every prompt, both orders,
    chunk by chunk (`cai.chunks`), under a principle drawn for the prompt from the
    constitution's evaluation principles of its kind (harmless for red-team prompts,
    helpful for helpful ones), through `Judge.compare_with`. `judge` loads the judge on the
    first chunk that needs it (none on a resume with every chunk done)."""
    ledger = ChunkLedger(ctx.dir.path, "comparisons", ["comparisons.jsonl"])
    items = [(f"{first}~{key}", (first, second, chunk)) for first, second in model_pairs(list(answers), cfg.judge_pairs)
             for key, chunk in chunked_by_length(prompts, cfg.batch_size, prefix=f"{second}/")]

    def work(_, item) -> dict:
        first, second, chunk = item
        conversations = [[{"role": "user", "content": p.text}] for p in chunk]
        principles = [draw_principles(ctx.constitution, ctx.run.seed, comparison_key(c), cfg.principles_per_comparison,
                                      pool=ctx.constitution.evaluation_principles(p.kind))
                      for p, c in zip(chunk, conversations)]
        comparisons = judge().compare_with(ctx.constitution, conversations,
                                           [answers[first][p.id]["response"] for p in chunk],
                                           [answers[second][p.id]["response"] for p in chunk],
                                           principles, seed=ctx.run.seed)
        return {"comparisons.jsonl": [
            {"first": first, "second": second, "id": p.id, "kind": p.kind, "p_first": c.p_first,
             "p_order_ab": c.p_order_ab, "p_order_ba": c.p_order_ba, "principles": list(c.principles),
             "principle_set": PRINCIPLE_SETS[p.kind], "orders_disagree": bool(c.orders_disagree)}
            for p, c in zip(chunk, comparisons)]}

    run_chunks(ledger, items, work, desc="evaluate: judging pairs", size=lambda item: len(item[2]))
    wanted = {p.id for p in prompts}
    return [r for r in ledger.rows("comparisons.jsonl")
            if r["first"] in answers and r["second"] in answers and r["id"] in wanted]


def judge_verdicts(ctx, cfg, answers: dict, prompts, judge: OnFirstChunk) -> dict:
    """The judge rates each model's answer to each of `prompts` alone (`Judge.score_single`,
    both option orders), under a harmlessness principle drawn for the prompt, chunk by
    chunk (`cai.chunks`): {(model, prompt id): P(good)}."""
    if not prompts:
        return {}
    ledger = ChunkLedger(ctx.dir.path, "verdicts", ["verdicts.jsonl"])
    items = [(key, (name, chunk)) for name in answers
             for key, chunk in chunked_by_length(prompts, cfg.batch_size, prefix=f"{name}/")]

    def work(_, item) -> dict:
        name, chunk = item
        conversations = [[{"role": "user", "content": p.text}] for p in chunk]
        principles = [draw_principles(ctx.constitution, ctx.run.seed, comparison_key(c), 1,
                                      pool=ctx.constitution.evaluation_principles("red_team"))
                      for c in conversations]
        scores = judge().score_single(ctx.constitution, conversations,
                                      [answers[name][p.id]["response"] for p in chunk], principles)
        return {"verdicts.jsonl": [{"model": name, "id": p.id, "p_good": s,
                                    "principles": [getattr(x, "id", x) for x in drawn]}
                                   for p, s, drawn in zip(chunk, scores, principles)]}

    run_chunks(ledger, items, work, desc="evaluate: harmful or not", size=lambda item: len(item[1]))
    wanted = {p.id for p in prompts}
    return {(r["model"], r["id"]): r["p_good"] for r in ledger.rows("verdicts.jsonl")
            if r["model"] in answers and r["id"] in wanted}
