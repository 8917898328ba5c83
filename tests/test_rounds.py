"""Iterated RLAIF (`rounds: N`): round k >= 2 labels with round k-1's policy, retrains the
reward model on every round's labels, optimises from round k-1's policy, in RUN_DIR/roundK;
a second run skips every step; a kill in round 2 resumes to the files of a run never
interrupted; evaluate and the report cover every round."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import ROOT, SMOKE, install_kill_hook, make_run, weight_difference
from test_kills import finish, same_rows, stop_when_waiting

from cai import registry
from cai.cli import main

ROUNDS = ["rounds=2"]
STEPS = ["critique", "sft", "label", "reward", "rl", "dpo", "label@2", "reward@2", "rl@2", "dpo@2", "evaluate"]


# ---------------------------------------------------------------- the step list, before any work


def test_one_round_is_the_stage_list_and_two_repeat_the_per_round_stages(tmp_path):
    from cai.plan.steps import default_stages

    assert default_stages(make_run(tmp_path / "run")) == list(registry.ORDER)
    assert default_stages(make_run(tmp_path / "run", *ROUNDS)) == STEPS
    assert [str(registry.step_folder(s)) for s in ("label", "label@2", "rl@1")] == ["label", "round2/label", "rl"]


def test_round_two_reads_its_own_round_and_starts_from_round_one(tmp_path):
    from cai.plan.sections import parse_section
    from cai.plan.steps import newest_policy, upstream_steps

    run = make_run(tmp_path / "run", *ROUNDS)
    steps = {step: upstream_steps(run, step, parse_section(run, registry.split_step(step)[0]).config) for step in STEPS}
    assert steps["label"] == ["sft"]  # round 1: as before rounds existed
    assert steps["label@2"] == ["sft", "rl"]  # sampled by round 1's rl
    assert steps["rl@2"] == ["sft", "reward@2", "rl"]
    assert steps["dpo@2"] == ["critique", "sft", "label@2", "dpo"]
    assert steps["evaluate"] == ["critique", "sft", "label", "label@2", "reward", "reward@2", "rl", "rl@2", "dpo",
                                 "dpo@2"]
    assert [newest_policy(run, name, 2) for name in ("label", "rl", "dpo")] == ["rl@1", "rl@1", "dpo@1"]
    assert newest_policy(run, "rl", 1) == "sft"


@pytest.mark.parametrize("value, message", [
    ("0", "'rounds' must be in [1, 100], got 0"),
    ("two", "'rounds' must be int, got str 'two'"),
    ("1.5", "'rounds' must be int, got float 1.5"),
])
def test_a_bad_rounds_value_is_refused_at_its_line_before_any_work(tmp_path, capsys, value, message):
    config = tmp_path / "run.yaml"
    text = SMOKE.read_text().replace("seed: 0\n", f"seed: 0\nrounds: {value}\n")
    config.write_text(text)
    line = text.splitlines().index(f"rounds: {value}") + 1
    run_dir = tmp_path / "run"
    assert main(["run", "--config", str(config), "--set", f"run_dir={run_dir}"]) == 2
    assert f"{config}:{line}: {message}" in capsys.readouterr().err
    assert not run_dir.exists()


def test_a_reference_to_a_round_the_run_does_not_have_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    base = ["run", "--config", str(SMOKE), "--set", f"run_dir={run_dir}", "--set", "rounds=2"]
    assert main(base + ["--set", "evaluate.models=[base, rl@3]"]) == 2
    assert "'evaluate.models': 'rl@3' names round 3, but this run has rounds: 2" in capsys.readouterr().err
    assert main(base + ["--set", "label.policy=sft@2"]) == 2
    assert "'label.policy': 'sft@2': sft runs once, not per round; name it 'sft'" in capsys.readouterr().err
    assert main(["label", "--config", str(SMOKE), "--set", f"run_dir={run_dir}", "--round", "2"]) == 2
    assert "--round: round 2, but" in capsys.readouterr().err
    assert not run_dir.exists()


# ---------------------------------------------------------------- two rounds, killed in round 2

# Where the killed run stops: mid-chunk in round 2's label stage, then in round 2's rl.
STOPS = [("round2/label", "round2/label:1"), ("round2/rl", "round2/rl@1")]
DATASETS = ["label/prefs.jsonl", "round2/label/prefs.jsonl", "round2/label/dropped.jsonl",
            "evaluate/generations.jsonl", "evaluate/comparisons.jsonl", "evaluate/rewards.jsonl"]
MODELS = ["rl", "round2/reward", "round2/rl", "round2/dpo"]


def cai_run(run_dir: Path, hooks: Path, wait_at: str = ""):
    """`cai run --set rounds=2` on the smoke config in a subprocess (tests/test_kills.py's hook)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), str(ROOT)]), "CAI_TEST_WAIT_AT": wait_at,
           "CAI_TEST_WAITING": str(hooks / "waiting")}
    argv = [sys.executable, "-m", "cai.cli", "run", "--config", str(SMOKE), "--set", f"run_dir={run_dir}",
            "--set", "rounds=2"]
    with open(hooks / f"{run_dir.name}-{wait_at.replace('/', '-') or 'end'}.log", "w") as log:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    process.log = Path(log.name)
    return process


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    """(reference, killed, outputs): an uninterrupted two-round run, and one killed at each
    of `STOPS` and then completed."""
    root = tmp_path_factory.mktemp("rounds")
    hooks = root / "hooks"
    hooks.mkdir()
    install_kill_hook(hooks)
    from cai.models import resolve

    resolve("builtin:tiny")
    reference = cai_run(root / "reference", hooks)
    killed = root / "killed"
    outputs = {}
    for folder, point in STOPS:
        outputs[point] = stop_when_waiting(cai_run(killed, hooks, point), hooks, point, signal.SIGKILL, timeout=600)
        names = sorted(p.name for p in (killed / folder).iterdir())
        assert "manifest.json" not in names and ".in_progress.json" in names, (point, names)
    assert main(["run", "--config", str(SMOKE), "--set", f"run_dir={killed}", "--set", "rounds=2"]) == 0
    finish(reference, timeout=900)
    return root / "reference", killed, outputs


