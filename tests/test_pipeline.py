"""`cai run`: every stage in order on builtin:tiny, then nothing left to do."""

from __future__ import annotations

import html
import json
import time

import pytest
from conftest import SMOKE

from cai.cli import main


def test_cai_run_completes_every_stage_then_skips_them_all(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["run", "--config", str(SMOKE), "--set", f"run_dir={run_dir}"]
    assert main(argv) == 0
    stages = ["critique", "sft", "label", "reward", "rl", "dpo", "evaluate"]
    manifests = {s: json.loads((run_dir / s / "manifest.json").read_text()) for s in stages}
    for stage in ("sft", "reward", "rl", "dpo"):
        assert (run_dir / stage / "model" / "config.json").exists(), stage
    for stage, manifest in manifests.items():  # each stage's own peak, not the process's so far
        assert manifest["peak_memory"]["rss_scope"] in ("stage", "sampled"), stage
        assert 10 * 2**20 < manifest["peak_memory"]["rss_bytes"] < 8 * 2**30, stage
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    assert {"base", "sft", "rl", "dpo"} <= set(json.dumps(results).split('"'))
    assert (run_dir / "report" / "index.html").exists()
    capsys.readouterr()

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert all(f"[cai] {s}: already complete" in out for s in stages), out
    for s in stages:  # untouched
        assert json.loads((run_dir / s / "manifest.json").read_text()) == manifests[s]

    # `cai evaluate` alone rewrites the report; with the judge limited to red-team prompts
    # there is no helpfulness Elo, and the harmlessness-vs-helpfulness plot's place says why
    report = run_dir / "report" / "index.html"
    report.unlink()
    assert main(["evaluate", "--config", str(SMOKE), "--set", f"run_dir={run_dir}", "--set",
                 "evaluate.judge_prompts=[red_team]", "--force"]) == 0
    assert f"[cai] report: {report}\n" in capsys.readouterr().out
    text = html.unescape(" ".join(report.read_text(encoding="utf-8").split()))
    assert 'alt="harmlessness vs helpfulness"' not in text
    assert ("<h3>Harmlessness vs helpfulness</h3> <p class=\"missing\">Not drawn: it plots each model's Elo on all "
            "red-team prompts against its Elo on all helpful prompts, and the judge did not compare the models on all "
            "helpful prompts") in text


def test_run_slices_with_from_and_until(tmp_path, capsys):
    run_dir = tmp_path / "run"
    base = ["run", "--config", str(SMOKE), "--set", f"run_dir={run_dir}"]
    assert main(base + ["--until", "sft"]) == 0
    assert (run_dir / "sft" / "manifest.json").exists() and not (run_dir / "label").exists()
    # cai run always ends with the report of what the folder holds, and says when it has no evaluation
    out = capsys.readouterr().out
    assert f"[cai] report: {run_dir / 'report' / 'index.html'} (no evaluation yet" in out
    assert (run_dir / "report" / "index.html").exists()
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
    assert main(["sft", "--config", str(SMOKE), "--set", f"run_dir={run_dir}"]) == 2
    assert ("cai sft: sft needs stage 'critique' (its sft.jsonl is the training set), which has not completed in "
            f"{run_dir}: run `cai critique` first") in capsys.readouterr().err
    assert not run_dir.exists()
    assert main(["critique", "--config", str(SMOKE), "--set", f"run_dir={run_dir}"]) == 0
    assert main(["sft", "--config", str(SMOKE), "--set", f"run_dir={run_dir}"]) == 0


def test_logging_saving_and_reporting_settings_do_not_redo_a_completed_stage(sft_run, capsys):
    from cai.config import load_config
    from cai.execute.executor import prepare

    base = ["run", "--config", str(SMOKE), "--set", f"run_dir={sft_run}", "--until", "sft"]
    for setting in ("sft.logging_steps=5", "sft.save_steps=7", "sft.report_to=none", "run_name=other",
                    "report_to=none", "sft.disable_tqdm=true"):
        assert main(base + ["--set", setting]) == 0, setting
        assert "[cai] sft: already complete" in capsys.readouterr().out, setting
    assert main(base + ["--set", "sft.learning_rate=0.5"]) == 2  # a result setting: refused without --force
    assert "with other settings" in capsys.readouterr().err
    named = load_config(SMOKE, [f"run_dir={sft_run}", "run_name=ablation-3"])
    from trl import SFTConfig

    from cai.training.args import trl_config

    assert trl_config(prepare(named, "sft"), SFTConfig).run_name == "ablation-3"  # once, for every training stage


def test_a_stage_that_failed_before_keeping_any_work_does_not_block_a_retry(sft_run, monkeypatch, capsys):
    import shutil

    from conftest import make_run
    from trl import DPOTrainer

    from cai.execute.executor import run_one as run_stage

    shutil.rmtree(sft_run / "sft")  # dpo needs label; build the chain on the tiny run
    run = make_run(sft_run)
    for stage in ("sft", "label"):
        run_stage(run, stage)

    def refuse(self, *args, **kwargs):
        raise RuntimeError("the trainer refused to start")

    monkeypatch.setattr(DPOTrainer, "train", refuse)
    with __import__("pytest").raises(RuntimeError, match="refused to start"):
        run_stage(make_run(sft_run, "dpo.beta=0.2"), "dpo")
    assert not (sft_run / "dpo" / ".in_progress.json").exists()  # its dataset folder is not kept work
    monkeypatch.undo()
    assert run_stage(make_run(sft_run, "dpo.beta=0.3"), "dpo")["config"]  # other settings: it runs


def test_peak_memory_is_the_stages_own_and_the_process_peak_is_kept():
    from cai.execute.measure import StagePeak
    from cai.execute.measure import status_kib as _status_kib

    def touched(mib: int) -> bytearray:  # resident: every page written
        block = bytearray(mib * 2**20)
        block[::4096] = b"x" * len(block[::4096])
        return block

    process_peak = _status_kib("VmHWM") * 1024
    watch = StagePeak(interval=0.01)
    ballast = touched(process_peak // 2**20 + 100)  # above the process's peak so far: the stage sets a new one
    first = watch.stop()
    assert first["rss_scope"] == "stage" and first["rss_bytes"] >= process_peak + 90 * 2**20
    del ballast
    watch = StagePeak(interval=0.01)  # a new stage starts: the freed memory is not its peak...
    small = touched(100)
    time.sleep(0.1)
    del small
    second = watch.stop()
    assert second["rss_scope"] == "sampled"  # ...below the process's peak: the highest sample
    assert 90 * 2**20 < second["rss_bytes"] < first["rss_bytes"] - 90 * 2**20
    # never reset: /usr/bin/time -v sees the run's peak (the kernel's counters lag by a few pages)
    assert _status_kib("VmHWM") * 1024 >= first["rss_bytes"] - 4 * 2**20


@pytest.mark.parametrize(("argv", "expected", "absent"), [
    (["run", "--from", "reward"], "--from reward: reward needs stage 'label' (its prefs.jsonl is the training set), "
                                  "which has not completed in {run}: start from it (--from label)", "reward"),
    (["run", "--from", "rl"], "--from rl: rl needs stage 'reward' (its model is rl.reward_model)", "rl"),
    (["dpo"], "cai dpo: dpo needs stage 'label' (its prefs.jsonl is the training set)", "dpo"),
    (["label", "--set", "label.policy=rl"], "cai label: label needs stage 'rl' (its model is label.policy)", "label"),
    (["run", "--from", "reward", "--set", "reward.mix_critique_pairs=true", "--set", "critique.num_revisions=1"],
     "reward needs stage 'label'", "reward"),
])
def test_a_missing_upstream_stage_is_refused_before_any_stage_folder(sft_run, capsys, argv, expected, absent):
    def stage_folders():
        return sorted(p.name for p in sft_run.iterdir() if p.is_dir())

    before = stage_folders()
    command, rest = argv[0], argv[1:]
    assert main([command, "--config", str(SMOKE), "--set", f"run_dir={sft_run}", *rest]) == 2
    err = capsys.readouterr().err
    assert expected.format(run=sft_run) in err and "Traceback" not in err
    assert not (sft_run / absent).exists()
    assert stage_folders() == before  # no stage folder, empty or not


def test_a_model_folder_without_a_chat_template_is_refused_before_any_stage(tmp_path, capsys):
    import shutil

    from cai import models

    folder = tmp_path / "no-template"
    shutil.copytree(models.resolve("builtin:tiny"), folder)
    (folder / "chat_template.jinja").unlink()
    run_dir = tmp_path / "run"
    assert main(["run", "--config", str(SMOKE), "--set", f"run_dir={run_dir}", "--set", f"model={folder}"]) == 2
    err = capsys.readouterr().err
    assert f"model folder {folder} has no chat template" in err and "Traceback" not in err
    assert not run_dir.exists()
    # the same folder as a later stage's model: refused before critique runs
    assert main(["run", "--config", str(SMOKE), "--set", f"run_dir={run_dir}",
                 "--set", f"evaluate.feedback_model={folder}"]) == 2
    assert "has no chat template" in capsys.readouterr().err and not run_dir.exists()


def test_a_stage_with_nothing_to_pass_on_fails_with_the_reason(tmp_path, capsys, monkeypatch):
    from cai.engines.base import Completion

    run_dir = tmp_path / "run"
    monkeypatch.setattr("cai.engines.hf.TransformersEngine.generate",
                        lambda self, conversations, *args, **kwargs: [Completion("", 0, True) for _ in conversations])
    assert main(["critique", "--config", str(SMOKE), "--set", f"run_dir={run_dir}"]) == 1
    err = capsys.readouterr().err
    assert "critique: no SFT rows: all 8 prompts were dropped (8 degenerate initial answer" in err
    assert "critique.max_new_tokens" in err and not (run_dir / "critique" / "manifest.json").exists()


def test_label_that_keeps_no_pair_fails_with_the_reason(sft_run, capsys, monkeypatch):
    from cai.engines.base import Completion

    monkeypatch.setattr("cai.engines.hf.TransformersEngine.generate",
                        lambda self, conversations, *args, **kwargs: [Completion("The same answer.", 4, True)
                                                                      for _ in conversations])
    assert main(["label", "--config", str(SMOKE), "--set", f"run_dir={sft_run}"]) == 1
    err = capsys.readouterr().err
    assert "label: no comparisons: all" in err and "identical answers" in err and "label.temperature" in err
    assert not (sft_run / "label" / "manifest.json").exists()
