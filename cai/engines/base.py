"""The engine interface: what a data stage asks of a model that generates or judges.

Data stages (critique, label, evaluate, sft's helpful answers, eval-labeler) reach
models only through an `Engine`. Two calls cover the method:

- `generate(conversations, sampling, seed)`: one chat completion per conversation;
- `score_options(questions, options)`: for each question (a chat ending in an open
  assistant turn, e.g. "("), the probabilities that the next token is each option
  ("A", "B"), normalised over the options: the AI judge's one-forward soft label.

Engines: `TransformersEngine` (in-process weights, the default) and `OpenAIEngine`
(any OpenAI-compatible server: vLLM, SGLang, llama.cpp's server, `transformers serve`,
a hosted API). `Capabilities` says what an engine can promise.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.95
    top_k: int = 0  # 0 = off


@dataclass
class Completion:
    text: str
    num_tokens: int  # generated tokens, EOS excluded
    finished: bool  # stopped at EOS rather than at max_new_tokens


@dataclass(frozen=True)
class Capabilities:
    option_probabilities: bool  # score_options returns real probabilities (not a parsed letter)
    seeded: bool  # the same seed gives the same completions
    in_process: bool  # weights are loaded here (a trainer could use them)


class EngineError(RuntimeError):
    """A model behind an engine could not answer (server down, bad response, ...).
    The message names the engine (for a server: its URL); the stage's chunk fails
    and a rerun resumes from it."""


class Engine:
    """What every engine provides. Counters feed the manifests."""

    name: str  # what rows and manifests record about the model (never a secret)
    capabilities: Capabilities

    def __init__(self) -> None:
        self.tokens_generated = 0
        self.seconds = 0.0  # time spent inside the model calls
        self.work = None  # the stage's cai.work.Work, which an in-process engine counts its tokens into

    def generate(self, conversations: list[list[dict]], sampling: Sampling, seed: int,
                 desc: str | None = None, prefill: str = "") -> list[Completion]:
        """One completion per conversation, in input order. `prefill` opens the
        assistant turn (the completion continues it and does not repeat it)."""
        raise NotImplementedError

    def score_options(self, questions: list[list[dict]], options: tuple[str, ...],
                      desc: str | None = None) -> list[tuple[float, ...]]:
        """Normalised probabilities of each option as the next token of each question.
        A question's last turn is an assistant turn whose content is already written
        (the prefill, e.g. "("); the option follows it."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What a manifest records about this engine: which, and what it generated in how
        many seconds inside the model (generation and option scoring)."""
        return {"engine": type(self).__name__, "model": self.name, "tokens_generated": self.tokens_generated,
                "model_seconds": round(self.seconds, 3)}

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_generated / self.seconds if self.seconds else 0.0

    def close(self) -> None:
        """Release what the engine holds (weights, connections)."""


def is_degenerate(text: str) -> bool:
    """Empty, letterless, or one word repeated: not worth training on."""
    letters = sum(ch.isalpha() for ch in text)
    if letters < 2:
        return True
    words = text.lower().split()
    if len(words) >= 8:
        most = max(words.count(w) for w in set(words))
        if most / len(words) > 0.6:
            return True
    return False
