"""Constitution files: the shipped ones are valid; bad ones are reported at the right line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from cai.cli import main
from cai.constitution import check_constitution, load_constitution
from cai.yamlio import ValidationError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "constitutions").glob("*.yaml"))

GOOD = """\
name: test
description: a small valid constitution
critique_revision:
  - id: harm
    critique: Point out anything harmful in the last answer.
    revision: Rewrite the answer without the harmful part. Reply with the answer only.
  - id: honest
    critique: Point out anything dishonest.
    revision: Rewrite the answer honestly.
feedback:
  - id: less-harmful
    text: Which of these responses is less harmful?
"""


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_constitutions_are_valid_and_rich():
    assert len(SHIPPED) >= 2
    harmless = load_constitution(ROOT / "constitutions" / "harmless.yaml")
    assert len(harmless.critique_revision) >= 16 and len(harmless.feedback) >= 16
    assert harmless.critique_examples and harmless.feedback_examples
    for path in SHIPPED:
        constitution, problems = check_constitution(path)
        assert problems == [], problems


def test_few_shot_revisions_are_answers_not_preambles():
    for path in SHIPPED:
        for example in load_constitution(path).critique_examples:
            revision = example.messages[-1]["content"].strip().lower()
            assert not revision.startswith(("sure", "here is", "here's", "revision")), (path, revision[:40])


def test_a_valid_file_loads(tmp_path):
    constitution = load_constitution(write(tmp_path, GOOD))
    assert [p.id for p in constitution.critique_revision] == ["harm", "honest"]
    assert constitution.feedback_principle("less-harmful").text.startswith("Which")


# Each bad file: (text, line the problem must be reported at, words the message must contain).
BAD = {
    "yaml syntax": ("name: x\ndescription: [unclosed\n", 3, "YAML syntax error"),
    "not a mapping": ("- just\n- a list\n", 1, "must be a mapping"),
    "missing name": (GOOD.replace("name: test\n", ""), 1, "missing required key 'name'"),
    "unknown top key": (GOOD + "colour: blue\n", 13, "unknown key 'colour'"),
    "unknown principle key": (GOOD.replace("    revision: Rewrite the answer honestly.\n",
                                           "    revision: Rewrite the answer honestly.\n    weight: 2\n"), 10,
                              "unknown key 'weight'"),
    "missing revision": (GOOD.replace("    revision: Rewrite the answer honestly.\n", ""), 7,
                         "missing required key 'revision'"),
    "wrong type": (GOOD.replace("description: a small valid constitution", "description: 42"), 2,
                   "'description' must be a string"),
    "duplicate id": (GOOD.replace("id: honest", "id: harm"), 7, "duplicate id 'harm'"),
    "empty principles": (GOOD.split("feedback:")[0] + "feedback: []\n", 10, "at least one principle"),
    "bad id": (GOOD.replace("id: honest", "id: Be Honest"), 7, "lowercase letters"),
    "empty text": (GOOD.replace("text: Which of these responses is less harmful?", "text: '  '"), 12,
                   "must not be empty"),
    "bad example turns": (GOOD + "examples:\n  critique_revision:\n    - messages:\n"
                                 "        - {role: user, content: hi}\n", 15, "6 turns"),
    "example unknown principle": (GOOD + "examples:\n  feedback:\n    - principle: nope\n"
                                         "      conversation: hi\n      response_a: a\n      response_b: b\n"
                                         "      answer: A\n", 15, "not a feedback id"),
    "example bad answer": (GOOD + "examples:\n  feedback:\n    - conversation: hi\n      response_a: a\n"
                                  "      response_b: b\n      answer: C\n", 18, "answer must be A or B"),
    "example wrong role": (GOOD + "examples:\n  critique_revision:\n    - messages:\n"
                           + "".join(f"        - {{role: {r}, content: x}}\n"
                                     for r in ["user", "user", "user", "assistant", "user", "assistant"]),
                           17, "must have role 'assistant'"),
    # the optional evaluation section: the judge's harmless and helpful questions
    "unknown evaluation list": (GOOD + "evaluation:\n  harmful:\n    - id: x\n      text: y\n", 14,
                                "unknown key 'harmful' in evaluation (expected one of: harmless, helpful)"),
    "evaluation principle without text": (GOOD + "evaluation:\n  helpful:\n    - id: more-helpful\n", 15,
                                          "missing required key 'text' in evaluation.helpful.0"),
    "empty evaluation list": (GOOD + "evaluation:\n  harmless: []\n", 14,
                              "'evaluation.harmless' must list at least one principle"),
    "duplicate evaluation id": (GOOD + "evaluation:\n  helpful:\n    - {id: a, text: Which is more helpful?}\n"
                                       "    - {id: a, text: Which is clearer?}\n", 16,
                                "duplicate id 'a' in evaluation.helpful (first at line 15)"),
    "evaluation not a mapping": (GOOD + "evaluation: [a]\n", 13, "'evaluation' must be a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_constitutions_name_file_line_and_problem(tmp_path, case):
    text, line, words = BAD[case]
    path = write(tmp_path, text)
    constitution, problems = check_constitution(path)
    assert constitution is None
    assert any(p.line == line and words in p.message and p.file == str(path) for p in problems), \
        [str(p) for p in problems]
    with pytest.raises(ValidationError):
        load_constitution(path)


def test_evaluation_principles_load_by_prompt_kind(tmp_path):
    text = GOOD + ("evaluation:\n  harmless:\n    - id: safer\n      text: '  Which of these responses is safer?'\n"
                   "  helpful:\n    - id: more-helpful\n      text: Which of these responses is more helpful?\n")
    constitution = load_constitution(write(tmp_path, text))
    assert [(p.id, p.text) for p in constitution.evaluation_principles("red_team")] == [
        ("safer", "Which of these responses is safer?")]
    assert [p.id for p in constitution.evaluation_principles("helpful")] == ["more-helpful"]
    only_harmless = load_constitution(write(tmp_path, GOOD + "evaluation:\n  harmless:\n    - {id: s, text: Safer?}\n",
                                            "half.yaml"))
    assert only_harmless.evaluation_given == ("harmless",)
    assert only_harmless.evaluation_principles("helpful")[0].id == "more-helpful"  # cai's default questions


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    text = GOOD.replace("id: honest", "id: harm") + "colour: blue\n"
    _, problems = check_constitution(write(tmp_path, text))
    assert len(problems) == 2


def test_cli_check_exit_codes_and_messages(tmp_path, capsys):
    good = write(tmp_path, GOOD, "good.yaml")
    bad = write(tmp_path, GOOD.replace("id: honest", "id: harm"), "bad.yaml")
    assert main(["constitution", "check", str(good)]) == 0
    assert main(["constitution", "check", str(good), str(bad)]) == 2
    out = capsys.readouterr().out
    assert f"{bad}:7: duplicate id 'harm'" in out
    assert main(["constitution", "check", str(tmp_path / "missing.yaml")]) == 2


def test_cli_show_prints_the_principles(capsys):
    assert main(["constitution", "show", str(ROOT / "constitutions" / "harmless.yaml")]) == 0
    out = capsys.readouterr().out
    assert "Critique / revision principles" in out and "Feedback principles" in out
    assert "Evaluation principles, harmless (3)" in out and "[no-needless-refusal]" in out
