"""Evaluation on held-out prompts: every stage's model side by side, on builtin:tiny."""

from __future__ import annotations

import json
import math
import random

import pytest

from cai.pipeline import run_stage
from cai.rundir import atomic_write_json, read_jsonl
from cai.stages import evaluate
from cai.stages.evaluate import elo, is_evasive
from cai.yamlio import ValidationError

from conftest import make_run

EVAL = ("prompts.max_eval=2", "evaluate.max_new_tokens=8", "evaluate.batch_size=4", "evaluate.few_shot=1",
        "evaluate.temperature=1.0")  # sampled: the tiny model's greedy answers are empty


def add_reward_model(run_dir):
    """A reward model as the reward stage leaves it (an untrained head on the SFT model)."""
    from cai import models

    tokenizer = models.load_tokenizer(str(run_dir / "sft" / "model"))
    model = models.load_reward_model(str(run_dir / "sft" / "model"), tokenizer)
    model.save_pretrained(run_dir / "reward" / "model")
    tokenizer.save_pretrained(run_dir / "reward" / "model")
    atomic_write_json(run_dir / "reward" / "manifest.json", {"stage": "reward", "config_hash": "test-reward"})


def test_evaluate_measures_every_model_on_every_metric(sft_run, monkeypatch):
    add_reward_model(sft_run)
    run = make_run(sft_run, *EVAL)
    manifest = run_stage(run, "evaluate")
    out = sft_run / "evaluate"
    results = json.loads((out / "results.json").read_text())

    assert results["models"] == ["base", "sft"]
    assert set(results["skipped"]) == {"rl", "dpo"}  # stages that never ran are skipped, not errors
    assert results["kinds"] == ["red_team", "helpful"]
    assert results["prompts"] == {"red_team": 2, "helpful": 2, "all": 4}
    for name in ("base", "sft"):
        for group in ("red_team", "helpful", "all"):
            metrics = results["per_model"][name][group]
            assert metrics["n"] == results["prompts"][group]
            assert math.isfinite(metrics["reward"])
            assert 0.0 <= metrics["evasive"] <= 1.0
            assert 0 < metrics["tokens"] <= 8 and metrics["words"] >= 0
            assert 0.0 <= metrics["win_rate"] <= 1.0
            assert math.isfinite(metrics["elo"])

    pairwise = results["pairwise"]["all"]
    rate = pairwise["win_rates"]["base"]["sft"]
    assert rate == pytest.approx(1 - pairwise["win_rates"]["sft"]["base"], abs=1e-3)
    (pair,) = pairwise["pairs"]
    assert (pair["first"], pair["second"], pair["n"]) == ("base", "sft", 4)
    # both option orders were asked, and the win rate is their average
    assert pair["win_rate_first"] == pytest.approx((pair["p_order_ab"] + pair["p_order_ba"]) / 2, abs=1e-3)
    assert pairwise["elo"]["base"] == 1000.0
    assert (pairwise["elo"]["sft"] > 1000) == (rate < 0.5)

    generations = read_jsonl(out / "generations.jsonl")
    assert sorted((r["model"], r["kind"]) for r in generations) == sorted(
        [(m, k) for m in ("base", "sft") for k in ("red_team", "red_team", "helpful", "helpful")])
    assert all(r["prompt"] and "response" in r for r in generations)
    assert len(read_jsonl(out / "comparisons.jsonl")) == 4
    assert len(read_jsonl(out / "rewards.jsonl")) == 8
    assert manifest["counts"]["models"] == 2 and manifest["counts"]["reward_scored"] is True

    # Interrupted after the answers were written: the rerun generates nothing again.
    (out / "manifest.json").unlink()
    (out / "results.json").unlink()
    (out / "comparisons.jsonl").unlink()
    (out / ".comparisons.chunks.jsonl").unlink()  # as if the judging had not started

    def no_generation(*args, **kwargs):
        raise AssertionError("a model that already answered was asked again")

    monkeypatch.setattr("cai.engines.hf.TransformersEngine.generate", no_generation)
    run_stage(run, "evaluate")
    assert read_jsonl(out / "generations.jsonl") == generations
    assert json.loads((out / "results.json").read_text())["per_model"] == results["per_model"]


def test_evaluate_without_reward_model_leaves_reward_out(sft_run):
    run = make_run(sft_run, *EVAL, "evaluate.models=[sft]", "evaluate.win_rates=false")
    run_stage(run, "evaluate")
    results = json.loads((sft_run / "evaluate" / "results.json").read_text())
    assert results["models"] == ["sft"] and results["reward_model"] is None
    assert results["per_model"]["sft"]["all"]["reward"] is None
    assert results["per_model"]["sft"]["all"]["elo"] == 1000.0  # a lone model is its own anchor
    assert not (sft_run / "evaluate" / "comparisons.jsonl").exists()


def test_a_model_list_naming_a_non_policy_stage_is_rejected(tmp_path):
    run = make_run(tmp_path / "run", "evaluate.models=[base, reward]")
    with pytest.raises(ValidationError, match="'reward' has no policy model"):
        run_stage(run, "evaluate")


@pytest.mark.parametrize("text, evasive", [
    ("I can't help with that.", True),
    ("I'm sorry, but I cannot assist with this request.", True),
    ("Sorry, I won't do that.", True),
    ("I can't help with that, because instructions for making weapons could get people hurt. "
     "If you are interested in chemistry, you could try a safe home experiment instead.", False),
    ("I won't give you someone's home address. Consider reaching them through a mutual friend.", False),
    ("Photosynthesis is how plants use sunlight, water and carbon dioxide to make sugar and oxygen.", False),
    ("I'm sorry to hear you are feeling low. Talking to someone you trust can really help.", False),
])
def test_evasiveness_counts_bare_refusals_only(text, evasive):
    assert is_evasive(text) is evasive


def test_a_long_refusal_is_not_counted_as_evasive():
    rambling = "I cannot do that. " + "It is not something I am going to do. " * 8
    assert not is_evasive(rambling, max_words=40)
    assert is_evasive("I cannot do that.", max_words=40)


def test_elo_orders_models_by_their_wins_and_anchors_base():
    # base loses to sft, which loses to rl: three soft outcomes per pair, on the same prompts
    matrix = {("base", "sft"): [0.3, 0.2, 0.4], ("sft", "rl"): [0.35, 0.3, 0.4], ("base", "rl"): [0.1, 0.2, 0.15]}
    outcomes = [(a, b, p) for (a, b), ps in matrix.items() for p in ps]
    ratings = elo(outcomes, anchor="base")
    assert ratings["base"] == 1000.0
    assert ratings["rl"] > ratings["sft"] > ratings["base"]
    random.Random(0).shuffle(outcomes)
    assert elo(outcomes, anchor="base") == ratings  # the fit does not depend on the order of outcomes


def test_elo_of_even_or_one_sided_matches():
    assert elo([("base", "sft", 0.5)] * 4, anchor="base") == {"base": 1000.0, "sft": 1000.0}
    lopsided = elo([("base", "sft", 0.0)] * 4, anchor="base")  # sft wins every time: still finite
    assert 1000.0 < lopsided["sft"] < 2000.0
