"""THE stage list: every list of stage names in cai (config sections, the pipeline's
order, which stages save a model, train, may use a server, read prompts, the CLI's
subcommands and help, the report's sections, bench/stages.py) is read from here.

A leaf module: it imports nothing from cai, so anything may import it.

Rounds (`rounds: N` in a run config; Bai et al. 2022a's iterated online RLHF): critique
and sft run once; the stages marked `per_round` (label, reward, rl, dpo) run once per
round, round k >= 2 in `RUN_DIR/roundK/STAGE`; evaluate runs once, after the last round,
on every round's models. A step, one stage in one round, is named `STAGE` in round 1
(today's folders and names) and `STAGE@K` in round K >= 2: `cai run --from rl@2`, and a
model reference `rl@2` means round 2's rl model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal


@dataclass(frozen=True)
class Stage:
    name: str
    kind: Literal["data", "training"]  # a data stage generates and judges; a training stage trains weights
    help: str
    # the stages whose outputs it reads (their config hashes enter its own), or a function of
    # its Config giving them
    upstream: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
    saves_model: bool = False  # writes STAGE/model (or STAGE/adapter): a model reference may name it
    policy: bool = False  # the model it saves answers prompts (evaluate compares it)
    per_round: bool = False  # runs once per round (`rounds`)
    prompts: Literal["train", "eval"] | None = None  # which prompt split it needs to have work
    # the parts of the constitution it reads (`cai.constitution.Constitution` fields), or a
    # function of its Config giving them: they, not the file's bytes, enter its config hash
    constitution: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()

    @property
    def module(self) -> str:
        """The recipe: `Config`, optional `TRL_CONFIG`, `check_config`, `hashed_config`, `run(ctx)`."""
        return f"cai.stages.{self.name}"

    def upstream_of(self, cfg: Any) -> tuple[str, ...]:
        return tuple(self.upstream(cfg) if callable(self.upstream) else self.upstream)

    def constitution_of(self, cfg: Any) -> tuple[str, ...]:
        return tuple(self.constitution(cfg) if callable(self.constitution) else self.constitution)


def _rl_upstream(cfg) -> tuple[str, ...]:
    """rl reads the policy and the reward model, or with `reward: judge` the policy and
    the judge's stage, if the judge is one."""
    if cfg.reward == "reward_model":
        return ("sft", "reward")
    judge = split_step(cfg.feedback_model)[0] if is_step_reference(cfg.feedback_model) else None
    return ("sft", cfg.feedback_model) if judge in MODEL_STAGES and judge not in ("base", "sft") else ("sft",)


def _reward_upstream(cfg) -> tuple[str, ...]:
    """reward reads the label stage's pairs, or with `preferences` a file of pairs instead."""
    return ("critique", "sft") if cfg.preferences else ("critique", "sft", "label")


JUDGE_PARTS = ("feedback", "feedback_examples")  # what a judge reads (cai.judge.prompts)


def _critique_parts(cfg) -> tuple[str, ...]:
    """critique: its principles, examples (few-shot turns and the leakage check) and system
    prompt; the judge's parts only when best_of uses a judge."""
    return ("system_prompt", "critique_revision", "critique_examples") + (JUDGE_PARTS if cfg.best_of > 1 else ())


def _rl_parts(cfg) -> tuple[str, ...]:
    return JUDGE_PARTS if cfg.reward == "judge" else ()


STAGES: tuple[Stage, ...] = (
    Stage("critique", "data", "SL-CAI: answer red-team prompts, critique and revise against the constitution",
          prompts="train", constitution=_critique_parts),
    Stage("sft", "training", "fine-tune on the final revisions (TRL SFTTrainer)",
          upstream=("critique",), saves_model=True, policy=True),
    Stage("label", "data", "RL-CAI: sample answer pairs, the feedback model picks one (soft labels)",
          upstream=("sft",), per_round=True, prompts="train", constitution=JUDGE_PARTS),
    Stage("reward", "training", "train a reward model on the AI preferences (TRL RewardTrainer, soft-label loss)",
          upstream=_reward_upstream, saves_model=True, per_round=True),
    Stage("rl", "training", "optimise the policy against the reward model (PPO, RLOO or GRPO)",
          upstream=_rl_upstream, saves_model=True, policy=True, per_round=True, prompts="train",
          constitution=_rl_parts),
    Stage("dpo", "training", "optimise the policy directly on the AI preferences (TRL DPOTrainer)",
          upstream=("critique", "sft", "label"), saves_model=True, policy=True, per_round=True),
    Stage("evaluate", "data", "evaluate every stage's model on held-out prompts",
          upstream=("critique", "sft", "label", "reward", "rl", "dpo"), prompts="eval",
          constitution=("name", "system_prompt", "critique_revision", "critique_examples", *JUDGE_PARTS,
                        "evaluation_harmless", "evaluation_helpful")),
)

