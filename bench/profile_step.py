"""Where one sft-shaped training step's time goes on a CPU, by torch operation.

One step of a causal LM (default: the demo's SmolLM2-135M-Instruct), shaped like the
demo's sft micro-batches: --rows rows of --tokens tokens, the first --prompt of each
unlabelled, activation checkpointing, cai's LM head (`cai.training.lm_head`) and AdamW.
After a warm-up step, two steps run under `torch.profiler`:

    .venv/bin/python bench/profile_step.py [--model builtin:smollm2-135m-instruct] [--threads 2]
        [--rows 8] [--tokens 145] [--prompt 60]

Prints the step's seconds and its useful rate (8·N per token: forward, backward and the
recomputed forward; N the matmul parameters), the operations with the largest share of
the CPU time, the share of the matrix multiplications and attention kernels, and the
matmul probe's rate at the same threads, measured in this process after the steps. With
every matmul at the probe's rate, the step's share of the probe is at most about the
matmuls' share of its time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cai import models
from cai.training.lm_head import plain_head_output
from cai.work import matmul_parameters

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=models.SMOLLM2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=145)
    parser.add_argument("--prompt", type=int, default=60, help="unlabelled tokens at the start of each row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile

    model = models.load_causal_lm(args.model, "cpu")
    model.train()
    model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.rows, args.tokens), generator=generator)
    labels = ids.clone()
    labels[:, :args.prompt] = -100

    def step() -> None:
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        mask = labels[:, 1:] != -100
        plain_head_output(hidden, model.get_output_embeddings(), labels[:, 1:], mask, 1.0).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    began = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
        step()
    seconds = (time.perf_counter() - began) / 2
    useful = 8 * matmul_parameters(model) * args.rows * args.tokens
    print(f"{args.model}, {args.threads} threads, {args.rows} x {args.tokens} tokens: {seconds:.2f} s per step "
          f"(under the profiler), {useful / seconds / 1e9:.1f} GFLOP/s useful (8·N per token)")
    events = profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"  {event.key:58s} {event.self_cpu_time_total / total:6.1%}  {event.count:6d} calls")
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    print(f"matrix multiplications and attention kernels: {matmul / total:.1%} of the CPU time")
    print(f"matmul probe at {args.threads} threads: {models.gemm_gflops(*models.PROBE_SHAPE, 0.03):.1f} GFLOP/s")


if __name__ == "__main__":
    main()
