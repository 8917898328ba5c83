"""The AI judge: multiple-choice questions, soft labels from option-token probabilities,
both orders averaged, chain-of-thought probabilities clamped, few-shot choice and
contextual calibration."""

from __future__ import annotations

import pytest
import torch
from conftest import CONVERSATIONS, FIRST, ROOT, SECOND

from cai.constitution import load_constitution
from cai.engines.hf import TransformersEngine
from cai.judge.judge import Judge
from cai.judge.prompts import CONTENT_FREE


@pytest.fixture(scope="module")
def constitution():
    return load_constitution(ROOT / "constitutions" / "harmless.yaml")


@pytest.fixture(scope="module")
def engine():
    return TransformersEngine.from_spec("builtin:tiny", device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def judge(engine):
    return Judge(engine, few_shot=1)


def recorded(judge, monkeypatch) -> list:
    """Capture the questions the judge scores."""
    asked, score = [], judge.option_probabilities

    def spy(questions, desc=None):
        asked.extend(questions)
        return score(questions, desc)

    monkeypatch.setattr(judge, "option_probabilities", spy)
    return asked


def test_question_shows_the_drawn_principle_and_both_answers_in_both_orders(judge, constitution, monkeypatch):
    asked = recorded(judge, monkeypatch)
    comparisons = judge.compare(constitution, CONVERSATIONS, FIRST, SECOND, seed=0, principles_per_comparison=2)
    assert len(asked) == 2 * 2 * len(CONVERSATIONS)  # two principles, two orders each
    for conversation, a, b, c in zip(CONVERSATIONS, FIRST, SECOND, comparisons):
        assert len(c.principles) == 2 and len(set(c.principles)) == 2
        for pid in c.principles:
            text = constitution.feedback_principle(pid).text
            mine = [q for q in asked if q[-2]["content"].startswith("Consider the following conversation")
                    and f"Human: {conversation[0]['content']}" in q[-2]["content"] and text in q[-2]["content"]]
            shown = {q[-2]["content"].split("Options:\n", 1)[1] for q in mine}
            assert shown == {f"(A) {a}\n(B) {b}\n\nThe answer is:", f"(A) {b}\n(B) {a}\n\nThe answer is:"}
            assert all(q[-1] == {"role": "assistant", "content": "("} for q in mine)
    # the constitution's feedback example goes first, as an answered question
    example = constitution.feedback_examples[0]
    assert example.response_a.strip() in asked[0][0]["content"]
    assert asked[0][1] == {"role": "assistant", "content": f"({example.answer})"}


def test_principle_draws_are_seeded_per_comparison_not_per_batch(judge, constitution):
    together = judge.compare(constitution, CONVERSATIONS, FIRST, SECOND, seed=3)
    alone = judge.compare(constitution, CONVERSATIONS[2:], FIRST[2:], SECOND[2:], seed=3)
    assert together[2].principles == alone[0].principles
    assert together[2].p_first == pytest.approx(alone[0].p_first, abs=1e-5)
    other_seeds = [judge.compare(constitution, CONVERSATIONS, FIRST, SECOND, seed=s) for s in range(1, 6)]
    assert any(c.principles != t.principles for run in other_seeds for c, t in zip(run, together))


def test_soft_label_is_the_normalised_option_probability(judge, constitution):
    comparisons = judge.compare(constitution, CONVERSATIONS, FIRST, SECOND, seed=0)
    tokenizer, model = judge.engine.tokenizer, judge.engine.model
    letter_a = tokenizer("(A", add_special_tokens=False)["input_ids"][-1]
    letter_b = tokenizer("(B", add_special_tokens=False)["input_ids"][-1]
    for conversation, a, b, c in zip(CONVERSATIONS, FIRST, SECOND, comparisons):
        principle = constitution.feedback_principle(c.principles[0])
        expected = []
        for shown_a, shown_b, slot in ((a, b, 0), (b, a, 1)):
            messages = judge.prompts.question(constitution, principle, conversation, shown_a, shown_b)
            text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True) + "("
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1]  # one unpadded sequence, every position's logits
            expected.append(torch.softmax(logits[[letter_a, letter_b]], dim=-1)[slot].item())
        assert c.p_order_ab == pytest.approx(expected[0], abs=1e-5)
        assert c.p_order_ba == pytest.approx(expected[1], abs=1e-5)


