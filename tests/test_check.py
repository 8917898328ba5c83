"""`cai run --check` / `cai STAGE --check`: the whole config validated, no weights loaded,
no server reached, nothing written; hub ids that are not cached are warnings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cai.cli import main

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_check_accepts_every_shipped_config(config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", "--check", "--config", str(config), "--set", f"run_dir={run_dir}"]) == 0
    out, err = capsys.readouterr()
    assert f"{config}: ok for critique, sft" in out
    assert not run_dir.exists() and not list(tmp_path.iterdir())  # nothing written
    hub_ids = not yaml.safe_load(config.read_text(encoding="utf-8"))["model"].startswith("builtin:")
    # offline (the suite sets HF_HUB_OFFLINE), a recipe's hub model and datasets are warnings, never errors
    assert ("warning: 'model': model" in err) == hub_ids, err
    for line in err.splitlines():
        assert ": warning: " in line and "not in the local Hugging Face cache" in line, line


def test_stage_check_validates_that_stage_only(tmp_path, capsys):
    config = ROOT / "configs" / "smoke.yaml"
    assert main(["sft", "--check", "--config", str(config), "--set", f"run_dir={tmp_path / 'run'}"]) == 0
    assert f"{config}: ok for sft" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def _bad(tmp_path: Path, old: str, new: str) -> Path:
    text = (ROOT / "configs" / "smoke.yaml").read_text(encoding="utf-8")
    assert old in text, old
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


@pytest.mark.parametrize("old,new,stage,words", [
    ("  learning_rate: 1.0e-3\n  max_length: 512\n\nlabel:", "  learning_rate: 1.0e-3\n  max_length: 512\n"
     "  lr_scheduler_type: wobbly\n\nlabel:", "sft", "'sft.lr_scheduler_type'"),  # a TRL value
    ("constitution: constitutions/harmless.yaml", "constitution: missing.yaml", "critique",
     "'constitution': no such file missing.yaml"),
    ("  red_team: builtin:donotanswer", "  red_team: {dataset: PROMPTS, column: nope}", "critique",
     "has no column 'nope'"),  # a prompt source
    ("threads: 1", "threads: 1\ndtype: float8", "sft", "'dtype'"),  # a model option
    ("  algorithm: ppo", "  algorithm: ppo\n  num_mini_batches: 3", "rl", "rl.num_mini_batches (3)"),  # a stage's check
], ids=["trl-value", "constitution", "prompt-column", "model-option", "stage-check"])
def test_check_refuses_bad_configs_and_writes_nothing(tmp_path, capsys, old, new, stage, words):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "train.jsonl").write_text('{"prompt": "a"}\n')
    config = _bad(tmp_path, old, new.replace("PROMPTS", str(prompts)))
    run_dir = tmp_path / "run"
    for command in ("run", stage):
        assert main([command, "--check", "--config", str(config), "--set", f"run_dir={run_dir}"]) == 2
        err = capsys.readouterr().err
        assert words in err and f"{config}:" in err, err
        assert "Traceback" not in err
    assert not run_dir.exists()


def test_check_reaches_no_server(tmp_path, capsys):
    """A declared server that nothing answers: a run would stop on it, --check does not ask."""
    config = _bad(tmp_path, "critique:\n", "servers:\n  gen: {base_url: 'http://127.0.0.1:9/v1', model: m}\n"
                                          "critique:\n  model: server:gen\n")
    assert main(["critique", "--check", "--config", str(config), "--set", f"run_dir={tmp_path / 'run'}"]) == 0
    assert main(["critique", "--config", str(config), "--set", f"run_dir={tmp_path / 'run'}"]) != 0
    assert "127.0.0.1:9" in capsys.readouterr().err
