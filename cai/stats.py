"""Uncertainty of the evaluation: bootstrap intervals over prompts, and Elo.

Every figure the evaluation reports is a statistic of per-prompt values (a mean of
reward scores, of refusal flags, of judged win probabilities, or an Elo fit of the
judged outcomes). Its uncertainty comes from the prompts: another draw of held-out
prompts would give another figure. The percentile bootstrap (Efron & Tibshirani 1993)
estimates that spread: draw n prompts with replacement from the n evaluated, compute
the statistic on the draw, repeat `RESAMPLES` times; the 2.5th and 97.5th percentiles
of the results are the 95 % interval.

A statistic is a function of prompt weights: a resample is a vector of counts (how
often each prompt was drawn), the full data is all ones. Comparisons are paired: the
difference of two models' statistics is computed on the SAME resampled prompts, so the
prompt-to-prompt variation both models share (an easy prompt, a hard one) cancels. A
difference is called better or worse only when its interval excludes the null value
(0 for a difference, 0.5 for a head-to-head win probability); otherwise it is within
noise. Resamples are seeded: the same rows give the same intervals.

No verdict comes from too little: with fewer than `MIN_PROMPTS` prompts the bootstrap
interval is too narrow to trust (with one prompt it has zero width whatever the
difference), so the verdict is "too few to compare"; an interval with a non-finite end
(a figure no resample could compute) gives "no interval". A zero-width interval over
`MIN_PROMPTS` or more prompts is a real result: every prompt moved by the same amount.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000  # bootstrap draws: the interval ends move by well under 1 % of their width between seeds
LEVEL = 0.95
ANCHOR_ELO = 1000.0
# The fewest prompts a verdict may rest on. Below ~10 the percentile bootstrap's interval
# undercovers badly (Efron & Tibshirani 1993, ch. 13): a handful of prompts resampled
# cannot show how another draw of prompts would differ.
MIN_PROMPTS = 10
TOO_FEW = "too few to compare"

# A statistic maps prompt weights (resamples x prompts) to one value per resample.
Statistic = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Estimate:
    """A figure, its bootstrap interval, and what the interval is compared against."""

    value: float
    low: float
    high: float
    null: float = 0.0  # the value meaning "no difference": 0 for differences, 0.5 for win probabilities
    n: int = 0  # the prompts behind the interval; 0 = unknown (no verdict)

    @property
    def measured(self) -> bool:
        """Enough prompts, and an interval with finite ends: a verdict may be given."""
        return self.n >= MIN_PROMPTS and math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def significant(self) -> bool:
        return self.measured and (self.low > self.null or self.high < self.null)

    def as_dict(self, digits: int = 4) -> dict:
        return {"value": _round(self.value, digits), "low": _round(self.low, digits),
                "high": _round(self.high, digits)}


def _round(value: float, digits: int) -> float:
    return round(float(value), digits) if math.isfinite(value) else float(value)


def verdict(estimate: Estimate, higher_is_better: bool | None = True) -> str:
    """"better" / "worse" when the interval excludes the null value, else "within noise".
    A figure with no good direction (length) is "higher" / "lower" instead. Fewer than
    `MIN_PROMPTS` prompts: "too few to compare"; a non-finite interval: "no interval"."""
    if estimate.n < MIN_PROMPTS:
        return TOO_FEW
    if not estimate.measured:
        return "no interval"
    if not estimate.significant:
        return "within noise"
    up = estimate.low > estimate.null
    if higher_is_better is None:
        return "higher" if up else "lower"
    return "better" if up == higher_is_better else "worse"


class Resampler:
    """The bootstrap resamples of n prompts, drawn once (seeded) and shared by every
    statistic, so that differences between models are paired."""

    def __init__(self, n: int, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL):
        if n < 1:
            raise ValueError("the bootstrap needs at least one prompt")
        self.n, self.level = n, level
        indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
        self.counts = np.stack([np.bincount(row, minlength=n) for row in indices]).astype(float)

    def _interval(self, samples: np.ndarray) -> tuple[float, float]:
        samples = samples[np.isfinite(samples)]
        if not samples.size:
            return float("nan"), float("nan")
        tail = 100 * (1 - self.level) / 2
        low, high = np.percentile(samples, [tail, 100 - tail])
        return float(low), float(high)

    def estimate(self, statistic: Statistic, null: float = 0.0) -> Estimate:
        """The statistic on all prompts, and its percentile interval over the resamples."""
        value = float(statistic(np.ones((1, self.n)))[0])
        return Estimate(value, *self._interval(statistic(self.counts)), null=null, n=self.n)

    def difference(self, first: Statistic, second: Statistic) -> Estimate:
        """first - second, both computed on the same resampled prompts (paired)."""
        return self.estimate(lambda weights: first(weights) - second(weights))


def mean_of(values: Sequence[float]) -> Statistic:
    """The weighted mean of per-prompt values."""
    values = np.asarray(values, dtype=float)
    return lambda weights: weights @ values / weights.sum(axis=1)


def bootstrap_mean(values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0) -> Estimate:
    """Mean of per-prompt values with its 95 % interval."""
    return Resampler(len(values), resamples, seed).estimate(mean_of(values))


def paired_difference(first: Sequence[float], second: Sequence[float], resamples: int = RESAMPLES,
                      seed: int = 0) -> Estimate:
    """mean(first) - mean(second) with its 95 % interval; `first[i]` and `second[i]`
    belong to the same prompt i, and each resample draws prompts, not values."""
    if len(first) != len(second):
        raise ValueError(f"paired values need the same prompts: {len(first)} vs {len(second)} values")
    return Resampler(len(first), resamples, seed).difference(mean_of(first), mean_of(second))


# ---------------------------------------------------------------- Elo


def bradley_terry_elo(wins: np.ndarray, games: np.ndarray, anchor: int, prior_draws: float = 1.0,
                      iterations: int = 10_000, tolerance: float = 1e-10) -> np.ndarray:
    """Elo ratings of a Bradley-Terry fit, for a batch of outcome tables at once.

    `wins[r, a, b]` is the (soft) number of games a won against b in table r and
    `games[r, a, b]` how many they played (symmetric). P(a beats b) = s_a / (s_a + s_b)
    is fitted by Hunter's (2004) minorise-maximise iteration, s_a <- W_a / sum_b
    n_ab / (s_a + s_b), which is deterministic and independent of the order of the
    outcomes (unlike sequential Elo updates). Each pair that played gets `prior_draws`
    virtual draws, so a model that wins every game keeps a finite rating. Strengths map
    to the Elo scale, 400 log10(s), with the `anchor` model at 1000.
    """
    wins, games = np.asarray(wins, dtype=float), np.asarray(games, dtype=float)
    played = (games > 0).astype(float)
    games = games + prior_draws * played
    total = wins.sum(axis=2) + prior_draws / 2 * played.sum(axis=2)
    strength = np.ones(total.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(iterations):
            denominator = (games / (strength[:, :, None] + strength[:, None, :])).sum(axis=2)
            new = np.where(denominator > 0, total / np.where(denominator > 0, denominator, 1.0), strength)
            scale = new[:, anchor:anchor + 1]
            new = new / np.where(scale > 0, scale, 1.0)
            both = (new > 0) & (strength > 0)
            change = np.abs(np.log(np.where(both, new, 1.0) / np.where(both, strength, 1.0)))
            strength = new
            if change.max(initial=0.0) < tolerance:
                break
        return np.where(strength > 0, ANCHOR_ELO + 400 * np.log10(np.where(strength > 0, strength, 1.0)), -np.inf)


def outcome_tables(outcomes, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(wins, games) M x M tables of soft outcomes `(a, b, p)`, p = P(a beat b)."""
    index = {name: i for i, name in enumerate(names)}
    wins, games = np.zeros((len(names), len(names))), np.zeros((len(names), len(names)))
    for a, b, p in outcomes:
        wins[index[a], index[b]] += p
        wins[index[b], index[a]] += 1.0 - p
        games[index[a], index[b]] += 1.0
        games[index[b], index[a]] += 1.0
    return wins, games


