"""Critique-stage prompting variants on the same prompts: how often a small model writes a
real revision, and whether the revisions are better than the first answers.

What it measures. The run config's critique section (default configs/demo.yaml: the
demo's settings) is the baseline; each variant changes one thing:

    baseline          the config as it is
    few_shot_0/1/2    that many constitution examples first (one equal to the baseline
                      is not run again: its row says "= baseline")
    no_critique       critique: false (revise directly; the examples lose their critiques)
    no_system_prompt  system_prompt: false
    greedy_revisions  revision_temperature: 0
    best_of_2         best_of: 2 (the base model judges the two candidates)

Each variant runs the stage's own chunk function (`cai.stages.critique.critique_chunk`,
with the stage's chunks and seeds) on the same seeded sample of red-team training
prompts (the run config's prompt source and split; with configs/demo.yaml and the
defaults, exactly the demo's 32 training prompts), then an effect proxy scores it:
the judge (the base model: --model, `cai.judge.judge.Judge`, both option orders) gives
P(final revision better than the first answer) per prompt under k harmlessness
feedback principles (drawn per prompt, the same draws for every variant; their
probabilities averaged). A prompt whose final revision is its first answer (no round
kept, or its first answer was degenerate) scores 0.5 without asking: the two orders of
a question about two identical answers average to exactly 0.5. With --reward-model
PATH the proxy is instead the reward model's score of the final revision minus that of
the first answer. The interval is a percentile bootstrap over prompts (--resamples).

How to run (an otherwise idle machine; SmolLM2 on 2 CPU cores takes minutes per
variant):

    .venv/bin/python bench/critique_prompting.py [--config configs/demo.yaml]
        [--model builtin:smollm2-135m-instruct] [--prompts 32] [--seed 0]
        [--variants baseline,few_shot_0,...] [--judge-principles 3] [--judge-few-shot 1]
        [--feedback-principles less-dangerous,...] [--reward-model PATH] [--out FILE.json]
    .venv/bin/python bench/critique_prompting.py --quick   # builtin:tiny, 4 prompts: checks the script

How to read it. One row per variant. Rates are over the variant's critique rounds
(prompts x num_revisions, less prompts dropped for a degenerate first answer): kept
(the revision became the answer), and why the others were not kept: degenerate,
unchanged (the answer itself again), copied (mostly prompt text: the few-shot
examples, the requests, the system prompt; `cai.stages.critique.is_copied`), leaked (6
words in a row of any few-shot example's answer, critique or revision; `cai.leakage`) or meta (a
comment on the answer). "refusals" counts the prompts whose first answer, then final
revision, is a refusal (`cai.refusals`: a harmlessness proxy that needs no judge; more is
not better on its own, read it beside the effect). "revised" is the share of prompts whose final revision differs
from their first answer: the SFT targets that are not just the first answer again.
"seconds" is the variant's wall time (generation, and best_of's judging). "P(better)"
is the mean effect proxy with its 95 % interval: above 0.5 with the interval clear of
0.5, the judge prefers that variant's revisions to the first answers; compare variants
by their intervals (the prompts are the same, so overlapping intervals mean no
measured difference). The 135M judge sits near 0.5 with position bias: a reward model
from a run (--reward-model runs/demo/reward/model) is a second opinion, not ground truth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cai import models  # noqa: E402
from cai.chunks import chunk_seed, chunked_by_length  # noqa: E402
from cai.config import load_config  # noqa: E402
from cai.constitution import load_constitution  # noqa: E402
from cai.engines import Sampling, open_engine  # noqa: E402
from cai.judge.judge import Judge  # noqa: E402
from cai.plan.sections import parse_section  # noqa: E402
from cai.prompts import load_splits  # noqa: E402
from cai.refusals import is_refusal  # noqa: E402
from cai.stages import critique  # noqa: E402
from cai.stats import bootstrap_mean  # noqa: E402

VARIANTS = {
    "baseline": {},
    "few_shot_0": {"few_shot": 0},
    "few_shot_1": {"few_shot": 1},
    "few_shot_2": {"few_shot": 2},
    "no_critique": {"critique": False},
    "no_system_prompt": {"system_prompt": False},
    "greedy_revisions": {"revision_temperature": 0.0},
    "best_of_2": {"best_of": 2},
}
# The harmless constitution's feedback principles about harm (not helpfulness, accuracy
# or overall quality): the judge's questions for the effect proxy.
HARMLESSNESS = ("less-dangerous", "less-criminal", "less-violent", "less-toxic", "less-discriminatory",
                "fewer-stereotypes", "child-appropriate", "less-deceptive", "respects-privacy", "self-harm-care",
                "appropriately-cautious", "no-explicit-content", "fair-persuasion", "kinder", "more-ethical")
QUICK = {"config": str(ROOT / "configs" / "smoke.yaml"), "model": models.TINY, "prompts": 4, "resamples": 200}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"),
                        help="run config whose critique section is the baseline (default: %(default)s)")
    parser.add_argument("--model", default=models.SMOLLM2, help="policy and judge (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=32, help="red-team training prompts (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the run seed: prompts, sampling, draws (default: 0)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--judge-principles", type=int, default=3,
                        help="k harmlessness principles per prompt for the effect proxy (default: %(default)s)")
    parser.add_argument("--judge-few-shot", type=int, default=1,
                        help="the judge's feedback examples (default: %(default)s, as configs/demo.yaml's evaluate)")
    parser.add_argument("--feedback-principles", default=",".join(HARMLESSNESS),
                        help="feedback principle ids the effect proxy draws from (default: the harmless ones)")
    parser.add_argument("--reward-model", help="score the effect with this reward model instead of the judge")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch threads (default: the run config's)")
    parser.add_argument("--out", help="write the settings, the rows and every variant's records to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: configs/smoke.yaml, builtin:tiny, 4 prompts (options given still win)")
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    if args.prompts < 1 or args.judge_principles < 1 or args.resamples < 1:
        parser.error("--prompts, --judge-principles and --resamples must be at least 1")
    return args


def run_variant(cfg, prompts, engine, judge_engine, constitution, seed: int, model: str) -> tuple[list[dict], float]:
    """The critique stage's chunk loop without the ledger: the same chunks, seeds and records."""
    judge = Judge(judge_engine, few_shot=cfg.feedback_few_shot) if cfg.best_of > 1 else None
    began, records = time.perf_counter(), []
    for index, (_, chunk) in enumerate(chunked_by_length(prompts, cfg.batch_size)):
        records += critique.critique_chunk(chunk, engine, constitution, cfg, seed,
                                           chunk_seed(seed, index), model, judge)
    return records, time.perf_counter() - began


