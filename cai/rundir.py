"""Run-directory bookkeeping: atomic and append-only writes, JSONL, manifests.

A stage folder holds its outputs and, once complete, `manifest.json`. Files are either
written whole to a temp file and renamed (never half-written) or appended line by line
(a kill leaves at most one torn last line, which `read_jsonl` repairs).

Under several processes only the main one writes: the writers here do nothing in the
others (`cai.distributed`), which read what the main process wrote after a barrier.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cai import distributed


def atomic_write_text(path: Path, text: str) -> None:
    if not distributed.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
    """One stage's folder in a run directory."""

    def __init__(self, root: Path, name: str):
        self.name = name
        self.path = Path(root) / name

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

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

    def require(self, what: str = "") -> StageDir:
        """Fail clearly when a stage this one reads from has not run."""
        if not self.complete():
            hint = f" ({what})" if what else ""
            raise FileNotFoundError(f"stage '{self.name}' has not completed in {self.path.parent}{hint}: "
                                    f"run `cai {self.name}` first")
        return self
