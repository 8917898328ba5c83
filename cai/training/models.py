"""The one loader of the weights a training stage trains (sft, dpo, reward, rl's policy
for every algorithm): tokenizer, dtype, attention, quantisation (load_in_4bit / 8bit)
and the LoRA config TRL wraps the model in, all from the stage's `ModelOptions`.
Frozen models a stage only reads (PPO's reference and reward model, RLOO/GRPO's reward
function) are loaded by `cai.models` directly, unquantised."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from cai import models
from cai.models import ModelOptions


@dataclass
class TrainingModel:
    model: Any  # quantised when the options say so; TRL wraps it in `peft_config`'s adapter
    tokenizer: Any
    peft_config: Any  # the trainer's `peft_config=`: None without use_peft


def load_training_model(ctx, spec: str, head: Literal["causal", "reward"] = "causal",
                        padding_side: str | None = None) -> TrainingModel:
    """`spec`'s weights to train, as a causal LM (sft, dpo, rl's policy) or under a new
    one-output reward head (reward). The reward head is freshly initialised, seeded by
    the run's seed. An adapter folder (a stage saved with merge_adapter: false) is merged
    onto its base first, whatever head it was trained with (`cai.models`)."""
    options: ModelOptions = ctx.model_options
    tokenizer = models.load_tokenizer(spec, padding_side=padding_side)
    if head == "reward":
        from transformers import set_seed
        from trl.trainer.reward_trainer import suppress_seqcls_warning

        set_seed(ctx.run.seed)
        with suppress_seqcls_warning():  # "score.weight newly initialised" is the point here
            model = models.load_reward_model(spec, tokenizer, options, quantize=True)
        # With use_peft: a SEQ_CLS adapter; peft trains the new `score` head in full (modules_to_save).
        return TrainingModel(model, tokenizer, options.peft_config("SEQ_CLS"))
    model = models.load_causal_lm(spec, ctx.run.device, options, quantize=True)
    return TrainingModel(model, tokenizer, options.peft_config("CAUSAL_LM"))


def reference_loading(args, options: ModelOptions) -> None:
    """A trainer that reloads its KL reference from the policy's folder (RLOO, GRPO, DPO
    without precomputed log-probs) loads it like the policy: same dtype, attention and
    revision (TRL's default is float32). The user's own `model_init_kwargs` win. With
    LoRA there is no reference to load (the adapter is disabled instead)."""
    if options.use_peft or getattr(args, "precompute_ref_log_probs", False):
        return
    kwargs = options.reference_kwargs()
    if kwargs and hasattr(args, "model_init_kwargs"):
        args.model_init_kwargs = {**kwargs, **(args.model_init_kwargs or {})}

