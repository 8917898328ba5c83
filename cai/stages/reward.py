"""RL-CAI, the preference model (Bai et al. 2022, section 4.1).

A reward model (the SFT model with a one-output head) is trained on the AI feedback:
pairs (prompt, chosen, rejected) with the feedback model's soft label `p_chosen`, the
probability that `chosen` is the better answer. The loss is the cross-entropy against
the soft label,

    -(p · log σ(r_c − r_r) + (1 − p) · log σ(r_r − r_c)),

which at p = 1 is the usual Bradley–Terry loss (`loss: hard` uses that). TRL's
RewardTrainer knows only hard labels: `SoftLabelRewardTrainer` carries `p_chosen`
through tokenisation and collation and swaps the loss, keeping TRL's metrics.

Optionally the critique stage's pairs (final revision over first answer) are mixed in
with a fixed label. A share of the prompts is held out (by hash of the prompt text);
preference accuracy and mean margin on it, and on the training pairs, are measured
before and after training and written to `reward/metrics.json`:

    {"loss": "soft", "pairs": {"label": .., "critique": .., "train": .., "held_out": .., "too_long": ..},
     "before": {"train": {"pairs", "accuracy", "margin", "loss"}, "held_out": {...}},
     "after":  {"train": {...}, "held_out": {...}}}

`held_out` is null when no pair fell in the held-out share. `RewardScorer` scores
(conversation, response) pairs with the saved model, for the RL and evaluate stages.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference, suppress_seqcls_warning

from cai import models
from cai.config import setting
from cai.rundir import atomic_write_json, read_jsonl

log = logging.getLogger(__name__)

# The label pairs' manifest hash enters ours; critique's does too (it is upstream of sft
# anyway, and its prefs.jsonl is read when mix_critique_pairs is on).
UPSTREAM = ("critique", "sft", "label")


def TRL_CONFIG():
    return RewardConfig


def trl_settings(cfg) -> tuple[type, dict]:
    """The TRL config class and cai's defaults for it (the user's `reward:` keys override them)."""
    return RewardConfig, {"max_length": 512, "num_train_epochs": 1, "per_device_train_batch_size": 8,
                          "learning_rate": 1e-5}


@dataclass
class Config:
    model: str = setting("sft", "initial weights: sft (the SFT stage's model), base (the run's model), or a model "
                                "spec", model_reference=True)
    loss: Literal["soft", "hard"] = "soft"  # soft: cross-entropy on p_chosen; hard: Bradley-Terry (p = 1)
    mix_critique_pairs: bool = False  # also train on critique/prefs.jsonl (final revision over first answer)
    critique_pair_label: float = setting(1.0, "p_chosen given to those critique pairs", ge=0, le=1)
    eval_fraction: float = setting(0.1, "share of prompts held out (by hash of the prompt text) for accuracy",
                                   ge=0, lt=1)


# ---------------------------------------------------------------- the loss


def soft_label_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of σ(r_c − r_r) against the soft label p, averaged over the batch.
    At p = 1 it is Bradley–Terry, -log σ(r_c − r_r); at p = 0.5 it is flat at margin 0."""
    margin = r_chosen - r_rejected
    return -(p * F.logsigmoid(margin) + (1 - p) * F.logsigmoid(-margin)).mean()


@dataclass
class SoftLabelCollator(DataCollatorForPreference):
    """TRL's preference collator (chosen rows, then rejected rows), plus `p_chosen`."""

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        batch["p_chosen"] = torch.tensor([e.get("p_chosen", 1.0) for e in examples], dtype=torch.float)
        return batch


class SoftLabelRewardTrainer(RewardTrainer):
    """RewardTrainer with the soft-label loss. Rows carry a `p_chosen` column (1.0 if absent)."""

    def __init__(self, model, args: RewardConfig, processing_class, data_collator=None, **kwargs):
        if data_collator is None:
            data_collator = SoftLabelCollator(pad_token_id=processing_class.pad_token_id,
                                              pad_to_multiple_of=args.pad_to_multiple_of)
        super().__init__(model=model, args=args, processing_class=processing_class, data_collator=data_collator,
                         **kwargs)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()  # chosen_ids, rejected_ids, margin
        if "p_chosen" not in self._signature_columns:  # else remove_unused_columns drops it
            self._signature_columns = [*self._signature_columns, "p_chosen"]

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


# ---------------------------------------------------------------- scoring


