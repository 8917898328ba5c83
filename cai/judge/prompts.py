"""The judge's questions: the text a feedback model reads (Bai et al. 2022, section 4.1).

A pairwise question shows a conversation, a feedback principle drawn from the
constitution and two candidate responses, as a multiple-choice question:

    Consider the following conversation between a human and an assistant:

    Human: ...

    <principle>
    Options:
    (A) <response a>
    (B) <response b>

    The answer is:

The question is the user turn of a chat; the assistant turn is primed with "(" and the
next token, "A" or "B", is what the judge scores. The constitution's feedback examples go
first as earlier chat turns (question -> "(A)" / "(B)"), to show a small model the format.
Which examples, and how (`few_shot_choice`):

- `first` shows the first N feedback examples;
- `balanced` picks N whose answers alternate A, B, A, ... (in constitution order, as far
  as the constitution has examples of each answer), so the shots do not teach a slot;
- `mirrored` shows each of the first N twice, as written and with its two responses
  swapped (answer flipped), 2N shots in which every content is seen in both slots.

In chain-of-thought mode (`cot`) the question asks the model to think first; the
assistant turn opens with "Let's think step by step:", and once the reasoning is
written the answer cue "So the answer is: (" follows it.

Pointwise questions (`rating_question`, the reward of direct RLAIF): one answer, the
drawn principle and "is it the kind of response this principle would choose?" with
options Yes / No, in either order. The pairwise worked examples become pointwise ones:
each example's preferred answer rated Yes, the other No.
"""

from __future__ import annotations

from dataclasses import dataclass

OPTIONS = ("A", "B")
PRIME = "("  # the assistant turn starts with it; the next token is the option letter
COT_PRIME = "Let's think step by step:"
COT_CUE = "So the answer is: ("
# Pointwise questions: the constitution's principles are written to compare two
# responses, so the question asks whether the one shown is what the principle would choose.
RATING_QUESTION = ("Judge only the assistant's last response above, on its own: is it the kind of response this "
                   "principle would choose?")
RATING_OPTIONS = ("Yes", "No")
FEW_SHOT_CHOICES = ("first", "balanced", "mirrored")
INTRO = "Consider the following conversation between a human and an assistant:\n\n"  # every judge question
CONTENT_FREE = ("N/A", "[MASK]", "")  # Zhao et al. 2021: the three content-free inputs, averaged


def render_conversation(conversation: list[dict]) -> str:
    """`Human: ... / Assistant: ...` text of a chat (system turns are left out)."""
    names = {"user": "Human", "assistant": "Assistant"}
    return "\n\n".join(f"{names[turn['role']]}: {turn['content'].strip()}"
                       for turn in conversation if turn["role"] in names)


def principle_text(principle) -> str:
    return principle if isinstance(principle, str) else principle.text


