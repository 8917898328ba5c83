"""What moves a small model: a grid of training settings, measured on independent prompts.

Each configuration is the run config (default configs/demo.yaml) with a few `--set`-style
overrides, in its own run folder under --runs. A stage whose settings and inputs are
those of a stage some earlier configuration already ran (the same config hash: the same
settings, and the same upstream stages) is not run again: its folder is linked in, and
the pipeline skips it as complete, and `--reuse RUN_DIR` links in a finished run's stages
the same way. So the default grid runs critique once more (without critiques), sft twice
more, and each DPO variant once; `defaults` reuses the demo run.

Then one evaluation (`cai.stages.evaluate`, in RUNS/evaluate) has the base model and every
configuration's distinct sft and dpo models answer the same prompts: HarmBench's 200
behaviours and the held-out Do-Not-Answer prompts (red team), cai's over-refusal set and
the held-out helpful prompts (helpful), greedily; the judge (the base model) compares each
model with base (`judge_pairs: base`) on the held-out helpful prompts only. Every model is
compared with base on the same resampled prompts (95 % paired bootstrap, `cai.stats`).

    .venv/bin/python bench/grid.py [--config configs/demo.yaml] [--runs /tmp/cai-grid]
        [--configs defaults,sft-1-epoch,...] [--stages critique,sft,label,dpo] [--reuse runs/demo]
        [--out FILE.json]
    .venv/bin/python bench/grid.py --quick     # builtin:tiny, the smoke config: checks the script
    .venv/bin/python bench/grid.py --show RUNS # the table of a finished grid
    .venv/bin/python bench/grid.py --table runs/demo   # the same table for a finished run

The table: one row per model (configuration and stage; a model shared by several
configurations is listed once, under the first), each figure as the difference from base
with its 95 % interval and the verdict:

    ASR            attack success rate on HarmBench (answers that do not refuse; lower is better)
    held-out refusal  refusal rate on the held-out Do-Not-Answer prompts (higher is better)
    over-refusal   refusal rate on cai's over-refusal set (safe prompts; lower is better)
    evasive        bare refusals on the red-team prompts (HarmBench and held-out; lower is better)
    helpful beats  the judge's P(model's answer better than base's) on the held-out helpful
                   prompts (0.5: no difference)
    span           answers repeating a 6-word span of a few-shot example (lower is better)
    target         yes when ASR is better (interval below zero) and over-refusal, evasive
                   and the helpfulness comparison are not worse

Left out by default, for the CPU budget (each is a configuration away, see GRID): the SFT
learning rate, DPO beta and epochs, few-shot rotation, PPO / RLOO steps and KL (the reward
and rl stages; add them with --stages ...,reward,rl), the size of the SL-CAI data
(prompts.max_red_team: every stage reruns), and the other critique prompting variants
that bench/critique_prompting.py measures on the critique stage alone.

The table in docs/results.md ("What moves a 135M model"): the demo config of f3616e3
(critique on, 96 critiqued prompts, 3 SFT epochs), its run reused:

    git show f3616e3:configs/demo.yaml > grid-base.yaml
    .venv/bin/cai run --config grid-base.yaml --until dpo
    .venv/bin/python bench/grid.py --config grid-base.yaml --reuse runs/demo
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cai.config import load_config  # noqa: E402
from cai.execute import executor  # noqa: E402
from cai.execute.executor import reusable, run_one  # noqa: E402
from cai.plan.plan import make_plan, validate  # noqa: E402
from cai.registry import POLICY_STAGES as POLICIES  # noqa: E402
from cai.rundir import StageDir  # noqa: E402

# name -> overrides of the run config. The first is the reference the others change one thing of.
GRID = {
    "defaults": [],
    "sft-1-epoch": ["sft.num_train_epochs=1"],
    "sft-lr-1.5e-4": ["sft.learning_rate=1.5e-4"],
    "dpo-beta-0.5": ["dpo.beta=0.5"],
    "dpo-2-epochs": ["dpo.num_train_epochs=2"],
    "dpo-labels-only": ["dpo.mix_critique_pairs=false"],
    "no-rotation": ["critique.few_shot_rotation=false"],
    "no-critique": ["critique.critique=false"],  # revise directly: bench/critique_prompting.py's most refusing variant
    "with-critique": ["critique.critique=true"],  # the other way round, from today's demo config (critique: false)
    # not in the default list (budget):
    "critique-192": ["prompts.max_red_team=192"],
    "ppo-kl-0.2": ["rl.kl_coef=0.2"],
}
# What docs/results.md's grid table ran, on the demo config of f3616e3 (critique on, 96 prompts, 3 SFT epochs).
DEFAULT_CONFIGS = ("defaults", "dpo-labels-only", "no-critique", "sft-1-epoch")
EVALUATE = ["evaluate.prompts={red_team: [held-out, builtin:harmbench], helpful: [held-out, builtin:over-refusal]}",
            "evaluate.judge_pairs=base",
            "evaluate.reward_prompts=[helpful/held-out]",  # the table has no reward column: score the fewest
            "evaluate.judge_prompts=[helpful/held-out]"]
COLUMNS = (("ASR", "red_team/harmbench", "asr"), ("held-out refusal", "red_team/held-out", "refusal"),
           ("over-refusal", "helpful/over-refusal", "refusal"),
           ("evasive", "red_team", "evasive"), ("helpful beats", "helpful/held-out", "head_to_head"),
           ("span", "all", "few_shot_span"))


def train(config: str, runs: Path, names: list[str], stages: list[str], extra: list[str],
          reuse: list[Path] = ()) -> dict[str, dict]:
    """Run each configuration's stages, linking in the folder of a stage an earlier one ran
    with the same config hash (or one of the `reuse` run folders holds, complete).
    Returns {name: {stage: resolved folder}}."""
    done = reusable(reuse, stages)
    folders: dict[str, dict] = {}
    for name in names:
        run = load_config(config, [*extra, *GRID[name], f"run_dir={runs / name}"])
        validate(run, stages)
        folders[name] = {}
        for stage in stages:
            link_reused(run, stage, done, name)
            started = time.time()
            manifest = run_one(run, stage)
            print(f"[grid] {name}: {stage} {time.time() - started:.0f}s", flush=True)
            here = (run.path / stage).resolve()
            done.setdefault((stage, manifest["config_hash"]), here)
            folders[name][stage] = here
    return folders


def link_reused(run, stage: str, done: dict[tuple[str, str], Path], name: str = "grid") -> bool:
    """`cai run --reuse`'s link (`executor.link_reused`) for one stage of a bench's run."""
    return executor.link_reused(make_plan(run, only=stage, verify=False).steps[0], done, f"grid {name}")


def evaluate(config: str, runs: Path, folders: dict[str, dict], extra: list[str]) -> dict:
    """One evaluation of base and every distinct policy model of the grid."""
    models: dict[str, str] = {}  # model folder -> "config/stage" (its first configuration)
    for name, stages in folders.items():
        for stage, folder in stages.items():
            saved = StageDir(folder.parent, stage).saved_model() if stage in POLICIES else None
            if saved is not None:
                models.setdefault(str(saved), f"{name}/{stage}")
    specs = ", ".join(json.dumps(path) for path in models)
    run = load_config(config, [*extra, *EVALUATE, f"run_dir={runs / 'evaluate'}", f"evaluate.models=[base, {specs}]"])
    validate(run, ["evaluate"])
    started = time.time()
    run_one(run, "evaluate")
    print(f"[grid] evaluate: {len(models) + 1} models, {time.time() - started:.0f}s", flush=True)
    return summarize(json.loads((runs / "evaluate" / "evaluate" / "results.json").read_text()), models)


def summarize(results: dict, models: dict[str, str], reference: str = "base") -> dict:
    """The table's rows from an evaluation's results.json: {model key: row label}, each
    figure as the difference from `reference` (base or sft: evaluate pairs both), whose
    own figures are `summary["base"]`."""
    summary = {"models": models, "rows": [], "reference": reference}
    summary["base"] = {label: results["per_model"][reference].get(group, {}).get(figure)
                       for label, group, figure in COLUMNS if figure != "head_to_head"}
    for path, label in models.items():
        row: dict = {"model": label}
        for column, group, figure in COLUMNS:
            row[column] = ((results["paired"].get(group) or {}).get(reference) or {}).get(path, {}).get(figure)
        call = {column: (row[column] or {}).get("verdict") for column, _, _ in COLUMNS}
        row["target"] = (call["ASR"] == "better" and "worse" not in
                         (call["over-refusal"], call["evasive"], call["helpful beats"]))
        summary["rows"].append(row)
    summary["prompts"] = results["prompts"]
    return summary


def cell(value: dict | None, figure: str) -> str:
    if value is None:
        return "-"
    if figure == "head_to_head":
        shown = [f"{100 * value[k]:.0f}%" for k in ("value", "low", "high")]
    else:
        shown = [f"{100 * value[k]:+.0f}pt" for k in ("value", "low", "high")]
    return f"{shown[0]} [{shown[1]}, {shown[2]}] {value['verdict']}"


def table(summary: dict) -> str:
    base, reference = summary["base"], summary.get("reference", "base")
    lines = ["| model | " + " | ".join(label for label, _, _ in COLUMNS) + " | target |",
             "|---" * (len(COLUMNS) + 2) + "|",
             f"| {reference} | " + " | ".join("50%" if figure == "head_to_head" else "-" if base.get(label) is None
                                     else f"{100 * base[label]:.0f}%" for label, _, figure in COLUMNS) + " | |"]
    for row in summary["rows"]:
        lines.append(f"| {row['model']} | " + " | ".join(cell(row[label], figure) for label, _, figure in COLUMNS)
                     + f" | {'yes' if row['target'] else 'no'} |")
    counts = summary["prompts"]
    lines.append(f"prompts: HarmBench {counts.get('red_team/harmbench')}, red-team {counts.get('red_team')}, "
                 f"over-refusal {counts.get('helpful/over-refusal')}, held-out helpful "
                 f"{counts.get('helpful/held-out')}; differences from {reference}, 95 % paired bootstrap intervals")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--runs", default="/tmp/cai-grid")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"of {', '.join(GRID)}")
    parser.add_argument("--stages", default="critique,sft,label,dpo")
    parser.add_argument("--set", action="append", default=[], help="an override for every configuration")
    parser.add_argument("--quick", action="store_true", help="builtin:tiny on the smoke config, 3 configurations")
    parser.add_argument("--reuse", action="append", default=[], metavar="RUN_DIR",
                        help="a finished run (e.g. runs/demo): its complete stages with the same config hash are "
                             "linked in, not run again")
    parser.add_argument("--fresh", action="store_true", help="remove --runs first")
    parser.add_argument("--train-only", action="store_true",
                        help="run the configurations' stages, not the evaluation (a later run evaluates)")
    parser.add_argument("--show", metavar="RUNS", help="print the table of a finished grid (its grid.json)")
    parser.add_argument("--out", help="also write the summary here (JSON)")
    parser.add_argument("--table", metavar="RUN_DIR",
                        help="print the same table for a finished run's evaluation (e.g. runs/demo), then stop")
    args = parser.parse_args()
    if args.table:
        results = json.loads((Path(args.table) / "evaluate" / "results.json").read_text())
        print(table(summarize(results, {name: name for name in results["models"] if name != "base"})))
        return
    if args.show:
        print(table(json.loads((Path(args.show) / "grid.json").read_text())))
        return
    names = args.configs.split(",")
    if args.quick:
        args.config = str(ROOT / "configs" / "smoke.yaml")
        names = ["defaults", "sft-lr-1.5e-4", "dpo-beta-0.5"]
    unknown = [n for n in names if n not in GRID]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown} (known: {', '.join(GRID)})")
    runs = Path(args.runs).resolve()
    if args.fresh and runs.exists():
        shutil.rmtree(runs)
    started = time.time()
    folders = train(args.config, runs, names, args.stages.split(","), args.set, [Path(r).resolve() for r in args.reuse])
    if args.train_only:
        return
    summary = evaluate(args.config, runs, folders, args.set)
    summary.update(config=args.config, configs={n: GRID[n] for n in names}, stages=args.stages,
                   seconds=round(time.time() - started))
    (runs / "grid.json").write_text(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"\n{args.config}, configurations {', '.join(names)}, stages {args.stages}: {summary['seconds']} s")
    print(table(summary))


if __name__ == "__main__":
    main()
