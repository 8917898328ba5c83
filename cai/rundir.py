"""Run-directory bookkeeping: atomic and append-only writes, JSONL, manifests.

A stage folder holds its outputs and, once complete, `manifest.json`. Files are either
written whole to a temp file and renamed (never half-written) or appended line by line
(a kill leaves at most one torn last line, which `read_jsonl` repairs).

Files are created with mode 0666 less the umask, like any other tool's.

Under several processes only the main one writes: the writers here do nothing in the
others (`cai.distributed`), which read what the main process wrote after a barrier.

A write that fails for want of space or permission (`WRITE_ERRNOS`) is a `WriteError`
naming the file and the cause; `cai.cli` prints it as one line. The run folder is held by
one run at a time (`RunLock`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cai import distributed
from cai.registry import ORDER, step_command, step_folder, steps

# Why a write fails that is no bug of cai's: the disk or quota is full, the folder became
# read-only or not writable, a file size limit.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


class WriteError(RuntimeError):
    """A file cai writes could not be written (`WRITE_ERRNOS`): the file and the cause."""

    def __init__(self, path: Path | str, cause: str):
        self.path, self.cause = str(path), cause
        super().__init__(f"cannot write {path}: {cause}. What was committed before is kept; once the cause is "
                         f"fixed (free space, permissions), the same command resumes from there")


def write_failure(err: BaseException) -> tuple[str | None, str] | None:
    """(file named by the error or None, cause) when `err`, or an error it was raised
    from, is a write failure: an OSError in `WRITE_ERRNOS`, the same error reported by
    safetensors (`os error N`) or torch's file writer. None for anything else."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, WriteError):
            return err.path, err.cause
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
            return err.filename, f"{os.strerror(err.errno)} [errno {errno.errorcode[err.errno]}]"
        text = str(err)
        found = re.search(r"os error (\d+)", text)
        if found and int(found.group(1)) in WRITE_ERRNOS:
            code = int(found.group(1))
            return None, f"{os.strerror(code)} [errno {errno.errorcode[code]}]"
        if isinstance(err, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text):
            return None, f"torch could not write the file ({text.strip().splitlines()[0][:200]})"
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Turn a write failure inside the block into a `WriteError` naming the file (the
    error's own, else `path`)."""
    try:
        yield
    except WriteError:
        raise
    except Exception as err:
        failure = write_failure(err)
        if failure is None:
            raise
        raise WriteError(failure[0] or path, failure[1]) from err


def umask() -> int:
    """The process's umask (read from /proc where it can be: setting it to read it is racy)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: Path) -> None:
    """Give a folder a library wrote (safetensors writes 0600 files, `mkdtemp` 0700
    folders) the modes of any file the umask allows: 0666 / 0777 less the umask."""
    mask = umask()
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, (0o666 | (os.stat(path).st_mode & 0o111)) & ~mask)


def _create(path: Path) -> tuple[int, Path]:
    """A new, private-named temp file beside `path`, mode 0666 less the umask (tempfile's
    are 0600 whatever the umask, so a run's files would be unreadable to the group)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_text(path: Path, text: str) -> None:
    if not distributed.is_main():
        return
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create(path)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Append rows in one write, flushed to disk before returning."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not text or not distributed.is_main():
        return
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Read JSONL rows. With `repair`, a torn last line (a killed append) is cut off the
    file; a bad line anywhere else is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    rows, good_bytes = [], 0
    with open(path, "rb") as f:
        raw_lines = f.readlines()
    for number, raw in enumerate(raw_lines, start=1):
        last = number == len(raw_lines)
        try:
            if not raw.endswith(b"\n") and last:
                raise ValueError("torn line")
            if raw.strip():
                rows.append(json.loads(raw))
            good_bytes += len(raw)
        except ValueError as err:
            if repair and last:
                if distributed.is_main():
                    with open(path, "r+b") as f:
                        f.truncate(good_bytes)
                break
            raise ValueError(f"{path}:{number}: not a JSON line ({err})") from None
    return rows


class StageDir:
    """One step's folder in a run directory: a stage's (`label`), or a stage's in a later
    round (`label@2`: `round2/label`, `cai.registry`)."""

    def __init__(self, root: Path, name: str):
        self.name = name
        self.path = Path(root) / step_folder(name)

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def marker_path(self) -> Path:
        """Written when the step starts (its config hash and settings), removed once its
        manifest is: a folder with a marker and no manifest holds an interrupted step."""
        return self.path / ".in_progress.json"

    def marker(self) -> dict | None:
        return json.loads(self.marker_path.read_text(encoding="utf-8")) if self.marker_path.exists() else None

    def manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def complete(self) -> bool:
        return self.manifest_path.exists()

    def saved_model(self) -> Path | None:
        """The stage's model folder: `model/` (full or merged), else `adapter/` (a LoRA
        stage saved with merge_adapter: false); None when it has neither."""
        return next((self.path / name for name in ("model", "adapter") if (self.path / name).exists()), None)

    def model_problem(self) -> tuple[Path, str] | None:
        """(file, why) when the stage's saved model or adapter cannot be loaded (a missing
        or torn config, a truncated or missing weights file), else None. Reads headers only."""
        folder = self.saved_model()
        if folder is None:
            return None
        adapter = folder.name == "adapter"
        config = folder / ("adapter_config.json" if adapter else "config.json")
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return config, "missing"
        except (OSError, ValueError) as err:
            return config, f"not readable JSON ({err})"
        index = next(folder.glob("*.safetensors.index.json"), None)
        if index is not None:
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as err:
                return index, f"not a readable shard index ({err})"
            weights = [folder / name for name in shards]
        else:
            weights = sorted(folder.glob("*.safetensors"))
        if not weights and not list(folder.glob("*.bin")):
            return folder, f"no weights file ({'adapter_model' if adapter else 'model'}.safetensors)"
        for path in weights:
            if (problem := safetensors_problem(path)) is not None:
                return path, problem
        return None

    def begin(self, fingerprint: str, settings: dict, aside: Path | None = None) -> str:
        """Start (or restart) the step: its old folder moved to `aside` (a redo), the folder
        made, the marker written. Returns what the moved folder keeps on disk ("" if none)."""
        size = ""
        if aside is not None:
            size = folder_size(self.path)
            self.path.rename(aside)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.marker_path, {"config_hash": fingerprint, "settings": settings})
        return size

    def finish(self, manifest: dict) -> None:
        """The step is complete: its manifest written, then its marker removed."""
        atomic_write_json(self.manifest_path, manifest)
        self.marker_path.unlink(missing_ok=True)

    def abandon(self) -> None:
        """A step that failed before doing any work it would keep (say, a trainer that
        refused its settings) leaves no marker that would refuse a retry with other
        settings; an interrupted one keeps it, so the same command resumes."""
        if self.kept_work():
            return
        self.marker_path.unlink(missing_ok=True)
        if self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def kept_work(self) -> bool:
        """Work a resume would keep: a committed chunk, a checkpoint, a saved model or adapter."""
        return (any(ledger.stat().st_size for ledger in self.path.glob(".*.chunks.jsonl"))
                or any((self.path / "checkpoints").glob("checkpoint-*")) or self.saved_model() is not None)

    def require(self, what: str = "") -> StageDir:
        """Fail clearly when a stage this one reads from has not run."""
        if not self.complete():
            hint = f" ({what})" if what else ""
            raise FileNotFoundError(f"stage '{self.name}' has not completed in {self.path.parent}{hint}: "
                                    f"run `{step_command(self.name)}` first")
        return self


def folder_size(path: Path) -> str:
    """The disk a folder uses, for the note on what a redo keeps."""
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    for unit in ("bytes", "KB", "MB", "GB"):
        if total < 1024 or unit == "GB":
            return f"{total:.0f} {unit}" if unit == "bytes" else f"{total:.1f} {unit}"
        total /= 1024
    return ""


def step_state(run_dir: Path, step: str) -> tuple[str, list[str]]:
    """A step's state from its folder alone, like `dvc status`: `complete`; `stale` (complete,
    but an upstream step it read was redone after it: the upstream steps, named); `partial`
    (started, interrupted or running); `pending` (not started)."""
    folder = StageDir(run_dir, step)
    manifest = folder.manifest()
    if manifest is None:
        return ("partial" if folder.marker_path.exists() else "pending"), []
    redone = []
    for up, used in (manifest.get("upstream") or {}).items():
        now = StageDir(run_dir, up).manifest()
        if (now["config_hash"] if now else None) != used:
            redone.append(up)
    return ("stale", redone) if redone else ("complete", [])


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be loaded: missing, a header that cannot be read, or
    tensors that end past the end of the file (a copy or a save cut short); else None."""
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = struct.unpack("<Q", f.read(8))[0] if size >= 8 else None
            if length is None or 8 + length > size:
                return f"truncated ({size} bytes, shorter than its own header says)"
            header = json.loads(f.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error) as err:
        return f"an unreadable header ({err})"
    if 8 + length + end != size:
        return f"truncated ({size} bytes; its header describes {8 + length + end})"
    return None


LOCK_NAME = ".cai.lock"


class RunLock:
    """The run folder held by one run: an exclusive `fcntl.flock` on RUN_DIR/.cai.lock,
    which names the holder (PID, host, start time, command). The kernel drops the lock
    when its process dies however it dies, so a lock file naming a process that is gone
    (a kill, a crash) is stale and taken over, with a message. A second run on a folder
    in use stops before any work, naming the holder (exit 2).

    Under several processes only the main one locks; the others follow its decision."""

    def __init__(self, run_dir: Path | str, command: str = ""):
        self.path = Path(run_dir) / LOCK_NAME
        self.command = command
        self.fd: int | None = None
        self.created = False  # the run folder did not exist: removed again if the run wrote nothing

    def __enter__(self) -> RunLock:
        from cai.yamlio import Problem, ValidationError

        refusal = self._acquire() if distributed.is_main() else None
        refusal = distributed.broadcast(refusal)
        if refusal is not None:
            self.release()
            raise ValidationError([Problem(str(self.path), None, refusal)])
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _acquire(self) -> str | None:
        import fcntl

        self.created = not self.path.parent.exists()
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._refusal(self._holder())
        except OSError as err:  # a file system without locks (some network mounts)
            print(f"[cai] {self.path}: cannot lock the run folder ({err.strerror}); make sure no other run "
                  f"uses it")
        holder = self._holder()
        if holder and _alive_here(holder):  # the lock file was replaced under a running holder
            return self._refusal(holder)
        if holder:
            print(f"[cai] {self.path}: taking over the lock of {_describe(holder)}, which is no longer running")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": self.command, "process_start": _process_start(os.getpid())}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(me) + "\n").encode(), 0)
        return None

    def _holder(self) -> dict | None:
        try:
            text = os.pread(self.fd, 4096, 0).decode("utf-8", "replace")
            if not text.strip():
                return None
            holder = json.loads(text)
        except ValueError:
            holder = None
        return holder if isinstance(holder, dict) else {"unreadable": True}

    def _refusal(self, holder: dict | None) -> str:
        return (f"the run folder is in use by another cai run ({_describe(holder or {})}); nothing was done. "
                f"Wait for it to end (or stop it), or use another run_dir")

    def release(self) -> None:
        """Empty the lock file (a clean end leaves no holder to take over) and unlock. A
        run folder this lock created and nothing else wrote in (the run stopped at a
        check) is removed."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if (self._holder() or {}).get("pid") == os.getpid():
                os.ftruncate(self.fd, 0)
                if self.created and [p.name for p in self.path.parent.iterdir()] == [LOCK_NAME]:
                    self.path.unlink()
                    self.path.parent.rmdir()
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def _describe(holder: dict) -> str:
    if holder.get("unreadable") or "pid" not in holder:
        return "holder unknown"
    what = f" `{holder['command']}`" if holder.get("command") else ""
    return f"PID {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}{what}"


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive_here(holder: dict) -> bool:
    """The holder is a process running on this host (not a later process with its PID)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = holder.get("process_start")
    return started is None or _process_start(pid) in (None, started)


def folder_steps(run_dir: Path, names=ORDER) -> list[str]:
    """The steps of these stages a run folder may hold: one round, or as many as its
    `roundK/` folders say (`rounds: N`)."""
    found = [int(p.name[5:]) for p in Path(run_dir).glob("round*") if p.is_dir() and p.name[5:].isdigit()]
    return steps(names, max(found, default=1))
