"""Batched generation (the critique stage's hot path) against a plain one-prompt-at-a-time
`generate` loop over the same prompts, in one process. Prints the speed-up ratios.

With `--few-shot N` the prompts are critique requests as the critique stage builds them
(system prompt + N constitution examples + the exchange), and batched generation is also
timed without the shared-prefix cache. With `--rotation` too, each prompt gets its
few-shot set as critique's rotation draws it, and the one call over all sets that
critique makes (each set's prefix cached once) is timed against one call per set (as
critique did before).

    .venv/bin/python bench/critique_generation.py [--model builtin:smollm2-135m-instruct]
        [--prompts 16] [--batch-size 8] [--max-new-tokens 64] [--threads 1] [--few-shot 0] [--rotation]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cai import models
from cai.engines import Sampling
from cai.engines.hf import TransformersEngine
from cai.prompts import load_source


def sequential(model, tokenizer, conversations, sampling: Sampling, seed: int) -> tuple[int, float]:
    """The baseline: what a script without batching does."""
    tokens, start = 0, time.perf_counter()
    for i, conversation in enumerate(conversations):
        torch.manual_seed(seed + i)
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=sampling.max_new_tokens, do_sample=True,
                                 temperature=sampling.temperature, top_p=sampling.top_p,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        tokens += int((new != tokenizer.pad_token_id).sum())
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.SMOLLM2)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--few-shot", type=int, default=0)
    parser.add_argument("--rotation", action="store_true", help="with --few-shot: rotated sets, one call vs per set")
    args = parser.parse_args()
    models.set_threads(args.threads)

    prompts = load_source("builtin:donotanswer", "red_team")[: args.prompts]
    conversations = [[{"role": "user", "content": p.text}] for p in prompts]
    which = [0] * len(conversations)
    if args.few_shot:
        from cai.constitution import load_constitution
        from cai.stages.critique import example_set, example_sets, few_shot_turns, system_turns

        constitution = load_constitution(Path(__file__).resolve().parent.parent / "constitutions" / "harmless.yaml")
        principle = constitution.critique_revision[0]
        sets = example_sets(constitution, args.few_shot, rotation=args.rotation)
        which = [example_set(sets, 0, p.id) for p in prompts]
        conversations = [system_turns(constitution) + few_shot_turns(constitution, args.few_shot, examples=sets[w])
                         + c + [{"role": "assistant", "content": "Here is how you could do that."},
                                {"role": "user", "content": principle.critique}]
                         for c, w in zip(conversations, which)]
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=0.95)
    generator = TransformersEngine.from_spec(args.model, "cpu", args.batch_size)
    generator.generate(conversations[:2], sampling, seed=99)  # warm-up

    generator.tokens_generated, generator.seconds = 0, 0.0
    start = time.perf_counter()
    generator.generate(conversations, sampling, seed=0)
    batched_s = time.perf_counter() - start
    batched_tokens = generator.tokens_generated

    unshared_s = None
    if args.few_shot:
        generator.share_prefix = False
        start = time.perf_counter()
        generator.generate(conversations, sampling, seed=0)
        unshared_s = time.perf_counter() - start
        generator.share_prefix = True

    per_set_s = None
    if args.rotation:
        start = time.perf_counter()
        for k in sorted(set(which)):
            generator.generate([c for c, w in zip(conversations, which) if w == k], sampling, seed=0)
        per_set_s = time.perf_counter() - start

    plain_tokens, plain_s = sequential(generator.model, generator.tokenizer, conversations, sampling, seed=0)

    batched_rate, plain_rate = batched_tokens / batched_s, plain_tokens / plain_s
    print(f"model={args.model} prompts={args.prompts} batch={args.batch_size} "
          f"max_new_tokens={args.max_new_tokens} threads={args.threads} few_shot={args.few_shot}")
    print(f"one-at-a-time : {plain_tokens:5d} tokens in {plain_s:7.1f} s = {plain_rate:6.1f} tok/s, "
          f"{plain_s / len(prompts):.2f} s/prompt")
    print(f"batched       : {batched_tokens:5d} tokens in {batched_s:7.1f} s = {batched_rate:6.1f} tok/s, "
          f"{batched_s / len(prompts):.2f} s/prompt")
    if unshared_s is not None:
        print(f"batched, prefix not shared: {unshared_s:7.1f} s; prefix cache speed-up {unshared_s / batched_s:.2f}x")
    if per_set_s is not None:
        print(f"one call per few-shot set ({len(set(which))} sets): {per_set_s:7.1f} s; one call for all "
              f"{per_set_s / batched_s:.2f}x faster")
    print(f"ratio (batched / one-at-a-time): {batched_rate / plain_rate:.2f}x tokens/s, "
          f"{plain_s / batched_s:.2f}x wall time per prompt")


if __name__ == "__main__":
    main()
