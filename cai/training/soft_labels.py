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

from cai.work import batch_tokens, matmul_parameters


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


class CountsReferencePass:
    """A DPO trainer that counts its precomputed reference pass into `work` (cai.work,
    kind `reference`, 2·N per real token): TRL runs that pass while the trainer is built,
    before `train_and_save` counts the training steps. Each (re)start runs it afresh (the
    stage's dataset, and the cache TRL writes beside it, are written anew)."""

    def __init__(self, *args, work=None, **kwargs):
        self._reference_work = work
        self._reference_flop = None  # 2·N of the reference model, counted on its first batch
        super().__init__(*args, **kwargs)

    def compute_ref_log_probs(self, model, inputs):
        if self._reference_work is not None:
            if self._reference_flop is None:
                self._reference_flop = 2 * matmul_parameters(self.accelerator.unwrap_model(model))
            self._reference_work.add("reference", *batch_tokens(inputs), self._reference_flop)
        return super().compute_ref_log_probs(model, inputs)


class CountedDPOTrainer(CountsReferencePass, DPOTrainer):
    """TRL's DPOTrainer (hard labels), its reference pass counted."""


class SoftLabelDPOTrainer(_KeepsSoftLabels, CountsReferencePass, DPOTrainer):
    """DPOTrainer with the soft-label loss (plain sigmoid DPO on precomputed reference
    log-probs; `cai.stages.dpo.check_config` refuses other loss settings).

    Since logσ(x) − logσ(−x) = x, the soft loss is TRL's sigmoid loss plus a linear term:
        -[p·logσ(βh) + (1−p)·logσ(−βh)] = −logσ(βh) + (1−p)·βh
    so TRL computes its loss (and all its metrics) as usual, and only (1−p)·βh is added.

    The term needs h with its graph: d/dθ of the whole is −β(p − σ(βh))·dh/dθ, not plain
    DPO's −β(1 − σ(βh))·dh/dθ. Since TRL 1.15 the DPO forward goes through a fused LM head
    that returns per-token log-probs and builds no logits; `compute_loss(return_outputs=
    True)` rebuilds logits in a second forward under no_grad, which would leave the term
    without gradient (and cost a forward). TRL 1.16 has no loss method that receives the
    policy's log-probs: `_compute_loss` runs the forward, the loss and the metrics in one
    body, and copying it would fork TRL. So the policy's per-token log-probs are taken from
    that one forward as it runs (`_PolicyLogProbs`, a forward hook on the model TRL calls),
    and h is summed from them exactly as TRL sums its own (`log_ratio_margin`)."""

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
        with _PolicyLogProbs(model) as policy:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs)
        loss, outputs = result if return_outputs else (result, None)
        margin = log_ratio_margin(policy.log_probs, inputs)
        loss = loss + (self.beta * (1 - p_chosen.to(margin)) * margin).mean()
        return (loss, outputs) if return_outputs else loss


class _PolicyLogProbs:
    """Within the block, the per-token log-probs of the model's first fused-LM-head forward
    (TRL's policy forward: `model(..., fused_lm_head=True).log_probs`), graph included."""

    def __init__(self, model):
        self.model = model
        self.log_probs: torch.Tensor | None = None

    def _seen(self, module, args, kwargs, output):
        if self.log_probs is None and kwargs.get("fused_lm_head"):
            self.log_probs = output.log_probs

    def __enter__(self):
        self._hook = self.model.register_forward_hook(self._seen, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._hook.remove()
        if exc[0] is None and self.log_probs is None:
            raise RuntimeError("SoftLabelDPOTrainer: TRL's DPO loss ran no fused-LM-head forward of the policy; this "
                               "TRL version computes DPO differently from the one cai's soft-label loss follows (1.16)")


def log_ratio_margin(log_probs: torch.Tensor, inputs: dict) -> torch.Tensor:
    """h = [log π(chosen) − log π_ref(chosen)] − [log π(rejected) − log π_ref(rejected)],
    from the policy's per-token log-probs (zero outside the completions, as TRL's fused head
    returns them) and the precomputed reference log-probs in the batch."""
    logps = log_probs[:, -(inputs["completion_mask"].size(1) - 1):].sum(dim=1)
    chosen, rejected = logps.chunk(2, dim=0)  # TRL batches [chosen..., rejected...]
    return (chosen - inputs["ref_chosen_logps"]) - (rejected - inputs["ref_rejected_logps"])
