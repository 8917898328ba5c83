"""RL-CAI, AI feedback on pairs of answers (Bai et al. 2022, section 4.1).

The SL-CAI model answers each training prompt twice, with different seeds. A feedback
model then reads a multiple-choice question: the conversation, a principle drawn at
random from the constitution, and the two answers as options (A) and (B). The
normalised probabilities of the option tokens are a soft label: the probability that
one answer is better. Both option orders are asked and averaged, since small models
pick a slot more than an answer; k principles can be drawn and averaged (an ensemble).
With `feedback_cot`, the feedback model reasons step by step before answering, and its
probabilities are clamped to a band (the paper's 40-60 %). Against slot bias, the few-shot
examples can be chosen balanced or mirrored, and the probabilities calibrated against a
content-free question (`feedback_few_shot_choice`, `feedback_calibrate`: cai/judge/). Helpful
prompts are labelled too, as in the paper, so the preference model does not learn "refuse
everything".

Prompts are processed in fixed chunks of `batch_size` (sorted by length) through the
resumable chunk loop (`cai.chunks`): a chunk's preference rows (prefs.jsonl) and
dropped pairs (dropped.jsonl) are committed together when the chunk is done, so a
killed run resumes losing at most the chunk in flight, and produces exactly what an
uninterrupted run would. The policy and the judge are engines: weights in-process
or `server:NAME` (a judge server must return token log-probabilities, or opt into
`option_scoring: letter`, whose hard labels the manifest and report say).

`cai eval-labeler` (cai/judge/eval_labeler.py) measures this section's judge against human
labels.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass

from cai.chunks import ChunkLedger, OnFirstChunk, chunk_seed, chunked_by_length, run_chunks
from cai.engines import Engine, Sampling, is_degenerate
from cai.judge.settings import JudgeSettings, judge_problems, judge_scoring, make_judge, model_name
from cai.schema import setting


@dataclass
class Config(JudgeSettings):  # the judge: feedback_model (the paper's pretrained LM: base), feedback_few_shot, ...
    policy: str | None = setting(
        None, "who answers: null = the newest policy (sft, the SL-CAI model, in round 1; round k-1's rl, else dpo, "
              "in round k), base, another stage, a model spec or server:NAME", model_reference=True)
    include_helpful: bool = True  # label answers to the helpful training prompts too (as the paper)
    max_prompts: int | None = setting(None, "cap on prompts labelled (a seeded sample), null = all", ge=1)
    principles_per_comparison: int = setting(1, "k feedback principles drawn per pair; their labels are averaged",
                                             ge=1)
    batch_size: int = setting(64, "prompts per generation batch and resume chunk; questions per scoring batch",
                              ge=1)
    max_new_tokens: int = setting(128, "length of the policy's answers", ge=1)
    temperature: float = setting(1.0, "sampling temperature of the two answers (high: the pair differs)", ge=0)
    top_p: float = setting(0.95, "nucleus sampling: the smallest token set with this probability", gt=0, le=1)


def check_config(run, cfg: Config, trl: dict) -> list:
    return judge_problems(run, "label", cfg)


def training_prompts(ctx, cfg: Config) -> list:
    prompts = list(ctx.prompts.red_team_train) + (list(ctx.prompts.helpful_train) if cfg.include_helpful else [])
    if cfg.max_prompts is not None and cfg.max_prompts < len(prompts):
        keep = set(random.Random(f"{ctx.run.seed}:label").sample(range(len(prompts)), cfg.max_prompts))
        prompts = [p for i, p in enumerate(prompts) if i in keep]
    return prompts


def label_chunk(chunk, policy: Engine, judge, constitution, cfg: Config, seed: int, chunk_seed: int,
                names: dict) -> tuple[list[dict], list[dict]]:
    """Two answers per prompt, then the judge's soft label; returns preference rows and dropped pairs."""
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    conversations = [[{"role": "user", "content": p.text}] for p in chunk]
    answers_1 = policy.generate(conversations, sampling, seed=chunk_seed)
    answers_2 = policy.generate(conversations, sampling, seed=chunk_seed + 1)

    live, dropped = [], []
    for prompt, a, b in zip(chunk, answers_1, answers_2):
        reason = ("degenerate answer" if is_degenerate(a.text) or is_degenerate(b.text)
                  else "identical answers" if a.text == b.text else None)
        if reason:
            dropped.append({"id": prompt.id, "kind": prompt.kind, "reason": reason, "answers": [a.text, b.text]})
        else:
            live.append((prompt, a.text, b.text))

    comparisons = judge.compare(constitution, [[{"role": "user", "content": p.text}] for p, _, _ in live],
                                [a for _, a, _ in live], [b for _, _, b in live], seed=seed,
                                principles_per_comparison=cfg.principles_per_comparison)
    rows = []
    for (prompt, a, b), c in zip(live, comparisons):
        first_wins = c.p_first >= 0.5
        chosen, rejected = (a, b) if first_wins else (b, a)
        # Each order's probability, seen from the chosen answer (the other order of the pair).
        p_ab, p_ba = (c.p_order_ab, c.p_order_ba) if first_wins else (1 - c.p_order_ba, 1 - c.p_order_ab)
        row = {"prompt": [{"role": "user", "content": prompt.text}],
               "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}],
               "p_chosen": max(c.p_first, 1 - c.p_first), "p_order_ab": p_ab, "p_order_ba": p_ba,
               "principles": list(c.principles), "orders_disagree": bool(c.orders_disagree),
               "feedback_model": names["feedback_model"], "policy": names["policy"],
               "mode": "cot" if cfg.feedback_cot else "direct", "id": prompt.id, "kind": prompt.kind,
               "category": prompt.category, "source": "label"}
        if c.reasoning:
            row["reasoning"] = list(c.reasoning)
        rows.append(row)
    return rows, dropped


