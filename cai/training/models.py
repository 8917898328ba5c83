"""The one loader of the weights a training stage trains (sft, dpo, reward, rl's policy
for every algorithm): tokenizer, dtype, attention, quantisation (load_in_4bit / 8bit)
and the LoRA config TRL wraps the model in, all from the stage's `ModelOptions`.
Frozen models a stage only reads (PPO's reference and reward model, RLOO/GRPO's reward
function) are loaded by `cai.models` directly, unquantised; `RewardScorer` reads a reward
model's scores (the reward stage's accuracies, rl's reward function, evaluate's rewards)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from cai import models
from cai.models import ModelOptions
from cai.work import matmul_parameters


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


class RewardScorer:
    """Scalar rewards from a sequence-classification reward model.

    A (conversation, response) pair is rendered with the tokenizer's chat template as one
    conversation ending in the assistant turn: the token ids RewardTrainer trains on.
    Batches are right-padded like TRL's collator; the model reads the last non-pad token.
    A sequence over `max_length` keeps its last `max_length` tokens (the end is scored).
    Each batch's tokens count into `work` (cai.work, kind `score`: 2·N per real token),
    the stage's when it gives one.
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 1024, work=None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.work = work
        self.forward_flop = 2 * matmul_parameters(model) if work is not None else None  # per token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def from_path(cls, path: str, device: str = "auto", batch_size: int = 8,
                  options: models.ModelOptions | None = None, work=None) -> RewardScorer:
        tokenizer = models.load_tokenizer(path)
        model = models.load_reward_model(path, tokenizer, options).to(models.device_for(device)).eval()
        return cls(model, tokenizer, batch_size, work=work)

    def render(self, conversation: list[dict], response: str) -> list[int]:
        messages = list(conversation) + [{"role": "assistant", "content": response}]
        # the call TRL's reward tokenizer makes (trl.data_utils._tokenize)
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        return list(ids)[-self.max_length:]

    def score(self, conversations: list[list[dict]], responses: list[str]) -> list[float]:
        if len(conversations) != len(responses):
            raise ValueError(f"{len(conversations)} conversations but {len(responses)} responses")
        return self.score_ids([self.render(c, r) for c, r in zip(conversations, responses)])

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """Rewards of already tokenised sequences, in input order (batched by length)."""
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        pad = self.model.config.pad_token_id
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        rewards = [0.0] * len(sequences)
        for start in range(0, len(order), self.batch_size):
            batch = [sequences[i][-self.max_length:] for i in order[start:start + self.batch_size]]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention[row, :len(ids)] = 1
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                use_cache=False).logits
            for i, value in zip(order[start:start + self.batch_size], logits[:, 0].float().tolist()):
                rewards[i] = value
            if self.work is not None:
                self.work.add("score", int(attention.sum()), attention.numel(), self.forward_flop)
        self.model.train(was_training)
        return rewards
