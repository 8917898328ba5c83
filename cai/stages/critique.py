"""SL-CAI, the critique-and-revise stage (Bai et al. 2022, section 3.1).

The model answers each red-team prompt. Then, K times, a principle is drawn at random
from the constitution; the model is asked to critique its latest answer against it,
then to revise the answer in the light of its critique. The constitution's few-shot
examples go first, as earlier chat turns, to show a small model the format. The final
revisions become the SFT set; "final revision over first answer" a preference set.

A round's revision is kept (it becomes the answer the next round revises) unless it is
- degenerate: empty, letterless or one word repeated (or the critique before it is);
- unchanged: the very answer it was asked to revise (a no-op, not a revision);
- copied: mostly prompt text the model was shown (`is_copied`), typically a few-shot
  example's revision pasted as the answer to an unrelated request;
- leaked: it repeats a 6-word span of a few-shot example's answer, critique or
  revision (`cai.leakage`): a partial copy, such as an example's refusal sentence reused
  for an unrelated request;
- meta: a comment on the answer ("The answer is not harmful...") instead of one.
Every round is recorded, with `kept` and the reason it was `dropped`; the manifest
counts each reason, and the share of SFT targets and chosen answers that repeat a
few-shot span (which the leaked rule keeps at zero for revisions; a first answer, written
without the examples, can still repeat one by chance).

Few-shot examples rotate (`few_shot_rotation`, on by default): the constitution's
critique examples are dealt, in order, into sets of `few_shot` (the last set wraps round
to the first examples), and each prompt gets one set, drawn seeded per prompt, so no
single example's phrasing is in every prompt. A chunk's rows of every set are generated
in one call per phase (critique, revision); the in-process engine caches each set's
few-shot prefix once (`prefix_groups`); off, every prompt gets the first `few_shot`
examples.

Options for small models (the paper finds critiques matter most for them):
`critique: false` revises directly, without a critique (the few-shot examples then
drop their critique turns too); `system_prompt: false` leaves the constitution's
system prompt out; `revision_temperature` samples revisions at their own temperature
(0 = greedy); `best_of: n` samples n revisions per round and keeps the one the
feedback model prefers (the judge of `cai.judge`, both option orders, set up by the same
`feedback_*` keys as label's and calibrated like it).

Prompts are processed in fixed chunks of `batch_size` (sorted by length) through the
resumable chunk loop (`cai.chunks`): a chunk's records are committed when all its
rounds are done, so a killed run resumes losing at most the chunk in flight, and
produces exactly what an uninterrupted run would. The model is any engine: weights
in-process or `server:NAME`.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from cai.chunks import ChunkLedger, OnFirstChunk, chunk_seed, chunked_by_length, run_chunks
from cai.engines import Engine, Sampling, is_degenerate
from cai.judge.judge import draw_principles
from cai.judge.settings import JUDGE_FIELDS, JudgeSettings, hashed_without_judge, judge_problems, make_judge
from cai.leakage import SpanIndex, few_shot_index, ngrams, words
from cai.rundir import atomic_write_jsonl
from cai.schema import setting

BEST_OF = ("best_of", lambda n: n > 1, "best_of above 1 (the judge picks among sampled revisions)")


@dataclass
class Config(JudgeSettings):  # the judge of best_of: feedback_model, feedback_few_shot, ... (opened when best_of > 1)
    num_revisions: int = setting(2, "K: critique-and-revise rounds per prompt", ge=1)
    few_shot: int = setting(2, "how many of the constitution's critique/revision examples go first", ge=0)
    few_shot_rotation: bool = setting(True, "draw each prompt's examples (a set of few_shot, seeded per prompt) "
                                            "from all the constitution's examples; false = always the first "
                                            "few_shot")
    critique: bool = setting(True, "critique before revising; false = the revision request follows the answer "
                                   "directly (and the few-shot examples lose their critique turns)")
    system_prompt: bool = setting(True, "use the constitution's system prompt (false = none of cai's own)")
    batch_size: int = setting(64, "prompts per generation batch (and per resume chunk)", ge=1)
    max_new_tokens: int = setting(128, "for answers and revisions", ge=1)
    critique_max_new_tokens: int = setting(96, "for critiques", ge=1)
    temperature: float = setting(0.7, "sampling temperature (0 = greedy)", ge=0)
    revision_temperature: float | None = setting(None, "sampling temperature of revisions: null = temperature, "
                                                       "0 = greedy", ge=0)
    top_p: float = setting(0.95, "nucleus sampling: the smallest token set with this probability", gt=0, le=1)
    best_of: int = setting(1, "revisions sampled per round; above 1 the feedback model picks the best", ge=1)
    model: str | None = setting(None, "the model that answers, critiques and revises: null = the run's model, "
                                      "or a model spec or server:NAME", model_reference=True)

    @property
    def revision_sampling_temperature(self) -> float:
        return self.temperature if self.revision_temperature is None else self.revision_temperature

    ONLY_IF: ClassVar[dict] = dict.fromkeys(JUDGE_FIELDS, BEST_OF)  # the judge is opened only when best_of > 1


def config_problems(cfg: Config) -> list[tuple[str, str]]:
    """(key, message) for settings that cannot work together."""
    if cfg.best_of > 1 and cfg.revision_sampling_temperature == 0:
        return [("best_of", f"'critique.best_of' is {cfg.best_of} but revisions are greedy (revision temperature 0): "
                            f"all {cfg.best_of} candidates would be the same text; set best_of: 1 or a temperature "
                            f"above 0")]
    return []


def check_config(run, cfg: Config, trl: dict) -> list:
    return ([run.source.problem(("critique", key), message) for key, message in config_problems(cfg)]
            + judge_problems(run, "critique", cfg))


def hashed_config(cfg: Config, run) -> dict:
    """The settings that decide critique's results: the judge's only when best_of uses it."""
    return dataclasses.asdict(cfg) if cfg.best_of > 1 else hashed_without_judge(cfg)


_LABEL = re.compile(r"^\s*(revision|revised (answer|response)|new answer|answer)\s*:\s*", re.IGNORECASE)


_META = re.compile(r"^\W*(the|this|my|your) ((original|last|previous|revised|new|first|assistant's|ai's) ){0,2}"
                   r"(answer|response|reply|revision)\b", re.IGNORECASE)

# A revision is "copied" when at least COPY_SHARE of its word COPY_NGRAM-grams occur in
# the texts the model was shown (see `is_copied`). Measured on the demo's 64 SmolLM2-135M
# rounds (runs/demo before this rule): the pasted few-shot revisions and critiques
# scored 0.32-0.72 (some pasted an example's first sentences, then drifted), every other
# revision 0.13 or less.
COPY_NGRAM = 6
COPY_SHARE = 0.3


def clean_revision(text: str) -> str:
    """Drop a leading 'Revision:' label small models like to echo."""
    return _LABEL.sub("", text, count=1).strip()


def is_meta_revision(text: str) -> bool:
    """A 'revision' that talks about the answer ("The answer is not harmful...") instead of
    being one: small models often write these; training on them teaches commentary."""
    return bool(_META.match(text))


def is_copied(text: str, shown: Iterable[str], n: int = COPY_NGRAM, share: float = COPY_SHARE) -> bool:
    """A revision that pastes prompt text (a few-shot example's revision, the request,
    the system prompt) instead of answering.

    The rule: split into lowercase words (letters, digits, inner apostrophes); the
    revision is copied when at least `share` of its word n-grams (n consecutive words)
    occur in some shown text. A pasted example scores near 1, an example's opening
    sentences followed by drift about 0.3 or more; a real answer that quotes a few words
    of the request stays low, since a quoted run of L words covers only L - n + 1 of a
    W-word revision's W - n + 1 n-grams (quoting a whole 12-word request is a copy only
    in an answer under 28 words: mostly echo). A revision of fewer than n words is never
    called copied: too short to tell a copy from a stock phrase ("I can't help with that.")."""
    tokens = words(text)
    if len(tokens) < n:
        return False
    mine = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    seen: set[tuple[str, ...]] = set()
    for source in shown:
        seen |= ngrams(words(source), n)
    return sum(gram in seen for gram in mine) >= share * len(mine)


def drop_reason(revision: str, critique: str | None, answer: str, shown: Iterable[str],
                few_shot: SpanIndex | None = None) -> str | None:
    """Why a round's revision is not kept (None: it is): degenerate, unchanged, copied,
    leaked (it repeats a span of `few_shot`, the examples' answers) or meta, checked in
    that order."""
    if (critique is not None and is_degenerate(critique)) or is_degenerate(revision):
        return "degenerate"
    if revision.strip() == answer.strip():
        return "unchanged"
    if is_copied(revision, shown):
        return "copied"
    if few_shot is not None and few_shot.leaks(revision):
        return "leaked"
    if is_meta_revision(revision):
        return "meta"
    return None


DROP_REASONS = ("degenerate", "unchanged", "copied", "leaked", "meta")


def draw_principle(constitution, seed: int, prompt_id: str, round_index: int):
    """Seeded per prompt and round, so the draw does not depend on batching or resume."""
    return random.Random(f"{seed}:{prompt_id}:{round_index}").choice(constitution.critique_revision)


def feedback_principle(constitution, principle, seed: int, prompt_id: str, round_index: int):
    """The feedback principle best_of judges a round's candidates under: the one with the
    critique principle's id if the constitution has it, else one drawn (seeded per prompt
    and round)."""
    same = [p for p in constitution.feedback if p.id == principle.id]
    return same[0] if same else draw_principles(constitution, seed, f"critique:{prompt_id}:{round_index}", 1)[0]


def system_turns(constitution) -> list[dict]:
    return [{"role": "system", "content": constitution.system_prompt}] if constitution.system_prompt else []


def example_sets(constitution, n: int, rotation: bool = True) -> list[tuple[int, ...]]:
    """The sets of example indices prompts are given: the examples dealt in order into
    sets of n, the last wrapping round to the first (with `rotation`), or the first n."""
    pool = len(constitution.critique_examples)
    if n == 0 or pool == 0:
        return [()]
    if not rotation or n >= pool:
        return [tuple(range(min(n, pool)))]
    return [tuple((start + i) % pool for i in range(n)) for start in range(0, pool, n)]


def example_set(sets: list[tuple[int, ...]], seed: int, prompt_id: str) -> int:
    """The index of a prompt's example set: seeded per prompt, so batching and resume do not change it."""
    return random.Random(f"{seed}:{prompt_id}:few-shot").randrange(len(sets))


