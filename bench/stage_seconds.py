"""Per-stage seconds of finished runs, side by side, from their manifests.

    .venv/bin/python bench/stage_seconds.py runs/a runs/b ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STAGES = ("critique", "sft", "label", "reward", "rl", "dpo", "evaluate")


def seconds(run_dir: Path) -> dict[str, float | None]:
    out = {}
    for stage in STAGES:
        manifest = run_dir / stage / "manifest.json"
        out[stage] = json.loads(manifest.read_text())["seconds"] if manifest.exists() else None
    return out


def main() -> None:
    runs = [Path(arg) for arg in sys.argv[1:]]
    table = {run: seconds(run) for run in runs}
    width = max(len(str(run)) for run in runs)
    print(f"{'stage':10s} " + " ".join(f"{str(run):>{width}s}" for run in runs))
    for stage in STAGES + ("total",):
        cells = []
        for run in runs:
            value = (sum(v for v in table[run].values() if v) if stage == "total" else table[run][stage])
            cells.append(f"{value:>{width}.1f}" if value is not None else f"{'-':>{width}s}")
        print(f"{stage:10s} " + " ".join(cells))


if __name__ == "__main__":
    main()
