"""`cai STAGE --help` and `cai run --help` list every setting with its default and help:
the stage's own, the model options it accepts, and every key of the TRL config it passes
keys to (cai's default where cai sets one, with TRL's help)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from cai import registry
from cai.cli import main
from cai.schema import settings_help


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def flat(text: str) -> str:
    return " ".join(text.split())


def listed(out: str, rows) -> None:
    for name, kind, default, text in rows:
        assert f"\n  {name}: {kind} = {default}\n" in out, name
        assert flat(text) in flat(out), name


@pytest.mark.parametrize("stage", registry.ORDER)
def test_stage_help_lists_every_setting_with_its_default_and_help(stage, capsys):
    from cai.models import TRAINING_ONLY, ModelOptions
    from cai.plan.sections import stage_module

    out = help_text(capsys, stage)
    assert f"settings of the `{stage}:` section (name: type = default, then help):" in out
    listed(out, settings_help(stage_module(stage).Config))
    options = settings_help(ModelOptions)
    training = registry.stage(stage).kind == "training"
    listed(out, [row for row in options if training or row[0] not in TRAINING_ONLY])
    if not training:
        assert "\n  use_peft: " not in out and "TRL keys" not in out
    assert ("--round K" in out) == registry.stage(stage).per_round


@pytest.mark.parametrize("stage, classes", [("sft", ["SFTConfig"]), ("reward", ["RewardConfig"]),
                                            ("dpo", ["DPOConfig"]), ("rl", ["PPOConfig", "RLOOConfig", "GRPOConfig"])])
def test_training_stage_help_lists_every_trl_key(stage, classes, capsys):
    from cai.help import trl_sections

    out = help_text(capsys, stage)
    sections = trl_sections(stage)
    assert [cls.__name__ for _, cls, _ in sections] == classes
    parts = re.split(r"(?:TRL|trainer) keys, passed to ", out)[1:]
    assert len(parts) == len(classes)
    for part, (_, cls, defaults) in zip(parts, sections):
        assert part.startswith(f"trl.{cls.__name__}" if cls.__module__.startswith("trl") else "cai.training.ppo.")
        for f in dataclasses.fields(cls):
            if f.init and f.name != "output_dir":  # cai sets output_dir: a user value is refused
                assert f"\n  {f.name}: " in part, (cls.__name__, f.name)
        for key in defaults:
            assert re.search(rf"\n  {key}: .* = .* \(cai's\)\n", part), (cls.__name__, key)
        assert "\n  output_dir: " not in part
    if stage == "sft":  # TRL's own help, its first sentence
        assert "      The initial learning rate for AdamW.\n" in out
        assert re.search(r"\n  completion_only_loss: .* = true \(cai's\)\n", out)


def test_run_help_lists_the_top_level_keys_and_every_stage_setting(capsys):
    from cai.config import PromptsConfig, RunConfig
    from cai.engines.openai import ServerConfig
    from cai.plan.sections import stage_module

    out = help_text(capsys, "run")
    listed(out, settings_help(RunConfig, skip=("prompts", "servers", "stages", "source")))
    assert "\n  rounds: int = 1\n" in out
    listed(out, [(f"prompts.{n}", k, d, t) for n, k, d, t in settings_help(PromptsConfig)])
    listed(out, [(f"servers.NAME.{n}", k, d, t) for n, k, d, t in settings_help(ServerConfig)])
    for stage in registry.ORDER:
        listed(out, [(f"{stage}.{n}", k, d, t) for n, k, d, t in settings_help(stage_module(stage).Config)])
        # a promise of TRL keys only where the stage has some
        assert (f"`cai {stage} --help` adds its TRL keys" in out) == (registry.stage(stage).kind == "training")


# How a rule `--help` states reads for a run on CPU with seed 7 (TRL lists report_to: none as []).
ON_THIS_RUN = {"the run's seed": 7, "the run's report_to": [], "true unless a CUDA GPU is used": True,
               "the run's run_name when set, else null": None}


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "rl"])
def test_the_trl_defaults_help_shows_are_the_ones_the_stage_uses(stage, tmp_path, capsys):
    """Every TRL key `cai STAGE --help` marks (cai's) has the value the stage builds its
    TRL config with (on CPU, seed 7); every other key, TRL's own, is left as TRL has it."""
    import enum
    import warnings

    from conftest import make_run

    from cai.help import trl_sections
    from cai.schema import yaml_text
    from cai.training.args import build_trl_config, checkpointing_is_auto

    def text(value) -> str:  # transformers turns its string choices into enums
        return yaml_text(value.value if isinstance(value, enum.Enum) else value)

    out = help_text(capsys, stage)
    run = make_run(tmp_path / "run", "device=cpu", "seed=7")
    parts = re.split(r"(?:TRL|trainer) keys, passed to ", out)[1:]
    for part, (_, cls, defaults) in zip(parts, trl_sections(stage), strict=True):
        built = build_trl_config(run, {}, tmp_path / stage, cls, defaults)  # as the stage builds it, no user keys
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TRL's own gradient_checkpointing: true is deprecated
            trl_only = cls(output_dir=str(tmp_path / "bare"), use_cpu=True)
        shown = dict(re.findall(r"\n  (\w+): .*? = (.*)", part))
        assert {"seed", "save_steps", "logging_steps", "activation_checkpointing"} <= set(shown)
        for name, default in shown.items():
            value = getattr(built, name)
            if name in ("activation_checkpointing", "gradient_checkpointing") and checkpointing_is_auto(run, {}):
                value = "auto"  # the TRL config holds false until the stage decides (cai.training.memory)
            if not default.endswith(" (cai's)"):
                assert text(value) == text(getattr(trl_only, name)), (cls.__name__, name)
                continue
            default = default.removesuffix(" (cai's)")
            if default in ON_THIS_RUN:
                assert value == ON_THIS_RUN[default], (cls.__name__, name)
            elif " on CPU" in default:
                assert default.startswith(f"{text(value)} on CPU"), (cls.__name__, name)
            else:
                assert default == text(value), (cls.__name__, name)
        assert (shown["seed"], shown["save_steps"], shown["logging_steps"]) == (
            "the run's seed (cai's)", "50 (cai's)", "1 (cai's)")
