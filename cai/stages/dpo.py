"""DPO on the AI preferences: the RL-CAI objective without a reward model or sampling.

Direct Preference Optimization (Rafailov et al. 2023) trains the policy on the feedback
model's comparisons directly: for each pair it raises the policy's log-probability
margin of `chosen` over `rejected`, measured against the frozen reference (the SFT
model), through TRL's DPOTrainer. The pairs are the label stage's AI preferences, and
optionally the critique stage's "final revision over first answer" pairs.

The label stage gives soft labels: `p_chosen`, the feedback model's probability that
`chosen` is the better answer (>= 0.5; near 0.5 with a small feedback model). Two ways
to use them (`soft_labels`):

- `threshold` (default): keep the pairs with p_chosen >= `min_confidence` as hard labels
  and train standard sigmoid DPO on them. Unsure pairs are dropped, not trained on.
- `weighted`: keep every pair and use p directly, as the target of the pairwise
  preference probability σ(β·h) (h = the policy-minus-reference log-ratio margin of
  chosen over rejected):

      loss = -[ p·logσ(β·h) + (1 - p)·logσ(-β·h) ]

  At p = 1 this is standard DPO; at p = 0.5 it pulls the margin to 0 (the pair carries
  no preference). TRL's `label_smoothing` (conservative DPO) is the same loss with one
  global constant 1 - p, and applies only to some loss types; here p is per pair.

Critique pairs carry no soft label: the revision is preferred by construction (p = 1).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

from cai.config import setting
from cai.rundir import read_jsonl
from cai.yamlio import Problem

UPSTREAM = ("critique", "sft", "label")


def TRL_CONFIG():
    from trl import DPOConfig

    return DPOConfig


def trl_settings(cfg) -> tuple[type, dict]:
    """The TRL config class and cai's defaults for it (the user's `dpo:` keys override them)."""
    from trl import DPOConfig

    return DPOConfig, {"max_length": 1024, "precompute_ref_log_probs": True}


@dataclass
class Config:
    policy: str | None = setting(None, "the model to optimise, also the reference: null = the sft stage's model",
                                 model_reference=True)
    soft_labels: Literal["threshold", "weighted"] = "threshold"  # how p_chosen is used (module docstring)
    min_confidence: float = setting(0.55, "threshold mode: keep pairs with p_chosen >= this", ge=0.5, le=1)
    mix_critique_pairs: bool = False  # also train on critique/prefs.jsonl (revision over first answer, p = 1)


def check_config(run, cfg: Config, trl: dict) -> list[Problem]:
    """The weighted loss extends TRL's plain sigmoid DPO loss: other loss settings are refused."""

    def problem(key: str, message: str) -> Problem:
        if run.source is None:
            return Problem("config", 1, message)
        return run.source.problem(("dpo", key), message)

    problems = []
    if cfg.soft_labels == "weighted":
        loss_type = trl.get("loss_type", ["sigmoid"])
        plain = {"loss_type": (["sigmoid"] if isinstance(loss_type, list) else "sigmoid", loss_type),
                 "f_divergence_type": ("reverse_kl", trl.get("f_divergence_type", "reverse_kl")),
                 "ld_alpha": (None, trl.get("ld_alpha")), "use_weighting": (False, trl.get("use_weighting", False)),
                 "precompute_ref_log_probs": (True, trl.get("precompute_ref_log_probs", True)),
                 "use_liger_kernel": (False, trl.get("use_liger_kernel", False))}
        for key, (needed, value) in plain.items():
            if value != needed:
                problems.append(problem(key, f"'dpo.{key}: {value}' does not work with dpo.soft_labels: weighted, "
                                             f"which needs {needed!r} (the soft-label loss extends plain sigmoid DPO "
                                             "on precomputed reference log-probs); use soft_labels: threshold"))
    return problems


def preference_pairs(ctx, cfg: Config) -> tuple[list[dict], dict]:
    """The training pairs with their soft label, and counts for the manifest."""
    path = ctx.stage("label").require("its prefs.jsonl is the training set") / "prefs.jsonl"
    labelled = read_jsonl(path)
    for number, row in enumerate(labelled, start=1):
        p = row.get("p_chosen")
        if not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"{path}:{number}: expected a 'p_chosen' soft label in [0, 1], got {p!r}")
    if cfg.soft_labels == "threshold":
        kept = [r for r in labelled if r["p_chosen"] >= cfg.min_confidence]
    else:
        kept = labelled
    critique = []
    if cfg.mix_critique_pairs:
        critique = read_jsonl(ctx.stage("critique").require("mix_critique_pairs reads its prefs.jsonl") / "prefs.jsonl")
    pairs = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "p_chosen": float(r["p_chosen"])}
             for r in kept]
    pairs += [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "p_chosen": 1.0}
              for r in critique]
    counts = {"label_pairs": len(kept), "dropped_low_confidence": len(labelled) - len(kept),
              "critique_pairs": len(critique)}
    return pairs, counts