def run(ctx) -> dict:
    cfg: Config = ctx.config
    constitution = ctx.constitution
    prompts = training_prompts(ctx, cfg)
    ledger = ChunkLedger(ctx.dir.path, "label", ["prefs.jsonl", "dropped.jsonl"])
    policy = cfg.policy or ctx.newest_policy()
    names = {"policy": model_name(ctx, policy), "feedback_model": model_name(ctx, cfg.feedback_model)}
    engine = OnFirstChunk(lambda: ctx.engine(policy, cfg.batch_size))
    judge = OnFirstChunk(lambda: make_judge(ctx, cfg, cfg.batch_size))
    started = time.perf_counter()

    def work(index: int, chunk) -> dict:
        rows, dropped = label_chunk(chunk, engine(), judge(), constitution, cfg, ctx.run.seed,
                                    chunk_seed(ctx.run.seed, index), names)
        return {"prefs.jsonl": rows, "dropped.jsonl": dropped}

    ran = run_chunks(ledger, chunked_by_length(prompts, cfg.batch_size), work, desc="label")
    prefs, dropped = ledger.rows("prefs.jsonl"), ledger.rows("dropped.jsonl")
    if not prefs:  # reward and dpo would fail on an empty file, far from the cause: fail here, with it
        reasons = Counter(r["reason"] for r in dropped)
        raise RuntimeError(
            f"label: no comparisons: all {len(dropped)} answer pairs were dropped "
            f"({', '.join(f'{k} {reason}' for reason, k in reasons.items())}; see {ctx.dir / 'dropped.jsonl'}). "
            f"The policy ({cfg.policy}) gave no two usable, different answers: sample more widely "
            f"(label.temperature), give it room (label.max_new_tokens), or label with another policy; then run "
            f"again with --force (the settings changed)")
    n = len(prefs)
    counts = {"prompts": len(prompts), "comparisons": n, "dropped": len(dropped),
              "dropped_degenerate": sum(r["reason"] == "degenerate answer" for r in dropped),
              "dropped_identical": sum(r["reason"] == "identical answers" for r in dropped),
              "red_team_comparisons": sum(r["kind"] == "red_team" for r in prefs),
              "helpful_comparisons": sum(r["kind"] == "helpful" for r in prefs),
              "orders_disagree_rate": round(sum(r["orders_disagree"] for r in prefs) / n, 4) if n else None,
              "mean_p_chosen": round(sum(r["p_chosen"] for r in prefs) / n, 4) if n else None,
              "policy": names["policy"], "feedback_model": names["feedback_model"],
              "mode": "cot" if cfg.feedback_cot else "direct",
              "judge_scoring": judge_scoring(ctx.run, cfg.feedback_model),
              "chunks_this_session": ran,
              "seconds_this_session": round(time.perf_counter() - started, 2)}
    if judge.value is not None:
        judge, engine = judge.value, engine.value
        counts.update(judge=judge.description, comparisons_this_session=judge.comparisons,
                      feedback_seconds_this_session=round(judge.seconds, 2),
                      comparisons_per_second=round(judge.comparisons / judge.seconds, 3) if judge.seconds else None,
                      policy_tokens_per_second=round(engine.tokens_per_second, 2))
    return counts
