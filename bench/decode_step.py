"""Per-step cost of decoding: the engine's sampled and greedy `generate` against a bare
forward loop over the same batch, in one process.

What it measures. --prompts red-team prompts (builtin:donotanswer, a seeded sample) as
single-turn chats, in one left-padded batch of that many rows, each answered with
--max-new-tokens tokens. Three ways, each after a warm-up, best of --repeats:

- forward: a bare loop, no `generate`: the prefill, then one `model(...)` call per new
  token on a static key/value cache, the next token an argmax. The floor: what the model
  itself costs per step, plus the least host work a decode loop needs.
- greedy: `TransformersEngine.generate` at temperature 0 (transformers' greedy loop:
  logits copy, stopping criteria, input growth).
- sampled: the same at temperature 0.7, top_p 0.95 (the `NucleusSampler` on top).

A step is one forward call (counted with a hook on the model, so rows that stop early or
an engine that calls the model more or less often are counted as they are); per-step
time is a run's wall time over its forward calls. EOS is never produced early here:
every row is forced to run the full --max-new-tokens (builtin:tiny's random weights give
EOS rarely; the hook's count is what is divided by, whatever happens).

The issue-16 bound: sampled <= 1.5x greedy and greedy <= 1.3x forward, per step, with
builtin:tiny at batch 64, 64 new tokens, one thread (--check prints PASS or FAIL).
The decode bound: the rate of one decode step's own MLP matmul ([batch, hidden] x [hidden,
intermediate]) at the same threads; each mode's decode work (2·N per generated token fed
back, N the matmul parameters) over its time less the prefill's (the bare loop's prefill
alone, timed beside the modes), and that rate's share of the bound. With
--model builtin:smollm2-135m-instruct --prompts 64 --max-new-tokens 48 --threads 2 it is
shaped like the demo's evaluate (greedy answers, batch 64, 48 new tokens).
--profile prints torch.profiler's per-op table for one sampled run (self time per op; on
CUDA the device time beside the host time, so host-bound steps show as host time far
above device time).

    .venv/bin/python bench/decode_step.py [--model builtin:tiny] [--prompts 64]
        [--max-new-tokens 64] [--threads 1] [--device cpu] [--repeats 3] [--profile]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from cai import models
from cai.engines import Sampling
from cai.engines.hf import TransformersEngine
from cai.prompts import load_source
from cai.work import matmul_parameters

MODES = {"greedy": Sampling(temperature=0.0), "sampled": Sampling(temperature=0.7, top_p=0.95)}
SAMPLED_OVER_GREEDY, GREEDY_OVER_FORWARD = 1.5, 1.3  # issue 16's done-when bounds


class ForwardCounter:
    """Counts the model's forward calls (a forward pre-hook)."""

    def __init__(self, model):
        self.calls = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def forward_loop(engine: TransformersEngine, rows: list[list[int]], new_tokens: int) -> None:
    """The bare decode loop: prefill, then one forward per token on a static cache."""
    model = engine.model
    input_ids, attention = engine._pad_left(rows)
    cache = engine._generation_cache(None, len(rows), input_ids.shape[1] + new_tokens)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=1)
    ones = attention.new_ones(len(rows), 1)
    for _ in range(new_tokens - 1):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        positions = positions[:, -1:] + 1
        attention = torch.cat([attention, ones], dim=1)
        out = model(input_ids=token, attention_mask=attention, position_ids=positions, cache=cache, use_cache=True)
    out.logits[:, -1].argmax(-1)
    synchronize(model.device)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.TINY, help="model spec (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=64, help="rows in the batch (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode, best kept (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="picks the prompts (default: %(default)s)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table of one sampled run")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the issue-16 bounds hold")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    models.set_threads(args.threads)
    red_team = load_source("builtin:donotanswer", "red_team")
    prompts = random.Random(args.seed).sample(red_team, min(args.prompts, len(red_team)))
    conversations = [[{"role": "user", "content": p.text}] for p in prompts]
    options = models.ModelOptions(dtype=args.dtype)
    engine = TransformersEngine.from_spec(args.model, args.device, batch_size=len(conversations), options=options)
    engine.eos_ids = [engine.model.config.vocab_size]  # no token has this id: every row runs the full length
    counter = ForwardCounter(engine.model)
    rows = [engine.render(c) for c in conversations]
    device = engine.model.device

    def timed(run) -> tuple[float, int]:
        counter.calls = 0
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        return time.perf_counter() - start, counter.calls

    runs = {"forward": lambda: forward_loop(engine, rows, args.max_new_tokens)}
    for mode, sampling in MODES.items():
        sampling = Sampling(args.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p)
        runs[mode] = lambda s=sampling: engine.generate(conversations, s, seed=args.seed)
    for run in runs.values():  # warm-up
        run()
    per_step, best = {}, {}
    prefill = float("inf")  # the prefill alone: the bare loop with one new token
    for _ in range(args.repeats):  # interleaved, so a noisy moment hits every mode alike
        for mode, run in runs.items():
            seconds, steps = timed(run)
            per_step[mode] = min(per_step.get(mode, float("inf")), seconds / steps * 1e3)
            best[mode] = min(best.get(mode, float("inf")), seconds)
        prefill = min(prefill, timed(lambda: forward_loop(engine, rows, 1))[0])

    print(f"model={args.model} device={device} dtype={args.dtype} batch={len(rows)} "
          f"max_new_tokens={args.max_new_tokens} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"vocabulary={engine.model.config.vocab_size} best of {args.repeats}")
    for mode, ms in per_step.items():
        print(f"{mode:>8}: {ms:7.3f} ms/step  {len(rows) / ms * 1e3:9.0f} tok/s")
    # The decode bound: every matmul at the rate of a decode step's own MLP matmul ([rows,
    # hidden] x [hidden, intermediate]). Useful work: 2·N per token through the model; the
    # decode's are the answers' tokens but the last, its time a run's less the prefill's.
    config = engine.model.config.get_text_config()
    bound = models.gemm_gflops(len(rows), config.hidden_size, config.intermediate_size, 0.03,
                               getattr(torch, args.dtype), device)
    tokens = len(rows) * (args.max_new_tokens - 1)
    useful = 2 * matmul_parameters(engine.model) * tokens / 1e9
    print(f"decode bound: a ({len(rows)}, {config.hidden_size}, {config.intermediate_size}) matmul at "
          f"{bound:.1f} GFLOP/s; the prefill alone {prefill:.2f} s; the decode (2·N x {tokens} tokens, each run's "
          f"time less the prefill's): "
          + ", ".join(f"{mode} {useful / (seconds - prefill):.1f} GFLOP/s ({useful / (seconds - prefill) / bound:.0%})"
                      for mode, seconds in best.items()))
    sampled_ratio = per_step["sampled"] / per_step["greedy"]
    greedy_ratio = per_step["greedy"] / per_step["forward"]
    ok = sampled_ratio <= SAMPLED_OVER_GREEDY and greedy_ratio <= GREEDY_OVER_FORWARD
    print(f"sampled/greedy {sampled_ratio:.2f}x (bound {SAMPLED_OVER_GREEDY}x), greedy/forward {greedy_ratio:.2f}x "
          f"(bound {GREEDY_OVER_FORWARD}x): {'PASS' if ok else 'FAIL'}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            runs["sampled"]()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=20))
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    raise SystemExit(main())
