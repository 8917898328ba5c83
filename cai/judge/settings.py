"""The judge's settings and the one factory every stage builds its judge with.

Every stage with a judge (critique's `best_of`, label, rl's `reward: judge`, evaluate)
has the same `feedback_*` keys, from `JudgeSettings`, and opens its judge with
`make_judge`: what applies where (calibration, chain of thought, a letter-scoring
server) is decided here, once. Pairwise judges (critique, label, evaluate) take every
setting; rl's pointwise judge (one answer, Yes / No) takes the model and the few-shot
count, and refuses the others.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from cai.engines import is_server, server_name
from cai.judge.judge import Judge, setting_conflicts
from cai.schema import setting
from cai.yamlio import problem

PREFIX = "feedback_"


COT = ("feedback_cot", bool, "feedback_cot: true")  # the chain-of-thought keys do nothing without it


@dataclass
class JudgeSettings:
    """The judge's keys, the same in every stage section that has a judge."""

    feedback_model: str = setting("base", "the judge (feedback model): base (the run's model), a stage, a model spec "
                                          "or server:NAME", model_reference=True)
    feedback_few_shot: int = setting(2, "the constitution's feedback examples shown to the judge first", ge=0)
    feedback_few_shot_choice: Literal["first", "balanced", "mirrored"] = setting(
        "first", "first: the first feedback_few_shot examples; balanced: their answers alternate A, B, ...; "
                 "mirrored: each also with its responses swapped (2x the shots; not with feedback_cot)")
    feedback_calibrate: bool | None = setting(
        None, "divide the option probabilities by those of a content-free input and renormalise (Zhao et al. "
              "2021); null = on where it applies (not with feedback_cot, a letter-scoring server or rl's "
              "pointwise judge)")
    feedback_cot: bool = setting(False, "chain of thought: the judge reasons before it answers; each order's "
                                        "probability is then clamped to feedback_cot_clamp")
    feedback_cot_clamp: list[float] = setting(help="[low, high] band for each order's chain-of-thought probability "
                                                   "(the paper's 40-60 %)", default_factory=lambda: [0.4, 0.6],
                                              only_if=COT)
    feedback_cot_max_new_tokens: int = setting(128, "length of the judge's reasoning", ge=1, only_if=COT)


JUDGE_FIELDS = tuple(f.name for f in dataclasses.fields(JudgeSettings))
POINTWISE_KEYS = ("feedback_model", "feedback_few_shot")  # what rl's Yes / No question uses

# Keys of earlier versions, refused with their new name (one vocabulary: feedback_*).
RENAMED = {
    "label": {old: PREFIX + old for old in ("few_shot", "few_shot_choice", "calibrate", "cot", "cot_clamp",
                                            "cot_max_new_tokens")},
    "evaluate": {old: PREFIX + old for old in ("few_shot", "few_shot_choice", "calibrate")},
    "rl": {"judge_few_shot": "feedback_few_shot", "judge_batch_size": "feedback_batch_size"},
}


def renamed_key_problems(doc, stage: str, section: dict | None) -> list:
    """A key of an earlier version in `stage`'s section: its new name, at its line."""
    renamed = RENAMED.get(stage, {})
    return [doc.problem((stage, key), f"'{stage}.{key}' is renamed to '{stage}.{renamed[key]}' (every judge "
                                      f"setting is spelt feedback_* in every stage)")
            for key in (section or {}) if key in renamed]


def letter_scoring(run, reference: str) -> bool:
    """The judge is a server opted into `option_scoring: letter` (no probabilities)."""
    return is_server(reference) and run.servers[server_name(reference)].option_scoring == "letter"


def calibrates(run, cfg: JudgeSettings, pointwise: bool = False) -> bool:
    """Whether a judge calibrates: as set, else (null) wherever it applies. On the CAI
    paper's HHH pairs it cut SmolLM2-135M's same-slot share from 100 % to 82 % at the same
    accuracy (bench/labeler_hhh.py)."""
    if cfg.feedback_calibrate is not None:
        return cfg.feedback_calibrate
    return not (pointwise or cfg.feedback_cot or letter_scoring(run, cfg.feedback_model))


def judge_scoring(run, reference: str) -> str:
    """How a judge's labels are read, for the manifest and the report: option
    probabilities, or (a server opted into `option_scoring: letter`) a parsed letter."""
    if letter_scoring(run, reference):
        return "letter (degraded: hard labels parsed from a generated letter; the server gives no log-probabilities)"
    return "probabilities"


def judge_problems(run, stage: str, cfg: JudgeSettings, pointwise: bool = False) -> list:
    """The judge settings of `stage`'s section that cannot be used as given, at their lines."""
    problems = []

    if pointwise:
        default = JudgeSettings()
        for key in JUDGE_FIELDS:
            if key not in POINTWISE_KEYS and getattr(cfg, key) != getattr(default, key):
                problems.append(problem(run.source, (stage, key), (
                    f"'{stage}.{key}' does not apply to {stage}'s judge, which rates one answer at a time "
                    f"(Yes / No, both orders; no calibration, chain of thought or few-shot choice); remove it")))
        return problems
    for key, why in setting_conflicts(cfg.feedback_few_shot_choice, cfg.feedback_calibrate is True, cfg.feedback_cot,
                                      cfg.feedback_cot_clamp, prefix=f"{stage}.{PREFIX}"):
        problems.append(problem(run.source, (stage, PREFIX + key), why))
    if cfg.feedback_calibrate is True and letter_scoring(run, cfg.feedback_model):
        problems.append(problem(run.source, (stage, "feedback_calibrate"), (
            f"'{stage}.feedback_calibrate' needs option probabilities, but the feedback model's server has "
            "option_scoring: letter")))
    return problems


def model_name(ctx, spec: str) -> str:
    """What a row or manifest records about a model: a stage name as is, else the resolved spec."""
    from cai.registry import is_step_reference

    return spec if is_step_reference(spec) and spec != "base" else ctx.model_spec(spec)


def make_judge(ctx, cfg: JudgeSettings, batch_size: int, pointwise: bool = False) -> Judge:
    """The stage's judge on its engine (shared with another role that names the same model)."""
    judge = Judge(ctx.engine(cfg.feedback_model, batch_size), few_shot=cfg.feedback_few_shot,
                  few_shot_choice=cfg.feedback_few_shot_choice, calibrate=calibrates(ctx.run, cfg, pointwise),
                  cot=cfg.feedback_cot and not pointwise, cot_clamp=tuple(cfg.feedback_cot_clamp),
                  cot_max_new_tokens=cfg.feedback_cot_max_new_tokens)
    judge.description = {"feedback_model": model_name(ctx, cfg.feedback_model),
                         "judge_scoring": judge_scoring(ctx.run, cfg.feedback_model),
                         "mode": "cot" if judge.cot else "direct", "few_shot": cfg.feedback_few_shot,
                         "few_shot_choice": cfg.feedback_few_shot_choice, "calibrate": judge.calibrate}
    return judge


def hashed_without_judge(cfg) -> dict:
    """A stage's settings without the judge's, for a config hash when its judge is unused."""
    return {key: value for key, value in dataclasses.asdict(cfg).items() if key not in JUDGE_FIELDS}
