"""Faults that are not bad input: two runs on one folder, file modes, a full disk, a
corrupt saved model (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SMOKE, weight_difference

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

    import cai.execute.executor

    run_dir = tmp_path / "run"
    seen = {}

    def run_step(run, step, force=False, run_steps=(), said=False):
        with open(run_dir / LOCK_NAME) as f:
            seen["holder"] = json.loads(f.read())
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                seen["locked"] = True
        (run_dir / step.step).mkdir()

    monkeypatch.setattr(cai.execute.executor, "run_step", run_step)
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
    from cai.training.save import _write_folder

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


# A full disk. The injected error is the one the system gives: `os.fsync` failing with
# ENOSPC on a file cai appends to or writes whole (the bytes may be in the file, not on
# the disk), or safetensors' own error when a model or a checkpoint does not fit.

NO_SPACE = "No space left on device [errno ENOSPC]"
RESUME = "What was committed before is kept; once the cause is fixed (free space, permissions), the same " \
         "command resumes from there"


def no_space_on_flush(monkeypatch, name: str, after: int = 0) -> None:
    """`os.fsync` of the file called `name` (or a temp file for it) fails with ENOSPC, from its
    `after` + 1-th flush on."""
    import errno

    real, seen = os.fsync, []

    def fsync(fd):
        written = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if written == name or written.startswith(f".{name}."):
            seen.append(written)
            if len(seen) > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def no_space_in_safetensors(monkeypatch, where: str) -> None:
    """safetensors fails as it does on a full disk when it writes into a folder whose path has `where`."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    real = transformers.modeling_utils.safe_save_file

    def save_file(tensors, filename, *args, **kwargs):
        if where in str(filename):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cai:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_full_disk_mid_chunk_stops_with_the_file_keeps_the_committed_chunks_and_resumes(
        tmp_path, monkeypatch, capsys, sft_run_template):
    run_dir = tmp_path / "run"
    argv = ["critique", "--config", str(SMOKE), "--set", f"run_dir={run_dir}"]
    with monkeypatch.context() as patch:
        no_space_on_flush(patch, "records.jsonl", after=1)  # the second chunk's rows
        assert main(argv) == 1
    folder = run_dir / "critique"
    assert error_line(capsys) == f"cai: error: cannot write {folder / 'records.jsonl'}: {NO_SPACE}. {RESUME}"
    ledger = [json.loads(line) for line in (folder / ".critique.chunks.jsonl").read_text().splitlines()]
    assert len(ledger) == 1 and (folder / "records.jsonl").stat().st_size == ledger[0]["sizes"]["records.jsonl"]
    assert main(argv) == 0
    for name in ("records.jsonl", "sft.jsonl", "prefs.jsonl"):
        assert (folder / name).read_bytes() == (sft_run_template / "critique" / name).read_bytes(), name


@pytest.mark.parametrize("failing", ["a.jsonl", "b.jsonl", ".loop.chunks.jsonl"])
def test_a_failed_commit_cuts_every_file_back_to_the_last_committed_chunk(tmp_path, monkeypatch, failing):
    from cai.chunks import ChunkLedger, run_chunks
    from cai.rundir import WriteError

    chunks = [(f"c{i}", i) for i in range(4)]

    def work(index, chunk):
        return {"a.jsonl": [{"i": chunk}] * 3, "b.jsonl": [{"j": chunk, "text": "x" * chunk}]}

    def run(folder: Path) -> None:
        run_chunks(ChunkLedger(folder, "loop", ["a.jsonl", "b.jsonl"]), chunks, work, "test", size=lambda c: 1)

    run(tmp_path / "reference")
    folder = tmp_path / "run"
    with monkeypatch.context() as patch:
        no_space_on_flush(patch, failing, after=2)  # the third chunk
        with pytest.raises(WriteError, match=re.escape(f"cannot write {folder / failing}: {NO_SPACE}")):
            run(folder)
    reference = tmp_path / "reference"
    committed = [json.loads(line) for line in (folder / ".loop.chunks.jsonl").read_text().splitlines()]
    assert len(committed) == 2
    for name in ("a.jsonl", "b.jsonl"):
        assert (folder / name).stat().st_size == committed[-1]["sizes"][name]
    run(folder)
    for name in ("a.jsonl", "b.jsonl", ".loop.chunks.jsonl"):
        assert (folder / name).read_bytes() == (reference / name).read_bytes()