def dpo_trainer(ctx, cfg: Config, pairs: list[dict]):
    from trl import DPOTrainer

    from cai import models
    from cai.training import reference_loading, shared_dataset, trl_config

    # The policy is loaded from its folder, so TRL's reference (config._name_or_path) is the
    # same SFT model; its log-probs are computed once, before training, then dropped. With
    # use_peft there is no reference copy at all (ref_model=None): the reference is the
    # policy with its adapter disabled, as TRL does.
    policy = ctx.model_spec(cfg.policy, "sft")
    options = ctx.model_options
    args = trl_config(ctx, *trl_settings(cfg))
    reference_loading(args, options)
    tokenizer = models.load_tokenizer(policy)
    model = models.load_causal_lm(policy, ctx.run.device, options, quantize=True)
    lora = {"ref_model": None, "peft_config": options.peft_config("CAUSAL_LM")}
    if cfg.soft_labels == "weighted":
        return soft_label_dpo_trainer()(model=model, args=args, train_dataset=shared_dataset(ctx, "train", pairs),
                                        processing_class=tokenizer, data_collator=soft_label_collator(tokenizer, args),
                                        **lora)
    hard = [{k: v for k, v in pair.items() if k != "p_chosen"} for pair in pairs]
    return DPOTrainer(model=model, args=args, train_dataset=shared_dataset(ctx, "train", hard),
                      processing_class=tokenizer, **lora)


def run(ctx) -> dict:
    from cai.training import train_and_save

    cfg: Config = ctx.config
    pairs, counts = preference_pairs(ctx, cfg)
    if not pairs:
        raise RuntimeError(f"dpo: no preference pairs to train on ({counts}); lower dpo.min_confidence, "
                           "use soft_labels: weighted, or check the label stage's outputs")
    data = {"label/prefs.jsonl": counts["label_pairs"]}
    if cfg.mix_critique_pairs:
        data["critique/prefs.jsonl"] = counts["critique_pairs"]
    metrics = train_and_save(dpo_trainer(ctx, cfg, pairs), ctx, base=ctx.model_spec(cfg.policy, "sft"), data=data)
    return {**counts, **metrics}


# ---------------------------------------------------------------- the soft-label loss


def soft_label_collator(tokenizer, args):
    """TRL's preference collator, also batching each pair's `p_chosen`."""
    import torch
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    class SoftLabelCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            batch["p_chosen"] = torch.tensor([example["p_chosen"] for example in examples], dtype=torch.float32)
            return batch

    return SoftLabelCollator(pad_token_id=tokenizer.pad_token_id, max_length=args.max_length,
                             truncation_mode=args.truncation_mode, pad_to_multiple_of=args.pad_to_multiple_of)


@functools.cache
def soft_label_dpo_trainer():
    """DPOTrainer with the soft-label loss (a class built on first use: TRL imports are slow).

    Since logσ(x) - logσ(-x) = x, the soft loss is TRL's sigmoid loss plus a linear term:
        -[p·logσ(βh) + (1-p)·logσ(-βh)] = -logσ(βh) + (1-p)·βh
    so TRL computes its loss (and all its metrics) as usual, and only (1-p)·βh is added,
    with h recomputed from the policy logits TRL returns and the precomputed reference
    log-probs in the batch (check_config ensures plain sigmoid DPO with precomputed refs).
    """
    from trl import DPOTrainer
    from trl.trainer.utils import selective_log_softmax

    class SoftLabelDPOTrainer(DPOTrainer):
        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "p_chosen" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "p_chosen"]

        def compute_ref_log_probs(self, model, inputs):
            return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k != "p_chosen"})

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            p_chosen = inputs.pop("p_chosen")
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
            margin = log_ratio_margin(outputs.logits, inputs)
            loss = loss + (self.beta * (1 - p_chosen) * margin).mean()
            return (loss, outputs) if return_outputs else loss

    def log_ratio_margin(logits, inputs):
        """h = [log π(chosen) - log π_ref(chosen)] - [log π(rejected) - log π_ref(rejected)]."""
        labels = inputs["input_ids"][..., 1:]
        mask = inputs["completion_mask"][..., 1:]
        logps = (selective_log_softmax(logits[..., :-1, :], labels) * mask).sum(dim=1)
        chosen, rejected = logps.chunk(2, dim=0)  # TRL batches [chosen..., rejected...]
        return (chosen - inputs["ref_chosen_logps"]) - (rejected - inputs["ref_rejected_logps"])

    return SoftLabelDPOTrainer
