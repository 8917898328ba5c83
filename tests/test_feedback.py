"""The AI judge: multiple-choice questions, soft labels from option-token probabilities,
both orders averaged, chain-of-thought probabilities clamped."""

from __future__ import annotations

import pytest
import torch

from cai.constitution import load_constitution
from cai.engines.hf import TransformersEngine
from cai.feedback import Judge
from conftest import CONVERSATIONS, FIRST, ROOT, SECOND

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
            messages = judge.question(constitution, principle, conversation, shown_a, shown_b)
            text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True) + "("
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1]  # one unpadded sequence, every position's logits
            expected.append(torch.softmax(logits[[letter_a, letter_b]], dim=-1)[slot].item())
        assert c.p_order_ab == pytest.approx(expected[0], abs=1e-5)
        assert c.p_order_ba == pytest.approx(expected[1], abs=1e-5)


def test_option_probabilities_sum_to_one(judge, constitution):
    questions = [judge.question(constitution, p, CONVERSATIONS[0], FIRST[0], SECOND[0])
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