@pytest.mark.parametrize("kind", ["manifest", "checkpoint", "model"])
def test_a_full_disk_in_a_training_stage_stops_with_the_file_and_resumes(sft_run, monkeypatch, capsys, kind,
                                                                          sft_run_template):
    import shutil


    shutil.rmtree(sft_run / "sft")
    folder = sft_run / "sft"
    argv = ["sft", "--config", str(SMOKE), "--set", f"run_dir={sft_run}", "--set", "sft.save_steps=1"]
    with monkeypatch.context() as patch:
        if kind == "manifest":
            no_space_on_flush(patch, "manifest.json")
            failed = folder / "manifest.json"
        elif kind == "checkpoint":
            no_space_in_safetensors(patch, "checkpoint-2")
            failed = folder / "checkpoints"
        else:
            no_space_in_safetensors(patch, "model.tmp")
            failed = folder / "model"
        assert main(argv) == 1
    assert error_line(capsys) == f"cai: error: cannot write {failed}: {NO_SPACE}. {RESUME}"
    assert not (folder / "manifest.json").exists() and (folder / ".in_progress.json").exists()
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))  # nothing half-written left
    if kind == "checkpoint":
        assert sorted(p.name for p in (folder / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1"]
    if kind == "model":
        assert not (folder / "model").exists()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "sft: resuming" in out
    if kind == "checkpoint":
        assert "sft: resuming from checkpoint-1" in out
    assert weight_difference(folder / "model", sft_run_template / "sft" / "model") <= 1e-6


@pytest.mark.parametrize("code, shown", [("ENOSPC", "No space left on device"), ("EDQUOT", "Disk quota exceeded"),
                                         ("EROFS", "Read-only file system"), ("EACCES", "Permission denied")])
def test_each_kind_of_write_failure_names_the_file_and_its_cause(tmp_path, monkeypatch, code, shown):
    import errno

    from cai.rundir import WriteError, atomic_write_json, write_failure

    def replace(src, dst):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(WriteError, match=re.escape(f"cannot write {tmp_path / 'x.json'}: {shown} [errno {code}]")):
        atomic_write_json(tmp_path / "x.json", {})
    assert list(tmp_path.iterdir()) == []  # the temp file is gone
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")
    assert write_failure(torch_error)[1].startswith("torch could not write the file")
    assert write_failure(ValueError("a bug")) is None and write_failure(FileNotFoundError(2, "x")) is None


# A completed stage whose saved model cannot be loaded (a copy cut short, a file deleted).

def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


@pytest.mark.parametrize("damage", ["truncated", "no-config"])
def test_a_corrupt_saved_model_is_reported_with_the_file_and_the_remedy_before_any_work(sft_run, capsys, damage):
    model = sft_run / "sft" / "model"
    if damage == "truncated":
        size = (model / "model.safetensors").stat().st_size
        truncate(model / "model.safetensors")
        problem = f"model.safetensors: truncated ({size * 2 // 3} bytes; its header describes {size})"
    else:
        (model / "config.json").unlink()
        problem = "config.json: missing"
    message = (f"{model}/{problem}: stage 'sft' is complete but its saved model cannot be loaded. Nothing was "
               f"changed. Redo the stage: `cai sft --force` with this config moves its folder aside and runs it again")
    for command in ("label", "sft"):  # a stage that loads it, and the stage itself when skipped
        assert main([command, "--config", str(SMOKE), "--set", f"run_dir={sft_run}"]) == 2
        assert capsys.readouterr().err.strip() == message
    assert not (sft_run / "label").exists()


def test_force_redoes_a_stage_whose_model_is_corrupt(sft_run, capsys, sft_run_template):

    truncate(sft_run / "sft" / "model" / "model.safetensors")
    assert main(["sft", "--config", str(SMOKE), "--set", f"run_dir={sft_run}", "--force"]) == 0
    assert "sft: old outputs moved to" in capsys.readouterr().out
    assert weight_difference(sft_run / "sft" / "model", sft_run_template / "sft" / "model") <= 1e-6


# Every command goes through the same checks as the stages: exit 2, the file named.

def test_eval_labeler_refuses_a_missing_data_file_and_a_bad_model_before_any_work(tmp_path, capsys):
    argv = ["eval-labeler", "--config", str(SMOKE), "--set", f"run_dir={tmp_path / 'run'}"]
    assert main([*argv, "--data", str(tmp_path / "no-such.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == (f"{tmp_path / 'no-such.jsonl'}: no such file (--data: HHH-format or "
                                               f"prompt/chosen/rejected JSONL)")
    assert main([*argv, "--data", str(tmp_path)]) == 2
    assert f"{tmp_path}: is not a file" in capsys.readouterr().err
    assert main([*argv, "--set", "label.feedback_model=nosuchmodel", "--data", str(tmp_path / "x.jsonl")]) == 2
    assert "--set label.feedback_model=nosuchmodel: 'label.feedback_model': 'nosuchmodel' is neither a stage name" \
           in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["helpful", "red_team"])
def test_an_empty_prompt_source_is_refused_at_its_line(tmp_path, capsys, key):
    text = SMOKE.read_text()
    assert f"  {key}: builtin:" in text
    config = tmp_path / "run.yaml"
    lines = text.splitlines()
    number = next(i for i, line in enumerate(lines, start=1) if line.startswith(f"  {key}: "))
    lines[number - 1] = f"  {key}: ''"
    config.write_text("\n".join(lines).replace("constitution: constitutions/", f"constitution: {ROOT}/constitutions/")
                      + "\n")
    assert main(["critique", "--config", str(config), "--set", f"run_dir={tmp_path / 'run'}"]) == 2
    assert f"{config}:{number}: 'prompts.{key}': is empty: name builtin:donotanswer" in capsys.readouterr().err
