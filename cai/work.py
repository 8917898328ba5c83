"""The work a stage's models do, counted where it is done: the in-process engine's
generation and option scoring (cai.engines.hf) and the trainers' steps
(cai.training.save). One `Work` per stage (its context's `work`); the manifest records
its `record()` with the stage's seconds and the machine's measured peak.

Useful work is the model's matmul work on real tokens (the convention of Kaplan et al.
2020 and nanoGPT's MFU, attention's own products left out), with N the parameters that
take part in a matmul: a forward pass costs 2·N FLOP per token; training 6·N per
trained token (forward, backward through the activations, the weights' gradients:
4·N + 2·N_trainable when only an adapter trains), 8·N with recomputed activations
(activation_checkpointing runs the forward twice: the issue's x 4/3); generation 2·N per
prompt token (prefill) and per generated token; scoring 2·N per scored token. Padding
is every token position computed that is not a real token (left padding, rows that
finished decoding while others went on, filler rows); its share is padded positions
over all positions computed."""

from __future__ import annotations


class Work:
    """Counters per kind of work (`train`, `reference`, `prefill`, `decode`, `score`):
    real tokens, token positions computed (padding included) and useful FLOP."""

    def __init__(self) -> None:
        self.kinds: dict[str, dict] = {}

    def add(self, kind: str, tokens: int, positions: int, flop_per_token: float) -> None:
        """`tokens` real tokens of `positions` computed, each real one worth `flop_per_token`."""
        counts = self.kinds.setdefault(kind, {"tokens": 0, "positions": 0, "flop": 0.0})
        counts["tokens"] += int(tokens)
        counts["positions"] += int(positions)
        counts["flop"] += float(tokens) * flop_per_token

    def record(self, seconds: float, peak_flop_per_second: float | None, peak: str) -> dict:
        """What the manifest keeps (nothing is kept when no model worked in this process:
        a stage whose models are servers). `peak` says what measured the peak."""
        flop = sum(k["flop"] for k in self.kinds.values())
        tokens = sum(k["tokens"] for k in self.kinds.values())
        positions = sum(k["positions"] for k in self.kinds.values())
        rate = flop / seconds if seconds > 0 else None
        return {"flop": flop, "flop_per_second": rate, "peak_flop_per_second": peak_flop_per_second, "peak": peak,
                "share_of_peak": round(rate / peak_flop_per_second, 4) if rate and peak_flop_per_second else None,
                "padding_share": round(1 - tokens / positions, 4) if positions else None,
                "by_kind": {kind: dict(counts) for kind, counts in self.kinds.items()}}


def matmul_parameters(model, trainable_only: bool = False) -> int:
    """Parameters that take part in a matmul (the weights of linear layers, an output
    head tied to the embedding counted once): N of the 2·N FLOP per token of a forward
    pass. An input embedding is a lookup, not a matmul, and is left out unless tied."""
    import torch

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":  # GPT-2's linear layers
            for parameter in module.parameters(recurse=False):
                if id(parameter) not in seen and (parameter.requires_grad or not trainable_only):
                    seen.add(id(parameter))
                    total += parameter.numel()
    return total


def batch_tokens(inputs) -> tuple[int, int]:
    """(real tokens, positions) of a training batch: `input_ids` with its attention mask,
    or RLOO/GRPO's prompt and completion ids with theirs."""
    pairs = [("input_ids", "attention_mask"), ("prompt_ids", "prompt_mask"), ("completion_ids", "completion_mask")]
    tokens = positions = 0
    for ids, mask in pairs:
        if ids in inputs:
            positions += inputs[ids].numel()
            tokens += int(inputs[mask].sum()) if inputs.get(mask) is not None else inputs[ids].numel()
    return tokens, positions


def training_flop_per_token(model, recomputed: bool) -> float:
    """Useful FLOP per trained token (see the module): 2·N forward, 2·N backward through
    the activations, 2·N_trainable for the weights' gradients, another 2·N forward when
    activations are recomputed."""
    n = matmul_parameters(model)
    return 4 * n + 2 * matmul_parameters(model, trainable_only=True) + (2 * n if recomputed else 0)


def stage_rows(manifests: dict[str, dict]) -> list[dict]:
    """One row per stage manifest for the utilisation table (the report's and
    bench/utilisation.py's): seconds, threads, useful TFLOP, achieved GFLOP/s, share of
    the peak, padding share."""
    rows = []
    for step, manifest in manifests.items():
        work = manifest.get("work") or {}
        threads = manifest.get("threads")
        rows.append({"step": step, "seconds": manifest.get("seconds"),
                     "threads": threads.get("threads") if isinstance(threads, dict) else threads,
                     "tflop": work["flop"] / 1e12 if work.get("flop") is not None else None,
                     "gflops": work["flop_per_second"] / 1e9 if work.get("flop_per_second") else None,
                     "peak_gflops": work["peak_flop_per_second"] / 1e9 if work.get("peak_flop_per_second") else None,
                     "share_of_peak": work.get("share_of_peak"), "padding_share": work.get("padding_share")})
    return rows
