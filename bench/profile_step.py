"""Where one training step's time goes on a CPU, by torch operation: sft, reward or dpo.

One optimizer step of the demo's training stages (configs/demo.yaml) on the demo's model
(SmolLM2-135M-Instruct), its micro-batches shaped like the demo's:

- sft: 8 rows of 145 tokens, the first 60 of each unlabelled (the prompt); cai's LM head
  (`cai.training.lm_head`) on the labelled positions; one micro-batch per step.
- reward: 8 rows (4 pairs) of 150 tokens under a one-output sequence-classification head,
  the soft-label loss (`cai.training.soft_labels`); 2 micro-batches per step.
- dpo: 2 rows (one pair) of 180 tokens, the first 60 the prompt, the sigmoid DPO loss
  on the completions' summed log-probs through cai's LM head (the reference log-probs are
  precomputed in the stage, so constants here); 8 micro-batches per step.

Activations are kept (the demo's `activation_checkpointing: auto` keeps them at these
sizes); --checkpointing recomputes them. --padding-free (sft) puts the micro-batch's real
tokens, rows x tokens x (1 - --padding, the demo's sft padding share), in one row of
`rows` sequences with position ids and no attention mask, as TRL's `padding_free`
collates them (transformers then masks attention to each sequence). AdamW (fused, the
trainers' default) updates every weight once per step. After a warm-up step, two steps
run under `torch.profiler`:

    .venv/bin/python bench/profile_step.py [--stage sft|reward|dpo] [--threads 2]
        [--rows R] [--tokens T] [--prompt P] [--accumulate A] [--checkpointing]
        [--padding-free [--padding 0.145]] [--repeats 3]

A shape other than the demo's (--rows, --tokens, --prompt, --accumulate, --padding-free)
is also timed against the demo's own shape in the same process, --repeats steps of each,
interleaved, without the profiler: the ratio of their best times per token through the
model (with --padding-free, per real token: the padded batch holds the same real tokens),
e.g. whether dpo's 8 micro-batches of one pair beat 2 of four pairs (`--stage dpo --rows 8
--accumulate 2`).

Prints the step's seconds and its useful rate (6·N per token, 8·N with recomputed
activations; N the matmul parameters, `cai.work.matmul_parameters`), the operations with
the largest share of the CPU time, the share of the matrix multiplications and attention
kernels, and, at the same threads and measured after the steps in this process, the
matmul probe's rate and the rate of the step's own MLP matmul ([rows·tokens, hidden] x
[hidden, intermediate]). With every matmul at that rate, the step's share of the probe is
at most about the matmuls' share of its time times that rate over the probe's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cai import models
from cai.training.lm_head import plain_head_output
from cai.training.soft_labels import soft_label_loss
from cai.work import matmul_parameters

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
# The demo's micro-batches: rows, tokens per row, unlabelled tokens per row, micro-batches per step.
SHAPES = {"sft": (8, 145, 60, 1), "reward": (8, 150, 0, 2), "dpo": (2, 180, 60, 8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=sorted(SHAPES), default="sft")
    parser.add_argument("--model", default=models.SMOLLM2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, help="rows per micro-batch (default: the stage's in the demo)")
    parser.add_argument("--tokens", type=int, help="tokens per row")
    parser.add_argument("--prompt", type=int, help="unlabelled tokens at the start of each row (sft, dpo)")
    parser.add_argument("--accumulate", type=int, help="micro-batches per optimizer step")
    parser.add_argument("--checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--padding-free", action="store_true", help="sft: the real tokens packed in one row")
    parser.add_argument("--padding", type=float, default=0.145, help="the padded batch's padding share")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps of each shape in the comparison")
    args = parser.parse_args()
    rows, tokens, prompt, accumulate = (given if given is not None else default for given, default in
                                        zip((args.rows, args.tokens, args.prompt, args.accumulate),
                                            SHAPES[args.stage]))
    torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile

    if args.padding_free and args.stage != "sft":
        parser.error("--padding-free: sft only")
    if args.stage == "reward":
        model = models.load_reward_model(args.model, models.load_tokenizer(args.model))
    else:
        model = models.load_causal_lm(args.model, "cpu")
    model.train()
    if args.checkpointing:
        model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # the trainers' (adamw_torch_fused)

    def batch(rows: int, tokens: int, prompt: int, padding_free: bool) -> tuple:
        """(input ids, labels, position ids or None) of one micro-batch."""
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (rows, tokens), generator=generator)
        labels = ids.clone()
        labels[:, :prompt] = -100
        if not padding_free:
            return ids, labels, None
        length = round(tokens * (1 - args.padding))  # each sequence's real tokens
        return (ids[:, :length].reshape(1, -1), labels[:, :length].reshape(1, -1),
                torch.arange(length).repeat(rows)[None])

    def loss(ids, labels, positions) -> torch.Tensor:
        if args.stage == "reward":
            chosen, rejected = model(input_ids=ids, use_cache=False).logits.squeeze(-1).chunk(2)
            return soft_label_loss(chosen, rejected, torch.full_like(chosen, 0.7))
        hidden = model.get_decoder()(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state[:, :-1]
        mask = labels[:, 1:] != -100
        out = plain_head_output(hidden, model.get_output_embeddings(), labels[:, 1:], mask, 1.0)
        if args.stage == "sft":
            return out.loss
        chosen, rejected = out.log_probs.sum(-1).chunk(2)  # the reference's log-probs: constants (0)
        return -F.logsigmoid(0.1 * (chosen - rejected)).mean()

    def step(micro_batch: tuple, accumulate: int) -> float:
        began = time.perf_counter()
        for _ in range(accumulate):
            (loss(*micro_batch) / accumulate).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - began

    this = batch(rows, tokens, prompt, args.padding_free)
    rows, tokens = this[0].shape
    step(this, accumulate)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        seconds = (step(this, accumulate) + step(this, accumulate)) / 2
    per_token = 8 if args.checkpointing else 6
    useful = per_token * matmul_parameters(model) * rows * tokens * accumulate
    print(f"{args.stage}: {args.model}, {args.threads} threads, {accumulate} x {rows} rows x {tokens} tokens "
          f"({'recomputed' if args.checkpointing else 'kept'} activations): {seconds:.2f} s per step "
          f"(under the profiler), {useful / seconds / 1e9:.1f} GFLOP/s useful ({per_token}·N per token)")
    events = profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"  {event.key:58s} {event.self_cpu_time_total / total:6.1%}  {event.count:6d} calls")
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    print(f"matrix multiplications and attention kernels: {matmul / total:.1%} of the CPU time")
    config = model.config.get_text_config()
    probe = models.gemm_gflops(*models.PROBE_SHAPE, 0.03)
    own = models.gemm_gflops(rows * tokens, config.hidden_size, config.intermediate_size, 0.03)
    print(f"matmul probe {models.PROBE_SHAPE} at {args.threads} threads: {probe:.1f} GFLOP/s; "
          f"this step's MLP matmul ({rows * tokens}, {config.hidden_size}, {config.intermediate_size}): "
          f"{own:.1f} GFLOP/s; the step's useful rate is {useful / seconds / 1e9 / probe:.0%} of the probe")
    demo_rows, demo_tokens, demo_prompt, demo_accumulate = SHAPES[args.stage]
    if args.padding_free or (rows, tokens, prompt, accumulate) != (demo_rows, demo_tokens, demo_prompt,
                                                                  demo_accumulate):
        # the same real tokens per step, or not: the ratio is per token through the model
        demo = batch(demo_rows, demo_tokens, demo_prompt, False)
        times = {"this": [], "demo": []}
        step(demo, demo_accumulate)
        for _ in range(args.repeats):  # interleaved, so a noisy moment hits both alike
            times["this"].append(step(this, accumulate))
            times["demo"].append(step(demo, demo_accumulate))
        this_tokens = rows * tokens * accumulate
        demo_tokens_per_step = demo_rows * demo_tokens * demo_accumulate * (1 - args.padding * args.padding_free)
        ratio = (min(times["this"]) / this_tokens) / (min(times["demo"]) / demo_tokens_per_step)
        print(f"against the demo's {demo_accumulate} x {demo_rows} x {demo_tokens}"
              f"{' (its padded batch: the same real tokens)' if args.padding_free else ''}, best of {args.repeats}, "
              f"interleaved, no profiler: {min(times['this']):.2f} s against {min(times['demo']):.2f} s per step, "
              f"{ratio:.2f}x the time per {'real ' if args.padding_free else ''}token")


if __name__ == "__main__":
    main()
