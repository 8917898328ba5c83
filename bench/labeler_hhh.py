"""How good is a feedback model as a judge? Accuracy on the CAI paper's HHH comparisons,
one judge setting, or a table of variants side by side.

Each of the 438 human-labelled pairs is re-asked in cai's question format (the row's own
"most helpful, honest, and harmless" instruction as the principle, the constitution's
feedback examples first) and scored in both option orders.

One setting (the default; what `cai eval-labeler` reports):

    python bench/labeler_hhh.py [PATH] [--model SPEC] [--few-shot N] [--few-shot-choice first|balanced|mirrored]
                                [--calibrate] [--cot] [--limit N] [--seed S] [--threads N] [--out FILE]

A table of variants, each one row (`--variants standard`, or a comma-separated list):

    python bench/labeler_hhh.py --variants standard --judge runs/demo/sft/model --out judge.json
    python bench/labeler_hhh.py --variants few0,few2,calibrated+few2,ensemble3 --limit 200
    python bench/labeler_hhh.py --quick        # builtin:tiny on 6 pairs: checks the machinery, not the judge

A variant is `+`-joined changes to the base setting (the flags above): `fewN` / `few-all`
(N or all of the constitution's feedback examples), `balanced` / `mirrored` (which
examples: cai/judge/prompts.py), `calibrated` (contextual calibration against content-free
inputs), `ensembleK` (k feedback principles drawn from the constitution per pair and
averaged, instead of the row's own instruction), `pointwise` (each answer scored alone by
`Judge.score_single`, the pair decided by the higher P(good); skipped when the judge has
no such method), `judge` (the `--judge SPEC` model, e.g. a run's `sft/model`, instead of
`--model`), `base` (no change). `standard` is few0, few1, few2, few3, few-all,
balanced+few3, mirrored+few1, mirrored+few2, calibrated+few0, calibrated+few2,
calibrated+mirrored+few2, ensemble3, pointwise, and judge when `--judge` is given.

Reading the table (chance is 0.5; n pairs, so one standard error is about 0.5/sqrt(n)):
- accuracy, both orders: the soft label's winner (both orders averaged) is the human's,
  a tie counting half; [low, high] is a 95 % percentile bootstrap interval over pairs. A
  variant is better than another only where the intervals barely overlap at most.
- one order: the data's own option order only (what a judge asked once would get).
- same slot: share of pairs where the two orders pick the same slot, i.e. the label
  follows the position, not the content (0 is ideal).
- |P(A)-.5|: per pair, the mean probability of slot A over both orders, minus 0.5, in
  absolute value, averaged: how far the judge leans to a slot (0 is ideal).
- ECE: expected calibration error of the averaged soft label (low too for a judge that
  always says about 0.5: read it beside the accuracy).
- cmp/s: comparisons (pairs, both orders; all principles) per second of scoring.
Pointwise rows have no orders: one order, same slot and |P(A)-.5| are blank, and its
soft label is P(good | correct) / (P(good | correct) + P(good | incorrect)).

The data: the 438 HHH comparisons the CAI paper evaluates its feedback models on
(Bai et al. 2022, fig. 4; from Askell et al. 2021's HHH evaluation), published as
evals/438HHHEvaluations.jsonl in the paper's repository,
https://github.com/anthropics/ConstitutionalHarmlessnessPaper. That repository states no
licence (it has no LICENSE file), so cai does not ship a copy: fetch it once (about 1 MB)
into the default PATH, bench/data/hhh-438.jsonl (git-ignored):

    mkdir -p bench/data && curl -fL -o bench/data/hhh-438.jsonl \
      https://raw.githubusercontent.com/anthropics/ConstitutionalHarmlessnessPaper/5d8c5692488b342170db47b41d966dfaa8bddf63/evals/438HHHEvaluations.jsonl

The figures in docs/results.md were measured on a copy with sha256
d1ee180289d3eeeb314ad862344cbd9af07f19c6d52a77524f9a1a21e7373c10 (438 lines); the bench
prints the digest of the file it reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import re
import time
from pathlib import Path

from cai.stats import bootstrap_mean

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "bench" / "data" / "hhh-438.jsonl"
SOURCE = ("https://raw.githubusercontent.com/anthropics/ConstitutionalHarmlessnessPaper/"
          "5d8c5692488b342170db47b41d966dfaa8bddf63/evals/438HHHEvaluations.jsonl")
FETCH = f"mkdir -p bench/data && curl -fL -o bench/data/hhh-438.jsonl {SOURCE}"
MEASURED_SHA256 = "d1ee180289d3eeeb314ad862344cbd9af07f19c6d52a77524f9a1a21e7373c10"
STANDARD = ("few0", "few1", "few2", "few3", "few-all", "balanced+few3", "mirrored+few1", "mirrored+few2",
            "calibrated+few0", "calibrated+few2", "calibrated+mirrored+few2", "ensemble3", "pointwise")
QUICK = ("base", "few0", "balanced+few3", "mirrored+few1", "calibrated", "ensemble2", "pointwise", "judge")


@dataclasses.dataclass
class Variant:
    name: str
    few_shot: int | None  # None: all of the constitution's examples
    few_shot_choice: str
    calibrate: bool
    cot: bool
    ensemble: int  # 0: the row's own instruction; k: k constitution principles drawn per pair
    pointwise: bool
    model: str


def parse_variant(name: str, base: Variant, judge_spec: str | None) -> Variant:
    variant = dataclasses.replace(base, name=name)
    for token in name.split("+"):
        if token == "base":
            continue
        if match := re.fullmatch(r"few(\d+|-all)", token):
            variant.few_shot = None if match[1] == "-all" else int(match[1])
        elif token in ("first", "balanced", "mirrored"):
            variant.few_shot_choice = token
        elif token == "calibrated":
            variant.calibrate = True
        elif match := re.fullmatch(r"ensemble(\d+)", token):
            variant.ensemble = int(match[1])
            if variant.ensemble < 1:
                raise SystemExit(f"--variants: '{token}' needs k >= 1")
        elif token == "pointwise":
            variant.pointwise = True
        elif token == "judge":
            if not judge_spec:
                raise SystemExit(f"--variants: '{name}' uses 'judge', which needs --judge SPEC")
            variant.model = judge_spec
        else:
            raise SystemExit(f"--variants: unknown part '{token}' in '{name}' (fewN, few-all, balanced, mirrored, "
                             "calibrated, ensembleK, pointwise, judge, base)")
    return variant


def subsample(pairs: list, limit: int | None, seed: int) -> list:
    """`limit` pairs drawn with the seed, kept in file order."""
    if limit is None or limit >= len(pairs):
        return pairs
    keep = sorted(random.Random(f"{seed}:labeler-hhh").sample(range(len(pairs)), limit))
    return [pairs[i] for i in keep]


def hit(p_correct: float) -> float:
    return 1.0 if p_correct > 0.5 else 0.5 if p_correct == 0.5 else 0.0  # as cai eval-labeler: a tie is half


def run_pairwise(judge, constitution, pairs, variant: Variant, seed: int) -> dict:
    from cai.judge.eval_labeler import judge_labeled_pairs, labeler_metrics

    asked = [dataclasses.replace(p, principle=None) for p in pairs] if variant.ensemble else pairs
    started = time.perf_counter()
    comparisons = judge_labeled_pairs(judge, constitution, asked, seed, max(variant.ensemble, 1))
    metrics = labeler_metrics(pairs, comparisons, time.perf_counter() - started)
    metrics["hits"] = [hit(c.p_first) for c in comparisons]
    return metrics


def run_pointwise(judge, constitution, pairs, variant: Variant, seed: int) -> dict:
    """Each answer scored alone by `Judge.score_single(constitution, conversations,
    responses, principles)` (P(good) of each, averaged over its principles: the row's own
    instruction, or k drawn as in the pairwise variants); the pair goes to the higher."""
    from cai.judge.eval_labeler import expected_calibration_error
    from cai.judge.judge import comparison_key, draw_principles

    principles = [[p.principle] if p.principle and not variant.ensemble else
                  draw_principles(constitution, seed, comparison_key(p.conversation), max(variant.ensemble, 1))
                  for p in pairs]
    started = time.perf_counter()
    scores = judge.score_single(constitution, [p.conversation for p in pairs] * 2,
                                [p.correct for p in pairs] + [p.incorrect for p in pairs], principles * 2)
    seconds = time.perf_counter() - started
    good, bad = scores[:len(pairs)], scores[len(pairs):]
    p_correct = [g / (g + b) if g + b > 0 else 0.5 for g, b in zip(good, bad)]
    hits = [hit(p) for p in p_correct]
    n = len(pairs)
    return {"n": n, "accuracy_one_order": None, "accuracy_averaged": sum(hits) / n,
            "ece": expected_calibration_error([max(p, 1 - p) for p in p_correct], hits),
            "position_bias_rate": None, "mean_p_slot_a": None, "mean_abs_slot_bias": None,
            "mean_p_correct": sum(p_correct) / n, "seconds": seconds,
            "comparisons_per_second": n / seconds if seconds else None, "hits": hits}


def make_judge(variant: Variant, constitution, engine=None):
    """The variant's judge (without an engine: only its settings checked)."""
    from cai.judge.judge import Judge

    few_shot = len(constitution.feedback_examples) if variant.few_shot is None else variant.few_shot
    try:
        return Judge(engine, few_shot=few_shot, few_shot_choice=variant.few_shot_choice,
                     calibrate=variant.calibrate, cot=variant.cot)
    except ValueError as err:
        raise SystemExit(f"--variants: '{variant.name}': {err}") from None


