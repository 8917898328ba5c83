"""The LM head of a training step on a CPU: TRL's fused head against cai's plain one.

TRL 1.15+ (SFT, DPO, RLOO) projects hidden states through its fused head
(`trl.kernels.chunked_logprob.ChunkedLogProbFunction`): on a device without Triton it scores
every position, in [tokens, 32768] tiles folded with torch operations, and recomputes them
in backward. cai's head (`cai.training.lm_head.plain_head_output`) projects the labelled
positions only, in one matmul. Both run forward and backward here, in this process, on
random hidden states of SmolLM2-135M's shape (hidden 576, vocabulary 49,152):

    .venv/bin/python bench/lm_head.py [--threads 2] [--positions 1200] [--labelled 0.5] [--repeats 3]

Prints the seconds of each (best of --repeats after one warm-up) and their ratio (cai / TRL;
below 1 cai is faster), at all positions labelled and at the --labelled share (a
completion-only SFT batch: about half its positions are prompt).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cai.training.lm_head import plain_head_output

HIDDEN, VOCABULARY = 576, 49152


def best_of(repeats: int, step) -> float:
    step()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--positions", type=int, default=1200, help="rows x tokens of a micro-batch")
    parser.add_argument("--labelled", type=float, default=0.5, help="share of positions with a label")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCABULARY, bias=False)
    with torch.no_grad():
        head.weight.normal_(0, 0.02, generator=generator)
    hidden = torch.randn(1, args.positions, HIDDEN, generator=generator, requires_grad=True)
    labels = torch.randint(0, VOCABULARY, (1, args.positions), generator=generator)
    outputs = ("log_probs", "entropy", "is_top1")  # what SFT asks TRL's head for

    def trl_step():  # every position, as TRL scores them on a CPU
        log_probs = ChunkedLogProbFunction.apply(hidden[0], head.weight, None, labels[0], 1.0, 32768, None, 1.0,
                                                 outputs)[0]
        log_probs.sum().backward()

    print(f"threads {args.threads}, {args.positions} positions, hidden {HIDDEN}, vocabulary {VOCABULARY}")
    trl_seconds = best_of(args.repeats, trl_step)
    print(f"TRL fused head, all positions scored:  {trl_seconds:7.3f} s")
    for share in (1.0, args.labelled):
        mask = torch.zeros(1, args.positions, dtype=torch.bool)
        mask[0, :round(share * args.positions)] = True

        def cai_step(mask=mask):
            plain_head_output(hidden, head, labels, mask, 1.0).log_probs.sum().backward()

        seconds = best_of(args.repeats, cai_step)
        print(f"cai plain head, {share:4.0%} labelled:       {seconds:7.3f} s   cai / TRL {seconds / trl_seconds:.2f}")


if __name__ == "__main__":
    main()
