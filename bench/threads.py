"""How many torch threads to use on this machine: times generation and a training step at
1 and 2 threads (and more if asked), in one process, and prints ratios against 1 thread.

    .venv/bin/python bench/threads.py [--model builtin:smollm2-135m-instruct] [--threads 1 2]

With `--busy SECONDS`: what `threads: auto` saves when another process holds a core at
start-up. Stage-like work (`--stages` stages of `--steps` training steps each) runs three
times in one process: the baseline at the choice on the machine as it is; then, with a
process spinning on one core for the first SECONDS, the old rule (one probe at start-up,
kept for every stage) and the current one (`cai.models.choose_threads` at each stage's
start). It prints each run's seconds, threads per stage and ratio against the baseline.

    .venv/bin/python bench/threads.py --busy 20 --stages 4 --steps 6
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch

from cai import models
from cai.engines import Sampling
from cai.engines.hf import TransformersEngine
from cai.prompts import load_source


def time_generate(generator: TransformersEngine, conversations, repeats: int = 1) -> float:
    sampling = Sampling(max_new_tokens=32, temperature=0.7)
    start = time.perf_counter()
    for i in range(repeats):
        generator.generate(conversations, sampling, seed=i)
    return (time.perf_counter() - start) / repeats


def time_train_step(model, tokenizer, texts, repeats: int = 3) -> float:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()
    start = time.perf_counter()
    for _ in range(repeats):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return (time.perf_counter() - start) / repeats


def staged_work(model, tokenizer, texts, stages: int, steps: int, decide) -> tuple[float, list[int]]:
    """Seconds for `stages` stages of `steps` training steps, each stage's threads set by
    `decide(stage)` at its start (its cost included), and those thread counts."""
    chosen, start = [], time.perf_counter()
    for stage in range(stages):
        chosen.append(decide(stage))
        torch.set_num_threads(chosen[-1])
        time_train_step(model, tokenizer, texts, repeats=steps)
    return time.perf_counter() - start, chosen


def busy_start(model, tokenizer, texts, busy_seconds: float, stages: int, steps: int) -> None:
    """The old choice (once, at start-up) against the current one (each stage), each run
    with a core held busy for its first `busy_seconds` (see the module's docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from busy_core import held_core

    os.environ.pop("OMP_NUM_THREADS", None)  # `threads: auto` would read it instead of deciding
    cpus = models.usable_cpu_ids()
    if len(cpus) < 2:
        raise SystemExit("--busy needs two usable CPUs")
    time_train_step(model, tokenizer, texts, repeats=1)  # warm-up
    idle = models.choose_threads("auto")["threads"]
    baseline, _ = staged_work(model, tokenizer, texts, stages, steps, lambda stage: idle)

    def with_busy_start(decide) -> tuple[float, list[int]]:
        with held_core(cpus[-1]) as spinner:
            moment = threading.Timer(busy_seconds, spinner.kill)  # the busy moment ends
            moment.start()
            try:
                return staged_work(model, tokenizer, texts, stages, steps, decide)
            finally:
                moment.cancel()

    at_start: list[int] = []

    def once(stage: int) -> int:  # the old rule: one probe at start-up, no load, kept for the run
        if not at_start:
            at_start.append(models.fastest_count(models.probe_gflops(models.probe_counts())))
        return at_start[0]

    old = with_busy_start(once)
    new = with_busy_start(lambda stage: models.choose_threads("auto")["threads"])
    print(f"{stages} stages x {steps} training steps; a core held for the first {busy_seconds:g} s")
    print(f"baseline (machine as it is, {idle} threads): {baseline:7.1f} s")
    for name, (seconds, chosen) in (("old: decided once at start-up", old), ("new: decided at each stage", new)):
        print(f"{name:32s} {seconds:7.1f} s, threads per stage {chosen}, {seconds / baseline:4.2f}x the baseline")
    print(f"new / old: {new[0] / old[0]:4.2f}x the time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.SMOLLM2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--busy", type=float, default=None, metavar="SECONDS",
                        help="compare the thread choices with a core held busy for the first SECONDS")
    parser.add_argument("--stages", type=int, default=4, help="with --busy: stages per run")
    parser.add_argument("--steps", type=int, default=6, help="with --busy: training steps per stage")
    args = parser.parse_args()

    prompts = [p.text for p in load_source("builtin:helpful", "helpful")[: args.batch_size]]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    generator = TransformersEngine.from_spec(args.model, "cpu", args.batch_size)
    generator.tokenizer.padding_side = "right"
    if args.busy is not None:
        print(f"model={args.model} batch={args.batch_size}")
        busy_start(generator.model, generator.tokenizer, prompts, args.busy, args.stages, args.steps)
        return
    results = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        time_generate(generator, conversations[:2])  # warm-up at this thread count
        results[threads] = (time_generate(generator, conversations),
                            time_train_step(generator.model, generator.tokenizer, prompts))
    base_gen, base_train = results[args.threads[0]]
    print(f"model={args.model} batch={args.batch_size}")
    for threads, (gen_s, train_s) in results.items():
        print(f"threads={threads}: generate {gen_s:6.2f} s ({base_gen / gen_s:4.2f}x vs {args.threads[0]}), "
              f"train step {train_s:6.2f} s ({base_train / train_s:4.2f}x vs {args.threads[0]})")


if __name__ == "__main__":
    main()
