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
The pairs come from `cai.training.preferences`, the loss from `cai.training.soft_labels`,
the policy from `cai.training.models`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cai.registry import step_folder
from cai.schema import setting
from cai.yamlio import Problem, problem


def TRL_CONFIG():
    from trl import DPOConfig

    return DPOConfig


def trl_settings(cfg) -> tuple[type, dict]:
    """The TRL config class and cai's defaults for it (the user's `dpo:` keys override them)."""
    from trl import DPOConfig

    return DPOConfig, {"max_length": 1024, "precompute_ref_log_probs": True}


@dataclass
class Config:
    policy: str | None = setting(
        None, "the model to optimise, also the reference: null = the newest policy (the sft stage's model in "
              "round 1, round k-1's dpo in round k)", model_reference=True)
    soft_labels: Literal["threshold", "weighted"] = "threshold"  # how p_chosen is used (module docstring)
    min_confidence: float = setting(0.55, "threshold mode: keep pairs with p_chosen >= this", ge=0.5, le=1,
                                    only_if=("soft_labels", lambda v: v == "threshold", "soft_labels: threshold"))
    mix_critique_pairs: bool = False  # also train on critique/prefs.jsonl (revision over first answer, p = 1)


def check_config(run, cfg: Config, trl: dict) -> list[Problem]:
    """The weighted loss extends TRL's plain sigmoid DPO loss: other loss settings are refused."""

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
                problems.append(problem(run.source, ("dpo", key),
                                        f"'dpo.{key}: {value}' does not work with dpo.soft_labels: weighted, "
                                        f"which needs {needed!r} (the soft-label loss extends plain sigmoid DPO "
                                        "on precomputed reference log-probs); use soft_labels: threshold"))
    return problems


def preference_pairs(ctx, cfg: Config) -> tuple[list[dict], dict]:
    """The training pairs with their soft label, and counts for the manifest. In
    threshold mode, label pairs under `min_confidence` are dropped (critique pairs are
    certain: p = 1)."""
    from cai.training.preferences import training_preferences

    read, data = training_preferences(ctx, cfg.mix_critique_pairs)
    unsure = [cfg.soft_labels == "threshold" and pair["p_chosen"] < cfg.min_confidence for pair in read]
    pairs = [{key: pair[key] for key in ("prompt", "chosen", "rejected", "p_chosen")}
             for pair, drop in zip(read, unsure) if not drop]
    labelled = sum(n for file, n in data.items() if file.endswith("label/prefs.jsonl"))  # round2/label/... too
    counts = {"label_pairs": labelled - sum(unsure), "dropped_low_confidence": sum(unsure),
              "critique_pairs": data.get("critique/prefs.jsonl", 0)}
    return pairs, counts


def dpo_trainer(ctx, cfg: Config, pairs: list[dict]):
    from cai.training.args import trl_config
    from cai.training.models import load_training_model, reference_loading
    from cai.training.preferences import shared_dataset
    from cai.training.soft_labels import CountedDPOTrainer, SoftLabelDPOTrainer

    # The policy is loaded from its folder, so TRL's reference (config._name_or_path) is the
    # same SFT model; its log-probs are computed once, before training, then dropped. With
    # use_peft there is no reference copy at all (ref_model=None): the reference is the
    # policy with its adapter disabled, as TRL does.
    policy = ctx.model_spec(cfg.policy, ctx.newest_policy())
    options = ctx.model_options
    args = trl_config(ctx, *trl_settings(cfg))
    reference_loading(args, options)
    loaded = load_training_model(ctx, policy)
    common = {"ref_model": None, "peft_config": loaded.peft_config, "work": ctx.work}
    if cfg.soft_labels == "weighted":
        return SoftLabelDPOTrainer(model=loaded.model, args=args, train_dataset=shared_dataset(ctx, "train", pairs),
                                   processing_class=loaded.tokenizer, **common)
    hard = [{k: v for k, v in pair.items() if k != "p_chosen"} for pair in pairs]
    return CountedDPOTrainer(model=loaded.model, args=args, train_dataset=shared_dataset(ctx, "train", hard),
                             processing_class=loaded.tokenizer, **common)


def run(ctx) -> dict:
    from cai.training.save import train_and_save

    cfg: Config = ctx.config
    pairs, counts = preference_pairs(ctx, cfg)
    if not pairs:
        raise RuntimeError(f"dpo: no preference pairs to train on ({counts}); lower dpo.min_confidence, "
                           "use soft_labels: weighted, or check the label stage's outputs")
    data = {f"{step_folder(ctx.stage('label').name)}/prefs.jsonl": counts["label_pairs"]}
    if cfg.mix_critique_pairs:
        data["critique/prefs.jsonl"] = counts["critique_pairs"]
    base = ctx.model_spec(cfg.policy, ctx.newest_policy())
    metrics = train_and_save(dpo_trainer(ctx, cfg, pairs), ctx, base=base, data=data)
    return {**counts, **metrics}
