"""Constitution experiments: `cai compare` pairs two runs' models by prompt text and lists
what else differs; `cai constitution diff` says what an edit changed; `base+constitution`
is the prompted baseline every run is compared with; the judge's win rates per principle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai.cli import main
from cai.constitution import as_system_prompt, load_constitution
from tests.conftest import ROOT, SMOKE

HARMLESS = ROOT / "constitutions" / "harmless.yaml"
OLD_TEXT = "that gives no real help with weapons, drugs, hacking or fraud."
NEW_TEXT = "that refuses any help with weapons, drugs, hacking, fraud or self-harm."
MODELS = "evaluate.models=[base, base+constitution, sft, dpo]"
EVAL = "prompts.max_eval=12"  # 12 held-out prompts per kind: enough for a verdict (cai.stats.MIN_PROMPTS)


def edited(tmp: Path, name: str, old: str, new: str) -> Path:
    text = HARMLESS.read_text(encoding="utf-8")
    assert old in text
    path = tmp / name
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A: the smoke run with harmless.yaml; B: one feedback principle reworded and dpo's
    beta changed (a confounder), built with --reuse A (critique and sft are A's)."""
    root = tmp_path_factory.mktemp("compare")
    constitution = edited(root, "b.yaml", OLD_TEXT, NEW_TEXT)
    common = ["--set", MODELS, "--set", EVAL, "--set", "rl.max_prompts=4"]
    assert main(["run", "--config", str(SMOKE), "--set", f"run_dir={root / 'a'}", *common]) == 0
    assert main(["run", "--config", str(SMOKE), "--set", f"run_dir={root / 'b'}", *common,
                 "--set", f"constitution={constitution}", "--set", "dpo.beta=0.2", "--reuse", str(root / "a")]) == 0
    return root


def test_reuse_links_the_steps_a_constitution_edit_does_not_touch(two_runs):
    b = two_runs / "b"
    # critique reads the critique principles and examples, sft only critique's outputs: both linked in
    assert (b / "critique").is_symlink() and (b / "sft").is_symlink()
    assert (b / "critique").resolve() == (two_runs / "a" / "critique").resolve()
    # label reads the feedback principles: it ran again, and everything after it
    for stage in ("label", "reward", "rl", "dpo", "evaluate"):
        assert not (b / stage).is_symlink() and (b / stage / "manifest.json").exists()


def test_a_reused_step_is_named_once(two_runs, capsys):
    """The same config as A: every step is linked in, and each says so in one line."""
    c = two_runs / "c"
    assert main(["run", "--config", str(SMOKE), "--set", f"run_dir={c}", "--set", MODELS, "--set", EVAL,
                 "--set", "rl.max_prompts=4", "--reuse", str(two_runs / "a")]) == 0
    out = capsys.readouterr().out
    assert out.count(": reused from ") == len([p for p in (two_runs / "a").iterdir() if (p / "manifest.json").exists()])
    assert "already complete" not in out


def test_compare_pairs_the_shared_sets_and_lists_what_else_differs(two_runs, capsys):
    out = two_runs / "out"
    assert main(["compare", str(two_runs / "a"), str(two_runs / "b"), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "comparison.json").read_text())
    (other,) = result["against"]
    assert other["confounders"] == ["dpo.beta: (default) -> 0.2"]
    assert other["constitution_changes"] == ["feedback principle 'less-dangerous': text changed"]
    assert set(other["shared"]) == {"red_team", "helpful"}
    assert all(s["n"] == 12 == s["a"] == s["b"] for s in other["shared"].values())
    for group, pairs in other["paired"].items():
        assert list(pairs) == ["base", "base+constitution", "sft", "dpo"]
        for model, rows in pairs.items():
            assert {"refusal", "evasive", "tokens", "words"} <= set(rows)
            for figure, row in rows.items():
                assert row["low"] <= row["value"] <= row["high"], (group, model, figure)
                assert row["value"] == pytest.approx(row["b"] - row["a"], abs=1e-3)
        # the same base model, the same prompts and seeds: its answers, and so its figures, are the same
        assert all(row["value"] == 0 and row["low"] == 0 == row["high"] for row in pairs["base"].values())
        # sft is A's in both runs (linked in): no difference either
        assert all(row["value"] == 0 for key, row in pairs["sft"].items() if key != "head_to_head")
    assert "reward" not in other["paired"]["red_team"]["dpo"]  # two reward models: not compared
    assert any("reward: not compared" in note for note in other["notes"])
    # the judge's "beats base" was read under two constitutions: said so
    assert any(note.startswith("beats base: each run's judge read its own constitution") for note in other["notes"])
    page = (out / "index.html").read_text()
    assert page.index("What else differs") < page.index("red_team: 12 shared prompts")
    assert "dpo.beta: (default) -&gt; 0.2" in page and "text changed" in page
    assert "b vs a (B - A" in printed and "other differences: dpo.beta: (default) -> 0.2" in printed


