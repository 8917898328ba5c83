"""Soft labels in training: the one loss, the one collator and the two TRL trainers that
use them (reward model, DPO).

The label stage's `p_chosen` is the feedback model's probability that `chosen` is the
better answer. Both trainers fit a pairwise preference probability σ(m) to it with the
cross-entropy

    -(p · log σ(m) + (1 − p) · log σ(−m)),

m being the reward margin r_chosen − r_rejected (reward model) or β·h, h the policy-minus-
reference log-ratio margin of chosen over rejected (DPO; Rafailov et al. 2023). At p = 1
it is Bradley–Terry / standard sigmoid DPO; at p = 0.5 it is flat at m = 0. TRL's trainers
know only hard labels: `p_chosen` is carried through tokenisation and collation
(`SoftLabels`) and the loss swapped, keeping TRL's metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from trl import DPOTrainer, RewardConfig, RewardTrainer
from trl.trainer import dpo_trainer, reward_trainer
from trl.trainer.utils import selective_log_softmax


def soft_label_loss(margin_chosen: torch.Tensor, margin_rejected: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of σ(a − b) against the soft label p, averaged over the batch.
    At p = 1 it is Bradley–Terry, -log σ(a − b); at p = 0.5 it is flat at a − b = 0."""
    margin = margin_chosen - margin_rejected
    return -(p * F.logsigmoid(margin) + (1 - p) * F.logsigmoid(-margin)).mean()


class SoftLabels:
    """Mixed into a TRL preference collator (chosen rows, then rejected rows): the batch
    also carries each pair's `p_chosen` (1.0 if a row has none)."""

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        batch["p_chosen"] = torch.tensor([e.get("p_chosen", 1.0) for e in examples], dtype=torch.float32)
        return batch


class RewardSoftLabelCollator(SoftLabels, reward_trainer.DataCollatorForPreference):
    pass


class DPOSoftLabelCollator(SoftLabels, dpo_trainer.DataCollatorForPreference):
    pass


class _KeepsSoftLabels:
    """Keeps the `p_chosen` column (else `remove_unused_columns` drops it)."""

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "p_chosen" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "p_chosen"]


class SoftLabelRewardTrainer(_KeepsSoftLabels, RewardTrainer):
    """RewardTrainer with the soft-label loss. Rows carry a `p_chosen` column (1.0 if absent)."""

    def __init__(self, model, args: RewardConfig, processing_class, data_collator=None, **kwargs):
        if data_collator is None:
            data_collator = RewardSoftLabelCollator(pad_token_id=processing_class.pad_token_id,
                                                    pad_to_multiple_of=args.pad_to_multiple_of)
        super().__init__(model=model, args=args, processing_class=processing_class, data_collator=data_collator,
                         **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        p_chosen = inputs.pop("p_chosen", None)
        # TRL's compute_loss runs the model and records accuracy, margin and rewards; its
        # hard-label loss is then replaced by the soft one on the same rewards.
        hard_loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                  num_items_in_batch=num_items_in_batch)
        if p_chosen is None:
            return (hard_loss, outputs) if return_outputs else hard_loss
        r_chosen, r_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        loss = soft_label_loss(r_chosen, r_rejected, p_chosen.to(r_chosen))
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((r_chosen + r_rejected) ** 2)
        return (loss, outputs) if return_outputs else loss


class SoftLabelDPOTrainer(_KeepsSoftLabels, DPOTrainer):
    """DPOTrainer with the soft-label loss (plain sigmoid DPO on precomputed reference
    log-probs; `cai.stages.dpo.check_config` refuses other loss settings).

    Since logσ(x) − logσ(−x) = x, the soft loss is TRL's sigmoid loss plus a linear term:
        -[p·logσ(βh) + (1−p)·logσ(−βh)] = −logσ(βh) + (1−p)·βh
    so TRL computes its loss (and all its metrics) as usual, and only (1−p)·βh is added,
    with h recomputed from the policy logits TRL returns and the precomputed reference
    log-probs in the batch."""

    def __init__(self, model, args, processing_class, **kwargs):
        kwargs.setdefault("data_collator", DPOSoftLabelCollator(
            pad_token_id=processing_class.pad_token_id, max_length=args.max_length,
            truncation_mode=args.truncation_mode, pad_to_multiple_of=args.pad_to_multiple_of))
        super().__init__(model=model, args=args, processing_class=processing_class, **kwargs)

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
    """h = [log π(chosen) − log π_ref(chosen)] − [log π(rejected) − log π_ref(rejected)]."""
    labels = inputs["input_ids"][..., 1:]
    mask = inputs["completion_mask"][..., 1:]
    logps = (selective_log_softmax(logits[..., :-1, :], labels) * mask).sum(dim=1)
    chosen, rejected = logps.chunk(2, dim=0)  # TRL batches [chosen..., rejected...]
    return (chosen - inputs["ref_chosen_logps"]) - (rejected - inputs["ref_rejected_logps"])
