"""Generation throughput (tokens/s) and achieved GFLOP/s as a share of a matmul probe run in
the same process, over batch sizes, greedy and sampled decoding, and torch thread counts.

What it measures. For each thread count, a probe first times fp32 GEMMs shaped like the
model's work (`F.linear` as `nn.Linear` calls it): the decode step's MLP up-projection
[batch, hidden] x [hidden, intermediate] and LM head [batch, hidden] x [hidden, vocab] at
every batch size, and one prefill-shaped up-projection [batch x prompt tokens, hidden] x
[hidden, intermediate]. Each shape is repeated until a timing lasts --probe-seconds, best
of 5 such timings; the best GFLOP/s (2*m*n*k / s) over the shapes is that thread count's
roofline: what this CPU's matmul reaches at these shapes. Then, at each batch size and
mode (greedy: temperature 0; sampled: temperature 0.7, top_p 0.95), after a warm-up at
that batch size and thread count, `TransformersEngine.generate` (today's path: batched,
left-padded, shared-prefix cache) answers --prompts red-team prompts (builtin:donotanswer,
a seeded sample) as single-turn chats with up to --max-new-tokens tokens each.

The FLOP count (the work the answers need; padding and the steps a finished row idles
through are waste, not work):

    FLOPs ~= 2 * body * (prompt tokens processed + generated tokens) + 2 * head * generated tokens

- body: weights of the `nn.Linear` layers in the decoder (attention q/k/v/o and MLP
  projections; the input embedding is a lookup, no FLOPs), one multiply-add per weight and
  token. head: the LM head (hidden x vocab, tied or not). `generate` keeps only the last
  position's logits at prefill, so the head runs once per generated token, not per
  prompt token.
- prompt tokens processed: the rendered prompts' tokens (`engine.render`), with a prefix
  every prompt shares (the chat template's default system prompt) counted once, as the
  engine runs it once.
- generated tokens: `engine.tokens_generated` (EOS excluded).
- Ignored: attention's score and value products, 4 * layers * heads * head_dim * t per
  token at context length t (quadratic in length). The script prints its size: for
  SmolLM2-135M with its ~45-token red-team prompts (24 of them a shared system prompt)
  and 64 new tokens, contexts stay near 100 tokens and it is a few percent of the count.
  Also ignored: norms, rotary embeddings, softmax, sampling (linear and small).

How to run (on an otherwise idle machine; the numbers are only as quiet as the CPU):

    .venv/bin/python bench/generation.py [--model builtin:smollm2-135m-instruct]
        [--prompts 64] [--max-new-tokens 64] [--threads 1,2] [--batches 8,32,64]
        [--seed 0] [--out FILE.json]
    .venv/bin/python bench/generation.py --quick     # builtin:tiny, seconds: checks the script
    python bench/generation.py --device cuda --dtype bfloat16 --model FOLDER --batches 64 --no-previous
        [--compile]                                  # a GPU: the probe's GEMMs run there, in the model's dtype

On a GPU (--device cuda) the probe times the same GEMM shapes on the GPU in the model's
dtype (bf16: the tensor cores' roofline, as fp32 on the CPU's vector units is the CPU's),
synchronised around each timing; --compile sets compile_generation (the decode step
compiled with CUDA graphs; the warm-up run pays the compile, which the timed rows do not).

How to read it. One row per (threads, batch, mode). tok/s is generated tokens per wall
second of the `generate` call. GFLOP/s is the FLOP count above over those seconds;
"of probe" is that as a share of the probe's roofline at the same thread count (decode at
small batch streams every weight once per step for few rows, so expect a small share that
grows with batch; padding and early-finished rows lower it). "vs base" is tok/s over the
baseline row run in this process: 1 thread, batch 8, same mode (the demo's setting today,
configs/demo.yaml); above 1.00 the row's setting is faster than today's default. Compare
the probe rows between thread counts too: a 2-thread roofline well under twice the
1-thread one means the second core is busy or is a hyperthread sibling.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from dataclasses import asdict, dataclass, replace

import torch

from cai import models
from cai.config import PROJECT_ROOT
from cai.engines import Sampling
from cai.engines.hf import TransformersEngine
from cai.prompts import load_source

MODES = {"greedy": Sampling(temperature=0.0), "sampled": Sampling(temperature=0.7, top_p=0.95)}
BASELINE_THREADS, BASELINE_BATCH = 1, 8  # the demo's setting before issue 10 (configs/demo.yaml)


class PreviousEngine(TransformersEngine):
    """The baseline: `generate` as cai ran it before issue 10 (commit 5872d5d), kept here
    to be timed in the same process. transformers' own sampling (top-p sorts the whole
    vocabulary) and its DynamicCache, into which the shared prefix's cache is copied for
    every row and which is concatenated at every step."""

    @torch.inference_mode()
    def generate(self, conversations, sampling, seed, desc=None, prefill=""):
        from transformers import GenerationConfig

        prompts = [self.render(c, prefill) for c in conversations]
        sampled = sampling.temperature > 0
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens, do_sample=sampled,
            temperature=sampling.temperature if sampled else None, top_p=sampling.top_p if sampled else None,
            top_k=sampling.top_k if sampled else None,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids, use_cache=True)
        results = [None] * len(prompts)
        shared, prefix_ids, prefix_cache = self._shared_prefix(prompts, "prefill")
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        for index, start in enumerate(range(0, len(order), self.batch_size)):
            batch = order[start:start + self.batch_size]
            torch.manual_seed(seed * 1_000_003 + index)
            input_ids, attention = self._pad_left([prompts[i][shared:] for i in batch])
            cache = self._batch_cache(prefix_cache, len(batch))
            if cache is not None:
                input_ids = torch.cat([prefix_ids.expand(len(batch), -1), input_ids], dim=1)
                attention = torch.cat([attention.new_ones(len(batch), shared), attention], dim=1)
            output = self.model.generate(input_ids=input_ids, attention_mask=attention, cache=cache,
                                         generation_config=config)
            for row, i in zip(output[:, input_ids.shape[1]:].tolist(), batch):
                results[i] = self._completion(row)
        return results
QUICK = {"model": models.TINY, "prompts": 8, "max_new_tokens": 8, "batches": "8,16", "threads": "1",
         "probe_seconds": 0.02}
WARM_UP_TOKENS = 4


@dataclass
class GenerationRow:
    engine: str  # previous (the baseline's code) or current
    threads: int
    batch: int
    mode: str
    tokens: int  # generated, EOS excluded
    prompt_tokens: int  # processed (a shared prefix once)
    seconds: float  # wall time of the generate call
    tokens_per_second: float
    gflops: float  # achieved: the module docstring's FLOP count / seconds
    probe_share: float  # gflops / the probe's best GFLOP/s at these threads
    attention_share: float  # the ignored attention FLOPs / the counted FLOPs
    vs_baseline: float = 0.0  # tok/s over the baseline row's


def matmul_weights(model) -> tuple[int, int]:
    """(body, head): multiply-adds per token in the decoder's Linear layers and in the LM head."""
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return body, head.weight.numel()