def test_option_probabilities_sum_to_one(judge, constitution):
    questions = [judge.prompts.question(constitution, p, CONVERSATIONS[0], FIRST[0], SECOND[0])
                 for p in constitution.feedback[:5]]
    for p_a, p_b in judge.option_probabilities(questions):
        assert 0 < p_a < 1 and p_a + p_b == pytest.approx(1.0, abs=1e-6)


def test_both_orders_are_averaged_and_swapping_the_answers_mirrors_the_label(judge, constitution):
    forward = judge.compare(constitution, CONVERSATIONS, FIRST, SECOND, seed=1, principles_per_comparison=3)
    swapped = judge.compare(constitution, CONVERSATIONS, SECOND, FIRST, seed=1, principles_per_comparison=3)
    for c, s in zip(forward, swapped):
        assert c.p_first == pytest.approx((c.p_order_ab + c.p_order_ba) / 2)
        assert s.principles == c.principles
        assert s.p_first == pytest.approx(1 - c.p_first, abs=1e-5)
        assert s.p_order_ab == pytest.approx(1 - c.p_order_ba, abs=1e-5)
        assert c.orders_disagree == ((c.p_order_ab > 0.5) != (c.p_order_ba > 0.5))


def test_chain_of_thought_reasons_first_and_is_clamped_to_the_band(engine, constitution, monkeypatch):
    judge = Judge(engine, few_shot=1, cot=True, cot_clamp=(0.4, 0.6), cot_max_new_tokens=6)
    asked = []

    def confident(questions, desc=None):  # a judge sure of slot A whatever the order
        asked.extend(questions)
        return [(0.9, 0.1)] * len(questions)

    monkeypatch.setattr(judge, "option_probabilities", confident)
    [c] = judge.compare(constitution, CONVERSATIONS[:1], FIRST[:1], SECOND[:1], seed=0)
    assert (c.p_order_ab, c.p_order_ba, c.p_first) == (pytest.approx(0.6), pytest.approx(0.4), pytest.approx(0.5))
    assert len(c.reasoning) == 2
    for question, reasoning in zip(asked, c.reasoning):
        assert question[-1]["content"].startswith("Let's think step by step:")
        assert reasoning.strip() in question[-1]["content"] and question[-1]["content"].endswith("(")
    assert "step by step" in asked[0][1]["content"]  # the few-shot example shows its reasoning

    monkeypatch.setattr(judge, "option_probabilities", lambda qs, desc=None: [(0.45, 0.55)] * len(qs))
    [inside] = judge.compare(constitution, CONVERSATIONS[:1], FIRST[:1], SECOND[:1], seed=0)
    assert (inside.p_order_ab, inside.p_order_ba) == (pytest.approx(0.45), pytest.approx(0.55))  # left alone
    with pytest.raises(ValueError, match="cot_clamp"):
        Judge(engine, cot=True, cot_clamp=(0.6, 0.7))


def test_option_letters_must_be_single_tokens_after_the_parenthesis(engine):
    class WholeWords:  # a tokenizer that keeps "(A" as one token
        eos_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [hash(text) % 1000]}

    whole = TransformersEngine(engine.model, WholeWords(), batch_size=4)
    with pytest.raises(ValueError, match="single-token options"):
        whole.option_token_ids("(", ("A", "B"))


def shown_answers(judge, constitution) -> list[str]:
    """The few-shot turns' answers, in order, as the question shows them."""
    question = judge.prompts.question(constitution, constitution.feedback[0], CONVERSATIONS[0], FIRST[0], SECOND[0])
    return [turn["content"] for turn in question[:-2] if turn["role"] == "assistant"]


def test_few_shot_choice_first_balanced_and_mirrored(engine, constitution):
    examples = constitution.feedback_examples
    assert [e.answer for e in examples] == ["B", "A", "A", "B"]  # harmless.yaml; the cases below rely on it

    def chosen(n, choice):
        shown = Judge(engine, n, choice).prompts.shot_examples(constitution)
        return [(examples.index(e), swapped) for e, swapped in shown]

    assert chosen(3, "first") == [(0, False), (1, False), (2, False)]
    assert chosen(3, "balanced") == [(0, False), (1, False), (3, False)]  # B, A, B: the second A waits
    assert chosen(4, "balanced") == [(0, False), (1, False), (3, False), (2, False)]
    assert chosen(9, "balanced") == chosen(4, "balanced") and chosen(0, "balanced") == []
    assert chosen(2, "mirrored") == [(0, False), (0, True), (1, False), (1, True)]
    assert shown_answers(Judge(engine, 3, "balanced"), constitution) == ["(B)", "(A)", "(B)"]
    assert shown_answers(Judge(engine, 1, "mirrored"), constitution) == ["(B)", "(A)"]
    # a mirrored example shows its responses in the other slots, so its answer follows the content
    question = Judge(engine, 1, "mirrored").prompts.question(constitution, constitution.feedback[0], CONVERSATIONS[0],
                                                             FIRST[0], SECOND[0])
    swapped = question[2]["content"].split("Options:\n", 1)[1]
    assert swapped.startswith(f"(A) {examples[0].response_b.strip()}\n(B) {examples[0].response_a.strip()}")

    with pytest.raises(ValueError, match="'few_shot_choice' must be one of"):
        Judge(engine, 2, "last")
    for options in ({"calibrate": True}, {"few_shot_choice": "mirrored"}):
        with pytest.raises(ValueError, match="does not apply with 'cot'"):
            Judge(engine, 2, cot=True, **options)