def test_two_rounds_write_round_two_in_its_folder(rounds):
    reference, _, _ = rounds
    for step in STEPS:
        manifest = json.loads((reference / registry.step_folder(step) / "manifest.json").read_text())
        assert manifest["stage"] == registry.split_step(step)[0]
        assert manifest.get("round") == registry.split_step(step)[1]
    label = [json.loads(line) for line in (reference / "round2" / "label" / "prefs.jsonl").read_text().splitlines()]
    assert {row["policy"] for row in label} == {"rl@1"}
    reward = json.loads((reference / "round2" / "reward" / "manifest.json").read_text())
    first = len((reference / "label" / "prefs.jsonl").read_text().splitlines())
    assert reward["counts"]["label"] == first + len(label)  # every round's labels so far
    assert (reference / "rl" / "model").is_dir() and (reference / "round2" / "rl" / "model").is_dir()


def test_a_second_run_skips_every_step(rounds, capsys):
    reference, _, _ = rounds
    assert main(["run", "--config", str(SMOKE), "--set", f"run_dir={reference}", "--set", "rounds=2"]) == 0
    out = capsys.readouterr().out
    for step in STEPS:
        assert f"[cai] {step}: already complete" in out, step


def test_a_killed_round_two_resumes(rounds):
    _, _, outputs = rounds
    assert "[cai] label@2: resuming" in outputs["round2/rl@1"]


@pytest.mark.parametrize("dataset", DATASETS)
def test_datasets_after_kills_in_round_two_are_identical(rounds, dataset):
    reference, killed, _ = rounds
    assert (reference / dataset).exists() == (killed / dataset).exists()
    if (reference / dataset).exists():  # dropped.jsonl only when a pair was dropped
        assert same_rows(killed, reference, dataset)
    assert (killed / "round2" / "label" / "prefs.jsonl").exists()


@pytest.mark.parametrize("folder", MODELS)
def test_models_after_kills_in_round_two_are_the_same_up_to_float_rounding(rounds, folder):
    reference, killed, _ = rounds
    worst = weight_difference(killed / folder / "model", reference / folder / "model")
    # PPO killed at step 1, before its first checkpoint, restarts: round 2's rl was measured
    # at up to 1.8e-6 from an uninterrupted run's; the other stages resume bit for bit.
    assert worst <= (1e-5 if folder == "round2/rl" else 1e-6), f"{folder}: max abs weight difference {worst}"


def test_evaluate_and_the_report_cover_both_rounds(rounds):
    from cai.report.charts import round_traces

    reference, _, _ = rounds
    results = json.loads((reference / "evaluate" / "results.json").read_text())
    assert results["models"] == ["base", "base+constitution", "sft", "rl@1", "rl@2", "dpo@1", "dpo@2"]
    assert round_traces(results["models"]) == [["sft", "rl@1", "rl@2"], ["sft", "dpo@1", "dpo@2"]]
    page = (reference / "report" / "index.html").read_text()
    for step in ("label@2", "reward@2", "rl@2", "dpo@2"):
        assert f"<td>{step}</td>" in page, step
    assert "rl@2 training curves" in page
    assert "Rounds: the line traces sft → rl@1 → rl@2" in page