def few_shot_turns(constitution, n: int, critique: bool = True, examples: tuple[int, ...] | None = None) -> list[dict]:
    """The first n examples (or those of `examples`) as chat turns; without `critique`,
    each example is request, answer, revision request, revision (its critique request
    and critique left out)."""
    keep = range(6) if critique else (0, 1, 4, 5)
    chosen = range(min(n, len(constitution.critique_examples))) if examples is None else examples
    return [constitution.critique_examples[e].messages[i] for e in chosen for i in keep]


def revision_seed(chunk_seed: int, round_index: int, candidate: int) -> int:
    """Candidate 0 keeps the seed revisions always had; the others are spread far apart."""
    return chunk_seed + 2 * round_index + 2 + 100_000 * candidate


def pick_best(judge, constitution, seed: int, conversations: list[list[dict]], candidates: list[list[str]],
              principles: list) -> tuple[list[int], list[list]]:
    """The judge's pick among each row's candidates: a champion (the first) meets each
    challenger in order and the preferred one stays (a tie keeps the champion). Returns
    each row's winning index and its comparisons `[champion, challenger, P(champion better)]`."""
    winners = [0] * len(candidates)
    comparisons: list[list] = [[] for _ in candidates]
    for challenger in range(1, max(map(len, candidates), default=0)):
        rows = [i for i, texts in enumerate(candidates) if challenger < len(texts)]
        if not rows:
            continue
        judged = judge.compare_with(constitution, [conversations[i] for i in rows],
                                    [candidates[i][winners[i]] for i in rows],
                                    [candidates[i][challenger] for i in rows],
                                    [[principles[i]] for i in rows], seed=seed)
        for i, c in zip(rows, judged):
            comparisons[i].append([winners[i], challenger, c.p_first])
            if c.p_first < 0.5:
                winners[i] = challenger
    return winners, comparisons