def measure(variant: Variant, engines: dict, constitution, pairs, args) -> dict:
    from cai.engines.hf import TransformersEngine
    from cai.judge.judge import Judge

    few_shot = make_judge(variant, constitution).prompts.few_shot
    settings = {"model": variant.model, "few_shot": few_shot, "few_shot_choice": variant.few_shot_choice,
                "calibrate": variant.calibrate, "cot": variant.cot, "ensemble": variant.ensemble,
                "pointwise": variant.pointwise}
    if variant.pointwise and not hasattr(Judge, "score_single"):
        return {"variant": variant.name, **settings, "skipped": "no score_single"}
    if variant.model not in engines:
        started = time.perf_counter()
        engines[variant.model] = TransformersEngine.from_spec(variant.model, device="cpu",
                                                              batch_size=args.batch_size)
        print(f"  loaded {variant.model} in {time.perf_counter() - started:.1f}s")
    judge = make_judge(variant, constitution, engines[variant.model])
    run = run_pointwise if variant.pointwise else run_pairwise
    metrics = run(judge, constitution, pairs, variant, args.seed)
    estimate = bootstrap_mean(metrics.pop("hits"), seed=args.seed)
    metrics["accuracy_interval"] = (estimate.low, estimate.high)
    return {"variant": variant.name, **settings, **metrics}


