"""TRL's fused LM head, on a CPU: the scored positions only, in one plain projection.

Since TRL 1.15 the SFT, DPO and RLOO trainers get per-token log-probs from a forward TRL
installs (`trl.trainer.utils.add_fused_lm_head`; `model(..., labels=..., fused_lm_head=
True)`), which never builds the `[rows, tokens, vocabulary]` logits: it projects the
hidden states in `[tokens, 32768]` tiles, folds each into a running log-sum-exp and
recomputes them in backward. On a GPU it scores only the positions that have a label; on
a device without Triton (a CPU) it scores every position, prompt and padding included,
and folds the tiles with torch operations. There it is the slow part of a small model's
step: for SmolLM2-135M's 49,152-token vocabulary it took 2.9 s per 1,200 positions
forward and backward against 1.7 s for the plain projection at 2 threads, and a
completion-only batch has about half its positions in the prompt (`bench/lm_head.py`).

`use_plain_lm_head(trainer)` puts a forward in front of TRL's on a CPU model: a call
with `fused_lm_head=True` runs the backbone, projects only the positions with a label
(one matmul over the whole vocabulary; autograd keeps `positions x vocabulary` floats for
backward, as TRL 1.12's logits did, but only of the scored positions), and returns TRL's
`FusedCausalLMOutput` with the same fields: log-probs (with their graph), entropy,
whether the label is the top token, mean logit and log Σp², those four without
gradient. Every other call, and any case it does not cover (a GPU; more positions than
`MAX_SCORED` x vocabulary floats; a model that scales or caps its logits; MoE router
logits), goes to TRL's forward unchanged.
"""

from __future__ import annotations

import types

import torch

# Positions x vocabulary floats one call may project at once (512 MiB); a larger batch uses
# TRL's tiled head, which needs less memory.
MAX_SCORED = 2**27
# Config fields that change the logits (TRL's head applies them; this one does not).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")
# Trainers whose fused-head entropy is read for metrics only (without gradient) and the
# attribute holding their sampling temperature, if they have one.
_TRAINERS = {"SFTTrainer": None, "DPOTrainer": None, "RLOOTrainer": "temperature"}


def use_plain_lm_head(trainer) -> bool:
    """Put the plain head in front of the fused one TRL installed on the trainer's model
    (and reference model) when they run on a CPU. Returns whether it did."""
    name = next((cls.__name__ for cls in type(trainer).__mro__ if cls.__name__ in _TRAINERS), None)
    if name is None:
        return False
    temperature = float(getattr(trainer, _TRAINERS[name]) if _TRAINERS[name] else 1.0)
    done = False
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if model is not None:
            done = _install(model.get_base_model() if hasattr(model, "get_base_model") else model,
                            temperature) or done
    return done


def _install(model, temperature: float) -> bool:
    fused = vars(model).get("forward")
    code = getattr(getattr(fused, "__func__", None), "__code__", None)
    if code is None or code.co_name != "_fused_forward":  # (TRL wraps it to look like `forward`)
        return False  # no TRL fused head here (an older or newer TRL): nothing to put in front of
    config = model.config.get_text_config()
    if any(getattr(config, key, None) is not None for key in _LOGIT_TRANSFORMS):
        return False
    if getattr(config, "output_router_logits", False):
        return False  # MoE: TRL's head adds the router's load-balancing loss
    if next(model.parameters()).device.type != "cpu":
        return False

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head or shift_labels is not None or labels is None or kwargs.get("output_router_logits"):
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                         num_items_in_batch=num_items_in_batch, **kwargs)
        mask = labels[:, 1:] != -100
        lm_head = self.get_output_embeddings()
        if int(mask.sum()) * lm_head.weight.shape[0] > MAX_SCORED:
            return fused(*args, fused_lm_head=True, labels=labels, num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        return plain_head_output(hidden, lm_head, labels[:, 1:], mask, temperature, num_items_in_batch)

    model.forward = types.MethodType(forward, model)
    return True


def plain_head_output(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor, mask: torch.Tensor,
                      temperature: float, num_items_in_batch=None):
    """TRL's `FusedCausalLMOutput` for the positions in `mask` (zero elsewhere), from one
    projection of their hidden states."""
    from trl.trainer.utils import FusedCausalLMOutput

    logits = lm_head(hidden[mask]).float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = labels[mask]
    log_softmax = logits.log_softmax(-1)
    log_probs = log_softmax.gather(-1, targets[:, None]).squeeze(-1)
    with torch.no_grad():
        probs = log_softmax.exp()
        entropy = -(probs * log_softmax).sum(-1)
        log_sum_sq_probs = probs.square().sum(-1).log()
        mean_logits = logits.mean(-1)
        is_top1 = logits.argmax(-1) == targets  # argmax takes the first of tied maxima, as TRL's kernel does

    def spread(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(mask.shape).masked_scatter(mask, values)

    log_probs = spread(log_probs)
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=spread(entropy),
                               log_sum_sq_probs=spread(log_sum_sq_probs), mean_logits=spread(mean_logits),
                               is_top1=spread(is_top1), label_mask=mask, aux_loss=None)
