"""Few-shot leakage: text that repeats a span of a few-shot example's answer.

The critique stage shows the model the constitution's worked critique/revision chats. A
small model copies them: whole revisions (the critique stage's copy rule catches those)
and, more often, a phrase it then reuses for any request ("I can't write a doctor's note,
but ..."). Training on such revisions teaches a stock answer, and DPO can make it the
model's answer to anything. The measure here: a text leaks when it repeats a run of
`SPAN_WORDS` consecutive words (lowercase words: letters, digits, inner apostrophes)
of any assistant turn (first answer, critique, revision) of any of the constitution's
critique examples. The critique stage drops such revisions; its manifest and
`cai evaluate`'s results report the share of texts that leak.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SPAN_WORDS = 6
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def words(text: str) -> list[str]:
    """Lowercase words: letters and digits, with inner apostrophes (curly ones read as straight)."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def few_shot_answers(constitution) -> list[str]:
    """Every assistant turn of every critique example: what a model shown the examples could repeat."""
    return [turn["content"] for example in constitution.critique_examples for turn in example.messages
            if turn["role"] == "assistant"]


class SpanIndex:
    """The `n`-word spans of some source texts; `leaks(text)` is True when the text repeats one."""

    def __init__(self, sources: Iterable[str], n: int = SPAN_WORDS):
        self.n = n
        self.spans: set[tuple[str, ...]] = set()
        for source in sources:
            self.spans |= ngrams(words(source), n)

    def span(self, text: str) -> str | None:
        """The first repeated span, as words joined by spaces (None: none)."""
        tokens = words(text)
        for i in range(len(tokens) - self.n + 1):
            if tuple(tokens[i:i + self.n]) in self.spans:
                return " ".join(tokens[i:i + self.n])
        return None

    def leaks(self, text: str) -> bool:
        return self.span(text) is not None

    def share(self, texts: Iterable[str]) -> dict:
        """{n, leaked, share} of some texts (share: None when there are none)."""
        flags = [self.leaks(text) for text in texts]
        return {"n": len(flags), "leaked": sum(flags),
                "share": round(sum(flags) / len(flags), 4) if flags else None}


def few_shot_index(constitution, n: int = SPAN_WORDS) -> SpanIndex:
    return SpanIndex(few_shot_answers(constitution), n)
