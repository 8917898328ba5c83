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
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StaticCache

from cai import console, models
from cai.engines.base import Capabilities, Completion, Engine, Sampling
from cai.work import matmul_parameters

MIN_SHARED_PREFIX = 16  # tokens; a shorter common prefix is not worth a cache copy
MAX_CACHE_BYTES = 4 * 2**30  # a batch's key/value cache stays under this (fewer rows if needed) on an accelerator,
CPU_MAX_CACHE_BYTES = 2**30  # and under this on a CPU, where it is the process's own RAM (docs/performance.md#memory)
CACHE_LENGTH_STEP = 256  # with compile_generation, cache lengths are rounded up to a multiple of this


class NucleusSampler(LogitsProcessor):
    """Temperature, top-k and top-p sampling, batched, on the logits' device.

    The distribution is transformers' (temperature, then top-k renormalised, then the
    nucleus: the smallest set of most likely tokens holding >= top_p), drawn from torch's
    generator by inverting a cumulative distribution at one uniform number per row (no
    `multinomial`, no per-token random numbers). Two ways to find the nucleus:

    - `static=False` (CPUs): draw and check. A token is drawn from the whole
      distribution; it is in the nucleus when the tokens more likely than it hold less
      than top_p (one pass over the row); rows whose draw is outside are drawn again,
      together, until none is left (each round is a host check, which a CPU does not
      notice; a round accepts a row with probability >= top_p). Accepted draws follow
      the nucleus's distribution exactly, and no row is ever sorted: transformers' top-p
      sorts all ~49k logits of every row at every step, which on a CPU costs as much as
      the model's forward pass at batch 64, and a top-k-first shortcut falls back to that
      sort whenever the nucleus is wide (a flat distribution, temperature 1).
    - `static=True` (accelerators, where a sort of the vocabulary is cheap and a host
      sync is not): every row is sorted and its nucleus cut from the cumulative sum:
      no data-dependent branch, no host sync, the same shapes at every step, so the
      decode step can be captured (CUDA graphs).

    The processor returns scores with the drawn token on top, so `generate` runs in
    greedy mode and its argmax takes the draw.
    """

    def __init__(self, temperature: float, top_p: float = 1.0, top_k: int = 0, static: bool = False):
        self.temperature, self.top_p, self.top_k, self.static = temperature, top_p, top_k, static

    @staticmethod
    def _invert(mass: torch.Tensor, total: torch.Tensor, last: torch.Tensor | int) -> torch.Tensor:
        """Column of each row's cumulative distribution `mass` at a uniform point in
        (0, total] (at most column `last`), shaped [rows, 1]: the first column whose mass
        reaches the point, so never a token of probability 0 (the point is never 0)."""
        point = (1.0 - torch.rand(total.shape, device=total.device, dtype=total.dtype)) * total
        return torch.searchsorted(mass, point).clamp_(max=last)

    def _sorted_nucleus(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        """Draws from the nucleus of each row's k most likely tokens (k = the vocabulary:
        a full sort), renormalised over them."""
        top, ids = logits.topk(k, dim=-1) if k < logits.shape[-1] else logits.sort(dim=-1, descending=True)
        probs = torch.softmax(top, dim=-1)
        mass = probs.cumsum(-1)
        size = ((mass - probs) < self.top_p).sum(-1, keepdim=True).clamp_(min=1)  # the nucleus: a prefix
        return ids.gather(1, self._invert(mass, mass.gather(1, size - 1), size - 1)).squeeze(1)

    def _checked_draws(self, logits: torch.Tensor) -> torch.Tensor:
        """Draws from the whole vocabulary, kept where the drawn token is in the nucleus,
        drawn again for the other rows (see the class)."""
        probs = torch.softmax(logits, dim=-1)
        mass = probs.cumsum(-1)
        drawn = self._invert(mass, mass[:, -1:], logits.shape[-1] - 1)
        if self.top_p >= 1.0:
            return drawn.squeeze(1)
        rows = None  # all of them, the first time
        while True:
            p, m = (probs, mass) if rows is None else (probs[rows], mass[rows])
            token = drawn if rows is None else self._invert(m, m[:, -1:], logits.shape[-1] - 1)
            above = torch.where(p > p.gather(1, token), p, 0.0).sum(-1)  # what the more likely tokens hold
            outside = (above >= self.top_p).nonzero().squeeze(1)
            if rows is not None:
                drawn[rows] = token
            if not len(outside):
                return drawn.squeeze(1)
            rows = outside if rows is None else rows[outside]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature
        vocabulary = logits.shape[-1]
        if self.top_k > 0:  # the nucleus lies inside the top k, renormalised
            drawn = self._sorted_nucleus(logits, min(self.top_k, vocabulary))
        elif self.static and self.top_p < 1.0:
            drawn = self._sorted_nucleus(logits, vocabulary)
        else:  # draw and check; without top-p, one draw and no check (no sync either)
            drawn = self._checked_draws(logits)
        return torch.full_like(scores, float("-inf")).scatter_(1, drawn[:, None], 0.0)


def shared_prefix_length(rows: list[list[int]]) -> int:
    """How many leading tokens all rows have in common."""
    first, length = rows[0], min(len(r) for r in rows)
    for row in rows[1:]:
        length = next((j for j in range(length) if row[j] != first[j]), length)
    return length


class TransformersEngine(Engine):
    capabilities = Capabilities(option_probabilities=True, seeded=True, in_process=True)

    def __init__(self, model, tokenizer, batch_size: int = 8, name: str = "", max_prompt_tokens: int | None = None,
                 share_prefix: bool = True, max_cache_bytes: int | None = None, compile_generation: bool = False):
        super().__init__()
        # compile_generation: on CUDA, transformers compiles the decode step (torch.compile,
        # CUDA graphs) for a static cache; static shapes make one compiled step serve every
        # batch: rows padded to the largest batch, cache lengths rounded up.
        self.static_shapes = compile_generation and model.device.type == "cuda"
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_cache_bytes = max_cache_bytes or (CPU_MAX_CACHE_BYTES if model.device.type == "cpu"
                                                   else MAX_CACHE_BYTES)
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.share_prefix = share_prefix
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_prompt_tokens = max_prompt_tokens or limit
        eos = tokenizer.eos_token_id
        gen_eos = model.generation_config.eos_token_id
        self.eos_ids = sorted({eos, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None})
        self._option_ids: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        self.forward_flop = 2 * matmul_parameters(model)  # per token of a forward pass (cai.work)

    def count(self, kind: str, tokens: int, positions: int) -> None:
        """Forward work done on `tokens` real tokens of `positions` computed (cai.work)."""
        if self.work is not None:
            self.work.add(kind, tokens, positions, self.forward_flop)

    @classmethod
    def from_spec(cls, spec: str, device: str = "auto", batch_size: int = 8, name: str = "",
                  options: models.ModelOptions | None = None) -> TransformersEngine:
        """Weights from a model spec (an adapter folder is merged onto its base), loaded
        with the options' dtype, attention and revision (never quantised: it only generates)."""
        tokenizer = models.load_tokenizer(spec, padding_side="left")
        return cls(models.load_causal_lm(spec, device, options), tokenizer, batch_size, name=name or spec,
                   compile_generation=bool(options and options.compile_generation))

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

    def _shared_prefix(self, rows: list[list[int]], kind: str):
        """(length, ids, key/value cache) of the prefix all rows share; (0, None, None)
        when it is too short to pay. Its forward pass counts as `kind` work."""
        shared = self.shared_length(rows)
        if not shared:
            return 0, None, None
        began = time.perf_counter()
        ids = torch.tensor([rows[0][:shared]], device=self.model.device)
        cache = self.model(input_ids=ids, use_cache=True, logits_to_keep=1).cache
        self.seconds += time.perf_counter() - began
        self.count(kind, shared, shared)
        return shared, ids, cache

    def cache_bytes_per_token(self) -> int:
        """Key/value cache bytes one token of one row takes (all layers)."""
        config = self.model.config.get_text_config()
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 2 * config.num_hidden_layers * heads * head_dim * self.model.dtype.itemsize

    def _batches_by_length(self, rows: list[list[int]], new_tokens: int = 0) -> list[list[int]]:
        """Row indices in batches of at most `batch_size`, longest first, so a batch pads
        little; a batch also stops growing before its key/value cache (rows x (longest
        row + new tokens)) would pass `max_cache_bytes`."""
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
        per_token, batches = self.cache_bytes_per_token(), []
        for i in order:
            batch = batches[-1] if batches else None
            if (batch is None or len(batch) >= self.batch_size
                    or (len(batch) + 1) * (len(rows[batch[0]]) + new_tokens) * per_token > self.max_cache_bytes):
                batches.append([i])
            else:
                batch.append(i)
        return batches

    def _generation_cache(self, prefix, rows: int, length: int) -> StaticCache:
        """A preallocated key/value cache for a generation batch of `rows` up to `length`
        tokens, starting with `prefix` (each layer's keys and values for the batch's
        prefix area, from `_batch_prefix`) when there is one. (transformers' default
        DynamicCache concatenates every layer's whole cache at every step: with a
        few-shot prefix of hundreds of tokens repeated over a batch, that copying costs
        several times the model's own work on a CPU, bench/generation.py --few-shot.)"""
        cache = StaticCache(config=self.model.config, max_cache_len=length)
        for index, (keys, values) in enumerate(prefix or ()):
            cache.update(keys, values, index)
        return cache

    def prefix_groups(self, rows: list[list[int]]) -> list[tuple[int, list[int]]]:
        """Rows grouped by the prefix whose key/value cache they share: [(prefix length,
        row indices)], every row in one group (length 0: no cache). Rows that share a
        prefix (few-shot sets after one system prompt) are found in token order; a group
        splits where its rows share less, when the split computes fewer tokens (each
        cached prefix counted once, plus `MIN_SHARED_PREFIX` for its own forward pass).
        Rows that all share one prefix make one group, as they always did."""
        if not rows:
            return []
        if not self.share_prefix:
            return [(0, list(range(len(rows))))]
        order = sorted(range(len(rows)), key=lambda i: rows[i])
        common = [shared_prefix_length([rows[a], rows[b]]) for a, b in zip(order, order[1:])]

        def best(lo: int, hi: int) -> tuple[int, list[tuple[int, list[int]]]]:
            """(tokens computed, groups) for the rows at sorted positions lo..hi."""
            members = sorted(order[lo:hi + 1])
            lengths = [len(rows[i]) for i in members]
            if lo == hi:
                return lengths[0], [(0, members)]
            base = min(common[lo:hi])
            shared = min(base, min(lengths) - 1)  # every row keeps a token of its own
            shared = shared if shared >= MIN_SHARED_PREFIX else 0
            kept = sum(lengths) - (len(members) - 1) * shared + (MIN_SHARED_PREFIX if shared else 0)
            cuts = [k + 1 for k in range(lo, hi) if common[k] == base]
            split_cost, split = 0, []
            for start, end in zip([lo, *cuts], [*cuts, hi + 1]):
                cost, groups = best(start, end - 1)
                split_cost += cost
                split += groups
            return (kept, [(shared, members)]) if kept <= split_cost else (split_cost, split)

        return best(0, len(rows) - 1)[1]

    def _prefix_caches(self, rows: list[list[int]], groups: list[tuple[int, list[int]]]) -> list:
        """Each group's prefix key/value cache (None without one), one forward pass each,
        counted as prefill work."""
        caches = []
        for length, members in groups:
            if not length:
                caches.append(None)
                continue
            began = time.perf_counter()
            ids = torch.tensor([rows[members[0]][:length]], device=self.model.device)
            caches.append(self.model(input_ids=ids, use_cache=True, logits_to_keep=1).cache)
            self.seconds += time.perf_counter() - began
            self.count("prefill", length, length)
        return caches

    def _batch_prefix(self, rows: list[list[int]], lengths: list[int], caches: list) -> tuple:
        """(ids, attention, per-layer keys and values) of a batch's prefix area: each row's
        cached prefix right-aligned in a width of the longest, masked left padding before a
        shorter one (the positions, from the mask, then run on from each row's own prefix).
        (None, None, None) when no row has a cached prefix."""
        width = max(lengths)
        if not width:
            return None, None, None
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        groups: dict[int, tuple] = {}  # the batch's rows of each cached prefix, copied together
        for k, (length, cache) in enumerate(zip(lengths, caches)):
            if length:
                groups.setdefault(id(cache), (length, cache, []))[2].append(k)
        layers = None
        for length, cache, members in groups.values():
            ids[members, width - length:] = torch.tensor(rows[members[0]][:length], dtype=torch.long)
            attention[members, width - length:] = 1
            if layers is None:
                layers = [tuple(t.new_zeros((len(rows), t.shape[1], width, t.shape[-1])) for t in (layer.keys,
                                                                                                  layer.values))
                          for layer in cache.layers]
            index = torch.tensor(members, device=cache.layers[0].keys.device)
            for (keys, values), layer in zip(layers, cache.layers):
                keys[index, :, width - length:] = layer.keys
                values[index, :, width - length:] = layer.values
        return ids.to(self.model.device), attention.to(self.model.device), layers

    @staticmethod
    def _batch_cache(cache, rows: int):
        """A private copy of the prefix cache, repeated for a batch of `rows`."""
        if cache is None:
            return None
        batch = copy.deepcopy(cache)
        batch.batch_repeat_interleave(rows)
        return batch

    # ------------------------------------------------------------ generation

    def generate(self, conversations: list[list[dict]], sampling: Sampling, seed: int,
                 desc: str | None = None, prefill: str = "") -> list[Completion]:
        rows = self.generate_tokens([self.render(c, prefill) for c in conversations], sampling, seed, desc)
        return [self._completion(row) for row in rows]

    @torch.inference_mode()
    def generate_tokens(self, prompts: list[list[int]], sampling: Sampling, seed: int,
                        desc: str | None = None) -> list[list[int]]:
        """The sampled token ids that follow each prompt (token ids), in input order: up to
        `max_new_tokens`, a row that stopped early padded after its EOS. What `generate`
        decodes, and what PPO's rollouts train on."""
        # Sampled or not, `generate` runs greedy: a NucleusSampler draws the token (see there).
        config = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids, use_cache=True,
                                  disable_compile=not self.static_shapes)
        # Off a CPU the sampler keeps its shapes and never syncs (see there).
        static = self.model.device.type != "cpu"
        processors = LogitsProcessorList([NucleusSampler(sampling.temperature, sampling.top_p, sampling.top_k,
                                                         static)] if sampling.temperature > 0 else [])
        results: list[list[int] | None] = [None] * len(prompts)
        groups = self.prefix_groups(prompts)
        caches = self._prefix_caches(prompts, groups)
        group_of = {i: g for g, (_, members) in enumerate(groups) for i in members}
        batches = self._batches_by_length(prompts, sampling.max_new_tokens)
        most = max(map(len, batches), default=0)
        bar = console.bar(batches, desc=desc, disable=desc is None, unit="batch")
        for index, batch in enumerate(bar):
            torch.manual_seed(seed * 1_000_003 + index)
            real = len(batch)
            if self.static_shapes:  # filler rows (copies of the first, dropped) keep the batch's size
                batch = batch + batch[:1] * (most - len(batch))
            lengths = [groups[group_of[i]][0] for i in batch]
            rows = [prompts[i][length:] for i, length in zip(batch, lengths)]
            input_ids, attention = self._pad_left(rows)
            prefix_ids, prefix_attention, prefix = self._batch_prefix([prompts[i] for i in batch], lengths,
                                                                      [caches[group_of[i]] for i in batch])
            width = 0 if prefix_ids is None else prefix_ids.shape[1]
            length = width + input_ids.shape[1] + sampling.max_new_tokens
            if self.static_shapes:
                length = -(-length // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP
            cache = self._generation_cache(prefix, len(rows), length)
            if prefix is not None:  # [prefix area][left padding][rest]: the mask hides the padding
                input_ids = torch.cat([prefix_ids, input_ids], dim=1)
                attention = torch.cat([prefix_attention, attention], dim=1)
            began = time.perf_counter()
            output = self.model.generate(input_ids=input_ids, attention_mask=attention, cache=cache,
                                         generation_config=config, logits_processor=processors)
            self.seconds += time.perf_counter() - began
            steps = output.shape[1] - input_ids.shape[1]
            generated = 0
            for row, i in zip(output[:real, input_ids.shape[1]:].tolist(), batch[:real]):
                results[i] = row
                answered, finished = self.answer_length(row)
                self.tokens_generated += answered
                generated += min(answered + finished, steps)  # the EOS is generated work too
            # prefill: the rows after their cached prefix, left padding included; decode: every
            # row at every step, those that finished early (and filler rows) included
            self.count("prefill", sum(map(len, rows[:real])), len(rows) * (input_ids.shape[1] - width))
            self.count("decode", generated, len(rows) * steps)
            if self.seconds:
                bar.set_postfix(tok_s=f"{self.tokens_per_second:.1f}")
        return results  # type: ignore[return-value]

    def answer_length(self, row: list[int]) -> tuple[int, bool]:
        """(tokens before the first EOS, whether there is one) of a generated row."""
        for j, token in enumerate(row):
            if token in self.eos_ids:
                return j, True
        return len(row), False

    def _completion(self, row: list[int]) -> Completion:
        length, finished = self.answer_length(row)
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
                                     f"token for {option!r} (got ids {both}); option scoring needs single-token "
                                     "options")
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
        shared, _, prefix = self._shared_prefix(rows, "score")
        results: list[tuple[float, ...]] = [()] * len(rows)
        batches = self._batches_by_length(rows)  # a question's two orders have one length: they stay together
        for batch in console.bar(batches, desc=desc, disable=desc is None, unit="batch"):
            input_ids, attention = self._pad_left([rows[i][shared:] for i in batch])
            positions = shared + (attention.cumsum(-1) - 1).clamp(min=0)  # as if each row were unpadded
            cache = self._batch_cache(prefix, len(batch))
            if cache is not None:
                attention = torch.cat([attention.new_ones(len(batch), shared), attention], dim=1)
            began = time.perf_counter()
            logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                cache=cache, use_cache=cache is not None, logits_to_keep=1).logits[:, -1, :]
            self.seconds += time.perf_counter() - began
            self.count("score", int(attention[:, shared:].sum() if cache is not None else attention.sum()),
                       input_ids.numel())
            ids = torch.tensor([option_ids[i] for i in batch], device=logits.device)
            probs = torch.softmax(logits.gather(1, ids).float(), dim=-1)
            for i, row in zip(batch, probs.tolist()):
                results[i] = tuple(row)
        return results