class RewardScorer:
    """Scalar rewards from a sequence-classification reward model.

    A (conversation, response) pair is rendered with the tokenizer's chat template as one
    conversation ending in the assistant turn: the token ids RewardTrainer trains on.
    Batches are right-padded like TRL's collator; the model reads the last non-pad token.
    A sequence over `max_length` keeps its last `max_length` tokens (the end is scored).
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 1024):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def from_path(cls, path: str, device: str = "auto", batch_size: int = 8,
                  options: models.ModelOptions | None = None) -> RewardScorer:
        tokenizer = models.load_tokenizer(path)
        model = models.load_reward_model(path, tokenizer, options).to(models.device_for(device)).eval()
        return cls(model, tokenizer, batch_size)

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
        self.model.train(was_training)
        return rewards


def preference_metrics(scorer: RewardScorer, dataset) -> dict | None:
    """Accuracy (share of pairs with r_chosen > r_rejected, chosen being the label's
    preferred side), mean margin and loss over a tokenised preference dataset."""
    if dataset is None or len(dataset) == 0:
        return None
    r_c = torch.tensor(scorer.score_ids(list(dataset["chosen_ids"])))
    r_r = torch.tensor(scorer.score_ids(list(dataset["rejected_ids"])))
    p = torch.tensor(list(dataset["p_chosen"]), dtype=torch.float)
    return {"pairs": len(dataset), "accuracy": round((r_c > r_r).float().mean().item(), 4),
            "margin": round((r_c - r_r).mean().item(), 4), "loss": round(soft_label_loss(r_c, r_r, p).item(), 4)}


# ---------------------------------------------------------------- data


def held_out(prompt: list[dict], fraction: float) -> bool:
    """Deterministic by the prompt text. Salted apart from cai.prompts' split: the label
    pairs come from its train share, which that hash would never put in eval."""
    text = "\n".join(m["content"] for m in prompt).strip().lower()
    digest = hashlib.sha256(("reward-eval:" + text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def preference_pairs(path: Path, source: str, label: float | None, loss: str) -> list[dict]:
    """Rows in TRL's conversational preference form plus `p_chosen`. A label under 0.5
    means `rejected` is the better answer: the pair is flipped, so `chosen` is always the
    preferred side (TRL's accuracy counts r_chosen > r_rejected)."""
    pairs = []
    for number, row in enumerate(read_jsonl(path), start=1):
        missing = [k for k in ("prompt", "chosen", "rejected") + (("p_chosen",) if label is None else ())
                   if k not in row]
        if missing:
            raise ValueError(f"{path}:{number}: missing {', '.join(missing)} "
                             "(expected prompt/chosen/rejected conversations and a p_chosen soft label)")
        p = float(row["p_chosen"]) if label is None else label
        chosen, rejected = row["chosen"], row["rejected"]
        if p < 0.5:
            chosen, rejected, p = rejected, chosen, 1.0 - p
        pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
                      "p_chosen": 1.0 if loss == "hard" else p, "source": source})
    return pairs


# ---------------------------------------------------------------- the stage


def run(ctx) -> dict:
    from datasets import Dataset
    from transformers import set_seed

    from cai.training import train_and_save, trl_config

    cfg: Config = ctx.config
    label_path = ctx.stage("label").require("its prefs.jsonl is the training set") / "prefs.jsonl"
    pairs = preference_pairs(label_path, "label", None, cfg.loss)
    n_label = len(pairs)
    if cfg.mix_critique_pairs:
        critique_path = ctx.stage("critique").require("mix_critique_pairs reads its prefs.jsonl") / "prefs.jsonl"
        pairs += preference_pairs(critique_path, "critique", cfg.critique_pair_label, cfg.loss)
    train = [p for p in pairs if not held_out(p["prompt"], cfg.eval_fraction)]
    held = [p for p in pairs if held_out(p["prompt"], cfg.eval_fraction)]
    if not train:
        raise RuntimeError(f"no preference pairs to train on in {label_path}"
                           + (" and critique/prefs.jsonl" if cfg.mix_critique_pairs else "")
                           + f" ({len(held)} held out by reward.eval_fraction={cfg.eval_fraction})")
    if not held:
        log.warning("reward: no pair fell in the held-out share (eval_fraction=%s, %d pairs); "
                    "held-out accuracy is not measured", cfg.eval_fraction, len(pairs))

    spec = ctx.model_spec(cfg.model, "sft")
    tokenizer = models.load_tokenizer(spec)
    set_seed(ctx.run.seed)  # the reward head is freshly initialised
    options = ctx.model_options
    with suppress_seqcls_warning():  # "score.weight newly initialised" is the point here
        model = models.load_reward_model(spec, tokenizer, options, quantize=True)
    args = trl_config(ctx, *trl_settings(cfg))
    # With use_peft: a SEQ_CLS adapter; peft trains the new `score` head in full (modules_to_save).
    trainer = SoftLabelRewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(train),
                                     eval_dataset=Dataset.from_list(held) if held else None,
                                     processing_class=tokenizer, peft_config=options.peft_config("SEQ_CLS"))
    scorer = RewardScorer(trainer.model, tokenizer, batch_size=args.per_device_eval_batch_size,
                          max_length=args.max_length or 1024)

    def measure() -> dict:
        return {"train": preference_metrics(scorer, trainer.train_dataset),
                "held_out": preference_metrics(scorer, trainer.eval_dataset)}

    before = measure()
    data = {"label/prefs.jsonl": n_label}
    if cfg.mix_critique_pairs:
        data["critique/prefs.jsonl"] = len(pairs) - n_label
    training = train_and_save(trainer, ctx, base=spec, data=data)
    scorer.model = trainer.model
    after = measure()
    too_long = len(train) + len(held) - len(trainer.train_dataset) - len(trainer.eval_dataset or [])
    metrics = {"loss": cfg.loss, "model": spec,
               "pairs": {"label": n_label, "critique": len(pairs) - n_label, "train": len(trainer.train_dataset),
                         "held_out": len(trainer.eval_dataset or []), "too_long": too_long},
               "before": before, "after": after}
    atomic_write_json(ctx.dir / "metrics.json", metrics)
    for split in ("held_out", "train"):
        if after[split]:
            line = (f"{split} accuracy {before[split]['accuracy']:.3f} -> {after[split]['accuracy']:.3f}, "
                    f"margin {before[split]['margin']:+.3f} -> {after[split]['margin']:+.3f} "
                    f"({after[split]['pairs']} pairs)")
            log.info("reward: %s", line)
            print(f"[cai] reward: {line}")
    if too_long:
        print(f"[cai] reward: {too_long} pairs longer than max_length={args.max_length} tokens were left out")
    held_after = after["held_out"] or {}
    return {**metrics["pairs"], **training, "held_out_accuracy": held_after.get("accuracy"),
            "held_out_margin": held_after.get("margin"), "train_accuracy": after["train"]["accuracy"]}