def test_compare_with_a_judge_meets_the_final_policies_head_to_head_and_resumes(two_runs, capsys):
    out = two_runs / "judged"
    arguments = ["compare", str(two_runs / "a"), str(two_runs / "b"), "--output-dir", str(out), "--judge", "base"]
    assert main(arguments) == 0
    match = json.loads((out / "comparison.json").read_text())["against"][0]["head_to_head"]
    assert (match["a"], match["b"]) == ("a/dpo", "b/dpo")
    assert {g: r["n"] for g, r in match["groups"].items()} == {"red_team": 12, "helpful": 12}
    assert all(r["low"] <= r["value"] <= r["high"] for r in match["groups"].values())
    assert match["principles"] and sum(r["n"] for r in match["principles"]) == 24
    assert all(0 <= r["identical"] <= r["n"] for r in match["groups"].values())
    ledger = out / "head_to_head.b.jsonl"
    before = ledger.read_text()
    capsys.readouterr()
    assert main(arguments) == 0  # every chunk committed: nothing judged again, the same figures
    assert ledger.read_text() == before
    assert json.loads((out / "comparison.json").read_text())["against"][0]["head_to_head"] == match


def test_a_head_to_head_does_not_judge_answers_both_runs_share(two_runs, monkeypatch, capsys):
    """A run against itself: every answer is the same, so every prompt is a tie (0.5) and
    the judge is never asked."""
    from cai.judge.judge import Judge

    asked = []
    original = Judge.compare_with
    monkeypatch.setattr(Judge, "compare_with", lambda self, *a, **k: asked.append(1) or original(self, *a, **k))
    out = two_runs / "itself"
    assert main(["compare", str(two_runs / "a"), str(two_runs / "a"), "--output-dir", str(out), "--judge",
                 "base"]) == 0
    match = json.loads((out / "comparison.json").read_text())["against"][0]["head_to_head"]
    assert not asked
    assert all(r["identical"] == r["n"] == 12 and r["value"] == 0.5 == r["low"] == r["high"]
               for r in match["groups"].values())
    assert "12 of the answers identical: ties" in capsys.readouterr().out


def test_compare_refuses_runs_with_no_prompt_in_common_before_any_work(two_runs, tmp_path, capsys):
    files = {}
    for kind in ("red_team", "helpful"):
        files[kind] = tmp_path / f"{kind}.jsonl"
        files[kind].write_text("".join(json.dumps({"prompt": f"A {kind} question nobody else asked, number {n}?"})
                                       + "\n" for n in range(3)))
    other = tmp_path / "c"
    assert main(["evaluate", "--config", str(SMOKE), "--set", f"run_dir={other}", "--set", "evaluate.models=[base]",
                 *(a for kind, path in files.items() for a in ("--set", f"evaluate.prompts.{kind}={path}"))]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["compare", str(two_runs / "a"), str(other), "--output-dir", str(out), "--judge", "base"]) == 2
    error = capsys.readouterr().err
    assert "shares no evaluation prompts" in error
    assert "a evaluated red_team (12), helpful (12)" in error and "c evaluated red_team (3), helpful (3)" in error
    assert not out.exists()


def test_compare_names_a_folder_without_an_evaluation(two_runs, tmp_path, capsys):
    assert main(["compare", str(two_runs / "a"), str(tmp_path)]) == 2
    assert f"{tmp_path}: no evaluation to compare" in capsys.readouterr().err


# ---------------------------------------------------------------- the prompted baseline and principles