def test_calibration_divides_by_the_content_free_probabilities_and_renormalises(engine, constitution,
                                                                              monkeypatch):
    raw, calibrated = Judge(engine, few_shot=1), Judge(engine, few_shot=1, calibrate=True)
    before = raw.compare(constitution, CONVERSATIONS, FIRST, SECOND, seed=0, principles_per_comparison=2)
    calls, score = [], engine.score_options

    def counted(questions, options, desc=None):  # the real scores; the batch sizes recorded
        calls.append(len(questions))
        return score(questions, options, desc=desc)

    monkeypatch.setattr(engine, "score_options", counted)
    after = calibrated.compare(constitution, CONVERSATIONS, FIRST, SECOND, seed=0, principles_per_comparison=2)
    again = calibrated.compare(constitution, CONVERSATIONS, FIRST, SECOND, seed=0, principles_per_comparison=2)
    templates = {p for c in before for p in c.principles}
    # the content-free questions are scored once per question template, each template in a
    # call of its own (its p_cf must not depend on the batch), then cached
    assert calls == [2 * 2 * len(CONVERSATIONS)] + [len(CONTENT_FREE)] * len(templates) + [2 * 2 * len(CONVERSATIONS)]
    assert [c.p_first for c in again] == [c.p_first for c in after]

    def content_free(principle) -> tuple[float, float]:  # scored here, from the content-free questions
        questions = [raw.prompts.question(constitution, principle, [{"role": "user", "content": text}], text, text)
                     for text in CONTENT_FREE]
        assert f"Human: {CONTENT_FREE[0]}" in questions[0][-2]["content"]
        assert f"(A) {CONTENT_FREE[0]}\n(B) {CONTENT_FREE[0]}" in questions[0][-2]["content"]
        scored = raw.option_probabilities(questions)
        a, b = sum(p[0] for p in scored) / len(scored), sum(p[1] for p in scored) / len(scored)
        return a / (a + b), b / (a + b)

    for i, (raw_comparison, c) in enumerate(zip(before, after)):
        assert c.principles == raw_comparison.principles
        ab, ba = [], []
        for pid in c.principles:
            principle = constitution.feedback_principle(pid)
            cf_a, cf_b = content_free(principle)
            assert abs(cf_a - 0.5) > 1e-4  # the tiny model's prompt prior is not flat: calibration has work to do
            # each order's raw probabilities, from the uncalibrated judge, one principle at a time
            [single] = raw.compare_with(constitution, CONVERSATIONS[i:i + 1], FIRST[i:i + 1], SECOND[i:i + 1],
                                        [[principle]])
            p_a = single.p_order_ab  # first shown as (A): P(A)
            ab.append((p_a / cf_a) / (p_a / cf_a + (1 - p_a) / cf_b))
            p_b = single.p_order_ba  # first shown as (B): P(B)
            ba.append((p_b / cf_b) / ((1 - p_b) / cf_a + p_b / cf_b))
        assert c.p_order_ab == pytest.approx(sum(ab) / len(ab), abs=1e-5)
        assert c.p_order_ba == pytest.approx(sum(ba) / len(ba), abs=1e-5)
        assert c.p_first == pytest.approx((c.p_order_ab + c.p_order_ba) / 2)
        assert abs(c.p_order_ab - raw_comparison.p_order_ab) > 1e-5
    # a question whose probabilities are the prompt's prior, and no more, comes out even
    assert Judge.calibrated((0.7, 0.3), (0.7, 0.3)) == pytest.approx((0.5, 0.5))