def critique_chunk(chunk, generator: Engine, constitution, cfg: Config, seed: int, chunk_seed: int,
                   model_name: str, judge=None) -> list[dict]:
    """All K rounds for one chunk of prompts; returns their records. `judge` (a
    `cai.judge.judge.Judge`) is needed when `cfg.best_of` > 1."""
    if cfg.best_of > 1 and judge is None:
        raise ValueError("critique: best_of > 1 needs a judge")
    answer = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    revising = Sampling(cfg.max_new_tokens, cfg.revision_sampling_temperature, cfg.top_p)
    critic = Sampling(cfg.critique_max_new_tokens, cfg.temperature, cfg.top_p)
    system = system_turns(constitution) if cfg.system_prompt else []
    sets = example_sets(constitution, cfg.few_shot, cfg.few_shot_rotation)
    shots = [few_shot_turns(constitution, cfg.few_shot, cfg.critique, examples) for examples in sets]
    leak = few_shot_index(constitution)

    first = generator.generate([system + [{"role": "user", "content": p.text}] for p in chunk], answer,
                               seed=chunk_seed)
    records = [{"id": p.id, "prompt": p.text, "category": p.category, "initial_response": a.text,
                "rounds": [], "final_revision": a.text, "model": model_name, "seed": seed,
                "few_shot": list(sets[example_set(sets, seed, p.id)])}
               for p, a in zip(chunk, first)]
    live = []
    for record, a in zip(records, first):
        if is_degenerate(a.text):
            record["dropped"] = "degenerate initial answer"
        else:
            live.append(record)

    for round_index in range(cfg.num_revisions):
        principles = [draw_principle(constitution, seed, r["id"], round_index) for r in live]
        which = [sets.index(tuple(r["few_shot"])) for r in live]
        exchanges = [system + shots[w] + [{"role": "user", "content": r["prompt"]},
                                          {"role": "assistant", "content": r["final_revision"]}]
                     for r, w in zip(live, which)]
        critiques: list[str | None] = [None] * len(live)
        if cfg.critique:
            asked = [turns + [{"role": "user", "content": p.critique}] for turns, p in zip(exchanges, principles)]
            critiques = [c.text for c in generator.generate(asked, critic, seed=chunk_seed + 2 * round_index + 1)]
            exchanges = [turns + [{"role": "assistant", "content": c}] for turns, c in zip(asked, critiques)]
        revise = [turns + [{"role": "user", "content": p.revision}] for turns, p in zip(exchanges, principles)]
        sampled = [generator.generate(revise, revising, seed=revision_seed(chunk_seed, round_index, j))
                   for j in range(cfg.best_of)]
        candidates = [[clean_revision(s[i].text) for s in sampled] for i in range(len(live))]
        reasons = []
        for record, principle, critique, texts, w in zip(live, principles, critiques, candidates, which):
            shown = [turn["content"] for turn in system + shots[w]] + [record["prompt"], principle.revision]
            shown += [principle.critique] if cfg.critique else []
            reasons.append([drop_reason(t, critique, record["final_revision"], shown, leak) for t in texts])
        # best_of: the judge picks among the candidates that could be kept; with one or
        # none there is nothing to judge (none: the first candidate is recorded, not kept).
        valid = [[j for j, reason in enumerate(why) if reason is None] for why in reasons]
        chosen = [keep[0] if keep else 0 for keep in valid]
        contests = [i for i, keep in enumerate(valid) if len(keep) > 1]
        judged: dict[int, tuple] = {}
        if contests:
            under = {i: feedback_principle(constitution, principles[i], seed, live[i]["id"], round_index)
                     for i in contests}
            winners, comparisons = pick_best(judge, constitution, seed,
                                             [[{"role": "user", "content": live[i]["prompt"]}] for i in contests],
                                             [[candidates[i][j] for j in valid[i]] for i in contests],
                                             [under[i] for i in contests])
            for i, winner, compared in zip(contests, winners, comparisons):
                chosen[i] = valid[i][winner]
                judged[i] = (under[i].id, [[valid[i][a], valid[i][b], p] for a, b, p in compared])

        for i, (record, principle, critique) in enumerate(zip(live, principles, critiques)):
            text, reason = candidates[i][chosen[i]], reasons[i][chosen[i]]
            step = {"round": round_index + 1, "principle": principle.id,
                    "critique_request": principle.critique if cfg.critique else None, "critique": critique,
                    "revision_request": principle.revision, "revision": text, "kept": reason is None,
                    "dropped": reason}
            if cfg.best_of > 1:
                step.update(candidates=candidates[i], candidates_dropped=reasons[i], chosen=chosen[i])
                if i in judged:
                    step.update(feedback_principle=judged[i][0], comparisons=judged[i][1])
            record["rounds"].append(step)
            if reason is None:
                record["final_revision"] = text
    for record in live:
        record["num_revisions"] = sum(r["kept"] for r in record["rounds"])
    return records