def elo(outcomes, anchor: str, prior_draws: float = 1.0) -> dict[str, float]:
    """Elo ratings (one decimal) from soft pairwise outcomes `(a, b, p)`, p = probability
    that a beat b, with `anchor` at 1000 (see `bradley_terry_elo`)."""
    outcomes = list(outcomes)
    names = sorted({a for a, _, _ in outcomes} | {b for _, b, _ in outcomes} | {anchor})
    wins, games = outcome_tables(outcomes, names)
    ratings = bradley_terry_elo(wins[None], games[None], names.index(anchor), prior_draws)[0]
    return {name: round(float(r), 1) if math.isfinite(r) else float("-inf") for name, r in zip(names, ratings)}


class EloStatistics:
    """Each model's Elo as a statistic of prompt weights: `wins[i]`, `games[i]` are the
    M x M outcome tables of prompt i, and a resample adds them up with its weights. One
    Bradley-Terry fit serves every model (for the resamples, the costly part, it is kept)."""

    def __init__(self, wins: np.ndarray, games: np.ndarray, anchor: int):
        self.wins, self.games, self.anchor = np.asarray(wins, float), np.asarray(games, float), anchor
        self._kept: tuple[np.ndarray, np.ndarray] | None = None

    def ratings(self, weights: np.ndarray) -> np.ndarray:
        if self._kept is not None and self._kept[0] is weights:
            return self._kept[1]
        ratings = bradley_terry_elo(np.einsum("rn,nab->rab", weights, self.wins),
                                    np.einsum("rn,nab->rab", weights, self.games), self.anchor)
        if len(weights) > 1:
            self._kept = (weights, ratings)
        return ratings

    def of(self, model: int) -> Statistic:
        return lambda weights: self.ratings(weights)[:, model]
