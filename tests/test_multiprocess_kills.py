"""A kill under `accelerate launch` (two real processes on the CPU, gloo) loses nothing:
the main process and the other one are each SIGKILLed mid-chunk (critique) and
mid-training (sft), the same command is run again after each kill, and the run ends
with the files of an uninterrupted two-process run (datasets byte for byte, the model
within float rounding).

A killed process takes the launch down with it (torchrun stops the other process), so
each stop is one `accelerate launch`. Where a process stops is chosen, not random: a
`sitecustomize` on the path (test-only; cai knows nothing of it) makes the process of
rank CAI_TEST_WAIT_RANK wait at CAI_TEST_WAIT_AT, writes its PID, and the test kills
that PID:
- `critique:N` (rank 0): inside the commit of the chunk after N committed ones, half of
  its rows written (a torn tail);
- `gather:N` (rank 1): at its N-th hand-over of a chunk's rows to the main process, the
  chunk made but not handed over;
- `sft@STEP` (either rank): at the end of optimizer step STEP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, SMOKE, install_kill_hook, weight_difference
from servers import free_port

MULTI_CPU = ROOT / "configs" / "accelerate" / "multi-cpu.yaml"
# Four critique chunks (two rounds of two processes), three sft steps with a checkpoint each.
OVERRIDES = ["critique.batch_size=2", "sft.per_device_train_batch_size=2", "sft.save_steps=1"]
STOPS = [("critique:2", 0), ("gather:1", 1), ("sft@2", 0), ("sft@2", 1)]
DATASETS = ["critique/records.jsonl", "critique/sft.jsonl", "critique/prefs.jsonl", "sft/helpful.jsonl"]

def launch(run_dir: Path, hooks: Path, point: str = "", rank: int = 0) -> subprocess.Popen:
    """`accelerate launch` of two processes running `cai run --until sft` (output in a log)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    argv = [str(accelerate), "launch", "--config_file", str(MULTI_CPU), "--main_process_port", str(free_port()),
            "-m", "cai", "run", "--config", str(SMOKE), "--until", "sft", "--set", f"run_dir={run_dir}"]
    for item in OVERRIDES:
        argv += ["--set", item]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "CAI_TEST_WAIT_AT": point,
           "CAI_TEST_WAIT_RANK": str(rank), "CAI_TEST_WAITING": str(hooks / "waiting")}
    log = hooks / f"{run_dir.name}-{point.replace(':', '_') or 'end'}-{rank}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    process.log = log
    return process


def kill_when_waiting(process: subprocess.Popen, hooks: Path, point: str, timeout: float = 300) -> str:
    """SIGKILL the process that waits at `point`; wait for the launch to end; its output."""
    waiting = hooks / "waiting"
    deadline = time.monotonic() + timeout
    while not waiting.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"{point} was not reached (exit {process.returncode}):\n{process.log.read_text()}")
        time.sleep(0.05)
    what, pid = waiting.read_text().split()
    assert what == point
    os.kill(int(pid), signal.SIGKILL)
    try:
        process.wait(120)  # torchrun stops the other process and exits
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    waiting.unlink()
    assert process.returncode != 0
    return process.log.read_text()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(reference, killed, outputs): an uninterrupted two-process run, and one killed at
    every stop of `STOPS`, then completed; `outputs`: each launch's output, in order."""
    root = tmp_path_factory.mktemp("mp-kills")
    hooks = root / "hooks"
    hooks.mkdir()
    install_kill_hook(hooks)
    from cai.models import resolve

    resolve("builtin:tiny")  # built once, before the processes race to build it
    started = time.monotonic()
    reference = launch(root / "reference", hooks)
    reference.wait(600)
    assert reference.returncode == 0, reference.log.read_text()
    print(f"\n[timing] uninterrupted 2-process run: {time.monotonic() - started:.1f}s")
    killed, outputs = root / "killed", []
    for point, rank in STOPS:
        started = time.monotonic()
        outputs.append(kill_when_waiting(launch(killed, hooks, point, rank), hooks, point))
        print(f"[timing] launch killed at {point} (rank {rank}): {time.monotonic() - started:.1f}s")
    started = time.monotonic()
    final = launch(killed, hooks)
    final.wait(600)
    assert final.returncode == 0, final.log.read_text()
    print(f"[timing] final rerun: {time.monotonic() - started:.1f}s")
    outputs.append(final.log.read_text())
    return root / "reference", killed, outputs


def test_each_rerun_resumes_what_the_kill_left(runs):
    _, _, outputs = runs
    after_main_mid_chunk, after_other_mid_chunk, after_main_mid_step, final = outputs[1:]
    assert "critique: dropped" in after_main_mid_chunk  # the torn chunk the main process left
    assert "taking over the lock of PID" in after_main_mid_chunk  # the killed main process held it
    assert "critique: resuming" in after_other_mid_chunk
    assert "sft: resuming from checkpoint-1" in after_main_mid_step
    assert "sft: resuming from checkpoint-" in final and "[cai] sft: done" in final
    assert "Traceback" not in final


@pytest.mark.parametrize("dataset", DATASETS)
def test_datasets_after_two_process_kills_are_identical(runs, dataset):
    reference, killed, _ = runs
    found = (killed / dataset).read_text().replace(str(killed), "RUN")
    assert found == (reference / dataset).read_text().replace(str(reference), "RUN")


def test_the_model_after_two_process_kills_is_the_same_up_to_float_rounding(runs):
    reference, killed, _ = runs
    assert weight_difference(killed / "sft" / "model", reference / "sft" / "model") <= 1e-6
