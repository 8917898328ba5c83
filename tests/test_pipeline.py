"""`cai run`: every stage in order on builtin:tiny, then nothing left to do."""

from __future__ import annotations

import json

from cai.cli import main

from conftest import SMOKE


def test_cai_run_completes_every_stage_then_skips_them_all(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["run", "--config", str(SMOKE), "--set", f"run_dir={run_dir}"]
    assert main(argv) == 0
    stages = ["critique", "sft", "label", "reward", "rl", "dpo", "evaluate"]
    manifests = {s: json.loads((run_dir / s / "manifest.json").read_text()) for s in stages}
    for stage in ("sft", "reward", "rl", "dpo"):
        assert (run_dir / stage / "model" / "config.json").exists(), stage
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    assert {"base", "sft", "rl", "dpo"} <= set(json.dumps(results).split('"'))
    assert (run_dir / "report" / "index.html").exists()
    capsys.readouterr()

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert all(f"[cai] {s}: already complete" in out for s in stages), out
    for s in stages:  # untouched
        assert json.loads((run_dir / s / "manifest.json").read_text()) == manifests[s]


def test_run_slices_with_from_and_until(tmp_path, capsys):
    run_dir = tmp_path / "run"
    base = ["run", "--config", str(SMOKE), "--set", f"run_dir={run_dir}"]
    assert main(base + ["--until", "sft"]) == 0
    assert (run_dir / "sft" / "manifest.json").exists() and not (run_dir / "label").exists()
    assert main(base + ["--from", "label", "--until", "label"]) == 0
    assert (run_dir / "label" / "manifest.json").exists() and not (run_dir / "reward").exists()


def test_a_bad_config_key_stops_the_run_before_any_work(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["run", "--config", str(SMOKE), "--set", f"run_dir={run_dir}", "--set", "dpo.betta=0.1"])
    assert code == 2
    assert "unknown key 'betta' in dpo" in capsys.readouterr().err
    assert not run_dir.exists()


def test_stage_out_of_order_is_a_clear_error(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["sft", "--config", str(SMOKE), "--set", f"run_dir={run_dir}"]) == 1
    assert "stage 'critique' has not completed" in capsys.readouterr().err
    assert main(["critique", "--config", str(SMOKE), "--set", f"run_dir={run_dir}"]) == 0
    assert main(["sft", "--config", str(SMOKE), "--set", f"run_dir={run_dir}"]) == 0
