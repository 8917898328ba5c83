"""No library warning in a run's output is caused by cai's own calls (issue 18)."""

from __future__ import annotations

import json
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