def attention_flops(config, shared: int, rows: list[list[int]], generated: list[int]) -> int:
    """The term the FLOP count leaves out: a query at context length t costs, per layer,
    heads * head_dim * t multiply-adds for its q.k scores and as many for the weighted sum
    of values, so 4 * heads * head_dim * t FLOPs."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_position = 4 * config.num_hidden_layers * heads * head_dim

    def positions(first: int, last: int) -> int:  # sum of t for t in first..last
        return (first + last) * (last - first + 1) // 2 if last >= first else 0

    total = positions(1, shared)
    for row, new in zip(rows, generated):
        total += positions(shared + 1, len(row) + new)
    return per_position * total


def probe(config, dtype: torch.dtype, batches: list[int], prefill_rows: int, min_seconds: float,
          device: torch.device) -> dict[str, float]:
    """GFLOP/s of the model's GEMM shapes on the model's device (a CPU: at the current
    thread count)."""
    hidden, intermediate, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = {}
    for batch in batches:
        shapes[f"decode mlp [{batch}x{hidden}]x[{hidden}x{intermediate}]"] = (batch, hidden, intermediate)
        shapes[f"decode lm head [{batch}x{hidden}]x[{hidden}x{vocab}]"] = (batch, hidden, vocab)
    shapes[f"prefill mlp [{prefill_rows}x{hidden}]x[{hidden}x{intermediate}]"] = (prefill_rows, hidden, intermediate)
    return {name: models.gemm_gflops(m, k, n, min_seconds, dtype, device) for name, (m, k, n) in shapes.items()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.SMOLLM2, help="model spec (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=64, help="red-team prompts per row (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    parser.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated (default: %(default)s)")
    parser.add_argument("--batches", default="8,32,64", help="batch sizes, comma-separated (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="picks the prompts and seeds sampling (default: %(default)s)")
    parser.add_argument("--probe-seconds", type=float, default=0.25,
                        help="each probe timing lasts at least this long (default: %(default)s)")
    parser.add_argument("--few-shot", type=int, default=0,
                        help="critique-shaped prompts: the system prompt and N constitution critique examples first")
    parser.add_argument("--no-previous", action="store_true", help="skip the previous engine's baseline rows")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the model's and the probe's dtype (default: %(default)s)")
    parser.add_argument("--compile", action="store_true", help="compile_generation: CUDA graphs for the decode step")
    parser.add_argument("--out", help="write the settings, the probe and all rows to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run in seconds: builtin:tiny, 8 prompts, 8 tokens, batch 8 and 16, 1 thread "
                             "(options given explicitly still win)")
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    return args


def main() -> None:
    args = parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]

    red_team = load_source("builtin:donotanswer", "red_team")
    prompts = random.Random(args.seed).sample(red_team, min(args.prompts, len(red_team)))
    context = []
    if args.few_shot:  # critique-shaped: system prompt and worked critique/revision chats first
        from cai.constitution import load_constitution
        from cai.stages.critique import few_shot_turns, system_turns

        constitution = load_constitution(PROJECT_ROOT / "constitutions" / "harmless.yaml")
        context = system_turns(constitution) + few_shot_turns(constitution, args.few_shot)
    conversations = [context + [{"role": "user", "content": p.text}] for p in prompts]
    options = models.ModelOptions(dtype=args.dtype, compile_generation=args.compile)
    engine = TransformersEngine.from_spec(args.model, args.device, batches[0], options=options)
    previous = PreviousEngine(engine.model, engine.tokenizer, BASELINE_BATCH)
    model, config = engine.model, engine.model.config
    dtype = next(model.parameters()).dtype
    rows = [engine.render(c) for c in conversations]
    shared = engine.shared_length(rows)
    prompt_tokens = shared + sum(len(r) - shared for r in rows)
    body, head = matmul_weights(model)
    mean_tail = round(sum(len(r) - shared for r in rows) / len(rows))

    probes: dict[int, dict[str, float]] = {}
    results: list[GenerationRow] = []
    def measure(name: str, runner: TransformersEngine, threads: int, batch: int, roofline: float) -> None:
        runner.batch_size = batch
        runner.generate(conversations[:batch], Sampling(max_new_tokens=min(WARM_UP_TOKENS, args.max_new_tokens)),
                        seed=99)  # warm-up at this thread count and batch size
        for mode, sampling in MODES.items():
            runner.tokens_generated = 0
            start = time.perf_counter()
            completions = runner.generate(conversations, replace(sampling, max_new_tokens=args.max_new_tokens),
                                          seed=args.seed)
            seconds = time.perf_counter() - start
            tokens = runner.tokens_generated
            flops = 2 * body * (prompt_tokens + tokens) + 2 * head * tokens
            ignored = attention_flops(config, shared, rows, [c.num_tokens for c in completions])
            gflops = flops / seconds / 1e9
            results.append(GenerationRow(name, threads, batch, mode, tokens, prompt_tokens, seconds,
                                         tokens / seconds, gflops, gflops / roofline, ignored / flops))

    for threads in sorted(set(thread_counts) | {BASELINE_THREADS}):
        models.set_threads(threads)
        probes[threads] = probe(config, dtype, batches, max(batches) * mean_tail, args.probe_seconds, model.device)
        roofline = max(probes[threads].values())
        if threads == BASELINE_THREADS and not args.no_previous:
            measure("previous", previous, threads, BASELINE_BATCH, roofline)
        for batch in batches if threads in thread_counts else []:
            measure("current", engine, threads, batch, roofline)

    baselines = {}
    for mode in MODES:
        of_mode = [r for r in results if r.mode == mode]
        baselines[mode] = next((r for r in of_mode if r.engine == "previous"), of_mode[0])
    for row in results:
        row.vs_baseline = row.tokens_per_second / baselines[row.mode].tokens_per_second

    base = baselines["greedy"]
    print(f"model={args.model} dtype={str(dtype).removeprefix('torch.')} prompts={len(prompts)} "
          f"max_new_tokens={args.max_new_tokens} seed={args.seed} torch={torch.__version__} "
          f"cpu={platform.processor() or platform.machine()} device={model.device}"
          + (f" ({torch.cuda.get_device_name(model.device)}) compile_generation={args.compile}"
             if model.device.type == "cuda" else ""))
    mean = sum(map(len, rows)) / len(rows)
    print(f"prompt tokens {prompt_tokens} (shared prefix {shared}, run once; mean {mean:.0f} "
          f"per prompt); matmul weights: body {body:,}, head {head:,}")
    print("FLOPs = 2*body*(prompt tokens + generated) + 2*head*generated; attention's quadratic term is left out "
          f"(here at most {max(r.attention_share for r in results):.1%} of the count)")
    print(f"baseline (vs base): the {base.engine} engine, threads={base.threads} batch={base.batch}, same mode")
    for threads, shapes in probes.items():
        print(f"probe, {threads} thread{'s' if threads > 1 else ''}: best {max(shapes.values()):.1f} GFLOP/s")
        for name, gflops in shapes.items():
            print(f"    {name:48s} {gflops:8.1f} GFLOP/s")
    print(f"{'engine':>8} {'threads':>7} {'batch':>5} {'mode':>7} {'tokens':>7} {'seconds':>8} {'tok/s':>8} "
          f"{'GFLOP/s':>8} {'of probe':>8} {'vs base':>7}")
    for r in results:
        print(f"{r.engine:>8} {r.threads:7d} {r.batch:5d} {r.mode:>7} {r.tokens:7d} {r.seconds:8.2f} "
              f"{r.tokens_per_second:8.1f} "
              f"{r.gflops:8.2f} {r.probe_share:8.1%} {r.vs_baseline:6.2f}x")

    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        report = {"settings": settings, "dtype": str(dtype), "torch": torch.__version__,
                  "prompt_tokens": prompt_tokens, "shared_prefix_tokens": shared,
                  "matmul_weights": {"body": body, "head": head},
                  "probe_gflops": {str(t): shapes for t, shapes in probes.items()},
                  "rows": [asdict(r) for r in results]}
        with open(args.out, "w") as file:
            json.dump(report, file, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
