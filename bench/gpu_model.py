"""A random-weight Llama of a real shape, saved as a model folder cai loads like any other.

The GPU check (bench/gpu.sh) cannot carry a real checkpoint (a call carries at most
64 MiB), so it builds one: Llama-shaped (default: hidden 2048, 16 layers, 32 heads, 8 KV
heads, MLP 8192, tied embeddings: 1.07 B parameters with SmolLM2's 49,152-token
vocabulary), weights drawn from transformers' own initialisation with a fixed seed, with
the tokenizer (and its chat template) from --tokenizer. Random weights give a flat
next-token distribution: the worst case for a sampler, and answers that are noise; the
timings are what it is for.

    python bench/gpu_model.py --tokenizer TOKENIZER_DIR --out MODEL_DIR [--device cuda]
        [--dtype bfloat16] [--hidden 2048 --layers 16 --heads 32 --kv-heads 8 --mlp 8192]
    python bench/gpu_model.py --save-tokenizer DIR   # here: SmolLM2's tokenizer, to carry
"""

from __future__ import annotations

import argparse
import time

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="a tokenizer folder (save one with --save-tokenizer)")
    parser.add_argument("--out", help="the model folder to write")
    parser.add_argument("--save-tokenizer", metavar="DIR",
                        help="only save builtin:smollm2-135m-instruct's tokenizer to DIR (needs its GGUF here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--mlp", type=int, default=8192)
    parser.add_argument("--max-positions", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if args.save_tokenizer:
        from cai import models

        models.load_tokenizer(models.SMOLLM2).save_pretrained(args.save_tokenizer)
        print(f"saved {models.SMOLLM2}'s tokenizer to {args.save_tokenizer}")
        return 0
    if not (args.tokenizer and args.out):
        raise SystemExit("gpu_model.py: --tokenizer and --out are needed (or --save-tokenizer DIR)")
    began = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.mlp,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions, tie_word_embeddings=True, rope_theta=100_000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        dtype=args.dtype)
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"built {parameters / 1e9:.3f} B parameters (hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
          f"{args.kv_heads} KV heads, MLP {args.mlp}, vocabulary {config.vocab_size}) in {args.dtype} on "
          f"{args.device}, saved to {args.out} in {time.perf_counter() - began:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
