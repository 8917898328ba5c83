"""`cai STAGE --help` and `cai run --help`: every setting, its default and its help text,
read from the config dataclasses (`cai.schema.settings_help`), the TRL config classes a
training stage passes keys to (their own `help` metadata) and the model options.

Built only when --help is asked for: it imports the stage recipes and TRL.
"""

from __future__ import annotations

import dataclasses
import textwrap

from cai import registry
from cai.schema import default_text, settings_help, yaml_text

WIDTH = 100
INDENT = " " * 6


def _rows(rows: list[tuple[str, str, str, str]], prefix: str = "") -> list[str]:
    lines = []
    for name, kind, default, text in rows:
        lines.append(f"  {prefix}{name}: {kind} = {default}")
        if text:
            lines += textwrap.wrap(text, WIDTH, initial_indent=INDENT, subsequent_indent=INDENT)
    return lines


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


def trl_rows(cls: type, defaults: dict) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) of every field of a TRL config class: the default the
    stage uses, marked (cai's) where cai sets it (the stage's `defaults`, else
    `cai.training.args.CAI_TRL_DEFAULTS`, its rule where it depends on the run or the
    device), else TRL's; TRL's help, its first sentence. Keys cai sets itself
    (`output_dir`) are left out: a user value is refused."""
    from cai.training.args import CAI_TRL_DEFAULTS, RESERVED_TRL_KEYS

    rows = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_") or f.name in RESERVED_TRL_KEYS:
            continue
        if f.name in defaults:
            default = f"{yaml_text(defaults[f.name])} (cai's)"
        elif f.name in CAI_TRL_DEFAULTS:
            value, rule = CAI_TRL_DEFAULTS[f.name]
            default = (rule.format(trl=default_text(f)) if rule else yaml_text(value)) + " (cai's)"
        else:
            default = default_text(f)
        kind = getattr(f.type, "__name__", None) or str(f.type).replace("typing.", "")
        rows.append((f.name, kind, default, _first_sentence(f.metadata.get("help", ""))))
    return rows


def trl_sections(name: str) -> list[tuple[str, type, dict]]:
    """(title, TRL config class, cai's defaults) of a stage's TRL pass-through: one, or for
    a stage with several algorithms (rl) one per algorithm."""
    from cai.plan.sections import stage_module

    module = stage_module(name)
    settings = getattr(module, "trl_settings", None)
    if settings is None:
        return []
    algorithms = getattr(module, "ALGORITHMS", None)
    if algorithms:
        found = []
        for algorithm in algorithms:
            cls, defaults = settings(module.Config(algorithm=algorithm))
            found.append((f"with {name}.algorithm: {algorithm}", cls, defaults))
        return found
    cls, defaults = settings(module.Config())
    return [("", cls, defaults)]


def model_option_rows(name: str | None) -> list[tuple[str, str, str, str]]:
    from cai.models import TRAINING_ONLY, ModelOptions

    rows = settings_help(ModelOptions)
    if name is not None and registry.stage(name).kind != "training":
        rows = [row for row in rows if row[0] not in TRAINING_ONLY]
    return rows


def stage_settings(name: str) -> str:
    """The epilog of `cai NAME --help`."""
    from cai.plan.sections import stage_module

    module = stage_module(name)
    lines = [f"settings of the `{name}:` section (name: type = default, then help):"]
    lines += _rows(settings_help(module.Config))
    lines += ["", f"model options (at the top level for every stage, or in the `{name}:` section):"]
    lines += _rows(model_option_rows(name))
    for title, cls, defaults in trl_sections(name):
        if cls.__module__.startswith("trl"):
            heading = f"TRL keys, passed to trl.{cls.__name__}"
        else:  # cai's own trainer config (PPO): TrainingArguments and its own keys
            heading = f"trainer keys, passed to {cls.__module__}.{cls.__name__}"
        lines += ["", heading + (f" {title}" if title else "") + " (its help, first sentence):"]
        lines += _rows(trl_rows(cls, defaults))
    if registry.stage(name).per_round:
        lines += ["", f"{name} runs once per round (rounds: N): --round K runs round K's, in RUN_DIR/roundK/{name}."]
    return "\n".join(lines)


def run_settings() -> str:
    """The epilog of `cai run --help`: the top-level keys, prompts, servers, model options,
    and each stage's own settings (`cai STAGE --help` adds a training stage's TRL keys)."""
    from cai.config import PromptsConfig, RunConfig
    from cai.engines.openai import ServerConfig
    from cai.plan.sections import stage_module

    lines = ["top-level settings (name: type = default, then help):"]
    lines += _rows(settings_help(RunConfig, skip=("prompts", "servers", "stages", "source")))
    lines += ["", "prompts: (the prompt sources and the train / eval split)"]
    lines += _rows(settings_help(PromptsConfig), prefix="prompts.")
    lines += ["", "servers: (OpenAI-compatible servers, used as server:NAME)"]
    lines += _rows(settings_help(ServerConfig), prefix="servers.NAME.")
    lines += ["", "model options (top level: every stage; in a stage's section: that stage):"]
    lines += _rows(model_option_rows(None))
    for entry in registry.STAGES:
        more = f" (`cai {entry.name} --help` adds its TRL keys)" if trl_sections(entry.name) else ""
        lines += ["", f"{entry.name}: {entry.help}{more}"]
        lines += _rows(settings_help(stage_module(entry.name).Config), prefix=f"{entry.name}.")
    return "\n".join(lines)
