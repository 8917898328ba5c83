"""`accelerate launch` with two real processes on the CPU (gloo): the smoke pipeline
completes, only the main process writes, and the data stages write exactly what one
process writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SMOKE, weight_difference
from servers import free_port

from cai.cli import main

MULTI_CPU = ROOT / "configs" / "accelerate" / "multi-cpu.yaml"
DATA_FILES = {"critique": ["records.jsonl", "sft.jsonl", "prefs.jsonl"], "sft": ["helpful.jsonl"],
              "label": ["prefs.jsonl", "dropped.jsonl"],
              "evaluate": ["generations.jsonl", "comparisons.jsonl", "rewards.jsonl"]}


def contents(root: Path, stage: str, name: str) -> str | None:
    """A file's text with its run folder's path taken out (rows name model folders)."""
    path = root / stage / name
    return path.read_text().replace(str(root), "RUN") if path.exists() else None


def launch(run_dir: Path, command_name: str, *args: str) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--config_file", str(MULTI_CPU), "--main_process_port", str(free_port()),
               "-m", "cai", command_name, "--config", str(SMOKE), "--set", f"run_dir={run_dir}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    assert main(["run", "--config", str(SMOKE), "--set", f"run_dir={run_dir}"]) == 0
    return run_dir


def test_two_processes_run_the_pipeline_and_only_the_main_one_writes(one_process, tmp_path):
    run_dir = tmp_path / "run"
    # Half the per-process batch: the same global batch of 4 as the one-process run.
    done = launch(run_dir, "run", "--set", "sft.per_device_train_batch_size=2")
    assert done.returncode == 0, done.stderr[-3000:]
    stages = ["critique", "sft", "label", "reward", "rl", "dpo", "evaluate"]
    for stage in stages:
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        assert manifest["processes"] == 2
        assert done.stdout.count(f"[cai] {stage}: done") == 1  # the other process prints nothing
    for stage in ("sft", "reward", "rl", "dpo"):  # each model saved once, whole, no staging left
        assert (run_dir / stage / "model" / "model.safetensors").exists()
        assert not (run_dir / stage / "model.tmp").exists()
    # The data of two processes is the one-process data; sft trained with the same global
    # batch ends within float rounding, and the labels sampled from it are the same.
    for stage in ("critique", "sft", "label"):
        for name in DATA_FILES[stage]:
            assert contents(run_dir, stage, name) == contents(one_process, stage, name), name
    assert weight_difference(run_dir / "sft" / "model", one_process / "sft" / "model") < 1e-5
    assert (run_dir / "report" / "index.html").exists()

    again = launch(run_dir, "run", "--set", "sft.per_device_train_batch_size=2")  # all complete: skipped
    assert again.returncode == 0 and again.stdout.count("already complete") == len(stages)


def test_data_stages_split_across_processes_write_what_one_process_writes(one_process, tmp_path):
    """label and evaluate redone by two processes on the one-process run's models."""
    run_dir = tmp_path / "run"
    shutil.copytree(one_process, run_dir)
    for stage in ("label", "evaluate", "report"):
        shutil.rmtree(run_dir / stage)
    done = launch(run_dir, "run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("already complete") == 5  # critique, sft, and reward, rl, dpo on the same labels
    for stage in ("label", "evaluate"):
        for name in DATA_FILES[stage]:
            assert contents(run_dir, stage, name) == contents(one_process, stage, name), name
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    assert results["per_model"] == json.loads((one_process / "evaluate" / "results.json").read_text())["per_model"]
