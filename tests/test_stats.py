"""Bootstrap intervals and paired comparisons (cai.stats), on constructed data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cai.stats import (
    MIN_PROMPTS,
    TOO_FEW,
    EloStatistics,
    Estimate,
    Resampler,
    bootstrap_mean,
    bradley_terry_elo,
    elo,
    mean_of,
    outcome_tables,
    paired_difference,
    verdict,
)


def test_the_interval_of_a_mean_has_the_width_the_normal_approximation_gives():
    values = np.random.default_rng(1).normal(0.0, 1.0, size=400)
    estimate = bootstrap_mean(values, seed=0)
    assert estimate.value == pytest.approx(values.mean())
    assert estimate.low < estimate.value < estimate.high
    half_width = 1.96 * values.std() / math.sqrt(len(values))
    assert (estimate.high - estimate.low) / 2 == pytest.approx(half_width, rel=0.1)


def test_intervals_are_seeded_and_constant_values_have_no_spread():
    values = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert bootstrap_mean(values, seed=3) == bootstrap_mean(values, seed=3)
    assert bootstrap_mean([0.25] * 10) == Estimate(0.25, 0.25, 0.25, n=10)


def test_a_known_difference_is_detected_and_identical_models_are_within_noise():
    rng = np.random.default_rng(0)
    base = rng.normal(0.0, 1.0, size=40)
    better = base + 0.5 + rng.normal(0.0, 0.2, size=40)  # the same prompts, every answer a bit better
    difference = paired_difference(better, base)
    assert difference.value == pytest.approx(np.mean(better - base))
    assert difference.low > 0 and verdict(difference) == "better"
    assert verdict(paired_difference(base, better)) == "worse"

    same = paired_difference(base, base.copy())  # identical models
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    assert not same.significant and verdict(same) == "within noise"

    # another model drawn like base (no true difference): its interval covers zero
    alike = paired_difference(rng.normal(0.0, 1.0, size=40), base)
    assert alike.low < 0 < alike.high and verdict(alike) == "within noise"


def test_pairing_finds_a_difference_the_separate_intervals_cannot():
    rng = np.random.default_rng(2)
    difficulty = rng.normal(0.0, 3.0, size=30)  # prompts differ far more than the models do
    base, tuned = difficulty, difficulty + 0.3 + rng.normal(0.0, 0.1, size=30)
    separate = bootstrap_mean(tuned), bootstrap_mean(base)
    assert separate[0].low < separate[1].high  # the two intervals overlap...
    assert paired_difference(tuned, base).low > 0  # ...but on the same prompts tuned is better every time


def test_without_a_true_difference_the_interval_covers_zero_about_95_percent_of_the_time():
    rng = np.random.default_rng(5)
    covered = 0
    for trial in range(200):
        a, b = rng.binomial(1, 0.3, size=50).astype(float), rng.binomial(1, 0.3, size=50).astype(float)
        covered += not paired_difference(a, b, resamples=1000, seed=trial).significant
    assert 0.88 <= covered / 200 <= 0.99


def test_verdicts_name_a_direction_only_outside_the_null():
    n = MIN_PROMPTS
    assert verdict(Estimate(0.2, 0.1, 0.3, n=n)) == "better"
    assert verdict(Estimate(0.2, 0.1, 0.3, n=n), higher_is_better=False) == "worse"
    assert verdict(Estimate(-5.0, -9.0, -1.0, n=n), higher_is_better=None) == "lower"
    assert verdict(Estimate(0.1, -0.1, 0.3, n=n)) == "within noise"
    assert verdict(Estimate(0.7, 0.55, 0.85, null=0.5, n=n)) == "better"  # a win probability against 0.5
    assert verdict(Estimate(0.6, 0.45, 0.75, null=0.5, n=n)) == "within noise"


@pytest.mark.parametrize(("first", "second", "expected"), [
    ([0.5001], [0.5], TOO_FEW),  # one prompt: a zero-width interval, whatever the difference
    ([1.0, 1.2, 0.9], [0.0, 0.1, 0.0], TOO_FEW),  # a few prompts, all one way: still no verdict
    ([1.0] * (MIN_PROMPTS - 1), [0.0] * (MIN_PROMPTS - 1), TOO_FEW),
    ([1.0] * MIN_PROMPTS, [0.0] * MIN_PROMPTS, "better"),  # every prompt moved the same way: a real result
    ([0.2, 0.4] * MIN_PROMPTS, [0.3, 0.3] * MIN_PROMPTS, "within noise"),
])
def test_no_verdict_from_one_or_a_few_prompts(first, second, expected):
    assert verdict(paired_difference(first, second)) == expected


def test_an_interval_without_finite_ends_or_a_count_gives_no_verdict():
    assert verdict(Estimate(0.2, float("nan"), float("nan"), n=MIN_PROMPTS)) == "no interval"
    assert verdict(Estimate(0.2, 0.1, 0.3)) == TOO_FEW  # how many prompts is unknown
    assert not Estimate(0.2, 0.1, 0.3, n=3).significant


def test_paired_values_must_belong_to_the_same_prompts():
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference([1.0, 2.0], [1.0])


def test_one_elo_fit_for_a_batch_of_tables_matches_the_single_fit():
    outcomes = [("base", "sft", 0.3), ("sft", "rl", 0.4), ("base", "rl", 0.2), ("base", "sft", 0.45)]
    names = ["base", "rl", "sft"]
    wins, games = outcome_tables(outcomes, names)
    batch = bradley_terry_elo(np.stack([wins, wins * 0 + games / 2]), np.stack([games, games]), anchor=0)
    ratings = elo(outcomes, "base")
    assert [round(float(r), 1) for r in batch[0]] == [ratings[n] for n in names]
    assert batch[1] == pytest.approx([1000.0] * 3)  # every game a draw: everyone at the anchor


def test_elo_intervals_over_prompts_separate_a_clearly_better_model():
    rng = np.random.default_rng(0)
    n = 30
    wins, games = np.zeros((n, 2, 2)), np.zeros((n, 2, 2))
    p = np.clip(rng.normal(0.25, 0.1, size=n), 0, 1)  # base beats sft with p ~ 0.25 on each prompt
    wins[:, 0, 1], wins[:, 1, 0] = p, 1 - p
    games[:, 0, 1] = games[:, 1, 0] = 1
    resampler = Resampler(n, resamples=500, seed=0)
    statistics = EloStatistics(wins, games, anchor=0)
    sft = resampler.estimate(statistics.of(1))
    assert sft.low > 1000 and verdict(Estimate(sft.value - 1000, sft.low - 1000, sft.high - 1000, n=n)) == "better"
    anchor = resampler.estimate(statistics.of(0))
    assert (anchor.value, anchor.low, anchor.high) == pytest.approx((1000.0, 1000.0, 1000.0))
    # the Elo difference and the mean outcome are statistics of the same resamples
    head = resampler.estimate(mean_of(1 - p), null=0.5)
    assert head.low > 0.5 and verdict(head) == "better"
