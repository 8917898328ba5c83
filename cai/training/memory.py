"""`activation_checkpointing: auto` (cai's default on a CPU): recompute activations in the
backward pass only when keeping them would not fit the run's `memory_budget`.

Keeping every layer's activations costs memory; recomputing them costs a third more
compute (the forward runs twice). The choice is made once per stage, before training,
from the batch the stage will actually train on: the most sequences a micro-batch holds,
each as long as the training data's longest, so the estimate is an upper bound.

    needed = memory held now + gradients and Adam's two moments of the trained weights
             + activations kept for the backward pass (+ the LM head's logits)

Activations per sequence of `s` tokens and layer, kept: `26·h·s + heads·s²` values;
the optimizer step's temporaries, after the activations are freed: two copies of the
trained weights; 5 % on top. Calibrated on SmolLM2-135M in fp32 with activations kept
(the demo's settings; GiB held before training -> the stage's peak -> the estimate): sft,
8 rows of up to 149 tokens, 0.76 -> 4.65 -> 5.08; reward, 4 pairs of up to 151 tokens,
0.99 -> 4.79 -> 4.88; dpo, one pair, 1.05 -> 3.58 -> 3.68; rl (PPO), see
`PPO_SEQUENCES_PER_ROW`. The decision, the estimate
and the budget go into the stage's counts (its manifest) and its log line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from cai import console, distributed

GIB = 2**30
KEPT_PER_TOKEN = 26  # hidden-sized values a layer keeps per token for backward, without recomputation
MARGIN = 1.05  # the estimate's own
# cai's PPO keeps the policy's and the value's forwards for backward, and its rollout's
# scoring passes come on top: calibrated on the demo's rl (LoRA, 8 rows of up to 101 tokens:
# 0.53 GiB held -> 4.55 GiB peak -> 5.08 estimated)
PPO_SEQUENCES_PER_ROW = 2.5
HEADROOM = 0.9  # of the free memory an `auto` budget counts on: the allocator's slack and other processes


def memory_budget(setting, device, held: float) -> tuple[float, str]:
    """Bytes a stage may hold, and how that was decided: the run's `memory_budget` in
    GiB, or (auto) what the process holds now (`held`) plus 90 % of what is free (a CUDA
    device's free memory; on a CPU, MemAvailable shared among this node's processes)."""
    if setting != "auto":
        return float(setting) * GIB, "memory_budget"
    if device.type == "cuda":
        import torch

        return held + HEADROOM * torch.cuda.mem_get_info(device)[0], "free GPU memory"
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return held + HEADROOM * meminfo_bytes("MemAvailable") / processes, "free memory"


def held_bytes(device) -> float:
    """What this process holds now: allocated GPU memory, or its resident set."""
    if device.type == "cuda":
        import torch

        return float(torch.cuda.memory_allocated(device))
    return float(resident_bytes() or 0)


def resident_bytes() -> int | None:
    """The process's resident set now (None where /proc is not there); the stage's memory
    sampler reads it every 20 ms (`cai.execute.measure`)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def meminfo_bytes(key: str) -> float:
    with open("/proc/meminfo", encoding="ascii") as info:
        for line in info:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024.0
    raise OSError(f"/proc/meminfo has no {key}")


def longest_batch(trainer) -> tuple[int, int]:
    """(sequences in one training forward, tokens of the longest of them) for the data the
    trainer will train on: SFT rows (`input_ids`), preference pairs (two sequences a
    pair: `chosen_ids` / `rejected_ids`, after `prompt_ids` when the prompt is apart) and
    prompts answered during training (cai's PPO: its `response_length` added, and
    `PPO_SEQUENCES_PER_ROW`; RLOO/GRPO: `max_completion_length` added)."""
    rows = trainer.args.per_device_train_batch_size
    if hasattr(trainer, "prompt_ids"):  # cai's PPO: PPO_SEQUENCES_PER_ROW
        return math.ceil(PPO_SEQUENCES_PER_ROW * rows), max(map(len, trainer.prompt_ids)) + trainer.args.response_length
    data = trainer.train_dataset
    columns = set(data.column_names)
    if {"chosen_ids", "rejected_ids"} <= columns:
        prompts = data["prompt_ids"] if "prompt_ids" in columns else [[]] * len(data)
        pairs = zip(prompts, data["chosen_ids"], data["rejected_ids"])
        longest = max(len(p) + max(len(c), len(r)) for p, c, r in pairs)
        return 2 * rows, longest
    if "input_ids" in columns:  # SFT: prompt and answer in one row
        return rows, max(map(len, data["input_ids"]))
    # prompts answered during training (RLOO, GRPO), rendered as the trainer will render them
    if "prompt_ids" in columns:
        lengths = map(len, data["prompt_ids"])
    else:
        tokenizer = trainer.processing_class
        lengths = (len(tokenizer(p)["input_ids"]) if isinstance(p, str) else
                   len(tokenizer.apply_chat_template(p, tokenize=True, add_generation_prompt=True,
                                                     return_dict=True)["input_ids"]) for p in data["prompt"])
    return rows, max(lengths) + (getattr(trainer.args, "max_completion_length", None) or 0)


def estimate(model, sequences: int, length: int, trained: int) -> float:
    """Bytes needed on top of what is held now, with every layer's activations kept: the
    trained weights' states, then the larger of the backward pass's activations and the
    optimizer step's temporaries."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    size = next(model.parameters()).element_size()
    h, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    kept = layers * sequences * (KEPT_PER_TOKEN * h * length + heads * length * length) * size
    head = sequences * length * config.vocab_size * 4 * 2 if _scores_tokens(model) else 0  # fp32 logits, their grad
    states = trained * (size + 8)  # the gradient and Adam's two fp32 moments of each trained weight
    step = 2 * trained * size  # the optimizer step's temporaries (foreach AdamW), once the activations are freed
    return MARGIN * (states + max(kept + head, step))


def _scores_tokens(model) -> bool:
    """A language model (its LM head's logits are kept), not a reward model's one score."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(inner, "lm_head")


def choose_activation_checkpointing(trainer, model, budget_setting, step: str) -> dict:
    """Turn the trainer's activation checkpointing on when the training batch's activations,
    kept, would not fit the memory budget (`model`: the one it trains, unwrapped); returns
    the decision for the stage's counts, and says it when it is on (-v: always). The main
    process decides and the others follow it (one choice for one model)."""
    decision = None
    if distributed.is_main():
        device = next(model.parameters()).device
        held = held_bytes(device)
        budget, source = memory_budget(budget_setting, device, held)
        sequences, length = longest_batch(trainer)
        trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        need = held + estimate(model, sequences, length, trained)
        decision = {"on": need > budget, "chosen_by": "memory", "budget_gib": round(budget / GIB, 2),
                    "budget_from": source, "held_gib": round(held / GIB, 2), "kept_gib": round(need / GIB, 2),
                    "batch": {"sequences": sequences, "tokens": length}}
    decision = distributed.broadcast(decision)
    trainer.args.activation_checkpointing = decision["on"]  # Trainer.train (and cai's PPO) turn it on from this
    if decision["on"] or console.verbosity == console.VERBOSE:
        console.info(f"[cai] {step}: activation checkpointing {'on' if decision['on'] else 'off'}: "
                     f"{decision['kept_gib']} GiB estimated with activations kept "
                     f"({decision['batch']['sequences']} sequences of up to {decision['batch']['tokens']} tokens), "
                     f"budget {decision['budget_gib']} GiB ({decision['budget_from']})")
    return decision
