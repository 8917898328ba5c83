"""RL-CAI, the preference model (Bai et al. 2022, section 4.1).

A reward model (the SFT model with a one-output head) is trained on the AI feedback:
pairs (prompt, chosen, rejected) with the feedback model's soft label `p_chosen`, the
probability that `chosen` is the better answer. The loss is the cross-entropy against
the soft label,

    -(p · log σ(r_c − r_r) + (1 − p) · log σ(r_r − r_c)),

which at p = 1 is the usual Bradley–Terry loss (`loss: hard` uses that). TRL's
RewardTrainer knows only hard labels: `cai.training.soft_labels.SoftLabelRewardTrainer`
carries `p_chosen` through tokenisation and collation and swaps the loss, keeping TRL's
metrics. The pairs come from `cai.training.preferences`, the model from
`cai.training.models` (the SFT model under a new one-output head).

`preferences: FILE` trains on a file of pairs instead of the label stage's (human labels,
say: `p_chosen` defaults to 1.0, a person's hard label), so the stage needs no label stage;
the file's content enters the config hash. Optionally the critique stage's pairs (final
revision over first answer) are mixed in with a fixed label. A share of the prompts is
held out (by hash of the prompt text); preference accuracy and mean margin on it, and on
the training pairs, are measured before and after training and written to
`reward/metrics.json`:

    {"loss": "soft", "pairs": {"label": .., "critique": .., ["preferences": ..,] "train": .., "held_out": ..,
                               "too_long": ..},
     "before": {"train": {"pairs", "accuracy", "margin", "loss"}, "held_out": {...}},
     "after":  {"train": {...}, "held_out": {...}}}

`held_out` is null when no pair fell in the held-out share. `cai.training.models.RewardScorer`
scores (conversation, response) pairs with the saved model, here and in the RL and evaluate stages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from trl import RewardConfig

from cai.config import find_file
from cai.rundir import atomic_write_json
from cai.schema import setting
from cai.training.models import RewardScorer
from cai.training.soft_labels import SoftLabelRewardTrainer, soft_label_loss
from cai.yamlio import Problem, ValidationError

log = logging.getLogger(__name__)


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
    preferences: str | None = setting(
        None, "a JSONL file of preference pairs to train on instead of the label stage's AI labels (then no label "
              "stage is needed): TRL's conversational prompt/chosen/rejected rows, optional p_chosen (1.0 when "
              "absent: a person's hard label); null = label/prefs.jsonl")
    mix_critique_pairs: bool = False  # also train on critique/prefs.jsonl (final revision over first answer)
    critique_pair_label: float = setting(1.0, "p_chosen given to those critique pairs", ge=0, le=1,
                                         only_if=("mix_critique_pairs", bool, "mix_critique_pairs: true"))
    eval_fraction: float = setting(0.1, "share of prompts held out (by hash of the prompt text) for accuracy",
                                   ge=0, lt=1)


def preferences_path(run, cfg: Config) -> Path | None:
    """The `preferences` file, resolved as every path of a config is (`cai.config.find_file`)."""
    return None if cfg.preferences is None else find_file(cfg.preferences, run.source)


def check_config(run, cfg: Config, trl: dict) -> list[Problem]:
    """The `preferences` file is read through, every row checked, before any work."""
    from cai.training.preferences import read_preferences

    path = preferences_path(run, cfg)
    if path is None:
        return []

    def problem(message: str) -> Problem:
        where = ("reward", "preferences")
        return run.source.problem(where, message) if run.source else Problem("config", None, message)

    if not path.is_file():
        return [problem(f"'reward.preferences': no file {cfg.preferences}")]
    try:
        pairs = read_preferences(path, "preferences", default=1.0)
    except ValidationError as err:  # a bad row: its file:line
        return [Problem(p.file, p.line, f"'reward.preferences': {p.message}") for p in err.problems]
    except ValueError as err:  # not JSON lines: the message names file:line
        return [problem(f"'reward.preferences': {err}")]
    if not pairs:
        return [problem(f"'reward.preferences': {path} holds no preference pairs")]
    return []


def hashed_config(cfg: Config, run) -> dict:
    """The settings that decide reward's results: the `preferences` file by its content
    (sha256), not its name; without the key, the settings as before it existed (so runs
    keep their hashes)."""
    hashed = dataclasses.asdict(cfg)
    path = preferences_path(run, cfg)
    if path is None:
        del hashed["preferences"]
    else:
        hashed["preferences"] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return hashed


# ---------------------------------------------------------------- scoring


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


# ---------------------------------------------------------------- the stage


def run(ctx) -> dict:
    from datasets import Dataset

    from cai.training.args import trl_config
    from cai.training.models import load_training_model
    from cai.training.preferences import training_preferences
    from cai.training.save import train_and_save

    cfg: Config = ctx.config
    # With rounds, round k trains afresh (from `model`, sft by default) on the labels of
    # rounds 1..k: every policy's answers so far, as the HH paper's iterated online RLHF
    # retrains its preference models on all comparisons collected.
    given = preferences_path(ctx.run, cfg)
    pairs, data = training_preferences(ctx, cfg.mix_critique_pairs, cfg.critique_pair_label, every_round=True,
                                       preferences=given)
    if cfg.loss == "hard":  # Bradley-Terry: the preferred side is certain
        pairs = [{**pair, "p_chosen": 1.0} for pair in pairs]
    sources = {source: sum(p["source"] == source for p in pairs) for source in ("label", "critique", "preferences")}
    train = [p for p in pairs if not held_out(p["prompt"], cfg.eval_fraction)]
    held = [p for p in pairs if held_out(p["prompt"], cfg.eval_fraction)]
    if not train:
        raise RuntimeError(f"no preference pairs to train on in {given or ctx.stage('label').path / 'prefs.jsonl'}"
                           + (" and critique/prefs.jsonl" if cfg.mix_critique_pairs else "")
                           + f" ({len(held)} held out by reward.eval_fraction={cfg.eval_fraction})")
    if not held:
        log.warning("reward: no pair fell in the held-out share (eval_fraction=%s, %d pairs); "
                    "held-out accuracy is not measured", cfg.eval_fraction, len(pairs))

    spec = ctx.model_spec(cfg.model, "sft")
    loaded = load_training_model(ctx, spec, "reward")
    tokenizer = loaded.tokenizer
    args = trl_config(ctx, *trl_settings(cfg))
    trainer = SoftLabelRewardTrainer(model=loaded.model, args=args, train_dataset=Dataset.from_list(train),
                                     eval_dataset=Dataset.from_list(held) if held else None,
                                     processing_class=tokenizer, peft_config=loaded.peft_config)
    scorer = RewardScorer(trainer.model, tokenizer, batch_size=args.per_device_eval_batch_size,
                          max_length=args.max_length or 1024, work=ctx.work)

    def measure() -> dict:
        return {"train": preference_metrics(scorer, trainer.train_dataset),
                "held_out": preference_metrics(scorer, trainer.eval_dataset)}

    before = measure()
    training = train_and_save(trainer, ctx, base=spec, data=data)
    scorer.model = trainer.model
    after = measure()
    too_long = len(train) + len(held) - len(trainer.train_dataset) - len(trainer.eval_dataset or [])
    metrics = {"loss": cfg.loss, "model": spec,
               "pairs": {"label": sources["label"], "critique": sources["critique"],
                         **({"preferences": sources["preferences"]} if given else {}),
                         "train": len(trainer.train_dataset),
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
