"""Hub kernels (compiled code transformers downloads from the hub) stay off unless a run opts in."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, make_run

from cai import models

# Loads a model the way any cai stage does (`from_pretrained`) and prints whether
# transformers kernelized it with hub kernels (`use_kernels`, its public flag); with cai
# imported, once more after the opt-in a run config's `hub_kernels: true` makes.
CHILD = """
import sys
if sys.argv[1] == "cai":
    from cai.models import set_hub_kernels
from transformers import AutoModelForCausalLM
print(AutoModelForCausalLM.from_pretrained(sys.argv[2]).use_kernels)
if sys.argv[1] == "cai":
    set_hub_kernels(True)
    print(AutoModelForCausalLM.from_pretrained(sys.argv[2]).use_kernels)
"""


def loaded_with_kernels(how: str, environment: dict[str, str]) -> list[bool]:
    """Whether a fresh process (`environment` only, plus what Python needs) loads
    builtin:tiny with hub kernels: importing cai first (then opting in) or not (plain)."""
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": str(ROOT),
             "HF_HUB_OFFLINE": "1", **environment}
    result = subprocess.run([sys.executable, "-c", CHILD, how, models.resolve(models.TINY)], env=clean,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return [line == "True" for line in result.stdout.split()]


def test_importing_cai_turns_hub_kernels_off_whatever_the_environment_says():
    assert loaded_with_kernels("plain", {}) == [True]  # transformers' default, without cai: on
    assert loaded_with_kernels("cai", {}) == [False, True]  # off until the opt-in
    assert loaded_with_kernels("cai", {"USE_HUB_KERNELS": "YES"}) == [False, True]  # the config decides, not the shell


@pytest.mark.parametrize("value", [False, True])
def test_a_stage_runs_with_hub_kernels_as_the_config_says(tmp_path, monkeypatch, value):
    from cai.execute.executor import run_one
    from cai.plan.sections import stage_module

    seen = {}

    def run(ctx):
        seen["USE_HUB_KERNELS"] = os.environ["USE_HUB_KERNELS"]
        return {}

    monkeypatch.setenv("USE_HUB_KERNELS", "NO")
    monkeypatch.setattr(stage_module("critique"), "run", run)
    run_one(make_run(tmp_path / "run", f"hub_kernels={str(value).lower()}"), "critique")
    assert seen["USE_HUB_KERNELS"] == ("YES" if value else "NO")
