"""The plan: from a run config and a command, the steps to run, each with everything it
runs with, checked as a whole before any work.

Pure: no weights are loaded, no server is reached and nothing is written (the run
folder's manifests are read, to know which upstream steps exist and what they were built
with). Every refusal is raised here, all of them together: the config's problems, the
packages a setting needs, dependency cycles, settings that cannot work and steps that
would read an upstream step the config would build differently. `--check` is
`make_plan`; `cai.execute` runs what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai import registry
from cai.config import local_path
from cai.plan import checks, fingerprint
from cai.plan.sections import Section, config_values, hashed_config, parse_section, server_references
from cai.plan.steps import (
    NULL_ROLES,
    cycle_problems,
    default_stages,
    newest_policy,
    select_stages,
    upstream_problems,
    upstream_steps,
)
from cai.registry import in_round, round_of, split_step, step_command
from cai.rundir import StageDir
from cai.yamlio import Problem, ValidationError


@dataclass(frozen=True)
class Step:
    """One stage in one round, with everything it runs with (frozen: the executor and the
    stage read it, nobody changes it)."""

    step: str  # `label`, `label@2`
    name: str  # the stage
    round: int
    folder: Path
    config: Any  # the stage module's Config
    trl: dict  # the TRL keys the section passes through
    model_options: Any  # cai.models.ModelOptions
    models: dict  # {role: the step or model spec it resolves to in this round}
    newest_policy: str  # the policy a step starts from when its config names none
    fingerprint: str  # the config hash: of `settings`
    settings: dict = field(repr=False)  # what the fingerprint is computed from (cai.plan.fingerprint)
    upstream: dict = field(default_factory=dict)  # {upstream step: its fingerprint when this step runs}
    selected: bool = True  # run by this command (False: one of the run's other steps, shown by --check)


@dataclass(frozen=True)
class Plan:
    run: Any  # cai.config.RunConfig
    steps: tuple[Step, ...]  # what this command runs, in order
    others: tuple[Step, ...]  # the run's other steps (their state is shown, they are not run)
    run_steps: tuple[str, ...]  # every step `cai run` runs for this config
    warnings: tuple[Problem, ...] = ()  # hub ids not in the local cache (--check)

    @property
    def folder(self) -> Path:
        return self.run.path.resolve()


def make_plan(run, start: str | None = None, until: str | None = None, only: str | None = None,
              verify: bool = True, upstream: bool = True) -> Plan:
    """The plan of `cai run [--from START] [--until UNTIL]`, or of one step (`only`: `cai
    STAGE [--round K]`). `verify`: the whole config's checks (a command's); without it only
    the step's own section is checked (a script or a test that runs one step). `upstream`:
    the steps it needs must exist (False: a command that reads none, eval-labeler)."""
    problems: list[Problem] = []
    run_steps = default_stages(run)
    if only is not None:
        selected = [in_round(only, 1)]
    else:
        try:
            selected = select_stages(run, start, until)
        except ValidationError as err:
            problems += err.problems
            selected = []
    every = registry.steps(list(dict.fromkeys(split_step(s)[0] for s in run_steps + selected)), run.rounds)
    every = [s for s in every if s in run_steps or s in selected]
    checked = list(dict.fromkeys(split_step(s)[0] for s in (run_steps if only is None else selected)))
    if not verify:
        checked = list(dict.fromkeys(split_step(s)[0] for s in selected))

    sections: dict[str, Section] = {}
    for name in dict.fromkeys(split_step(s)[0] for s in every):
        try:
            sections[name] = parse_section(run, name)
        except ValidationError as err:
            if name in checked:
                problems += err.problems
    constitution, more = checks.load_constitution(run)
    problems += more
    if verify:
        problems += run_problems(run, {n: s for n, s in sections.items() if n in checked},
                                 run_steps if only is None else selected, constitution)
        if not problems and only is None and (more := cycle_problems(run, {n: s.config for n, s in sections.items()})):
            problems += more
        elif not problems and upstream:
            flag = f"--from {start}" if start else ("cai run" if only is None else None)
            problems += upstream_problems(run, selected, {n: s.config for n, s in sections.items()}, flag)
    from cai.prompts import NotCached

    warnings = tuple(p for p in problems if isinstance(p, NotCached))
    problems = [p for p in problems if not isinstance(p, NotCached)]
    if problems:
        raise ValidationError(list(dict.fromkeys(problems)))  # a top-level key's problem once, not per stage

    shared = fingerprint.shared_fingerprint(run, lambda value: local_path(value, run.source))
    planned: dict[str, Step] = {}
    for step in every:
        name = split_step(step)[0]
        if name in sections:
            planned[step] = plan_step(run, step, sections[name], constitution, shared, planned, step in selected)
    if verify and (problems := stale_upstream_problems(run, [planned[s] for s in selected], planned)):
        raise ValidationError(problems)
    return Plan(run, tuple(planned[s] for s in selected), tuple(planned[s] for s in every if s not in selected
                                                                and s in planned),
                tuple(run_steps), warnings)


def validate(run, steps: list[str]) -> None:
    """Every problem of these steps' sections, of what they name and of the constitution,
    together (no run folder is read: what `make_plan` checks of a config)."""
    problems, sections = [], {}
    for name in dict.fromkeys(split_step(s)[0] for s in steps):
        try:
            sections[name] = parse_section(run, name)
        except ValidationError as err:
            problems += err.problems
    constitution, more = checks.load_constitution(run)
    problems += more + run_problems(run, sections, steps, constitution)
    if problems:
        raise ValidationError(list(dict.fromkeys(problems)))


def run_problems(run, sections: dict[str, Section], steps: list[str], constitution) -> list[Problem]:
    """Every problem of what the checked sections name (models, prompt files, the
    device), of the constitution and what the stages ask of it, and of settings that
    would fail or do nothing once a stage runs."""
    problems = checks.device_problems(run) + checks.model_problems(run, ("model",), run.model)
    for name, section in sections.items():
        problems += checks.reference_problems(run, name, section.config)
    problems += checks.prompt_problems(run, steps)
    if constitution is not None:
        problems += checks.few_shot_problems(run, sections, constitution)
    problems += checks.training_problems(run, sections)
    return problems


def plan_step(run, step: str, section: Section, constitution, shared: dict, planned: dict[str, Step],
              selected: bool) -> Step:
    """A step with its fingerprint. An upstream step's hash is the one it will have when
    this step runs: its planned fingerprint when this command runs it, else its manifest's
    (None when it has not run)."""
    name, cfg = section.name, section.config
    upstream = {}
    for up in upstream_steps(run, step, cfg):
        if up in planned and planned[up].selected:
            upstream[up] = planned[up].fingerprint
        else:
            manifest = StageDir(run.path, up).manifest()
            upstream[up] = manifest["config_hash"] if manifest else None
    parts = registry.stage(name).constitution_of(cfg)
    settings = fingerprint.step_settings(
        name, shared, fingerprint.constitution_fingerprint(constitution, parts) if parts else {},
        hashed_config(name, cfg, run), section.trl, upstream,
        {ref: fingerprint.server_fingerprint(run.servers[ref.split(":", 1)[1]]) for ref in server_references(cfg)},
        fingerprint.model_options_fingerprint(section.model_options))
    round_number = round_of(step, run.rounds)
    policy = newest_policy(run, name, round_number)
    return Step(step, name, round_number, StageDir(run.path, step).path, cfg, section.trl, section.model_options,
                resolved_models(cfg, name, round_number, policy), policy, fingerprint.config_hash(settings),
                settings, upstream, selected)


def resolved_models(cfg, name: str, round_number: int, policy: str) -> dict[str, str]:
    """{role: what it means in this round}: a role left null is its default (the newest
    policy, or this round's reward model), a stage name this round's step."""
    models = {}
    for f, item in config_values(cfg):
        if not f.metadata.get("model_reference"):
            continue
        if item is None:
            item = policy if f.name == "policy" else NULL_ROLES.get(f.name)
        if item is not None:
            resolved = item if item == "base" else in_round(item, round_number)
            models[f.name] = f"{models[f.name]}, {resolved}" if f.name in models else resolved
    return models


def stale_upstream_problems(run, selected: list[Step], planned: dict[str, Step]) -> list[Problem]:
    """A step this command runs that would read an upstream step it does not run, which
    the run folder holds with other settings than this config gives it: the step would be
    built from outputs the config no longer describes."""
    problems = []
    for step in selected:
        for up, used in step.upstream.items():
            if up not in planned or planned[up].selected or used is None or used == planned[up].fingerprint:
                continue
            before = StageDir(run.path, up).manifest() or {}
            changed = fingerprint.settings_diff(before, planned[up].settings)
            problems.append(Problem(str(StageDir(run.path, up).path), None,
                                    f"{step.step} would read stage '{up}', which this run folder holds with other "
                                    f"settings than the config gives it:\n" + "\n".join(f"  {c}" for c in changed)
                                    + f"\nRun it again first (`{step_command(up)} --force`, or cai run from it), "
                                      f"or undo the change"))
    return problems
