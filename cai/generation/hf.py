"""Batched chat generation with transformers: the hot path of every data stage.

Conversations are rendered with the tokenizer's chat template, sorted by length so a
batch pads little, left-padded, and generated with the KV cache; a prefix all prompts share (the system
prompt and few-shot turns) is computed once and its cache reused by every batch. Each batch is seeded
from (seed, batch index), so the same inputs give the same outputs.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from cai import models


MIN_SHARED_PREFIX = 16  # tokens; a shorter common prefix is not worth a cache copy


def shared_prefix_length(rows: list[list[int]]) -> int:
    """How many leading tokens all rows have in common."""
    first, length = rows[0], min(len(r) for r in rows)
    for row in rows[1:]:
        length = next((j for j in range(length) if row[j] != first[j]), length)
    return length


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.95
    top_k: int = 0


@dataclass
class Completion:
    text: str
    num_tokens: int  # generated tokens, EOS excluded
    finished: bool  # stopped at EOS rather than at max_new_tokens


class HFGenerator:
    def __init__(self, model, tokenizer, batch_size: int = 8, max_prompt_tokens: int | None = None,
                 share_prefix: bool = True):
        self.model = model
        self.share_prefix = share_prefix
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_prompt_tokens = max_prompt_tokens or limit
        self.tokens_generated = 0
        self.seconds = 0.0
        eos = tokenizer.eos_token_id
        gen_eos = model.generation_config.eos_token_id
        self.eos_ids = sorted({eos, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None})

    @classmethod
    def from_spec(cls, spec: str, device: str = "auto", batch_size: int = 8) -> "HFGenerator":
        tokenizer = models.load_tokenizer(spec, padding_side="left")
        return cls(models.load_causal_lm(spec, device), tokenizer, batch_size)

    def render(self, conversation: list[dict], prefill: str = "") -> list[int]:
        """Token ids of a conversation ending in an open assistant turn (plus `prefill`)."""
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text + prefill, add_special_tokens=False)["input_ids"]
        return ids[-self.max_prompt_tokens:]

    def pad_left(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention[i, width - len(row):] = 1
        device = self.model.device
        return input_ids.to(device), attention.to(device)

    @torch.inference_mode()
    def generate(self, conversations: list[list[dict]], sampling: Sampling, seed: int,
                 desc: str | None = None, prefill: str = "") -> list[Completion]:
        """One completion per conversation, in input order."""
        prompts = [self.render(c, prefill) for c in conversations]
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens, do_sample=sampling.temperature > 0,
            temperature=sampling.temperature if sampling.temperature > 0 else None,
            top_p=sampling.top_p if sampling.temperature > 0 else None,
            top_k=sampling.top_k if sampling.temperature > 0 else None,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids, use_cache=True)
        results: list[Completion | None] = [None] * len(prompts)
        # Prompts that open with the same turns (system prompt, few-shot examples) share
        # that prefix: its key/value cache is computed once and copied into every batch.
        shared = shared_prefix_length(prompts) if self.share_prefix and prompts else 0
        shared = min(shared, min((len(p) for p in prompts), default=1) - 1)
        prefix_ids, prefix_cache = None, None
        if shared >= MIN_SHARED_PREFIX:
            start = time.perf_counter()
            prefix_ids = torch.tensor([prompts[0][:shared]], device=self.model.device)
            prefix_cache = self.model(input_ids=prefix_ids, use_cache=True, logits_to_keep=1).past_key_values
            self.seconds += time.perf_counter() - start
        else:
            shared = 0
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        bar = tqdm(batches, desc=desc, disable=desc is None, leave=False, unit="batch")
        for index, batch in enumerate(bar):
            torch.manual_seed(seed * 1_000_003 + index)
            input_ids, attention = self.pad_left([prompts[i][shared:] for i in batch])
            cache = None
            if prefix_cache is not None:  # [prefix][left padding][rest]: the mask hides the padding
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(batch))
                input_ids = torch.cat([prefix_ids.expand(len(batch), -1), input_ids], dim=1)
                attention = torch.cat([attention.new_ones(len(batch), shared), attention], dim=1)
            start = time.perf_counter()
            output = self.model.generate(input_ids=input_ids, attention_mask=attention, past_key_values=cache,
                                         generation_config=config)
            self.seconds += time.perf_counter() - start
            for row, i in zip(output[:, input_ids.shape[1]:].tolist(), batch):
                results[i] = self._completion(row)
            if self.seconds:
                bar.set_postfix(tok_s=f"{self.tokens_generated / self.seconds:.1f}")
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

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_generated / self.seconds if self.seconds else 0.0


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
