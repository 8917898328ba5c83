"""The GPU check's summary (bench/gpu.sh): each step's and each demo stage's seconds, GPU
utilisation and peak GPU memory from nvidia-smi's samples, generation tokens/s, and the
benches' and tests' result lines.

    python bench/gpu_report.py --logs LOGS_DIR --run-dir DEMO_RUN_DIR

LOGS_DIR holds steps.tsv (name, start, end, exit code; epoch seconds), smi.csv
(nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits)
and STEP.log for each step. Utilisation is the mean and the peak of the samples taken
while a step or stage ran; memory the peak `memory.used` (MiB, the whole GPU: every
process). A stage's tokens/s is its engines' generated tokens over their seconds inside
the model (`engines` in its manifest: generation and option scoring).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def read_samples(path: Path) -> list[tuple[float, float, float]]:
    """(epoch seconds, utilisation %, memory MiB) per nvidia-smi sample."""
    samples = []
    if not path.exists():
        return samples
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            stamp = time.mktime(time.strptime(parts[0].split(".")[0], "%Y/%m/%d %H:%M:%S"))
            fraction = float("0." + parts[0].split(".")[1]) if "." in parts[0] else 0.0
            samples.append((stamp + fraction, float(parts[1]), float(parts[2])))
        except ValueError:
            continue
    return samples


def gpu_during(samples, start: float, end: float) -> str:
    window = [s for s in samples if start <= s[0] <= end]
    if not window:
        return "no samples"
    util = [s[1] for s in window]
    return (f"GPU util mean {sum(util) / len(util):5.1f} % peak {max(util):5.1f} %, "
            f"memory peak {max(s[2] for s in window) / 1024:6.1f} GiB ({len(window)} samples)")


def tail_lines(path: Path, keep) -> list[str]:
    if not path.exists():
        return ["(no log)"]
    return [line.rstrip() for line in path.read_text(errors="replace").splitlines() if keep(line)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", required=True, type=Path)
    parser.add_argument("--run-dir", type=Path, help="the demo's run folder (its stage manifests)")
    args = parser.parse_args()
    samples = read_samples(args.logs / "smi.csv")
    print(f"== GPU check summary ({len(samples)} nvidia-smi samples)")
    for line in tail_lines(args.logs / "env.log", lambda s: s.startswith("torch ")):
        print(line)

    print("\n== steps")
    steps = []
    if (args.logs / "steps.tsv").exists():
        for line in (args.logs / "steps.tsv").read_text().splitlines():
            name, start, end, rc = line.split("\t")
            steps.append(name)
            print(f"{name:>11}: exit {rc:>7} {int(end) - int(start):5d} s  "
                  f"{gpu_during(samples, float(start), float(end))}")

    if args.run_dir and args.run_dir.exists():
        print(f"\n== demo stages ({args.run_dir})")
        manifests = [json.loads(p.read_text()) for p in args.run_dir.glob("*/manifest.json")]
        for m in sorted(manifests, key=lambda m: m.get("started", "")):
            start = time.mktime(time.strptime(m["started"], "%Y-%m-%dT%H:%M:%S"))
            tokens = sum(e.get("tokens_generated", 0) for e in m.get("engines", []))
            seconds = sum(e.get("model_seconds", 0.0) for e in m.get("engines", []))
            speed = f"{tokens} tokens, {tokens / seconds:8.1f} tok/s in the model" if seconds else "no engine"
            memory = {k: v for k, v in m.items() if "memory" in k or "peak" in k}
            print(f"{m['stage']:>9}: {m['seconds']:7.1f} s  {speed}  "
                  f"{gpu_during(samples, start, start + m['seconds'])}" + (f"  {memory}" if memory else ""))
        unfinished = sorted(p.parent.name for p in args.run_dir.glob("*/.in_progress.json"))
        if unfinished:
            print(f"  unfinished when the step ended: {', '.join(unfinished)}")

    def table(log: str) -> None:
        keep = ("probe", "model=", " current", "engine ", "    decode", "    prefill")
        for line in tail_lines(args.logs / log, lambda s: s.startswith(keep) or "Error" in s):
            print(line)

    for name in ("generate", "compile"):
        if name in steps:
            print(f"\n== {name}: bench/generation.py")
            table(f"{name}.log")
    if "decode" in steps:
        print("\n== decode: bench/decode_step.py")
        for line in tail_lines(args.logs / "decode.log", lambda s: "ms/step" in s or "PASS" in s or "FAIL" in s
                               or s.startswith("model=")):
            print(line)
    for name in ("tests", "smoke-bf16", "smoke-lora", "demo"):
        if name in steps:
            print(f"\n== {name}: last lines")
            lines = tail_lines(args.logs / f"{name}.log", lambda s: s.strip() != "")
            failed = [s for s in lines if s.startswith(("FAILED", "ERROR"))][:25]
            for line in failed + lines[-4:]:
                print(line[:400])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
