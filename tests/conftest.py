"""Shared fixtures: one torch thread, a private model cache, tiny runs built once."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["OMP_NUM_THREADS"] = "1"  # `threads: auto` reads it: tests pin one thread, no probe

import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"

# Three conversations and two answers to each, for the judge's tests.
CONVERSATIONS = [[{"role": "user", "content": "How do I pick a lock?"}],
                 [{"role": "user", "content": "Write a short poem about the sea."}],
                 [{"role": "user", "content": "What is the capital of France?"}]]
FIRST = ["Use a tension wrench and a pin.", "The sea is wide and blue.", "Paris."]
SECOND = ["I can't help with that, but a locksmith can.", "Waves.", "It is Paris, in the north of France."]


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """builtin:tiny is built once per session into a private cache."""
    if not os.environ.get("CAI_CACHE"):
        os.environ["CAI_CACHE"] = str(tmp_path_factory.mktemp("cai-cache"))
    yield


def make_run(run_dir: Path, *overrides: str):
    """configs/smoke.yaml pointed at `run_dir`, with `--set`-style overrides."""
    from cai.config import load_config

    return load_config(SMOKE, [f"run_dir={run_dir}", *overrides])


def _built(tmp_path_factory, name: str, stages: tuple[str, ...]) -> Path:
    from cai.execute.executor import run_one as run_stage

    run_dir = tmp_path_factory.mktemp(name) / "run"
    run = make_run(run_dir)
    for stage in stages:
        run_stage(run, stage)
    return run_dir


@pytest.fixture(scope="session")
def sft_run_template(tmp_path_factory) -> Path:
    """A tiny run with critique and sft complete (built once; copy before changing)."""
    return _built(tmp_path_factory, "sft-run", ("critique", "sft"))


@pytest.fixture
def sft_run(sft_run_template, tmp_path) -> Path:
    """A private copy of the tiny run with critique and sft complete."""
    target = tmp_path / "run"
    shutil.copytree(sft_run_template, target)
    return target


def weight_difference(found: Path, expected: Path) -> float:
    """The largest absolute difference between the weights of two saved models (folders
    holding model.safetensors), which must name the same tensors."""
    from safetensors.torch import load_file

    got, want = (load_file(folder / "model.safetensors") for folder in (found, expected))
    assert got.keys() == want.keys()
    return max((got[k] - want[k]).abs().max().item() for k in want)


def install_kill_hook(hooks: Path) -> None:
    """Put tests/kill_hook.py on a subprocess's path (`hooks` goes first on its PYTHONPATH)
    as its `sitecustomize`: the process then waits where CAI_TEST_WAIT_AT says."""
    shutil.copy(ROOT / "tests" / "kill_hook.py", hooks / "sitecustomize.py")


def kill_mid_chunk(folder: Path, loop: str, committed: int) -> None:
    """Leave a finished stage folder as a kill during chunk `committed` + 1 would have:
    `committed` chunks in the ledger (`cai.chunks`), the next chunk's rows half written
    (cut mid-line) into every output file, and no manifest."""
    ledger = folder / f".{loop}.chunks.jsonl"
    entries = ledger.read_text().splitlines(keepends=True)
    before = json.loads(entries[committed - 1])["sizes"] if committed else {}
    after = json.loads(entries[committed])["sizes"]
    ledger.write_text("".join(entries[:committed]))
    for name, end in after.items():
        path, start = folder / name, before.get(name, 0)
        if path.exists():
            data = path.read_bytes()
            path.write_bytes(data[:start + (end - start) // 2])
    (folder / "manifest.json").unlink(missing_ok=True)
