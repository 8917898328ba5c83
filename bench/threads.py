"""How many torch threads to use on this machine: times generation and a training step at
1 and 2 threads (and more if asked), in one process, and prints ratios against 1 thread.

    .venv/bin/python bench/threads.py [--model builtin:smollm2-135m-instruct] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.SMOLLM2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    prompts = [p.text for p in load_source("builtin:helpful", "helpful")[: args.batch_size]]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    generator = TransformersEngine.from_spec(args.model, "cpu", args.batch_size)
    generator.tokenizer.padding_side = "right"
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
