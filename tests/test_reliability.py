"""Faults that are not bad input: two runs on one folder, file modes, a full disk, a
corrupt saved model (README, "Reliability")."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SMOKE

from cai.cli import main
from cai.rundir import LOCK_NAME, RunLock

HOLD = """
import sys, time
from cai.rundir import RunLock
with RunLock(sys.argv[1], "cai run"):
    print("locked", flush=True)
    time.sleep(120)
"""


def cai(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cai.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, **kwargs)


def test_a_second_run_on_a_folder_in_use_stops_before_any_work_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        second = cai("critique", "--config", str(SMOKE), "--set", f"run_dir={run_dir}")
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2, second.stderr
    assert f"{run_dir / LOCK_NAME}: the run folder is in use by another cai run (PID {holder.pid} on " \
           f"{socket.gethostname()}, started " in second.stderr
    assert "`cai run`); nothing was done" in second.stderr and "Traceback" not in second.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # no stage folder: no work


def test_a_stage_command_holds_the_lock_while_it_works(tmp_path, monkeypatch):
    import fcntl

    import cai.pipeline

    run_dir = tmp_path / "run"
    seen = {}

    def run_stage(run, name, force=False):
        with open(run_dir / LOCK_NAME) as f:
            seen["holder"] = json.loads(f.read())
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                seen["locked"] = True
        (run_dir / name).mkdir()

    monkeypatch.setattr(cai.pipeline, "run_stage", run_stage)
    assert main(["critique", "--config", str(SMOKE), "--set", f"run_dir={run_dir}"]) == 0
    assert seen["locked"] and seen["holder"]["pid"] == os.getpid() and seen["holder"]["command"] == "cai critique"
    assert (run_dir / LOCK_NAME).read_text() == ""  # a clean end leaves no holder behind


def test_a_stale_lock_of_a_dead_process_is_taken_over(sft_run, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = {"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+0000", "command": "cai run"}
    (sft_run / LOCK_NAME).write_text(json.dumps(stale))
    assert main(["sft", "--config", str(SMOKE), "--set", f"run_dir={sft_run}"]) == 0
    out = capsys.readouterr().out
    assert f"{sft_run / LOCK_NAME}: taking over the lock of PID {pid} on {socket.gethostname()}, started " \
           f"2026-01-01T00:00:00+0000 `cai run`, which is no longer running" in out
    assert "sft: already complete" in out


def test_a_lock_file_naming_a_live_process_here_is_not_taken_over(tmp_path):
    """The lock file replaced (deleted, copied) under a running holder: its PID still counts."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        from cai.yamlio import ValidationError

        with pytest.raises(ValidationError, match=f"in use by another cai run \\(PID {holder.pid} on"):
            RunLock(tmp_path).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # once it is gone, the folder is free
        pass


def test_a_run_that_stops_at_its_checks_leaves_no_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["run", "--config", str(SMOKE), "--set", f"run_dir={run_dir}", "--set", "model=nosuchmodel"]) == 2
    assert not run_dir.exists()


def test_written_files_follow_the_umask(tmp_path, sft_run_template):
    import torch
    from safetensors.torch import save_file

    from cai.rundir import atomic_write_json, umask
    from cai.training import _write_folder

    for name in ("model.safetensors", "config.json"):  # a real stage's save, under the suite's umask
        assert (sft_run_template / "sft" / "model" / name).stat().st_mode & 0o777 == 0o666 & ~umask()
    for name in ("critique/sft.jsonl", "critique/manifest.json", "critique/records.jsonl"):
        assert (sft_run_template / name).stat().st_mode & 0o777 == 0o666 & ~umask()
    before = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "manifest.json", {"a": 1})

        def save(out: Path) -> None:  # what save_pretrained does
            out.mkdir()
            save_file({"w": torch.zeros(2)}, out / "model.safetensors")

        _write_folder(tmp_path / "model", save)
    finally:
        os.umask(before)
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "model" / "model.safetensors").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "model"]  # no temp file left
