"""The in-process engine: transformers weights, batched, with a shared-prefix cache.

Conversations are rendered with the tokenizer's chat template, sorted by length so a
batch pads little, and left-padded. A prefix every row shares (the system prompt,
few-shot turns, the judge's worked examples) is run through the model once; its
key/value cache is copied into every batch, for generation and for option scoring
alike. Each generation batch is seeded from (seed, batch index), so the same inputs
give the same outputs.
"""

from __future__ import annotations

import copy
import time

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from cai import models
from cai.engines.base import Capabilities, Completion, Engine, Sampling

MIN_SHARED_PREFIX = 16  # tokens; a shorter common prefix is not worth a cache copy


def shared_prefix_length(rows: list[list[int]]) -> int:
    """How many leading tokens all rows have in common."""
    first, length = rows[0], min(len(r) for r in rows)
    for row in rows[1:]:
        length = next((j for j in range(length) if row[j] != first[j]), length)
    return length


class TransformersEngine(Engine):
    capabilities = Capabilities(option_probabilities=True, seeded=True, in_process=True)

    def __init__(self, model, tokenizer, batch_size: int = 8, name: str = "", max_prompt_tokens: int | None = None,
                 share_prefix: bool = True):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.share_prefix = share_prefix
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_prompt_tokens = max_prompt_tokens or limit
        eos = tokenizer.eos_token_id
        gen_eos = model.generation_config.eos_token_id
        self.eos_ids = sorted({eos, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None})
        self._option_ids: dict[tuple[str, tuple[str, ...]], list[int]] = {}

    @classmethod
    def from_spec(cls, spec: str, device: str = "auto", batch_size: int = 8, name: str = "",
                  options: "models.ModelOptions | None" = None) -> "TransformersEngine":
        """Weights from a model spec (an adapter folder is merged onto its base), loaded
        with the options' dtype, attention and revision (never quantised: it only generates)."""
        tokenizer = models.load_tokenizer(spec, padding_side="left")
        return cls(models.load_causal_lm(spec, device, options), tokenizer, batch_size, name=name or spec)

    def close(self) -> None:
        self.model = None

    # ------------------------------------------------------------ tokens

    def render(self, conversation: list[dict], prefill: str = "") -> list[int]:
        """Token ids of a conversation ending in an open assistant turn (plus `prefill`)."""
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text + prefill, add_special_tokens=False)["input_ids"]
        return ids[-self.max_prompt_tokens:]

    def _pad_left(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention[i, width - len(row):] = 1
        return input_ids.to(self.model.device), attention.to(self.model.device)

    def shared_length(self, rows: list[list[int]]) -> int:
        """How many leading tokens the cached prefix of `rows` has (0: none is worth it).
        Every row keeps at least one token of its own."""
        if not self.share_prefix or not rows:
            return 0
        shared = min(shared_prefix_length(rows), min(len(r) for r in rows) - 1)
        return shared if shared >= MIN_SHARED_PREFIX else 0

    def _shared_prefix(self, rows: list[list[int]]):
        """(length, ids, key/value cache) of the prefix all rows share; (0, None, None)
        when it is too short to pay."""
        shared = self.shared_length(rows)
        if not shared:
            return 0, None, None
        began = time.perf_counter()
        ids = torch.tensor([rows[0][:shared]], device=self.model.device)
        cache = self.model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
        self.seconds += time.perf_counter() - began
        return shared, ids, cache

    def _batches_by_length(self, rows: list[list[int]]) -> list[list[int]]:
        """Row indices in batches of `batch_size`, longest first, so a batch pads little."""
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    @staticmethod
    def _batch_cache(cache, rows: int):
        """A private copy of the prefix cache, repeated for a batch of `rows`."""
        if cache is None:
            return None
        batch = copy.deepcopy(cache)
        batch.batch_repeat_interleave(rows)
        return batch

    # ------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(self, conversations: list[list[dict]], sampling: Sampling, seed: int,
                 desc: str | None = None, prefill: str = "") -> list[Completion]:
        prompts = [self.render(c, prefill) for c in conversations]
        sampled = sampling.temperature > 0
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens, do_sample=sampled,
            temperature=sampling.temperature if sampled else None, top_p=sampling.top_p if sampled else None,
            top_k=sampling.top_k if sampled else None,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids, use_cache=True)
        results: list[Completion | None] = [None] * len(prompts)
        shared, prefix_ids, prefix_cache = self._shared_prefix(prompts)
        batches = self._batches_by_length(prompts)
        bar = tqdm(batches, desc=desc, disable=desc is None, leave=False, unit="batch")
        for index, batch in enumerate(bar):
            torch.manual_seed(seed * 1_000_003 + index)
            input_ids, attention = self._pad_left([prompts[i][shared:] for i in batch])
            cache = self._batch_cache(prefix_cache, len(batch))
            if cache is not None:  # [prefix][left padding][rest]: the mask hides the padding
                input_ids = torch.cat([prefix_ids.expand(len(batch), -1), input_ids], dim=1)
                attention = torch.cat([attention.new_ones(len(batch), shared), attention], dim=1)
            began = time.perf_counter()
            output = self.model.generate(input_ids=input_ids, attention_mask=attention, past_key_values=cache,
                                         generation_config=config)
            self.seconds += time.perf_counter() - began
            for row, i in zip(output[:, input_ids.shape[1]:].tolist(), batch):
                results[i] = self._completion(row)
            if self.seconds:
                bar.set_postfix(tok_s=f"{self.tokens_per_second:.1f}")
        return results  # type: ignore[return-value]

    def _completion(self, row: list[int]) -> Completion:
        length, finished = len(row), False
        for j, token in enumerate(row):
            if token in self.eos_ids:
                length, finished = j, True
                break
        self.tokens_generated += length
        text = self.tokenizer.decode(row[:length], skip_special_tokens=True).strip()
        return Completion(text, length, finished)

    # ------------------------------------------------------------ option scoring

    def option_token_ids(self, prefill: str, options: tuple[str, ...]) -> list[int]:
        """The token id of each option as it follows the prefill's last character (e.g.
        "A" after "("). Each option must be one token there, and the options distinct."""
        tail = prefill[-1:]
        key = (tail, tuple(options))
        if key not in self._option_ids:
            before = self.tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
            ids = []
            for option in options:
                both = self.tokenizer(tail + option, add_special_tokens=False)["input_ids"]
                if both[:len(before)] != before or len(both) != len(before) + 1:
                    raise ValueError(f"the model's tokenizer does not split {tail + option!r} into {tail!r} plus one "
                                     f"token for {option!r} (got ids {both}); option scoring needs single-token options")
                ids.append(both[-1])
            if len(set(ids)) != len(ids):
                raise ValueError(f"the tokenizer maps the options {list(options)} to the same token ids {ids}")
            self._option_ids[key] = ids
        return self._option_ids[key]

    @torch.inference_mode()
    def score_options(self, questions: list[list[dict]], options: tuple[str, ...] = ("A", "B"),
                      desc: str | None = None) -> list[tuple[float, ...]]:
        """One forward pass per batch of consecutive questions, left-padded, no
        generation (plus one pass over the prefix all questions share)."""
        if not questions:
            return []
        rows = [self.render(q[:-1], prefill=q[-1]["content"]) for q in questions]
        option_ids = [self.option_token_ids(q[-1]["content"], options) for q in questions]
        shared, _, prefix = self._shared_prefix(rows)
        results: list[tuple[float, ...]] = [()] * len(rows)
        batches = self._batches_by_length(rows)  # a question's two orders have one length: they stay together
        for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False, unit="batch"):
            input_ids, attention = self._pad_left([rows[i][shared:] for i in batch])
            positions = shared + (attention.cumsum(-1) - 1).clamp(min=0)  # as if each row were unpadded
            cache = self._batch_cache(prefix, len(batch))
            if cache is not None:
                attention = torch.cat([attention.new_ones(len(batch), shared), attention], dim=1)
            began = time.perf_counter()
            logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                past_key_values=cache, use_cache=cache is not None, logits_to_keep=1).logits[:, -1, :]
            self.seconds += time.perf_counter() - began
            ids = torch.tensor([option_ids[i] for i in batch], device=logits.device)
            probs = torch.softmax(logits.gather(1, ids).float(), dim=-1)
            for i, row in zip(batch, probs.tolist()):
                results[i] = tuple(row)
        return results
