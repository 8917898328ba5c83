"""Per-stage seconds of one run config under two code trees, stage by stage, interleaved.

Each stage of the config runs first with the baseline tree's code, then with this tree's
(`python -m cai STAGE --config CONFIG` in each tree's root, so each tree imports its own
`cai` and reads its own copy of CONFIG: the same work with each tree's defaults), each
tree in its own run folder. Interleaving puts both trees' runs of a stage minutes apart,
so a machine that gets busier or quieter during the benchmark shifts both alike.

    git worktree add /tmp/cai-base HEAD~3          # the code to compare against
    .venv/bin/python bench/stages.py --baseline /tmp/cai-base [--config configs/demo.yaml]
        [--stages critique,sft,...] [--set KEY=VALUE ...] [--runs /tmp/cai-stages] [--out FILE.json]
    .venv/bin/python bench/stages.py --quick       # smoke config, this tree against itself: checks the script
    .venv/bin/python bench/stages.py --show runs/a runs/b ...   # finished runs' seconds side by side

Prints one row per stage: the stage's own seconds (its manifest's `seconds`: model loads,
work and writes, without the interpreter's start) for the baseline and this tree, and
their ratio (this tree's time over the baseline's; below 1.00 this tree is faster), then
the totals, and the wall seconds of each `python -m cai` process (start-up included).
The baseline's folder is BASELINE/RUNS/baseline, this tree's RUNS/current; both are
removed first, so every stage runs from scratch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cai.registry import ORDER as STAGES  # noqa: E402 - this tree's stage list


def run_stage(tree: Path, python: str, stage: str, config: str, run_dir: Path, sets: list[str]) -> dict:
    command = [python, "-m", "cai", stage, "--config", config, "--set", f"run_dir={run_dir}"]
    for item in sets:
        command += ["--set", item]
    began = time.perf_counter()
    done = subprocess.run(command, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - began
    if done.returncode:
        sys.exit(f"{stage} failed in {tree} (exit {done.returncode}):\n{done.stderr[-3000:]}")
    manifest = json.loads((run_dir / stage / "manifest.json").read_text())
    return {"seconds": manifest["seconds"], "wall": round(wall, 2), "threads": manifest.get("threads")}


def stages_of(tree: Path, config: str) -> list[str]:
    """The stages `cai run` would run for this config (a dpo section adds dpo)."""
    import yaml

    data = yaml.safe_load((tree / config).read_text()) or {}
    return [s for s in STAGES if s != "dpo" or "dpo" in data]


def show(runs: list[Path]) -> None:
    """Finished runs' per-stage seconds (their manifests), side by side."""
    table = {}
    for run in runs:
        manifests = {stage: run / stage / "manifest.json" for stage in STAGES}
        table[run] = {stage: json.loads(path.read_text())["seconds"] if path.exists() else None
                      for stage, path in manifests.items()}
    width = max(len(str(run)) for run in runs)
    print(f"{'stage':10s} " + " ".join(f"{str(run):>{width}s}" for run in runs))
    for stage in STAGES + ("total",):
        values = [sum(v for v in table[run].values() if v) if stage == "total" else table[run][stage] for run in runs]
        print(f"{stage:10s} " + " ".join(f"{v:>{width}.1f}" if v is not None else f"{'-':>{width}s}" for v in values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--show", nargs="+", type=Path, metavar="RUN", help="print finished runs' seconds and stop")
    parser.add_argument("--baseline", type=Path, help="root of the code tree to compare against")
    parser.add_argument("--config", default="configs/demo.yaml", help="relative to each tree's root")
    parser.add_argument("--stages", default=None, help="comma-separated; default: what `cai run` runs")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE for both trees")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/cai-stages"), help="run folders go here")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="configs/smoke.yaml, this tree against itself")
    args = parser.parse_args()
    if args.show:
        return show(args.show)
    if args.quick:
        args.baseline, args.config = args.baseline or ROOT, "configs/smoke.yaml"
    if args.baseline is None:
        parser.error("--baseline is required (or --quick)")
    trees = {"baseline": args.baseline.resolve(), "current": ROOT}
    stages = args.stages.split(",") if args.stages else stages_of(ROOT, args.config)
    folders = {name: args.runs / name for name in trees}
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)

    rows = []
    for stage in stages:
        row = {"stage": stage}
        for name, tree in trees.items():
            row[name] = run_stage(tree, args.python, stage, args.config, folders[name], args.sets)
        row["ratio"] = round(row["current"]["seconds"] / row["baseline"]["seconds"], 3)
        rows.append(row)
        print(f"{stage:9s} baseline {row['baseline']['seconds']:8.1f}s  current {row['current']['seconds']:8.1f}s  "
              f"ratio {row['ratio']:.2f}  (threads {row['current']['threads']})", flush=True)
    total = {name: round(sum(r[name]["seconds"] for r in rows), 1) for name in trees}
    wall = {name: round(sum(r[name]["wall"] for r in rows), 1) for name in trees}
    print(f"{'total':9s} baseline {total['baseline']:8.1f}s  current {total['current']:8.1f}s  "
          f"ratio {total['current'] / total['baseline']:.2f}")
    print(f"{'wall':9s} baseline {wall['baseline']:8.1f}s  current {wall['current']:8.1f}s  "
          f"ratio {wall['current'] / wall['baseline']:.2f}  (processes, start-up included)")
    if args.out:
        Path(args.out).write_text(json.dumps({"trees": {k: str(v) for k, v in trees.items()}, "config": args.config,
                                              "rows": rows, "total": total, "wall": wall}, indent=2) + "\n")


if __name__ == "__main__":
    main()