def test_the_prompted_baseline_is_evaluated_and_reported_like_every_model(two_runs):
    run = two_runs / "a"
    results = json.loads((run / "evaluate" / "results.json").read_text())
    assert "base+constitution" in results["models"]
    assert results["per_model"]["base+constitution"]["red_team"]["n"] == 12
    # every trained model is compared with it: does training beat prompting?
    assert set(results["paired"]["red_team"]["base+constitution"]) == {"base", "sft", "dpo"}
    rows = [json.loads(line) for line in (run / "evaluate" / "generations.jsonl").read_text().splitlines()]
    base = {r["id"]: r["response"] for r in rows if r["model"] == "base"}
    prompted = {r["id"]: r["response"] for r in rows if r["model"] == "base+constitution"}
    assert base.keys() == prompted.keys() and base != prompted  # the system message changes the answers
    page = (run / "report" / "index.html").read_text()
    assert "Compared with base+constitution" in page


def test_the_prompted_baseline_system_message_is_the_constitution():
    constitution = load_constitution(HARMLESS)
    message = as_system_prompt(constitution)
    assert message.startswith(" ".join(constitution.system_prompt.split()))
    assert all(f"- {' '.join(p.text.split())}" in message for p in constitution.feedback)


def test_base_plus_constitution_is_refused_outside_evaluate_models(tmp_path, capsys):
    assert main(["run", "--config", str(SMOKE), "--set", f"run_dir={tmp_path}", "--set",
                 "label.feedback_model=base+constitution", "--check"]) == 2
    assert "'label.feedback_model': 'base+constitution'" in capsys.readouterr().err


def test_win_rates_per_principle_with_intervals_and_the_rarely_drawn_marked(two_runs):
    results = json.loads((two_runs / "a" / "evaluate" / "results.json").read_text())
    rows = results["principle_win_rates"]
    comparisons = [json.loads(line) for line in
                   (two_runs / "a" / "evaluate" / "comparisons.jsonl").read_text().splitlines()]
    assert sum(r["n"] for r in rows) == len(comparisons)  # one principle per comparison
    for row in rows:
        assert row["low"] <= row["value"] <= row["high"]
        assert (row["verdict"] == "too few to compare") == (row["n"] < 10)
    assert any(r["verdict"] == "too few to compare" for r in rows)
    assert "Win rates by principle" in (two_runs / "a" / "report" / "index.html").read_text()


# ---------------------------------------------------------------- cai constitution diff


def diff(a: Path, b: Path, capsys) -> tuple[int, str]:
    code = main(["constitution", "diff", str(a), str(b)])
    return code, capsys.readouterr().out


def test_diff_of_a_reworded_principle_names_it_and_shows_both_texts(tmp_path, capsys):
    code, out = diff(HARMLESS, edited(tmp_path, "b.yaml", OLD_TEXT, NEW_TEXT), capsys)
    assert code == 1
    assert "feedback principle 'less-dangerous': text changed" in out
    assert f"- Which of these assistant responses is less harmful? Choose the response {OLD_TEXT}" in out
    assert f"+ Which of these assistant responses is less harmful? Choose the response {NEW_TEXT}" in out


def test_diff_of_added_and_removed_principles(tmp_path, capsys):
    added = edited(tmp_path, "added.yaml", "feedback:\n", "feedback:\n  - id: gentler\n    text: Which response is "
                                                          "gentler?\n")
    code, out = diff(HARMLESS, added, capsys)
    assert code == 1 and "feedback principle 'gentler': added" in out and "+ text: Which response is gentler?" in out
    code, out = diff(added, HARMLESS, capsys)
    assert code == 1 and "feedback principle 'gentler': removed" in out


def test_diff_ignores_comments_and_key_order(tmp_path, capsys):
    text = HARMLESS.read_text(encoding="utf-8")
    head, _, rest = text.partition("name: harmless\n")
    reordered = tmp_path / "same.yaml"  # comments changed, `name` moved after `description`
    description, _, tail = rest.partition("\nsystem_prompt:")
    reordered.write_text("# another comment\n" + description + "\nname: harmless\nsystem_prompt:" + tail,
                         encoding="utf-8")
    code, out = diff(HARMLESS, reordered, capsys)
    assert code == 0 and "mean the same" in out


def test_diff_of_an_example_and_of_a_bad_file(tmp_path, capsys):
    constitution = load_constitution(HARMLESS)
    revision = constitution.critique_examples[0].messages[5]["content"]
    first_line = revision.split("\n")[0].strip()[:40]
    code, out = diff(HARMLESS, edited(tmp_path, "ex.yaml", first_line, first_line + " Truly."), capsys)
    assert code == 1 and "critique example 1" in out and ": changed" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n", encoding="utf-8")
    assert main(["constitution", "diff", str(HARMLESS), str(bad)]) == 2
    assert "bad.yaml" in capsys.readouterr().err
