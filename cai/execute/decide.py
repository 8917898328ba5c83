"""The one decision per step, from the step and its folder (DVC's `Stage.changed`):
skip it (complete with the same fingerprint), run it, resume it (an interrupted start
with the same fingerprint), redo it (moving the old folder aside: `--force`, or a stale
step, whose own settings are unchanged but whose upstream steps were redone after it in
this run folder), or refuse (other settings without --force, or a saved model that
cannot be loaded). Pure: it reads the folder, writes nothing."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cai import distributed
from cai.plan.fingerprint import own_settings, settings_diff
from cai.registry import step_command
from cai.rundir import StageDir, folder_size
from cai.yamlio import Problem, ValidationError


@dataclass(frozen=True)
class Decision:
    action: str  # skip, run, resume, redo, refuse
    message: str = ""  # why (a redo's note, a refusal's text)
    where: str = ""  # what a refusal is about: the step's folder, or a file
    manifest: dict | None = None  # a skipped step's
    stale: bool = False  # a redo because upstream steps were redone after it

    def problem(self) -> Problem:
        return Problem(self.where, None, self.message)

    def aside(self, folder: Path) -> Path:
        """Where a redo moves the old folder."""
        return folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")


def decide(step, run_dir: Path, force: bool = False) -> Decision:
    """The decision for a planned step (`cai.plan.plan.Step`) in `run_dir`."""
    folder = StageDir(run_dir, step.step)
    manifest = folder.manifest()
    before = manifest or folder.marker()
    previous = before["config_hash"] if before else None
    corrupt = folder.model_problem() if manifest else None  # a saved model that would fail its readers
    if previous == step.fingerprint and manifest:
        if not corrupt:
            return Decision("skip", manifest=manifest)
        if not force:
            return corrupt_refusal(step.step, corrupt)
    for up in step.upstream:  # the models this stage will load are readable, before any work
        if (problem := StageDir(run_dir, up).model_problem()) is not None:
            return corrupt_refusal(up, problem)
    if corrupt:  # with --force: the same settings, a model that cannot be loaded
        return Decision("redo", f"--force: its saved model cannot be loaded ({corrupt[0]}: {corrupt[1]})")
    if previous is None:
        return Decision("run")
    if previous == step.fingerprint:
        return Decision("resume")
    changes = "\n".join(f"  {line}" for line in settings_diff(before, step.settings))
    if "settings" in before and own_settings(before["settings"]) == own_settings(step.settings):
        return Decision("redo", f"stale: upstream steps were redone after it:\n{changes}", stale=True)
    if force:
        return Decision("redo", f"--force:\n{changes}")
    state = "completed" if manifest else "started"
    return Decision("refuse", (
        f"stage '{step.step}' in {folder.path} was {state} with other settings or inputs "
        f"(config hash {previous}, now {step.fingerprint}):\n{changes}"
        f"\nNothing was changed. Use another run_dir, or pass --force to move the old folder aside "
          f"(a full copy, {folder_size(folder.path)}) and redo the stage."), where=str(folder.path))


def corrupt_refusal(step: str, problem: tuple[Path, str]) -> Decision:
    """The refusal of a complete stage whose saved model cannot be loaded, at the file."""
    path, why = problem
    return Decision("refuse", (
        f"{why}: stage '{step}' is complete but its saved model cannot be loaded. Nothing was changed. Redo the "
        f"stage: `{step_command(step)} --force` with this config moves its folder aside and runs it again"),
        where=str(path))


def decide_all(plan, force: bool = False) -> list[Decision]:
    """Every step of a plan decided before any work (by the main process; the others follow
    its decisions)."""
    return distributed.broadcast([decide(step, plan.run.path, force) for step in plan.steps]
                                 if distributed.is_main() else None)


def refuse(decisions: list[Decision]) -> None:
    """All the refusals among a plan's decisions, together."""
    if refusals := [d.problem() for d in decisions if d.action == "refuse"]:
        raise ValidationError(refusals)


def decide_now(step, run_dir: Path, force: bool = False) -> Decision:
    """One step decided as it starts (the files may have changed since `decide_all`): a
    refusal raises."""
    decision = distributed.broadcast(decide(step, run_dir, force) if distributed.is_main() else None)
    if decision.action == "refuse":
        raise ValidationError([decision.problem()])
    return decision
