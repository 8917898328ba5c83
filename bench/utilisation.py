"""Utilisation per stage of a finished run: seconds, threads, useful work, achieved
GFLOP/s, the machine's matmul peak, the share of it and the padding share, read from
each step's manifest (`work`, cai.work).

    .venv/bin/python bench/utilisation.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cai.registry import step_folder
from cai.rundir import folder_steps
from cai.work import stage_rows


def number(value, form: str, scale: int = 1) -> str:
    return "–" if value is None else format(value * scale, form)


def table(run_dir: Path) -> str:
    manifests = {}
    for step in folder_steps(run_dir):
        path = run_dir / step_folder(step) / "manifest.json"
        if path.exists():
            manifests[step] = json.loads(path.read_text(encoding="utf-8"))
    lines = [f"{run_dir}", f"{'stage':12s} {'seconds':>8s} {'threads':>7s} {'TFLOP':>8s} {'GFLOP/s':>8s} "
                           f"{'peak':>8s} {'of peak':>8s} {'padding':>8s}"]
    for row in stage_rows(manifests):
        lines.append(f"{row['step']:12s} {number(row['seconds'], '8.1f')} {number(row['threads'], '7d')} "
                     f"{number(row['tflop'], '8.3f')} {number(row['gflops'], '8.1f')} "
                     f"{number(row['peak_gflops'], '8.1f')} {number(row['share_of_peak'], '7.1f', 100)} %"
                     f" {number(row['padding_share'], '7.1f', 100)} %")
    total = sum(row["seconds"] or 0 for row in stage_rows(manifests))
    lines.append(f"{'total':12s} {total:8.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    for run_dir in parser.parse_args().run_dirs:
        print(table(run_dir) + "\n")


if __name__ == "__main__":
    main()
