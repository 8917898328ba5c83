"""How good is a feedback model as a judge? Accuracy on the CAI paper's HHH comparisons.

Each of the 438 human-labelled pairs is re-asked in cai's question format (the row's own
"most helpful, honest, and harmless" instruction as the principle, the constitution's
feedback examples first) and scored in both option orders. Prints accuracy with the
data's own order, accuracy with both orders averaged, expected calibration error, how
often the model picks the same slot in both orders, and comparisons per second.

    python bench/labeler_hhh.py [PATH] [--model SPEC] [--few-shot N] [--limit N] [--threads N]

Default PATH: ../shared/data/hhh-438.jsonl relative to the repository.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="?", default=str(ROOT.parent / "shared" / "data" / "hhh-438.jsonl"))
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--constitution", default=str(ROOT / "constitutions" / "harmless.yaml"),
                        help="its feedback examples are the few-shot turns")
    parser.add_argument("--few-shot", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cot", action="store_true", help="chain of thought (slow on CPU)")
    parser.add_argument("--out", default=None, help="write the metrics as JSON here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from cai.constitution import load_constitution
    from cai.engines.hf import TransformersEngine
    from cai.feedback import Judge
    from cai.stages.label import evaluate_labeler, format_metrics, read_labeled_pairs

    pairs = read_labeled_pairs(args.data, limit=args.limit)
    started = time.perf_counter()
    judge = Judge(TransformersEngine.from_spec(args.model, device="cpu", batch_size=args.batch_size),
                  few_shot=args.few_shot, cot=args.cot)
    load_seconds = time.perf_counter() - started
    metrics = evaluate_labeler(judge, load_constitution(args.constitution), pairs)
    print(f"{args.model} on {args.data}: few_shot={args.few_shot}, {'cot' if args.cot else 'direct'}, "
          f"threads={args.threads}, batch={args.batch_size}, load {load_seconds:.1f}s, "
          f"scoring {metrics['seconds']:.1f}s")
    print(format_metrics(metrics))
    print("  chance is 0.5; TRL-NOTES measured SmolLM2-135M (chat template, primed '(', no examples): "
          "0.523 one order, 0.537 averaged, same slot 96%")
    if args.out:
        Path(args.out).write_text(json.dumps({**metrics, **vars(args)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
