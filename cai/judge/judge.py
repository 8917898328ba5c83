"""The AI judge of RL-CAI (Bai et al. 2022, section 4.1): soft labels from a feedback model.

The judge asks the questions of `cai.judge.prompts` and reads the normalised
probabilities of the option tokens "A" / "B" as a soft label: the probability that one
answer is better.

Small models prefer one slot whatever the content (position bias), so every comparison
is asked in both orders and the two answers averaged; an ensemble of k principles is
averaged too. Two more remedies are options: the few-shot choice (`cai.judge.prompts`)
and contextual calibration (`calibrate`, Zhao et al. 2021, "Calibrate before use",
section 5): the same question with a content-free input ("N/A", "[MASK]" and "" as the
conversation and both responses, the three averaged) measures the prior the prompt
itself puts on each letter, p_cf. Each order's option probabilities p are divided by it
and renormalised, q = (p_A / p_cf_A, p_B / p_cf_B) / sum, so a judge that only follows
the prompt's prior lands at 0.5. p_cf is scored once per question template (principle,
few-shot turns) and cached.

Neither applies to chain-of-thought mode: the examples' reasoning names the letters (so
they cannot be mirrored), and a content-free input has no reasoning to calibrate
against; there the clamp is the remedy. In chain-of-thought mode the model first writes
its reasoning, then the answer cue follows and the options are scored; such
probabilities are overconfident, so each order's probability is clamped to a band (the
paper uses 40-60 %). `setting_conflicts` is the one place these rules are written.

The judge is engine-agnostic: the option probabilities come from `Engine.score_options`
(one forward pass in-process; token log-probabilities over a server), the reasoning from
`Engine.generate`. With a server that returns no log-probabilities and
`option_scoring: letter`, the labels are hard (0, 1, or a tie).

Pointwise (`score_single`, the reward of direct RLAIF in the rl stage): P(Yes) to "is it
the kind of response this principle would choose?", asked with Yes as (A) and as (B),
averaged over the two orders.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, field

from cai.engines import Sampling
from cai.judge.prompts import FEW_SHOT_CHOICES, OPTIONS, JudgePrompts


@dataclass
class Comparison:
    p_first: float  # P(first is better): averaged over both orders and over the principles
    p_order_ab: float  # P(first is better) asked with first as (A): P(A), averaged over the principles
    p_order_ba: float  # P(first is better) asked with first as (B): P(B), averaged over the principles
    principles: list[str]  # feedback principle ids used
    orders_disagree: bool  # the two orders prefer different responses (the model picked the same slot)
    slot_bias: float = 0.0  # mean P(slot A) over both orders minus 0.5: > 0 leans to (A), < 0 to (B)
    reasoning: list[str] = field(default_factory=list)  # chain-of-thought texts (cot mode), ab then ba per principle

    @property
    def p_second(self) -> float:
        return 1.0 - self.p_first


def comparison_key(conversation: list[dict]) -> str:
    """A stable key for principle draws: the conversation itself, not its place in a batch."""
    return hashlib.sha256(json.dumps(conversation, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def principle_id(principle) -> str:
    """The id a verdict records for a principle: a constitution's principle's own, "custom"
    for a question text."""
    return getattr(principle, "id", "custom")


def draw_principles(constitution, seed: int, key: str, k: int, pool=None) -> list:
    """k distinct feedback principles (or principles of `pool`), each draw seeded by
    (seed, comparison, index)."""
    pool = list(constitution.feedback if pool is None else pool)
    drawn = []
    for index in range(min(k, len(pool))):
        choice = random.Random(f"{seed}:{key}:{index}").choice(pool)
        pool.remove(choice)
        drawn.append(choice)
    return drawn


def setting_conflicts(few_shot_choice: str, calibrate: bool, cot: bool, cot_clamp,
                      prefix: str = "") -> list[tuple[str, str]]:
    """(setting, why) for each judge setting that cannot be used as given: the rules of
    the module docstring, the same for a run config's check (`prefix` "feedback_") and a
    `Judge` built by hand."""
    names = {key: f"'{prefix}{key}'" for key in ("few_shot_choice", "calibrate", "cot", "cot_clamp")}
    problems = []
    if few_shot_choice not in FEW_SHOT_CHOICES:
        problems.append(("few_shot_choice", f"{names['few_shot_choice']} must be one of "
                                            f"{', '.join(FEW_SHOT_CHOICES)}, got {few_shot_choice!r}"))
    clamp = list(cot_clamp)
    if len(clamp) != 2 or not 0.0 <= clamp[0] <= 0.5 <= clamp[1] <= 1.0:
        problems.append(("cot_clamp", f"{names['cot_clamp']} must be [low, high] with 0 <= low <= 0.5 <= high <= 1, "
                                      f"got {clamp}"))
    if cot and calibrate:
        problems.append(("calibrate", f"{names['calibrate']} does not apply with {names['cot']} (a content-free "
                                      f"input has no reasoning); chain-of-thought probabilities are clamped instead"))
    if cot and few_shot_choice == "mirrored":
        problems.append(("few_shot_choice", f"{names['few_shot_choice']} mirrored does not apply with "
                                            f"{names['cot']} (the examples' reasoning names the letters)"))
    return problems


class Judge:
    """A model, behind any engine, used as a multiple-choice judge of response pairs.

    The engine does the scoring (`score_options`) and, in chain-of-thought mode, the
    reasoning (`generate`); the questions (`self.prompts`), the principle draws, both
    orders, the calibration and the clamping live here, the same whatever the engine.
    Stages build theirs with `cai.judge.settings.make_judge`."""

    def __init__(self, engine, few_shot: int = 2, few_shot_choice: str = "first", calibrate: bool = False,
                 cot: bool = False, cot_clamp: tuple[float, float] = (0.4, 0.6), cot_max_new_tokens: int = 128,
                 cot_temperature: float = 0.0):
        conflicts = setting_conflicts(few_shot_choice, calibrate, cot, cot_clamp)
        if conflicts:
            raise ValueError("; ".join(why for _, why in conflicts))
        self.engine = engine
        self.prompts = JudgePrompts(few_shot, few_shot_choice, cot)
        self.calibrate = calibrate
        self._content_free: dict[str, tuple[float, float]] = {}  # question template -> p_cf
        self.cot = cot
        self.cot_clamp = (float(cot_clamp[0]), float(cot_clamp[1]))
        self.cot_sampling = Sampling(cot_max_new_tokens, cot_temperature)
        self.description: dict = {}  # what a manifest records about it (`make_judge` fills it in)
        self.comparisons = 0
        self.seconds = 0.0

    # ------------------------------------------------------------ scoring

    def option_probabilities(self, questions: list[list[dict]], desc: str | None = None) -> list[tuple[float, float]]:
        """Normalised (P(A), P(B)) of each question's next token, from the engine."""
        began = time.perf_counter()
        scored = self.engine.score_options(questions, OPTIONS, desc=desc)
        self.seconds += time.perf_counter() - began
        return [(a, b) for a, b in scored]

    def content_free_probabilities(self, constitution, principles: list) -> list[tuple[float, float]]:
        """p_cf of each principle's question template: (P(A), P(B)) with the content-free
        inputs in place of the conversation and both responses, averaged over the inputs
        and renormalised; scored once per template, then cached."""
        templates = [self.prompts.content_free_questions(constitution, principle) for principle in principles]
        keys = [[json.dumps(q, sort_keys=True) for q in questions] for questions in templates]
        for questions, ks in zip(templates, keys):
            # One call per template: its p_cf must not depend on which other templates
            # happen to be scored with it (batch composition moves the last float bits,
            # and a resumed run must label exactly as an uninterrupted one).
            if ks[0] not in self._content_free:
                self._content_free.update(zip(ks, self.option_probabilities(questions)))
        averaged = []
        for ks in keys:
            a = sum(self._content_free[key][0] for key in ks) / len(ks)
            b = sum(self._content_free[key][1] for key in ks) / len(ks)
            if a <= 0 or b <= 0:
                raise ValueError("calibrate needs option probabilities, but a content-free question scored "
                                 f"(A, B) = ({a}, {b}); a server with option_scoring: letter gives hard labels")
            averaged.append((a / (a + b), b / (a + b)))
        return averaged

    @staticmethod
    def calibrated(p: tuple[float, float], p_cf: tuple[float, float]) -> tuple[float, float]:
        """Contextual calibration: each option's probability over its content-free
        probability, renormalised."""
        a, b = p[0] / p_cf[0], p[1] / p_cf[1]
        return a / (a + b), b / (a + b)

    def _reasoning(self, questions: list[list[dict]], seed: int) -> list[str]:
        if not questions:
            return []
        began = time.perf_counter()
        completions = self.engine.generate([q[:-1] for q in questions], self.cot_sampling, seed=seed,
                                           prefill=questions[0][-1]["content"])
        self.seconds += time.perf_counter() - began
        return [c.text for c in completions]

    def compare(self, constitution, conversations: list[list[dict]], first: list[str], second: list[str],
                seed: int, principles_per_comparison: int = 1) -> list[Comparison]:
        """Which of `first[i]` / `second[i]` better answers `conversations[i]`, as a soft label.

        Each comparison draws its k principles from (seed, the conversation, index), so
        the draw is the same whatever the batching or resume."""
        drawn = [draw_principles(constitution, seed, comparison_key(c), principles_per_comparison)
                 for c in conversations]
        return self.compare_with(constitution, conversations, first, second, drawn, seed)

    def compare_with(self, constitution, conversations: list[list[dict]], first: list[str], second: list[str],
                     principles: list[list], seed: int = 0, desc: str | None = None) -> list[Comparison]:
        """`compare` with the principles given: `principles[i]` lists comparison i's
        (FeedbackPrinciple objects, or plain question texts)."""
        if not (len(conversations) == len(first) == len(second) == len(principles)):
            raise ValueError("conversations, first, second and principles must have the same length")
        if any(not drawn for drawn in principles):
            raise ValueError("every comparison needs at least one feedback principle")
        # Both orders of a question: first shown as (A), then first shown as (B).
        asked = [(i, principle) for i in range(len(conversations)) for principle in principles[i]]
        question = self.prompts.question

        def both_orders(i, principle, reasoning=(None, None)):
            return (question(constitution, principle, conversations[i], first[i], second[i], reasoning[0]),
                    question(constitution, principle, conversations[i], second[i], first[i], reasoning[1]))

        pairs = [both_orders(i, principle) for i, principle in asked]
        reasoning: list[str] = []
        if self.cot:  # the model writes its reasoning, then the answer cue follows it
            reasoning = self._reasoning([q for pair in pairs for q in pair], seed)
            pairs = [both_orders(i, principle, reasoning[2 * n: 2 * n + 2]) for n, (i, principle) in enumerate(asked)]

        scored = self.option_probabilities([q for pair in pairs for q in pair], desc=desc)
        if self.calibrate:  # both orders of a question share its template, so its p_cf
            p_cf = self.content_free_probabilities(constitution, [principle for _, principle in asked])
            scored = [self.calibrated(p, p_cf[n // 2]) for n, p in enumerate(scored)]
        p_ab = [scored[2 * n][0] for n in range(len(pairs))]  # first shown as (A): P(A)
        p_ba = [scored[2 * n + 1][1] for n in range(len(pairs))]  # first shown as (B): P(B)
        if self.cot:  # reasoning makes the model overconfident: keep each order inside the band
            low, high = self.cot_clamp
            p_ab = [min(max(p, low), high) for p in p_ab]
            p_ba = [min(max(p, low), high) for p in p_ba]

        comparisons = []
        for i in range(len(conversations)):
            mine = [n for n, (owner, _) in enumerate(asked) if owner == i]
            ab = sum(p_ab[n] for n in mine) / len(mine)
            ba = sum(p_ba[n] for n in mine) / len(mine)
            comparisons.append(Comparison(
                p_first=(ab + ba) / 2, p_order_ab=ab, p_order_ba=ba,
                principles=[principle_id(asked[n][1]) for n in mine],
                orders_disagree=(ab - 0.5) * (ba - 0.5) < 0, slot_bias=(ab + (1 - ba)) / 2 - 0.5,
                reasoning=[text for n in mine for text in reasoning[2 * n: 2 * n + 2]]))
        self.comparisons += len(comparisons)
        return comparisons

    # ------------------------------------------------------------ one answer at a time (direct RLAIF)

    def score_single(self, constitution, conversations: list[list[dict]], responses: list[str],
                     principles: list[list], desc: str | None = None) -> list[float]:
        """P(good) of each `responses[i]` as the answer to `conversations[i]`, judged on its
        own under each of `principles[i]` (FeedbackPrinciple objects or question texts) and
        averaged: the reward of direct RLAIF (Lee et al. 2023, "RLAIF vs. RLHF").

        A yes/no question rather than the paper's 1-10 scale: its probability needs no
        scale mapping, and both option orders can be asked and averaged, which cancels a
        small model's slot preference as it does for pairs (a ten-letter scale has no such
        symmetric reordering). The questions of one order go to the engine together, so
        their shared few-shot turns are run once (the in-process engine's prefix cache)."""
        if not (len(conversations) == len(responses) == len(principles)):
            raise ValueError("conversations, responses and principles must have the same length")
        if any(not drawn for drawn in principles):
            raise ValueError("every answer needs at least one feedback principle")
        asked = [(i, principle) for i in range(len(conversations)) for principle in principles[i]]
        rating = self.prompts.rating_question
        yes_a = self.option_probabilities([rating(constitution, principle, conversations[i], responses[i],
                                                  yes_first=True) for i, principle in asked], desc=desc)
        yes_b = self.option_probabilities([rating(constitution, principle, conversations[i], responses[i],
                                                  yes_first=False) for i, principle in asked], desc=desc)
        p_good = [(a[0] + b[1]) / 2 for a, b in zip(yes_a, yes_b)]
        totals, counts = [0.0] * len(conversations), [0] * len(conversations)
        for (i, _), p in zip(asked, p_good):
            totals[i] += p
            counts[i] += 1
        return [total / count for total, count in zip(totals, counts)]
