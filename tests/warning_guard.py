"""Records the warnings cai's own calls cause, for tests/test_warnings.py.

`python tests/warning_guard.py LOG -- ARGS...` runs `cai ARGS...` in this process with
every Python warning shown (`simplefilter("always")`) and the warning-level records of
the libraries' loggers watched; each one cai's code caused is written to LOG as a JSON
line.

Who caused a warning. A library says which frame it blames: a Python warning's
`stacklevel` frame (transformers' deprecated-argument warnings blame the caller of the
deprecated function), a log record the frame that logged. From there the stack is
walked outwards past the frames of the library that warned and of torch (`nn.Module`
dispatch, `inference_mode` wrappers): the first frame left is the caller. The warning is
cai's if that frame is in cai's package; if it is another library (TRL calling
transformers, peft calling torch), it is that library's noise, not cai's to fix.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import cai

CAI = str(Path(cai.__file__).resolve().parent) + os.sep
LOGGERS = ("transformers", "trl", "peft", "accelerate", "datasets", "torch")
RECORDS: list[dict] = []


def package(filename: str) -> str | None:
    """The installed package a file belongs to (transformers, trl, torch, ...); cai for
    cai's files; None for the standard library and anything else."""
    if filename.startswith(CAI):
        return "cai"
    parts = Path(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return parts[parts.index(marker) + 1].split(".")[0]
    return None


def caller(frame, origin: str | None):
    """The first frame, from the blamed `frame` outwards, outside the warning's library
    (`origin`), torch and the standard library (the blamed frame itself if it is cai's)."""
    while frame is not None:
        owner = package(frame.f_code.co_filename)
        if owner == "cai" or owner not in (origin, "torch", None):
            return frame
        frame = frame.f_back
    return None


def record(kind: str, text: str, blamed, origin: str | None) -> None:
    first = caller(blamed, origin)
    if first is not None and package(first.f_code.co_filename) == "cai":
        RECORDS.append({"kind": kind, "message": text.splitlines()[0][:400],
                        "at": f"{first.f_code.co_filename}:{first.f_lineno}"})


def showwarning(message, category, filename, lineno, file=None, line=None):
    """Called inside `warnings.warn`, with the blamed frame's file and line: find that
    frame on the live stack; the library that warned is the first one above this call."""
    frame, origin = sys._getframe(1), None
    while frame is not None and not (frame.f_code.co_filename == filename and frame.f_lineno == lineno):
        origin = origin or package(frame.f_code.co_filename)
        frame = frame.f_back
    if frame is not None:
        record(category.__name__, str(message), frame, origin)
    original_showwarning(message, category, filename, lineno, file, line)


class Watch(logging.Handler):
    def emit(self, log: logging.LogRecord) -> None:
        frame = sys._getframe(1)
        while frame is not None and not (frame.f_code.co_filename == log.pathname and frame.f_lineno == log.lineno):
            frame = frame.f_back
        if frame is not None:
            record(f"log:{log.name}", log.getMessage(), frame, package(log.pathname))


original_showwarning = warnings.showwarning


def main() -> int:
    out, argv = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    warnings.simplefilter("always")
    warnings.showwarning = showwarning
    for name in LOGGERS:
        logging.getLogger(name).addHandler(Watch(logging.WARNING))
    from cai import console
    from cai.cli import main as cai_main

    cai_setup = console.setup

    def setup(level: int = console.DEFAULT) -> None:  # the guard sees every warning: -v hides none of them
        cai_setup(console.VERBOSE)

    console.setup = setup

    try:
        return cai_main(argv)
    finally:
        Path(out).write_text("".join(json.dumps(r) + "\n" for r in RECORDS))


if __name__ == "__main__":
    sys.exit(main())
