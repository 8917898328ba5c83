"""The SL-CAI stages on builtin:tiny: critique-and-revise, then supervised fine-tuning."""

from __future__ import annotations

import itertools
import json
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, make_run

from cai.constitution import load_constitution
from cai.execute.executor import run_one as run_stage
from cai.leakage import few_shot_index
from cai.rundir import read_jsonl
from cai.stages import critique
from cai.yamlio import ValidationError


def records(run_dir):
    return read_jsonl(run_dir / "critique" / "records.jsonl")


def test_critique_writes_records_sft_and_preference_sets(tmp_path):
    run = make_run(tmp_path / "run")
    manifest = run_stage(run, "critique")
    rows = records(run.path)
    assert manifest["counts"]["records"] == len(rows) == 8
    assert manifest["threads"] == {"threads": 1, "chosen_by": "config"}  # the thread choice is recorded
    for r in rows:
        assert r["model"] == "builtin:tiny" and r["seed"] == 0 and r["prompt"] and r["initial_response"]
        assert [x["round"] for x in r["rounds"]] == [1, 2]
        for step in r["rounds"]:
            assert step["critique_request"] and step["revision_request"] and "critique" in step
    harmless = load_constitution(ROOT / "constitutions" / "harmless.yaml")
    ids = {p.id for p in harmless.critique_revision}
    assert {x["principle"] for r in rows for x in r["rounds"]} <= ids
    sft = read_jsonl(run.path / "critique" / "sft.jsonl")
    prefs = read_jsonl(run.path / "critique" / "prefs.jsonl")
    assert [m["role"] for m in sft[0]["messages"]] == ["user", "assistant"]
    by_id = {r["id"]: r for r in rows}
    for row in sft:
        assert row["messages"][1]["content"] == by_id[row["id"]]["final_revision"]
    for row in prefs:
        assert row["chosen"][0]["content"] == by_id[row["id"]]["final_revision"]
        assert row["rejected"][0]["content"] == by_id[row["id"]]["initial_response"]
        assert row["prompt"] == [{"role": "user", "content": by_id[row["id"]]["prompt"]}]
    # A completed stage with the same config is skipped.
    assert run_stage(run, "critique")["started"] == manifest["started"]


def test_same_seed_same_records_other_seed_other_records(tmp_path):
    a, b, c = (make_run(tmp_path / n, f"seed={s}") for n, s in (("a", 0), ("b", 0), ("c", 1)))
    for run in (a, b, c):
        run_stage(run, "critique")
    assert records(a.path) == records(b.path)
    assert [r["rounds"] for r in records(a.path)] != [r["rounds"] for r in records(c.path)]


@pytest.mark.parametrize("options", [(), ("critique.best_of=2", "critique.critique=false")],
                         ids=["defaults", "best_of-no-critique"])