@dataclass(frozen=True)
class JudgePrompts:
    """The chats a judge asks: `few_shot` worked examples chosen by `few_shot_choice`,
    then the question; with `cot`, the chain-of-thought form."""

    few_shot: int = 2
    few_shot_choice: str = "first"
    cot: bool = False

    def question_text(self, principle, conversation: str, response_a: str, response_b: str) -> str:
        ending = "The answer is:" if not self.cot else "Think it through step by step, then give the answer."
        return (f"{INTRO}{conversation}\n\n{principle_text(principle)}\nOptions:\n"
                f"(A) {response_a.strip()}\n(B) {response_b.strip()}\n\n{ending}")

    def answer_turn(self, answer: str, reasoning: str | None) -> str:
        if reasoning is None:
            return f"{PRIME}{answer})"
        return f"{COT_PRIME} {reasoning.strip()}\n{COT_CUE}{answer})"

    def shot_examples(self, constitution) -> list[tuple]:
        """The feedback examples shown first, in order, as (example, swapped): a swapped
        example is shown with its responses in the other slots and its answer flipped."""
        examples = list(constitution.feedback_examples)
        if self.few_shot_choice == "mirrored":
            return [(example, swapped) for example in examples[: self.few_shot] for swapped in (False, True)]
        if self.few_shot_choice == "first":
            return [(example, False) for example in examples[: self.few_shot]]
        chosen, wanted = [], examples[0].answer if examples else "A"
        while len(chosen) < self.few_shot and examples:  # balanced: answers alternate while both remain
            pick = next((e for e in examples if e.answer == wanted), examples[0])
            examples.remove(pick)
            chosen.append((pick, False))
            wanted = "B" if pick.answer == "A" else "A"
        return chosen

    def shots(self, constitution, principle) -> list[dict]:
        turns = []
        for example, swapped in self.shot_examples(constitution):
            shown = constitution.feedback_principle(example.principle) if example.principle else principle
            reasoning = (example.reasoning or "") if self.cot else None
            first, second, answer = ((example.response_b, example.response_a, "B" if example.answer == "A" else "A")
                                     if swapped else (example.response_a, example.response_b, example.answer))
            turns += [{"role": "user", "content": self.question_text(
                          shown, render_conversation([{"role": "user", "content": example.conversation}]),
                          first, second)},
                      {"role": "assistant", "content": self.answer_turn(answer, reasoning)}]
        return turns

    def question(self, constitution, principle, conversation: list[dict], response_a: str, response_b: str,
                 reasoning: str | None = None) -> list[dict]:
        """The chat of one multiple-choice question. It ends in an open assistant turn:
        "(" (direct), "Let's think step by step:" (cot, reasoning not yet written) or the
        reasoning followed by the answer cue "... (" (cot, reasoning given)."""
        messages = self.shots(constitution, principle)
        messages.append({"role": "user", "content": self.question_text(
            principle, render_conversation(conversation), response_a, response_b)})
        if reasoning is not None:
            opening = f"{COT_PRIME} {reasoning.strip()}\n{COT_CUE}"
        else:
            opening = COT_PRIME if self.cot else PRIME
        messages.append({"role": "assistant", "content": opening})
        return messages

    def content_free_questions(self, constitution, principle) -> list[list[dict]]:
        """The question template of `principle` with each content-free input in place of
        the conversation and both responses (contextual calibration)."""
        return [self.question(constitution, principle, [{"role": "user", "content": text}], text, text)
                for text in CONTENT_FREE]

    # ------------------------------------------------------------ one answer at a time

    def rating_text(self, principle, conversation: str, yes_first: bool) -> str:
        options = RATING_OPTIONS if yes_first else RATING_OPTIONS[::-1]
        return (f"{INTRO}{conversation}\n\n{principle_text(principle)}\n{RATING_QUESTION}\nOptions:\n"
                f"(A) {options[0]}\n(B) {options[1]}\n\nThe answer is:")

    def rating_shots(self, constitution, principle, yes_first: bool) -> list[dict]:
        """The constitution's worked preference examples, each turned into two rated
        answers: its preferred response "Yes", the other "No". Which comes first alternates
        from example to example, so the last shot does not always teach the same verdict."""
        turns = []
        for n, example in enumerate(constitution.feedback_examples[: self.few_shot]):
            shown = constitution.feedback_principle(example.principle) if example.principle else principle
            better, worse = ((example.response_a, example.response_b) if example.answer == "A"
                             else (example.response_b, example.response_a))
            rated = [(better, True), (worse, False)] if n % 2 == 0 else [(worse, False), (better, True)]
            for response, good in rated:
                conversation = render_conversation([{"role": "user", "content": example.conversation},
                                                    {"role": "assistant", "content": response}])
                letter = OPTIONS[0] if good == yes_first else OPTIONS[1]
                turns += [{"role": "user", "content": self.rating_text(shown, conversation, yes_first)},
                          {"role": "assistant", "content": f"{PRIME}{letter})"}]
        return turns

    def rating_question(self, constitution, principle, conversation: list[dict], response: str,
                        yes_first: bool = True) -> list[dict]:
        """The chat of one pointwise question: the conversation with `response` as the
        assistant's last turn, the principle, and "Yes" / "No" as options (A) and (B)
        (`yes_first`) or (B) and (A). It ends in an open assistant turn "(". Always direct:
        pointwise scoring has no chain-of-thought mode."""
        messages = self.rating_shots(constitution, principle, yes_first)
        shown = render_conversation([*conversation, {"role": "assistant", "content": response}])
        messages.append({"role": "user", "content": self.rating_text(principle, shown, yes_first)})
        messages.append({"role": "assistant", "content": PRIME})
        return messages