def judged_effect(records: list[dict], judge: Judge, constitution, draws: dict, seed: int) -> list[float]:
    """P(final revision better than the first answer) per record; 0.5 where they are the same text."""
    changed = [r for r in records if r["final_revision"] != r["initial_response"]]
    comparisons = judge.compare_with(constitution, [[{"role": "user", "content": r["prompt"]}] for r in changed],
                                     [r["final_revision"] for r in changed], [r["initial_response"] for r in changed],
                                     [draws[r["id"]] for r in changed], seed=seed) if changed else []
    p = {r["id"]: c.p_first for r, c in zip(changed, comparisons)}
    return [p.get(r["id"], 0.5) for r in records]


def reward_effect(records: list[dict], scorer) -> list[float]:
    """Reward of the final revision minus reward of the first answer, per record."""
    conversations = [[{"role": "user", "content": r["prompt"]}] for r in records]
    final = scorer.score(conversations, [r["final_revision"] for r in records])
    first = scorer.score(conversations, [r["initial_response"] for r in records])
    return [a - b for a, b in zip(final, first)]


def main() -> None:
    args = parse_args()
    # run_dir is required but unused: the bench writes nothing there.
    run = load_config(args.config, [f"run_dir={Path(tempfile.gettempdir()) / 'cai-bench-prompting'}",
                                    f"model={args.model}", f"seed={args.seed}", f"prompts.max_red_team={args.prompts}"])
    base_cfg = parse_section(run, "critique").config
    models.set_threads(args.threads or run.threads)
    constitution = load_constitution(run.constitution_path())
    prompts = load_splits(run.prompts, run.seed, run.source).red_team_train
    pool = [p.strip() for p in args.feedback_principles.split(",") if p.strip()]
    known = {p.id: p for p in constitution.feedback}
    missing = [p for p in pool if p not in known]
    if missing:
        sys.exit(f"--feedback-principles: {', '.join(missing)} not in {constitution.path} "
                 f"(its feedback ids: {', '.join(known)})")
    draws = {p.id: random.Random(f"{args.seed}:{p.id}:effect").sample([known[i] for i in pool],
                                                                       min(args.judge_principles, len(pool)))
             for p in prompts}

    configs = {}
    for name in args.variants.split(","):
        cfg = dataclasses.replace(base_cfg, **VARIANTS[name])
        problems = critique.config_problems(cfg)
        if problems:
            sys.exit(f"variant {name}: " + "; ".join(message for _, message in problems))
        configs[name] = cfg

    model_spec = base_cfg.model or run.model
    engines = {model_spec: open_engine(model_spec, run, base_cfg.batch_size)}

    def engine_of(reference: str):
        """An engine per model, opened once (`base` is the run's model, as in the stage)."""
        spec = run.model if reference == "base" else reference
        if spec not in engines:
            engines[spec] = open_engine(spec, run, base_cfg.batch_size)
        return engines[spec]

    warm_up = [[{"role": "user", "content": "Hello"}]]
    engines[model_spec].generate(warm_up, Sampling(max_new_tokens=4), seed=99)  # not timed in the first variant
    results: dict[str, dict] = {}
    for name, cfg in configs.items():
        same = next((other for other, done in results.items() if configs[other] == cfg), None)
        if same is not None:
            results[name] = {**results[same], "same_as": same}
            continue
        records, seconds = run_variant(cfg, prompts, engines[model_spec], engine_of(cfg.feedback_model),
                                       constitution, run.seed, model_spec)
        results[name] = {"records": records, "seconds": seconds, "counts": critique.round_counts(records)}
        print(f"[bench] {name}: {seconds:.1f} s", flush=True)

    if args.reward_model:
        from cai.training.models import RewardScorer

        scorer = RewardScorer.from_path(args.reward_model, device=run.device, batch_size=base_cfg.batch_size)
        proxy = f"reward({args.reward_model}): final revision minus first answer"

        def effect(records: list[dict]) -> list[float]:
            return reward_effect(records, scorer)
    else:
        judge = Judge(engine_of("base"), few_shot=args.judge_few_shot)
        proxy = (f"judge({run.model}, both orders, {args.judge_principles} of {len(pool)} harmlessness principles): "
                 f"P(final revision better than first answer)")

        def effect(records: list[dict]) -> list[float]:
            return judged_effect(records, judge, constitution, draws, run.seed)

    rows = []
    for name, result in results.items():
        result["effect"] = results[result["same_as"]]["effect"] if "same_as" in result else effect(result["records"])
        values = result["effect"]
        estimate = bootstrap_mean(values, args.resamples, args.seed)
        low, high = estimate.low, estimate.high
        counts, rounds = result["counts"], max(result["counts"]["rounds"], 1)
        rows.append({"variant": name, "overrides": VARIANTS[name], "same_as": result.get("same_as"),
                     "prompts": len(result["records"]), "rounds": counts["rounds"],
                     "kept": counts["kept_rounds"] / rounds,
                     "revised": counts["revised_prompts"] / max(len(result["records"]), 1),
                     **{reason: counts[f"{reason}_rounds"] / rounds for reason in critique.DROP_REASONS},
                     "refusals_first": sum(is_refusal(r["initial_response"]) for r in result["records"]),
                     "refusals_final": sum(is_refusal(r["final_revision"]) for r in result["records"]),
                     "seconds": result["seconds"], "effect": estimate.value, "effect_low": low,
                     "effect_high": high})

    print(f"model={model_spec} config={args.config} prompts={len(prompts)} seed={args.seed} "
          f"rounds/prompt={base_cfg.num_revisions} batch={base_cfg.batch_size}")
    print(f"baseline critique settings: {json.dumps(dataclasses.asdict(base_cfg))}")
    print(f"effect proxy: {proxy}; 95 % bootstrap interval over prompts ({args.resamples} resamples)")
    print(f"{'variant':18s} {'kept':>6s} {'revised':>7s} {'degen':>6s} {'unchgd':>6s} {'copied':>6s} "
          f"{'leaked':>6s} {'meta':>6s} {'refusals':>9s} {'seconds':>8s}  effect [95 % interval]")
    for r in rows:
        note = f"  (= {r['same_as']})" if r["same_as"] else ""
        print(f"{r['variant']:18s} {r['kept']:6.1%} {r['revised']:7.1%} {r['degenerate']:6.1%} {r['unchanged']:6.1%} "
              f"{r['copied']:6.1%} {r['leaked']:6.1%} {r['meta']:6.1%} "
              f"{r['refusals_first']:4d}->{r['refusals_final']:<3d} "
              f"{r['seconds']:8.1f}  {r['effect']:.3f} "
              f"[{r['effect_low']:.3f}, {r['effect_high']:.3f}]{note}")

    if args.out:
        report = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "model": model_spec,
                  "baseline_config": dataclasses.asdict(base_cfg), "effect_proxy": proxy, "rows": rows,
                  "records": {name: result["records"] for name, result in results.items() if "same_as" not in result},
                  "effects": {name: result["effect"] for name, result in results.items() if "same_as" not in result}}
        with open(args.out, "w") as file:
            json.dump(report, file, indent=2, ensure_ascii=False)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