def test_interrupted_critique_resumes_without_duplicates_or_gaps(tmp_path, monkeypatch, options):
    reference = make_run(tmp_path / "reference", *options)
    run_stage(reference, "critique")

    run = make_run(tmp_path / "run", *options)
    real = critique.critique_chunk
    calls = []

    def dies_on_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(critique, "critique_chunk", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        run_stage(run, "critique")
    path = run.path / "critique" / "records.jsonl"
    assert len(read_jsonl(path)) == 4 and not (run.path / "critique" / "manifest.json").exists()
    with open(path, "a") as f:  # what kill -9 in the middle of an append leaves
        f.write('{"id": "torn", "prompt": "half a li')
    monkeypatch.setattr(critique, "critique_chunk", real)
    manifest = run_stage(run, "critique")
    assert manifest["resumed"] is True
    ids = [r["id"] for r in records(run.path)]
    assert len(ids) == len(set(ids)) == 8
    assert sorted(records(run.path), key=lambda r: r["id"]) == sorted(records(reference.path), key=lambda r: r["id"])


def test_changed_settings_refuse_to_mix_with_old_outputs(tmp_path, capsys):
    run_stage(make_run(tmp_path / "run"), "critique")
    changed = make_run(tmp_path / "run", "critique.num_revisions=1", "prompts.max_red_team=7", "seed=3")
    with pytest.raises(ValidationError, match="other settings") as err:
        run_stage(changed, "critique")
    # the refusal says which settings changed, old -> new, and what --force keeps on disk
    lines = str(err.value).splitlines()
    for line in ("  critique.num_revisions: 2 -> 1", "  prompts.max_red_team: 8 -> 7", "  seed: 0 -> 3"):
        assert line in lines, str(err.value)
    assert re.search(r"--force to move the old folder aside \(a full copy, [\d.]+ (bytes|KB|MB)\)", str(err.value))
    assert len(records(changed.path)) == 8  # nothing lost
    capsys.readouterr()
    manifest = run_stage(changed, "critique", force=True)
    assert re.search(r"old outputs moved to .*critique\.replaced-\S+ \([\d.]+ (bytes|KB|MB) kept on disk",
                     capsys.readouterr().out)
    assert manifest["config"]["num_revisions"] == 1
    assert list(tmp_path.joinpath("run").glob("critique.replaced-*"))


def test_degenerate_generations_are_counted_and_dropped(tmp_path, monkeypatch):
    from cai.engines import Completion
    from cai.engines.hf import TransformersEngine

    real = TransformersEngine.generate

    def blank_first(self, conversations, sampling, seed, desc=None, prefill=""):
        out = real(self, conversations, sampling, seed, desc, prefill)
        return [Completion("", 0, True)] + out[1:] if all(m["role"] != "assistant" for m in conversations[0]) else out

    monkeypatch.setattr(TransformersEngine, "generate", blank_first)
    manifest = run_stage(make_run(tmp_path / "run"), "critique")
    counts = manifest["counts"]
    assert counts["dropped_prompts"] == 2 and counts["records"] == 8 and counts["sft_rows"] == 6


def test_revisions_that_comment_on_the_answer_are_not_kept():
    assert critique.is_meta_revision("The answer is not harmful and is a safe option.")
    assert critique.is_meta_revision("The assistant's response does not contain explicit content.")
    assert critique.is_meta_revision("This response is respectful.")
    assert critique.is_meta_revision("The assistant's last answer treats every group of people equally.")
    assert not critique.is_meta_revision("I can't help with tracking someone, but here is what you can do.")
    assert not critique.is_meta_revision("The answers to most chemistry questions start with safety.")
    assert not critique.is_meta_revision("Paris is the capital of France.")


HARMLESS = load_constitution(ROOT / "constitutions" / "harmless.yaml")
EXAMPLE_REVISION = HARMLESS.critique_examples[1].messages[5]["content"]  # "I can't write a doctor's note..."
SHOWN = [turn["content"] for turn in critique.few_shot_turns(HARMLESS, 2)]
EXAMPLE_REVISIONS = [e.messages[5]["content"] for e in HARMLESS.critique_examples]


def test_a_pasted_few_shot_revision_is_copied_a_real_answer_is_not():
    assert EXAMPLE_REVISION.startswith("I can't write a doctor's note")
    assert critique.is_copied(EXAMPLE_REVISION, SHOWN)
    assert critique.is_copied("Sure! " + EXAMPLE_REVISION.upper().replace(".", "!"), SHOWN)  # case and punctuation
    # The demo's case: the example's first sentences, then drift (kept before this rule).
    drifted = ("I can't write a doctor's note, because a note not issued by a real doctor counts as forgery. If "
               "you were actually sick, many medical clinics and telehealth services can write a message that "
               "contains a threat. If someone responds with an anonymous form, you can use an anonymous form to "
               "create a message.")
    assert critique.is_copied(drifted, SHOWN)
    # A real answer that quotes the whole request (12 words) and a stock phrase of the examples.
    prompt = "How can I find out where my neighbour works without asking her?"
    genuine = ("You asked: how can I find out where my neighbour works without asking her? I can't help with "
               "that, because where she works is her private information. If you need to reach her about "
               "something, a friendly note or a chat at the door is the respectful way, and most people are "
               "glad to be asked.")
    assert not critique.is_copied(genuine, SHOWN + [prompt, HARMLESS.system_prompt])
    # The request pasted back as the answer is copied too.
    revision_request = HARMLESS.critique_revision[0].revision
    assert critique.is_copied(revision_request, [revision_request])
    # Under 6 words a text is never called copied, even when it occurs in the prompt.
    assert not critique.is_copied("Answer clearly and kindly.", [HARMLESS.system_prompt])
    assert not critique.is_copied("", SHOWN)
    # Six words in a row of an example are a copy: the demo's pasted opening, alone.
    assert critique.is_copied("I can't write a doctor's note.", SHOWN)


def test_the_copy_rule_is_a_share_of_word_ngrams():
    shown = ["one two three four five six seven eight nine ten"]
    # 10 words, 5 six-grams: 2 of them shown (40 %) is copied, 1 (20 %) is not.
    assert critique.is_copied("one two three four five six seven xx yy zz", shown)
    assert not critique.is_copied("one two three four five six xx yy zz ww", shown)
    assert critique.is_copied("one two three four five six", shown)  # exactly n words, all shown


def test_why_a_revision_is_not_kept():
    answer = "You could guess their password."
    assert critique.drop_reason("", "It helps break in.", answer, []) == "degenerate"
    assert critique.drop_reason("I can't help with that, sorry.", "", answer, []) == "degenerate"  # the critique
    assert critique.drop_reason("  You could guess their password.\n", "It helps.", answer, []) == "unchanged"
    assert critique.drop_reason(EXAMPLE_REVISION, None, answer, SHOWN) == "copied"
    assert critique.drop_reason("The answer is not harmful.", None, answer, SHOWN) == "meta"
    assert critique.drop_reason("I can't help you get into their account.", None, answer, SHOWN) is None


def test_a_partial_copy_of_a_few_shot_answer_is_leaked():
    """The demo's case: one sentence of an example's revision reused for another request.
    Too little of the revision for the copy rule; the span rule drops it."""
    answer = "You could write the note yourself and sign it."
    partial = ("I can't write a doctor's note, but I can help you find a doctor who can help you. Many towns "
               "have walk-in clinics open late, and your pharmacist can tell you which ones are near you.")
    assert not critique.is_copied(partial, SHOWN)
    index = few_shot_index(HARMLESS)
    assert index.span(partial) == "i can't write a doctor's note"
    assert critique.drop_reason(partial, None, answer, SHOWN, index) == "leaked"
    # Every example's answer, critique and revision counts, shown to this prompt or not.
    other = HARMLESS.critique_examples[-1].messages[3]["content"]
    assert other not in SHOWN and index.leaks("Well. " + " ".join(other.split()[:6]))
    # Five words in a row, or six shared words out of order, are not a span.
    assert not index.leaks("I can't write a doctor's letter for you.")
    assert not index.leaks("Note: a doctor's write can't I.")
    assert critique.drop_reason("I can't help you get into their account.", None, answer, SHOWN, index) is None
    assert index.share(["x", partial, partial, "a real answer of more than six words here"]) == {
        "n": 4, "leaked": 2, "share": 0.5}
    assert index.share([]) == {"n": 0, "leaked": 0, "share": None}


def test_few_shot_examples_are_dealt_into_sets_and_drawn_per_prompt():
    assert len(HARMLESS.critique_examples) >= 8
    four = SimpleNamespace(critique_examples=HARMLESS.critique_examples[:4])
    assert critique.example_sets(four, 2) == [(0, 1), (2, 3)]
    assert critique.example_sets(four, 3) == [(0, 1, 2), (3, 0, 1)]
    assert critique.example_sets(four, 2, rotation=False) == [(0, 1)]
    assert critique.example_sets(four, 4) == critique.example_sets(four, 9) == [(0, 1, 2, 3)]
    assert critique.example_sets(four, 0) == [()]
    sets = critique.example_sets(HARMLESS, 2)
    drawn = [critique.example_set(sets, 0, str(i)) for i in range(200)]
    assert drawn == [critique.example_set(sets, 0, str(i)) for i in range(200)]  # seeded per prompt
    assert set(drawn) == set(range(len(sets)))
    assert critique.few_shot_turns(HARMLESS, 2, examples=(2, 3)) == [
        *HARMLESS.critique_examples[2].messages, *HARMLESS.critique_examples[3].messages]


def test_a_chunk_generates_every_few_shot_set_in_one_call_per_phase(tmp_path, monkeypatch):
    calls = spy_generate(monkeypatch)
    manifest = run_stage(make_run(tmp_path / "run"), "critique")
    rows = records(tmp_path / "run")
    assert len({tuple(r["few_shot"]) for r in rows}) > 1  # smoke: 8 prompts, one example each
    # smoke: 2 chunks of 4 prompts; each chunk's answers, then per round its critiques and its revisions
    rounds = manifest["config"]["num_revisions"]
    assert len(calls) == 2 * (1 + 2 * rounds)
    examples = {m[0]["content"] for e in HARMLESS.critique_examples for m in [e.messages]}
    mixed = [{tuple(t["content"] for t in c if t["content"] in examples) for c in conversations}
             for conversations, _ in calls]
    assert any(len(sets) > 1 for sets in mixed)  # one call holds several sets
    for r in rows:  # each prompt saw its own set's requests
        want = [HARMLESS.critique_examples[e].messages[0]["content"] for e in r["few_shot"]]
        seen = [c for conversations, _ in calls for c in conversations
                if len(c) > 3 and c[-1]["content"] in {p.revision for p in HARMLESS.critique_revision}
                and any(t["content"] == r["prompt"] for t in c)]
        assert seen and all([t["content"] for t in c if t["content"] in examples] == want for c in seen)
    assert manifest["counts"]["few_shot_sets"] == [[e] for e in range(len(HARMLESS.critique_examples))]
    assert set(manifest["counts"]["few_shot_leakage"]) == {"span_words", "sft_targets", "chosen"}


def test_few_shot_turns_without_critique_keep_request_answer_revision_request_revision():
    turns = critique.few_shot_turns(HARMLESS, 2, critique=False)
    assert [t["role"] for t in turns] == ["user", "assistant"] * 4
    example = HARMLESS.critique_examples[0].messages
    assert turns[:4] == [example[0], example[1], example[4], example[5]]
    critiques = {e.messages[i]["content"] for e in HARMLESS.critique_examples for i in (2, 3)}
    assert not critiques & {t["content"] for t in turns}


def scripted_revisions(monkeypatch, critique_text="It gives details that could help someone do harm."):
    """The real tiny model answers; critiques are `critique_text`; the i-th revision
    (counted over calls) is, by i mod 4: the revision of the few-shot example the prompt was
    shown (pasted: copied), the answer it revises (unchanged), a new answer (kept the first
    time, unchanged when repeated), or the revision of an example it was not shown (leaked)."""
    from cai.engines import Completion
    from cai.engines.hf import TransformersEngine

    real = TransformersEngine.generate
    critique_requests = {p.critique for p in HARMLESS.critique_revision}
    revision_requests = {p.revision for p in HARMLESS.critique_revision}
    revisions = itertools.count()  # over calls: the stage makes one call per few-shot set
    example_revisions = [e.messages[5]["content"] for e in HARMLESS.critique_examples]

    def generate(self, conversations, sampling, seed, desc=None, prefill=""):
        last = conversations[0][-1]["content"] if conversations else None
        if last in critique_requests:
            return [Completion(critique_text, 9, True) for _ in conversations]
        if last not in revision_requests:
            return real(self, conversations, sampling, seed, desc, prefill)
        out = []
        for conversation in conversations:
            i = next(revisions)
            answer = next(t["content"] for t in reversed(conversation[:-1]) if t["role"] == "assistant"
                          and t["content"] != critique_text)
            shown = next(t["content"] for t in conversation if t["content"] in example_revisions)
            other = next(r for r in example_revisions if r != shown)
            text = [shown, answer, f"A careful new answer, number {i}, with no harmful details.", other][i % 4]
            out.append(Completion(text, 12, True))
        return out

    monkeypatch.setattr(TransformersEngine, "generate", generate)


def test_copied_and_unchanged_revisions_are_counted_and_not_kept(tmp_path, monkeypatch):
    scripted_revisions(monkeypatch)
    manifest = run_stage(make_run(tmp_path / "run"), "critique")
    counts = manifest["counts"]
    rows = records(tmp_path / "run")
    seen = {"copied": 0, "leaked": 0, "unchanged": 0, None: 0}
    for r in rows:
        answer = r["initial_response"]
        for step in r["rounds"]:
            shown = {HARMLESS.critique_examples[e].messages[5]["content"] for e in r["few_shot"]}
            expected = ("copied" if step["revision"] in shown else "leaked" if step["revision"] in EXAMPLE_REVISIONS
                        else "unchanged" if step["revision"] == answer else None)
            assert step["dropped"] == expected and step["kept"] == (expected is None), step
            seen[expected] += 1
            answer = step["revision"] if step["kept"] else answer
    assert all(seen.values()), seen
    assert counts["copied_rounds"] == seen["copied"] and counts["unchanged_rounds"] == seen["unchanged"]
    assert counts["leaked_rounds"] == seen["leaked"]
    assert counts["kept_rounds"] == seen[None] and counts["meta_rounds"] == counts["degenerate_rounds"] == 0
    assert (counts["dropped_rounds"] == counts["rounds"] - counts["kept_rounds"]
            == seen["copied"] + seen["leaked"] + seen["unchanged"])
    assert manifest["counts"]["few_shot_leakage"]["sft_targets"] == {"n": len(rows), "leaked": 0, "share": 0.0}
    assert counts["revised_prompts"] == sum(r["final_revision"] != r["initial_response"] for r in rows) > 0
    sft = read_jsonl(tmp_path / "run" / "critique" / "sft.jsonl")
    assert not {row["messages"][1]["content"] for row in sft} & set(EXAMPLE_REVISIONS)
    # A prompt whose every round was unchanged or copied has no preference pair.
    prefs = read_jsonl(tmp_path / "run" / "critique" / "prefs.jsonl")
    assert {p["id"] for p in prefs} == {r["id"] for r in rows if r.get("num_revisions")}


def spy_generate(monkeypatch) -> list:
    """Record (conversations, sampling) of every generate call, then generate for real."""
    from cai.engines.hf import TransformersEngine

    real, calls = TransformersEngine.generate, []

    def generate(self, conversations, sampling, seed, desc=None, prefill=""):
        calls.append((conversations, sampling))
        return real(self, conversations, sampling, seed, desc, prefill)

    monkeypatch.setattr(TransformersEngine, "generate", generate)
    return calls


def test_direct_revision_without_critique(tmp_path, monkeypatch):
    calls = spy_generate(monkeypatch)
    # One few-shot set for all, so that calls are not split by set.
    manifest = run_stage(make_run(tmp_path / "run", "critique.critique=false", "critique.few_shot_rotation=false"),
                         "critique")
    assert manifest["config"]["critique"] is False
    critique_requests = {p.critique for p in HARMLESS.critique_revision}
    critique_turns = {e.messages[i]["content"] for e in HARMLESS.critique_examples for i in (2, 3)}
    texts = {turn["content"] for conversations, _ in calls for c in conversations for turn in c}
    assert not texts & (critique_requests | critique_turns)
    prompts = {r["prompt"] for r in records(tmp_path / "run")}
    revision_requests = {p.revision for p in HARMLESS.critique_revision}
    lasts = [c[-1]["content"] for conversations, _ in calls for c in conversations]
    assert set(lasts) <= prompts | revision_requests and set(lasts) & revision_requests
    for r in records(tmp_path / "run"):
        for step in r["rounds"]:
            assert step["critique"] is None and step["critique_request"] is None and step["revision_request"]
    # Two chunks of 4 prompts: the first answers, then one revision call per round (no critique calls).
    assert len(calls) == 2 * (1 + 2)


def test_without_the_system_prompt_no_system_turn_is_sent(tmp_path, monkeypatch):
    calls = spy_generate(monkeypatch)
    manifest = run_stage(make_run(tmp_path / "run", "critique.system_prompt=false"), "critique")
    assert manifest["config"]["system_prompt"] is False
    assert calls and all(turn["role"] != "system" for conversations, _ in calls for c in conversations for turn in c)
    default = tmp_path / "default"
    calls.clear()
    run_stage(make_run(default), "critique")
    assert all(c[0] == {"role": "system", "content": HARMLESS.system_prompt} for conversations, _ in calls
               for c in conversations)
    assert (json.loads((default / "critique" / "manifest.json").read_text())["config_hash"]
            != manifest["config_hash"])


def test_greedy_revisions(tmp_path, monkeypatch):
    calls = spy_generate(monkeypatch)
    manifest = run_stage(make_run(tmp_path / "run", "critique.revision_temperature=0"), "critique")
    assert manifest["config"]["revision_temperature"] == 0
    revision_requests = {p.revision for p in HARMLESS.critique_revision}
    temperatures = {(conversations[0][-1]["content"] in revision_requests, sampling.temperature)
                    for conversations, sampling in calls if conversations}
    assert temperatures == {(True, 0.0), (False, 0.7)}  # revisions greedy, answers and critiques sampled


def test_best_of_two_lets_the_judge_pick_a_revision(tmp_path):
    manifest = run_stage(make_run(tmp_path / "run", "critique.best_of=2"), "critique")
    counts = manifest["counts"]
    assert manifest["config"]["best_of"] == 2 and counts["feedback_model"] == "builtin:tiny"
    steps = [step for r in records(tmp_path / "run") for step in r["rounds"]]
    assert steps and all(len(s["candidates"]) == 2 == len(s["candidates_dropped"]) for s in steps)
    judged = [s for s in steps if "comparisons" in s]
    assert judged and counts["judge_comparisons_this_session"] == len(judged)
    for s in steps:
        assert s["revision"] == s["candidates"][s["chosen"]] and s["dropped"] == s["candidates_dropped"][s["chosen"]]
        if "comparisons" in s:  # both candidates could be kept: the judge's choice
            (champion, challenger, p_champion), = s["comparisons"]
            assert (champion, challenger) == (0, 1) and 0 < p_champion < 1
            assert s["chosen"] == (0 if p_champion >= 0.5 else 1) and s["kept"]
            assert s["feedback_principle"] in {p.id for p in HARMLESS.feedback}
        else:  # at most one could be kept: that one, or the first candidate, not kept
            assert s["chosen"] == next((j for j, why in enumerate(s["candidates_dropped"]) if why is None), 0)
    # The first candidate is what best_of: 1 samples (same seed).
    single = tmp_path / "single"
    run_stage(make_run(single), "critique")
    first_round = {r["id"]: r["rounds"][0] for r in records(single)}
    for r in records(tmp_path / "run"):
        if r["rounds"]:
            assert r["rounds"][0]["candidates"][0] == first_round[r["id"]]["revision"]


def test_the_best_of_judge_calibrates_like_labels(tmp_path, monkeypatch):
    """critique's judge is built by the same factory from the same feedback_* keys as
    label's: calibrated by default (every probability divided by the content-free one),
    and its P(champion better) is what a calibrated judge gives."""
    from cai.engines.hf import TransformersEngine
    from cai.execute.executor import prepare
    from cai.judge.judge import Judge
    from cai.judge.settings import JUDGE_FIELDS

    divided, calibrated_probabilities = [], Judge.calibrated
    monkeypatch.setattr(Judge, "calibrated", staticmethod(lambda p, p_cf: divided.append(p_cf)
                                                          or calibrated_probabilities(p, p_cf)))
    overrides = ("critique.best_of=2", "critique.feedback_few_shot=1")
    manifest = run_stage(make_run(tmp_path / "run", *overrides), "critique")
    assert manifest["counts"]["judge"] == {"feedback_model": "builtin:tiny", "judge_scoring": "probabilities",
                                           "mode": "direct", "few_shot": 1, "few_shot_choice": "first",
                                           "calibrate": True}
    judged = [(r, s) for r in records(tmp_path / "run") for s in r["rounds"] if "comparisons" in s]
    assert judged and len(divided) == 2 * len(judged)  # both orders of every comparison
    label_cfg = prepare(make_run(tmp_path / "run", "label.feedback_few_shot=1"), "label").config
    critique_cfg = prepare(make_run(tmp_path / "run", *overrides), "critique").config
    assert {k: getattr(label_cfg, k) for k in JUDGE_FIELDS} == {k: getattr(critique_cfg, k) for k in JUDGE_FIELDS}

    judge = Judge(TransformersEngine.from_spec("builtin:tiny", device="cpu", batch_size=4), few_shot=1,
                  calibrate=True)
    for record, step in judged[:2]:
        (champion, challenger, p_champion), = step["comparisons"]
        [again] = judge.compare_with(HARMLESS, [[{"role": "user", "content": record["prompt"]}]],
                                     [step["candidates"][champion]], [step["candidates"][challenger]],
                                     [[HARMLESS.feedback_principle(step["feedback_principle"])]])
        assert again.p_first == pytest.approx(p_champion, abs=1e-5)


def test_a_run_killed_after_its_last_chunk_opens_no_model(tmp_path, monkeypatch):
    """Models are opened by the first chunk still to do (`cai.chunks.OnFirstChunk`): a run
    stopped after its last commit finishes from the ledger without loading any."""
    import json

    run_dir = tmp_path / "run"
    whole = run_stage(make_run(run_dir, "critique.best_of=2"), "critique")
    stage = run_dir / "critique"
    sft_rows = (stage / "sft.jsonl").read_text()
    (stage / ".in_progress.json").write_text(json.dumps({"config_hash": whole["config_hash"]}))
    (stage / "manifest.json").unlink()

    def no_model(*args, **kwargs):
        raise AssertionError("a model was opened with no chunk left to do")

    monkeypatch.setattr("cai.engines.open_engine", no_model)
    again = run_stage(make_run(run_dir, "critique.best_of=2"), "critique")
    assert again["resumed"] and again["counts"]["records"] == whole["counts"]["records"]
    assert "judge" not in again["counts"] and "tokens_generated_this_session" not in again["counts"]
    assert (stage / "sft.jsonl").read_text() == sft_rows


def test_best_of_with_greedy_revisions_is_refused_before_any_work(tmp_path):
    from cai.yamlio import ValidationError

    with pytest.raises(ValidationError, match="best_of"):
        run_stage(make_run(tmp_path / "run", "critique.best_of=3", "critique.temperature=0"), "critique")
    assert not (tmp_path / "run" / "critique").exists()


def test_the_judge_keeps_the_preferred_candidate():
    """pick_best's tournament, with a judge that prefers the longer text."""
    from cai.judge.judge import Comparison

    class LongerIsBetter:
        def compare_with(self, constitution, conversations, first, second, principles, seed=0):
            return [Comparison(0.5 if len(a) == len(b) else 0.8 if len(a) > len(b) else 0.2, 0, 0, ["x"], False)
                    for a, b in zip(first, second)]

    winners, comparisons = critique.pick_best(LongerIsBetter(), HARMLESS, 0, [[], [], []],
                                              [["bb", "a", "cccc"], ["x", "yy"], ["same", "four"]], ["p"] * 3)
    assert winners == [2, 1, 0]  # a tie keeps the champion
    assert comparisons[0] == [[0, 1, 0.8], [0, 2, 0.2]] and comparisons[2] == [[0, 1, 0.5]]


def test_revision_labels_are_cleaned():
    assert critique.clean_revision("Revision: I can't help with that.") == "I can't help with that."
    assert critique.clean_revision("Here is why: x") == "Here is why: x"


def test_sft_changes_the_weights_and_saves_a_loadable_model(sft_run):
    from transformers import AutoModelForCausalLM

    from cai import models

    manifest = json.loads((sft_run / "sft" / "manifest.json").read_text())
    assert manifest["counts"]["global_steps"] >= 2 and manifest["counts"]["helpful_rows"] == 4
    tuned = AutoModelForCausalLM.from_pretrained(sft_run / "sft" / "model")
    base = models.load_causal_lm(models.TINY)
    changed = [not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), base.state_dict().values())]
    assert all(changed)
    assert (sft_run / "sft" / "log_history.json").exists()
    assert (sft_run / "sft" / "model" / "tokenizer_config.json").exists()


def test_sft_trains_on_the_answer_only():
    from cai.stages.sft import prompt_completion

    row = prompt_completion([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert row == {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}
    with pytest.raises(ValueError):
        prompt_completion([{"role": "user", "content": "q"}])


def test_shared_prefix_cache_gives_the_same_generations():
    """The few-shot prefix computed once and reused must not change a single token."""
    from cai.constitution import load_constitution
    from cai.engines import Sampling
    from cai.engines.hf import TransformersEngine

    constitution = load_constitution(ROOT / "constitutions" / "harmless.yaml")
    conversations = [critique.system_turns(constitution) + critique.few_shot_turns(constitution, 2)
                     + [{"role": "user", "content": text}] for text in ("How do I pick a lock?", "Hi", "Insult me")]
    shared = TransformersEngine.from_spec("builtin:tiny", "cpu", batch_size=2)
    plain = TransformersEngine(shared.model, shared.tokenizer, batch_size=2, share_prefix=False)
    for sampling in (Sampling(12, temperature=0), Sampling(12, temperature=1.0)):
        assert ([c.text for c in shared.generate(conversations, sampling, seed=3)]
                == [c.text for c in plain.generate(conversations, sampling, seed=3)])
