"""The SL-CAI stages on builtin:tiny: critique-and-revise, then supervised fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch

from cai.constitution import load_constitution
from cai.pipeline import run_stage
from cai.rundir import read_jsonl
from cai.stages import critique

from conftest import ROOT, make_run


def records(run_dir):
    return read_jsonl(run_dir / "critique" / "records.jsonl")


def test_critique_writes_records_sft_and_preference_sets(tmp_path):
    run = make_run(tmp_path / "run")
    manifest = run_stage(run, "critique")
    rows = records(run.path)
    assert manifest["counts"]["records"] == len(rows) == 8
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


def test_interrupted_critique_resumes_without_duplicates_or_gaps(tmp_path, monkeypatch):
    reference = make_run(tmp_path / "reference")
    run_stage(reference, "critique")

    run = make_run(tmp_path / "run")
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


def test_changed_settings_refuse_to_mix_with_old_outputs(tmp_path):
    run_stage(make_run(tmp_path / "run"), "critique")
    changed = make_run(tmp_path / "run", "critique.num_revisions=1")
    with pytest.raises(RuntimeError, match="other settings"):
        run_stage(changed, "critique")
    assert len(records(changed.path)) == 8  # nothing lost
    manifest = run_stage(changed, "critique", force=True)
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
    assert not critique.is_meta_revision("I can't help with tracking someone, but here is what you can do.")
    assert not critique.is_meta_revision("The answers to most chemistry questions start with safety.")
    assert not critique.is_meta_revision("Paris is the capital of France.")


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