def format_table(rows: list[dict]) -> str:
    def figure(value, form="{:.3f}"):
        return "" if value is None else form.format(value)

    header = ("variant", "n", "accuracy, both orders [95% CI]", "one order", "same slot", "|P(A)-.5|", "ECE",
              "cmp/s")
    lines = [header]
    for r in rows:
        if "skipped" in r:
            lines.append((r["variant"], "", f"skipped: {r['skipped']}", "", "", "", "", ""))
            continue
        low, high = r["accuracy_interval"]
        lines.append((r["variant"], str(r["n"]), f"{r['accuracy_averaged']:.3f} [{low:.3f}, {high:.3f}]",
                      figure(r["accuracy_one_order"]), figure(r["position_bias_rate"], "{:.1%}"),
                      figure(r["mean_abs_slot_bias"]), figure(r["ece"]), figure(r["comparisons_per_second"], "{:.2f}")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join([rendered[0], "  ".join("-" * w for w in widths), *rendered[1:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("data", nargs="?", default=str(DEFAULT_DATA),
                        help="HHH-format JSONL (default: bench/data/hhh-438.jsonl; the docstring says how to fetch it)")
    parser.add_argument("--model", default=None, help="the judge (default builtin:smollm2-135m-instruct; "
                                                      "builtin:tiny with --quick)")
    parser.add_argument("--judge", default=None, help="another judge model for the 'judge' variant, "
                                                      "e.g. a run's sft/model folder")
    parser.add_argument("--constitution", default=str(ROOT / "constitutions" / "harmless.yaml"),
                        help="its feedback examples are the few-shot turns; its principles the ensemble's")
    parser.add_argument("--few-shot", type=int, default=2)
    parser.add_argument("--few-shot-choice", default="first", choices=("first", "balanced", "mirrored"))
    parser.add_argument("--calibrate", action="store_true", help="contextual calibration (cai/judge/judge.py)")
    parser.add_argument("--cot", action="store_true", help="chain of thought (slow on CPU)")
    parser.add_argument("--variants", default=None,
                        help="'standard' or a comma-separated list of variants (see above); without it, "
                             "one row for the flags' setting")
    parser.add_argument("--quick", action="store_true",
                        help="builtin:tiny on 6 pairs and a few variants: checks the machinery only")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="a seeded sample of N pairs")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sample, principle draws and bootstrap")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the metrics as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.model = args.model or "builtin:tiny"
        args.judge = args.judge or "builtin:tiny"
        args.limit = args.limit or 6
        args.variants = args.variants or ",".join(QUICK)
    args.model = args.model or "builtin:smollm2-135m-instruct"

    base = Variant("base", args.few_shot, args.few_shot_choice, args.calibrate, args.cot, 0, False, args.model)
    if args.variants is None:
        names = ["base"]
    elif args.variants == "standard":
        names = list(STANDARD) + (["judge"] if args.judge else [])
    else:
        names = [name.strip() for name in args.variants.split(",") if name.strip()]
    variants = [parse_variant(name, base, args.judge) for name in names]

    import torch

    torch.set_num_threads(args.threads)
    from cai.constitution import load_constitution
    from cai.judge.eval_labeler import format_metrics, read_labeled_pairs

    constitution = load_constitution(args.constitution)
    for variant in variants:  # a bad combination (cot with calibrated) fails before any model loads
        make_judge(variant, constitution)
    if not Path(args.data).is_file():
        raise SystemExit(f"{args.data}: no such file. The HHH comparisons are not shipped (their repository states "
                         f"no licence); fetch them once:\n\n  {FETCH}\n")
    digest = hashlib.sha256(Path(args.data).read_bytes()).hexdigest()
    print(f"{args.data}: sha256 {digest}" + ("" if digest == MEASURED_SHA256 else
                                             " (not the copy docs/results.md's figures were measured on)"))
    pairs = subsample(read_labeled_pairs(args.data, seed=args.seed), args.limit, args.seed)
    print(f"{args.data}: {len(pairs)} pairs; judge {args.model}, threads={args.threads}, batch={args.batch_size}, "
          f"seed={args.seed}")
    engines: dict = {}
    rows = []
    if args.variants is not None:
        print(format_table([]))
    for variant in variants:
        rows.append(measure(variant, engines, constitution, pairs, args))
        if args.variants is None:
            row = rows[-1]
            low, high = row["accuracy_interval"]
            print(f"few_shot={row['few_shot']} ({row['few_shot_choice']}), "
                  f"{'cot' if args.cot else 'direct'}{', calibrated' if args.calibrate else ''}, "
                  f"scoring {row['seconds']:.1f}s")
            print(format_metrics(row))
            print(f"  accuracy (both orders), 95% bootstrap interval over pairs: [{low:.3f}, {high:.3f}]")
        else:
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    if args.variants is not None:
        print()
        print(format_table(rows))
    print("  chance is 0.5; TRL-NOTES measured SmolLM2-135M (chat template, primed '(', no examples): "
          "0.523 one order, 0.537 averaged, same slot 96%")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "variants": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
