"""No library warning in a run's output is caused by cai's own calls (issue 18)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import torch
import warning_guard
from conftest import ROOT, SMOKE

from cai import models


def test_the_smoke_run_causes_no_library_warning_from_cais_own_calls(tmp_path):
    """Every stage of the smoke config (generation with the shared-prefix cache, option
    scoring, each trainer, evaluate, the report) in a fresh process, every warning shown;
    tests/warning_guard.py lists those whose blamed caller is cai's code."""
    log = tmp_path / "warnings.jsonl"
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "warning_guard.py"), str(log), "--", "run",
                             "--config", str(SMOKE), "--set", f"run_dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    caused = [json.loads(line) for line in log.read_text().splitlines()]
    assert caused == [], "\n".join(f"{w['at']}: {w['kind']}: {w['message']}" for w in caused)


def run_as(filename: str, source: str, **names) -> list[dict]:
    """Run `source` as if it were code in `filename`, under the guard; what it recorded."""
    warning_guard.RECORDS.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = warning_guard.showwarning
        exec(compile(source, filename, "exec"), dict(names))
    return list(warning_guard.RECORDS)


def test_the_guard_blames_a_deprecated_call_on_the_code_that_made_it():
    """A deprecated argument passed straight to generate, or through nn.Module's call to
    forward, is blamed on its caller: cai's code if it is in cai, not if a library's."""
    model = models.load_causal_lm(models.TINY, "cpu")
    ids = torch.tensor([[1, 2, 3]])
    calls = ("model(input_ids=ids, past_key_values=None)\n"
             "model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=None, max_new_tokens=1,"
             " do_sample=False, pad_token_id=0)\n")
    in_cai = run_as(warning_guard.CAI + "caller.py", calls, model=model, ids=ids, torch=torch)
    assert {w["kind"] for w in in_cai} == {"FutureWarning"}
    assert len(in_cai) == 2 and all(w["at"].startswith(warning_guard.CAI + "caller.py:") for w in in_cai)
    trl = str(ROOT / ".venv" / "lib" / "site-packages" / "trl" / "caller.py")
    assert run_as(trl, calls, model=model, ids=ids, torch=torch) == []


# ---------------------------------------------------------------- the console a person reads

def run_in_terminal(argv: list[str], columns: int = 120, timeout: float = 900) -> tuple[int, str]:
    """Run a command as in a terminal (a pseudo-terminal of `columns` columns, so progress
    bars are drawn as a person sees them): its exit status and everything it wrote."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the command has ended and closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return process.wait(timeout), b"".join(chunks).decode("utf-8", "replace")


def screen(raw: str) -> str:
    """What stays on the terminal: each line as its last carriage return left it."""
    return "\n".join(line.split("\r")[-1] for line in raw.replace("\r\n", "\n").split("\n"))


# Warnings the smoke run may show: none (its config is fine, and cai.console.NOISE hides the
# libraries' own).
EXPECTED_WARNINGS: tuple[str, ...] = ()
# cai's bars (one per long phase) and TRL's for DPO's reference log-probabilities
PHASES = ("critique", "sft: helpful answers", "sft: training", "label", "reward: training", "rl: training",
          "dpo: training", "Computing reference log probs for train dataset", "evaluate: answers",
          "evaluate: judging pairs")


def test_the_smoke_run_console_is_short_with_one_bar_per_phase_and_no_unexpected_warning(tmp_path):
    """`cai run` of the smoke config as a person sees it in a terminal: a line when each
    step starts and one when it ends, a bar with rate and ETA per long phase and never one
    inside another (tqdm moves the cursor up to draw a nested bar), none for loading or
    saving a model or mapping a dataset, no warning but the expected ones; under 4 KB."""
    code, raw = run_in_terminal([sys.executable, "-m", "cai", "run", "--config", str(SMOKE), "--set",
                                 f"run_dir={tmp_path / 'run'}"])
    shown = screen(raw)
    assert code == 0, shown[-3000:]
    assert len(shown.encode()) < 4096, shown
    assert "\x1b[A" not in raw  # no nested bar
    bars = {line.split("%|")[0].rsplit(":", 1)[0] for line in raw.replace("\r", "\n").split("\n") if "%|" in line}
    assert bars == set(PHASES), bars
    for phase in PHASES:  # each with its elapsed time, ETA and rate
        assert re.search(rf"{re.escape(phase)}: +\d+%\|.*\[\d\d:\d\d<[\d:?]+, +[\d.?]+(it|step|batch)/s", raw), phase
    for stage in ("critique", "sft", "label", "reward", "rl", "dpo", "evaluate"):
        assert f"\n[cai] {stage}: running\n" in f"\n{shown}"
        assert re.search(rf"\n\[cai\] {stage}: done in [\d.]+ s: \d+ ", shown), stage
    assert "{" not in shown  # counts in words; the dicts stay in the manifests
    warned = [line for line in shown.splitlines() if re.search(r"warn", line, re.IGNORECASE)]
    assert [w for w in warned if not any(e in w for e in EXPECTED_WARNINGS)] == []


def test_every_hidden_library_warning_has_a_reason_and_hides_only_itself():
    """cai.console.NOISE: each entry is a Python warning or a logger's record with the
    reason it is not the user's; at the default verbosity it is hidden and its neighbours
    are not; with -v nothing is hidden."""
    import logging

    from cai import console

    assert console.NOISE
    for noise in console.NOISE:
        assert (noise.category is None) != (noise.logger is None), noise
        assert len(noise.reason.split()) >= 8, noise  # a reason, in words
    trainer = logging.getLogger("transformers.trainer")
    kept = []

    class Keep(logging.Handler):
        def emit(self, record):
            kept.append(record.getMessage())

    handler = Keep(logging.WARNING)
    trainer.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as seen:
            console.setup(console.DEFAULT)
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                          stacklevel=1)
            warnings.warn("a warning of the user's", UserWarning, stacklevel=1)
            warnings.warn("a warning of the user's", UserWarning, stacklevel=1)  # another place: still shown once
        trainer.warning("There were missing keys in the checkpoint model loaded: ['lm_head.weight'].")
        trainer.warning("There were missing keys in the checkpoint model loaded: ['model.norm.weight'].")
        assert [str(w.message) for w in seen] == ["a warning of the user's"]
        assert kept == ["There were missing keys in the checkpoint model loaded: ['model.norm.weight']."]
    finally:
        trainer.removeHandler(handler)
        trainer.filters.clear()
        console.setup(console.VERBOSE)


def test_a_bar_in_a_log_is_drawn_only_for_a_long_phase(monkeypatch):
    """Output to a file or a pipe: a phase shorter than console.LOG_DELAY draws nothing
    (each redraw would be a line of the log); with -q no bar is drawn at all."""
    import io

    from cai import console

    log = io.StringIO()
    monkeypatch.setattr(console, "terminal", lambda: False)
    for _ in console.bar(range(3), desc="short", file=log):
        pass
    assert log.getvalue() == ""
    monkeypatch.setattr(console, "terminal", lambda: True)
    monkeypatch.setattr(console, "verbosity", console.QUIET)
    for _ in console.bar(range(3), desc="quiet", file=log):
        pass
    assert log.getvalue() == ""
    monkeypatch.setattr(console, "verbosity", console.DEFAULT)
    for _ in console.bar(range(3), desc="shown", file=log):
        pass
    assert log.getvalue().startswith("\rshown:   0%|")
