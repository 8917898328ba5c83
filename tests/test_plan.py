"""The plan, then the executor: every refusal before any stage folder exists and all of
them at once; `--check` prints the plan; stale steps after a `--force`; rounds 1 -> 2 -> 1;
fingerprints of meaning (a constitution comment redoes nothing); the run folder keeps its
config (`cai run RUN_DIR`); `cai status`."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import ROOT, SMOKE, make_run

from cai.cli import main
from cai.plan.checks import TRACKER_PACKAGES

MISSING_TRACKER = next(name for name, package in TRACKER_PACKAGES.items() if importlib.util.find_spec(package) is None)


def stage_folders(run_dir):
    return sorted(p.name for p in run_dir.iterdir() if p.is_dir()) if run_dir.exists() else []


@pytest.mark.parametrize(("settings", "expected"), [
    ([f"sft.report_to={MISSING_TRACKER}"], f"'sft.report_to': {MISSING_TRACKER} needs the "
                                           f"{TRACKER_PACKAGES[MISSING_TRACKER]} package, which is not installed"),
    ([f"report_to={MISSING_TRACKER}"], f"'report_to': {MISSING_TRACKER} needs the"),
    (["dpo.soft_labels=threshold", "dpo.min_confidence=1"], "'dpo.min_confidence': 1 keeps only pairs whose label "
                                                            "is certain"),
    (["critique.few_shot=99"], "'critique.few_shot': 99 critique examples asked for, but the constitution"),
    (["label.feedback_few_shot=99"], "'label.feedback_few_shot': 99 feedback examples asked for"),
    (["sft.num_train_epochs=0"], "'sft.num_train_epochs': 0 trains nothing"),
    (["label.policy=rl"], "these steps need each other in a cycle, so no order (no --from) can run them: "
                          "label (its model is label.policy) -> rl (its model is rl.reward_model) -> reward (its "
                          "prefs.jsonl is the training set) -> label"),
    (["prompts.eval_fraction=0"], "no held-out red_team prompts for evaluate"),
], ids=["tracker", "tracker-top-level", "dpo-keeps-no-pair", "few-shot", "feedback-few-shot", "no-epoch", "cycle",
        "empty-held-out"])
def test_every_refusal_comes_from_the_plan_before_any_stage_folder(tmp_path, capsys, settings, expected):
    run_dir = tmp_path / "run"
    flags = [f for setting in settings for f in ("--set", setting)]
    for check in ([], ["--check"]):
        assert main(["run", "--config", str(SMOKE), "--set", f"run_dir={run_dir}", *flags, *check]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err
        assert not run_dir.exists()


def test_a_cycle_is_named_once_not_sent_round_the_stages(tmp_path, capsys):
    assert main(["run", "--config", str(SMOKE), "--set", f"run_dir={tmp_path / 'run'}", "--set",
                 "label.policy=rl"]) == 2
    err = capsys.readouterr().err
    assert err.count("cycle") == 1 and "--from rl" not in err and "rl@1" in err


def test_every_mistake_of_a_file_is_reported_at_once(tmp_path, capsys):
    text = SMOKE.read_text(encoding="utf-8")
    text = text.replace("seed: 0", "seeed: 0").replace("  learning_rate: 1.0e-3\n  max_length: 512\n\nlabel:",
                                                       "  learnin_rate: 1.0e-3\n  max_length: 512\n\nlabel:")
    text = text.replace("  algorithm: ppo", "  algorithm: ppo\n  num_mini_batches: 3")
    config = tmp_path / "three.yaml"
    config.write_text(text, encoding="utf-8")
    assert main(["run", "--config", str(config), "--set", f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    lines = text.splitlines()
    for key, words in (("seeed", "unknown key 'seeed'"), ("learnin_rate", "unknown key 'learnin_rate' in sft"),
                       ("num_mini_batches: 3", "rl.num_mini_batches (3)")):
        line = next(n for n, text in enumerate(lines, start=1) if text.strip().startswith(key))
        assert f"{config}:{line}: " in err and words in err, (key, err)
    assert not (tmp_path / "run").exists()


def test_a_step_that_would_read_an_upstream_the_config_changed_is_refused(sft_run, capsys):
    argv = ["sft", "--config", str(SMOKE), "--set", f"run_dir={sft_run}", "--set", "critique.num_revisions=1",
            "--set", "sft.learning_rate=0.5", "--force"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "sft would read stage 'critique', which this run folder holds with other settings" in err
    assert "critique.num_revisions: 2 -> 1" in err and "Traceback" not in err
    assert json.loads((sft_run / "sft" / "manifest.json").read_text())["trl"]["learning_rate"] == 1e-3
    assert stage_folders(sft_run) == ["critique", "sft"]


def test_check_prints_the_plan_with_the_run_folder(sft_run, capsys):
    assert main(["run", "--check", "--config", str(SMOKE), "--set", f"run_dir={sft_run}", "--set",
                 "sft.learning_rate=0.5", "--force"]) == 0
    out = capsys.readouterr().out
    assert f"[cai] run folder: {sft_run.resolve()}" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert "skip (complete with these settings)" in lines["critique"]
    assert "redo" in lines["sft"] and "sft.learning_rate: 0.001 -> 0.5" in out
    assert "  label " in out and "run" in lines["label"] and "policy=sft" in lines["label"]
    assert stage_folders(sft_run) == ["critique", "sft"]
    # without --force the same plan is refused, and --check says so
    assert main(["run", "--check", "--config", str(SMOKE), "--set", f"run_dir={sft_run}", "--set",
                 "sft.learning_rate=0.5"]) == 2
    assert "stage 'sft'" in capsys.readouterr().err


def test_after_force_the_downstream_steps_are_stale_then_redone_with_a_note(sft_run, capsys):
    from cai.execute.executor import run_one

    run_one(make_run(sft_run), "label")
    base = ["run", "--config", str(SMOKE), "--set", f"run_dir={sft_run}", "--set", "sft.learning_rate=2.0e-3"]
    assert main(base + ["--until", "sft", "--force"]) == 0
    capsys.readouterr()
    assert main(["status", str(sft_run)]) == 0
    out = capsys.readouterr().out
    assert f"[cai] {sft_run.resolve()}" in out
    status = {line.split()[0]: line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("  ")}
    assert status["critique"] == "complete" and status["sft"] == "complete" and status["label"] == "stale"
    assert status["reward"] == "pending"
    assert "stale: upstream sft redone after it (cai run redoes it)" in out
    from cai.report import write_report

    assert "stale: sft redone after it" in write_report(sft_run).read_text(encoding="utf-8")
    # the plain command redoes label, with a note, instead of refusing it
    assert main(base + ["--until", "label"]) == 0
    out = capsys.readouterr().out
    assert "[cai] label: redone: stale: upstream steps were redone after it:" in out
    assert "upstream stage 'sft' (its config hash: it was redone)" in out
    status_after = json.loads((sft_run / "label" / "manifest.json").read_text())
    assert status_after["upstream"]["sft"] == json.loads((sft_run / "sft" / "manifest.json").read_text())["config_hash"]


def test_rounds_one_two_one_redo_evaluate_without_refusing(sft_run, capsys):
    base = ["run", "--config", str(SMOKE), "--set", f"run_dir={sft_run}", "--set", "rl=null", "--set",
            "evaluate.models=[base, sft, dpo]"]
    assert main(base) == 0
    first = json.loads((sft_run / "evaluate" / "manifest.json").read_text())
    capsys.readouterr()
    assert main(base + ["--set", "rounds=2"]) == 0
    out = capsys.readouterr().out
    assert "[cai] evaluate: redone: stale" in out and (sft_run / "round2" / "dpo" / "manifest.json").exists()
    assert "upstream stage 'dpo@2' (new)" in out
    assert main(base) == 0  # back to one round: evaluate again, on round 1's models
    out = capsys.readouterr().out
    assert "[cai] evaluate: redone: stale" in out and "upstream stage 'dpo@2' (gone)" in out
    assert json.loads((sft_run / "evaluate" / "manifest.json").read_text())["config_hash"] == first["config_hash"]
    assert main(base) == 0
    assert "[cai] evaluate: already complete" in capsys.readouterr().out


def _constitution_copy(tmp_path, old: str = "", new: str = ""):
    path = tmp_path / "constitution.yaml"
    text = (ROOT / "constitutions" / "harmless.yaml").read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


def test_a_constitution_comment_changes_no_fingerprint_and_a_principle_is_named(tmp_path, capsys):
    from cai.execute.executor import prepare

    run_dir = tmp_path / "run"
    config = _constitution_copy(tmp_path)
    base = ["run", "--config", str(SMOKE), "--set", f"run_dir={run_dir}", "--set", f"constitution={config}"]
    assert main(base + ["--until", "critique"]) == 0
    _constitution_copy(tmp_path, "# cai default constitution", "# an edited comment\n# cai default constitution")
    capsys.readouterr()
    assert main(base + ["--until", "critique"]) == 0
    assert "[cai] critique: already complete" in capsys.readouterr().out
    # a critique principle is critique's and evaluate's, not label's
    label = prepare(make_run(run_dir, f"constitution={config}"), "label").config_hash
    _constitution_copy(tmp_path, "      Point out any way the assistant's last answer",
                       "      Point out every way the assistant's last answer")
    assert prepare(make_run(run_dir, f"constitution={config}"), "label").config_hash == label
    assert main(base + ["--until", "critique"]) == 2
    err = capsys.readouterr().err
    assert "principle 'dangerous-help': critique text changed" in err and "sha256" not in err


def test_the_run_folder_keeps_its_config_and_continues_with_no_flags(tmp_path, capsys, monkeypatch):
    import yaml

    run_dir = tmp_path / "run"
    assert main(["run", "--config", str(SMOKE), "--set", f"run_dir={run_dir}", "--set", "critique.num_revisions=1",
                 "--until", "critique"]) == 0
    kept = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    assert kept["critique"]["num_revisions"] == 1 and kept["run_dir"] == str(run_dir.resolve())
    assert kept["constitution"] == str((ROOT / "constitutions" / "harmless.yaml").resolve())
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # from anywhere
    assert main(["run", str(run_dir), "--until", "critique"]) == 0
    assert "[cai] critique: already complete" in capsys.readouterr().out
    assert main(["run", "--check", "--config", str(run_dir / "config.yaml"), "--until", "critique"]) == 0
    assert main(["run", str(run_dir), "--config", str(SMOKE)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "elsewhere")]) == 2
    assert "holds no config.yaml" in capsys.readouterr().err
