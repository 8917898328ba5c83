"""One stage section -> its Config, its TRL pass-through keys and its model options,
parsed and checked once per plan (TRL scripts parse one tuple of dataclasses once).

The stage module's interface: `Config` (a dataclass), optional `TRL_CONFIG()` (the TRL
config class whose fields the section passes through), `trl_settings(cfg)` (that class
and the stage's defaults, to build it as the stage will), `check_config(run, cfg, trl)`
(the stage's own rules), `hashed_config(cfg, run)` (the settings that enter its hash, when some
do not apply in some modes) and `run(ctx)`.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

from cai import registry
from cai.engines import is_server, server_name
from cai.registry import DATA_STAGES
from cai.schema import parse_dataclass
from cai.yamlio import Problem, ValidationError, problem


def stage_module(name: str):
    """The recipe module of a stage (or of a step, `rl@2`)."""
    return importlib.import_module(registry.stage(name).module)


@dataclass(frozen=True)
class Section:
    """A stage's section, parsed: what every step of that stage runs with."""

    name: str
    config: Any
    trl: dict
    model_options: Any  # cai.models.ModelOptions: the run's top-level keys, then the stage's


def trl_fields(module) -> tuple[set[str] | None, str]:
    trl_config = getattr(module, "TRL_CONFIG", None)
    if trl_config is None:
        return None, ""
    cls = trl_config() if not isinstance(trl_config, type) else trl_config
    return {f.name for f in dataclasses.fields(cls) if f.init}, f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def key_homes(key: str) -> list[str]:
    """The stages whose section takes `key` (their own settings or their TRL keys)."""
    homes = []
    for entry in registry.STAGES:
        module = stage_module(entry.name)
        trl, _ = trl_fields(module)
        if key in {f.name for f in dataclasses.fields(module.Config)} | (trl or set()):
            homes.append(entry.name)
    return homes


def misplaced_key_hint(key, value) -> str:
    """Where an unknown top-level key belongs, for its problem: a stage key written at the
    top level (`learning_rate`: `sft.learning_rate`, ...), or a section that is not a
    stage (`ppo:`) whose keys are some stage's (`rl.kl_coef`)."""
    def written(keys: list[str]) -> str:
        return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " or " + keys[-1]

    if isinstance(value, dict):
        found = [f"{home}.{sub}" for sub in value for home in key_homes(str(sub))]
        if not found:
            return ""
        stages = ", ".join(entry.name for entry in registry.STAGES)
        return f"; '{key}' is not a stage ({stages}): its keys belong in a stage's section, e.g. {written(found)}"
    homes = key_homes(str(key))
    if not homes:
        return ""
    return f"; '{key}' is a stage setting: write it in the section of the stage it is for: " + written(
        [f"{home}.{key}" for home in homes])


def parse_section(run, name: str) -> Section:
    """The stage's section parsed and checked (errors name lines): its own keys and model
    options, its server roles, the stage's checks, and for a training stage the TRL config
    built as the stage will build it, so a bad TRL value fails now, not after earlier
    stages. Each group needs the one before it; all of a group's problems come together."""
    from cai.judge.settings import renamed_key_problems
    from cai.models import ModelOptions, split_model_options, stage_model_options
    from cai.training.args import trl_build_problems, trl_value_problems

    module = stage_module(name)
    extra, extra_name = trl_fields(module)
    _, section = split_model_options(run.stages.get(name))  # ModelOptions keys: checked apart, never passed to TRL
    if problems := renamed_key_problems(run.source, name, section):
        raise ValidationError(problems)
    cfg, trl, problems = parse_dataclass(module.Config, section, run.source, (name,), extra=extra,
                                         extra_name=extra_name, suggest=tuple(f.name for f in
                                                                              dataclasses.fields(ModelOptions)))
    options, more = stage_model_options(run, name)
    if problems := problems + more:
        raise ValidationError(problems)
    if problems := server_problems(run, name, cfg):
        raise ValidationError(problems)
    settings = getattr(module, "trl_settings", None)
    if settings is not None:
        cls, defaults = settings(cfg)
        if problems := trl_value_problems(run.source, name, cls, trl):
            raise ValidationError(problems)
    check = getattr(module, "check_config", None)  # stage-specific checks, still before any work
    if check is not None and (problems := check(run, cfg, trl)):
        raise ValidationError(problems)
    if settings is not None and (problems := trl_build_problems(run, name, cls, defaults, trl)):
        raise ValidationError(problems)
    return Section(name, cfg, trl, options)


def hashed_config(name: str, cfg, run) -> dict:
    """The settings of a stage's Config that enter its hash (its `hashed_config(cfg, run)`:
    some settings apply only in some modes, a file counts by its content; else all)."""
    module = stage_module(name)
    return module.hashed_config(cfg, run) if hasattr(module, "hashed_config") else dataclasses.asdict(cfg)


# Roles that score options (a server must return log-probabilities); a judge only scores,
# so it may be a server in any stage (rl's judge, with reward: judge).
JUDGE_KEYS = ("feedback_model",)


def config_values(cfg):
    """(field, value) for every value of a stage config, each item of a list field apart."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for item in value if isinstance(value, list) else [value]:
            yield f, item


def server_references(cfg) -> dict[str, bool]:
    """{`server:NAME`: used as a judge} for every model role of a stage config."""
    found: dict[str, bool] = {}
    for f, item in config_values(cfg):
        if is_server(item):
            found[item] = found.get(item, False) or f.name in JUDGE_KEYS
    return found


def server_problems(run, name: str, cfg) -> list[Problem]:
    """`server:NAME` only in data stages' model roles, and only for declared servers."""
    problems = []
    for f, item in config_values(cfg):
        if not is_server(item):
            continue
        if name not in DATA_STAGES and f.name not in JUDGE_KEYS:
            problems.append(problem(run.source, (name, f.name),
                                    f"'{name}.{f.name}': {item} is a server, but {name} trains weights: it needs a "
                                    f"model it can load (builtin:, a folder or a hub id)"))
        elif server_name(item) not in run.servers:
            declared = ", ".join(sorted(run.servers)) or "none"
            problems.append(problem(run.source, (name, f.name),
                                    f"'{name}.{f.name}': {item} names no server under 'servers:' "
                                    f"(declared: {declared})"))
    return problems