def round_counts(records: list[dict]) -> dict:
    """What the manifest (and bench/critique_prompting.py) counts: prompts dropped for a
    degenerate first answer, rounds kept and not kept, by reason, and prompts whose
    final revision differs from their first answer."""
    rounds = [x for r in records for x in r["rounds"]]
    reasons = Counter(x["dropped"] for x in rounds if not x["kept"])
    counts = {"dropped_prompts": sum(1 for r in records if r.get("dropped")), "rounds": len(rounds),
              "kept_rounds": sum(x["kept"] for x in rounds), "dropped_rounds": sum(reasons.values())}
    counts.update({f"{reason}_rounds": reasons.get(reason, 0) for reason in DROP_REASONS})
    counts["revised_prompts"] = sum(1 for r in records if r["final_revision"] != r["initial_response"])
    return counts


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
    engine = OnFirstChunk(lambda: ctx.engine(model_name, cfg.batch_size))
    judge = OnFirstChunk(lambda: make_judge(ctx, cfg, cfg.batch_size))

    def work(index: int, chunk) -> dict:
        records = critique_chunk(chunk, engine(), constitution, cfg, ctx.run.seed, chunk_seed(ctx.run.seed, index),
                                 model_name, judge() if cfg.best_of > 1 else None)
        return {"records.jsonl": records}

    run_chunks(ledger, chunks, work, desc="critique")
    records = ledger.rows("records.jsonl")
    sft, prefs = training_sets(records)
    if not sft:  # sft would fail on an empty file, far from the cause: fail here, with it
        reasons = Counter(r["dropped"] for r in records if r.get("dropped"))
        raise RuntimeError(
            f"critique: no SFT rows: all {len(records)} prompts were dropped "
            f"({', '.join(f'{n} {reason}' for reason, n in reasons.items())}; see {ctx.dir / 'records.jsonl'}). "
            f"The model ({model_name}) gave no usable first answer: give it room (critique.max_new_tokens), "
            f"sample (critique.temperature above 0), or use a model that answers chat prompts; then run again "
            f"with --force (the settings changed)")
    atomic_write_jsonl(ctx.dir / "sft.jsonl", sft)
    atomic_write_jsonl(ctx.dir / "prefs.jsonl", prefs)
    leak = few_shot_index(constitution)
    counts = {"prompts": len(prompts), "records": len(records), **round_counts(records),
              "sft_rows": len(sft), "pref_rows": len(prefs), "model": model_name,
              "few_shot_sets": [list(s) for s in example_sets(constitution, cfg.few_shot, cfg.few_shot_rotation)],
              "few_shot_leakage": {"span_words": leak.n,
                                   "sft_targets": leak.share(r["messages"][-1]["content"] for r in sft),
                                   "chosen": leak.share(r["chosen"][-1]["content"] for r in prefs)}}
    if cfg.best_of > 1:
        counts["feedback_model"] = ctx.model_spec(cfg.feedback_model)
    judge, engine = judge.value, engine.value
    if judge is not None:
        counts.update(judge=judge.description, judge_comparisons_this_session=judge.comparisons,
                      judge_seconds_this_session=round(judge.seconds, 2))
    if engine is not None:
        counts.update(tokens_generated_this_session=engine.tokens_generated,
                      generation_seconds_this_session=round(engine.seconds, 2),
                      tokens_per_second=round(engine.tokens_per_second, 2))
    return counts