BY_NAME = {stage.name: stage for stage in STAGES}
ORDER = tuple(stage.name for stage in STAGES)
TRAINING_STAGES = tuple(s.name for s in STAGES if s.kind == "training")
DATA_STAGES = tuple(s.name for s in STAGES if s.kind == "data")  # their model roles may name a server
ROUND_STAGES = tuple(s.name for s in STAGES if s.per_round)
POLICY_STAGES = tuple(s.name for s in STAGES if s.policy)
# Stage names a model reference may use: `base` (the run's model) and the stages that save one.
MODEL_STAGES = ("base",) + tuple(s.name for s in STAGES if s.saves_model)
# In evaluate.models only: the base model prompted with the constitution as its system message
# (`cai.constitution.as_system_prompt`), the baseline training has to beat.
PROMPTED_BASE = "base+constitution"


def optimisers(sections) -> list[str]:
    """The policy optimisers a run has, from its config's section names: rl and dpo when
    their section is present, rl when neither is."""
    return [s for s in ("rl", "dpo") if s in sections] or ["rl"]


def stage(name: str) -> Stage:
    """The registry entry of a stage or a step (`rl@2`)."""
    base = split_step(name)[0]
    if base not in BY_NAME:
        raise ValueError(f"unknown stage '{name}' (stages: {', '.join(ORDER)})")
    return BY_NAME[base]


# ---------------------------------------------------------------- steps: a stage in a round


def step_name(name: str, round_number: int) -> str:
    """`label` in round 1, `label@2` in round 2 (a stage outside the rounds keeps its name)."""
    return f"{name}@{round_number}" if round_number > 1 and BY_NAME[name].per_round else name


def split_step(step: str) -> tuple[str, int | None]:
    """`rl@2` -> ("rl", 2); `rl` -> ("rl", None). Not validated."""
    name, sep, number = step.partition("@")
    return (name, int(number)) if sep and number.isdigit() else (step, None)


def is_step_reference(reference: str) -> bool:
    """A stage name, or `STAGE@K` of a per-round stage (K >= 1)."""
    name, number = split_step(reference)
    if number is None:
        return reference in BY_NAME or reference == "base"
    return name in BY_NAME and BY_NAME[name].per_round and number >= 1


def in_round(reference: str, round_number: int) -> str:
    """The step a stage name means in a round: `label` in round 2 is `label@2`; `rl@1` is
    `rl`; a stage outside the rounds, `base` or a model spec is itself."""
    name, number = split_step(reference)
    if name not in BY_NAME:
        return reference
    return step_name(name, number if number is not None else round_number)


def step_command(step: str) -> str:
    """The command that runs a step: `cai rl`, `cai rl --round 2`."""
    name, number = split_step(step)
    return f"cai {name}" + (f" --round {number}" if number and number > 1 else "")


def step_folder(step: str) -> PurePosixPath:
    """A step's folder, relative to the run directory: `label`, `round2/label`."""
    name, number = split_step(step)
    return PurePosixPath(f"round{number}", name) if number and number > 1 else PurePosixPath(name)


def steps(names: list[str] | tuple[str, ...], rounds: int) -> list[str]:
    """The steps of these stages over `rounds` rounds, in running order: the stages before
    the rounds, each round's, then the rest (evaluate)."""
    names = [n for n in ORDER if n in names]
    first = ORDER.index(ROUND_STAGES[0])
    before = [n for n in names if not BY_NAME[n].per_round and ORDER.index(n) < first]
    after = [n for n in names if not BY_NAME[n].per_round and ORDER.index(n) > first]
    looped = [n for n in names if BY_NAME[n].per_round]
    return before + [step_name(n, k) for k in range(1, rounds + 1) for n in looped] + after


def round_of(step: str, rounds: int) -> int:
    """The round a step runs in: its `@K`, 1 for a stage before the rounds, the last
    round for one after them (evaluate sees the newest reward model and labels)."""
    name, number = split_step(step)
    if number is not None:
        return number
    if BY_NAME[name].per_round or ORDER.index(name) < ORDER.index(ROUND_STAGES[0]):
        return 1
    return rounds
