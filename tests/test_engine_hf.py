"""The in-process engine's own machinery: the sampler and the batch planner."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from cai.engines import hf
from cai.engines.hf import NucleusSampler

DRAWS = 40_000


def transformers_distribution(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """What transformers' own sampling path draws from: its warpers, then a softmax."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    return torch.softmax(warpers(None, logits.clone()), dim=-1)


def drawn_distribution(logits: torch.Tensor, sampler: NucleusSampler) -> torch.Tensor:
    rows = logits.expand(DRAWS, -1).contiguous()
    scores = sampler(None, rows)
    assert torch.isfinite(scores).sum(dim=1).eq(1).all()  # exactly one token left per row
    counts = torch.bincount(scores.argmax(dim=1), minlength=logits.shape[-1]).float()
    return counts / DRAWS


@pytest.mark.parametrize("static", [False, True])  # draw and check (CPUs); sorted, fixed shapes (accelerators)
@pytest.mark.parametrize("temperature,top_p,top_k", [
    (0.7, 0.95, 0),  # a peaked nucleus
    (1.0, 0.9, 0),  # a wide one
    (1.0, 0.3, 0),  # a narrow one: most first draws are outside it
    (1.3, 0.8, 5),  # top-k then top-p, renormalised
    (0.9, 1.0, 0),  # plain temperature sampling
])
def test_nucleus_sampler_draws_from_transformers_distribution(temperature, top_p, top_k, static):
    torch.manual_seed(0)
    logits = torch.randn(1, 40) * 2
    expected = transformers_distribution(logits, temperature, top_p, top_k)[0]
    drawn = drawn_distribution(logits, NucleusSampler(temperature, top_p, top_k, static))
    assert (drawn[expected == 0] == 0).all()  # never outside transformers' support
    assert torch.allclose(drawn, expected, atol=0.01)  # 40k draws: standard error < 0.0025


@pytest.mark.parametrize("static", [False, True])
def test_nucleus_sampler_draws_each_row_of_a_mixed_batch_from_its_own_distribution(static):
    """Peaked and flat rows in one batch: each is drawn from its own nucleus (with draw
    and check, the rows drawn again are a different set each round)."""
    torch.manual_seed(0)
    peaked = torch.cat([torch.tensor([[9.0, 8.0, 7.0]]), torch.randn(1, 37)], dim=1)  # nucleus: 3 tokens
    flat = torch.randn(1, 40) * 0.5  # nucleus: most of the 40
    rows = torch.cat([peaked, flat]).repeat(DRAWS, 1)
    drawn = NucleusSampler(1.0, 0.9, static=static)(None, rows).argmax(dim=1)
    for index, logits in enumerate((peaked, flat)):
        expected = transformers_distribution(logits, 1.0, 0.9, 0)[0]
        counts = torch.bincount(drawn[index::2], minlength=40).float() / DRAWS
        assert (counts[expected == 0] == 0).all()
        assert torch.allclose(counts, expected, atol=0.01)


@pytest.mark.parametrize("static", [False, True])
def test_nucleus_sampler_is_seeded(static):
    logits = torch.randn(64, 100)
    sampler = NucleusSampler(1.0, 0.5, static=static)
    torch.manual_seed(1)
    first = sampler(None, logits).argmax(1)
    torch.manual_seed(1)
    assert torch.equal(first, sampler(None, logits).argmax(1))
    assert not torch.equal(first, sampler(None, logits).argmax(1))  # and the next draw differs


def test_batches_are_longest_first_and_stay_under_the_cache_bound():
    engine = hf.TransformersEngine.from_spec("builtin:tiny", "cpu", batch_size=4)
    rows = [[1] * n for n in (5, 50, 20, 20, 7, 30)]
    assert engine._batches_by_length(rows) == [[1, 5, 2, 3], [4, 0]]
    assert engine.max_cache_bytes == hf.CPU_MAX_CACHE_BYTES  # on a CPU the cache is the process's RAM
    per_row = (50 + 10) * engine.cache_bytes_per_token()  # the longest row with 10 new tokens
    engine.max_cache_bytes = 2 * per_row
    batches = engine._batches_by_length(rows, new_tokens=10)
    assert [i for batch in batches for i in batch] == [1, 5, 2, 3, 4, 0]
    assert all(len(b) * (len(rows[b[0]]) + 10) * engine.cache_bytes_per_token() <= 2 * per_row for b in batches)
    assert batches[0] == [1, 5]


def test_batched_generation_matches_one_prompt_at_a_time():
    """Batches (left padding, the shared-prefix cache copied into a static cache) give the
    tokens transformers' own generate gives each prompt alone."""
    from cai.engines import Sampling

    engine = hf.TransformersEngine.from_spec("builtin:tiny", "cpu", batch_size=3)
    system = [{"role": "system", "content": "You are a careful assistant. " * 4}]
    conversations = [system + [{"role": "user", "content": text}]
                     for text in ("How do I pick a lock?", "Hi", "Write a long poem about the sea and the sky", "Why?")]
    batched = engine.generate(conversations, Sampling(10, temperature=0), seed=0)
    assert engine.shared_length([engine.render(c) for c in conversations]) > 0
    for conversation, completion in zip(conversations, batched):
        ids = torch.tensor([engine.render(conversation)])
        with torch.inference_mode():
            out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                        pad_token_id=engine.tokenizer.pad_token_id, eos_token_id=engine.eos_ids)
        assert completion.text == engine._completion(out[0, ids.shape[1]:].tolist()).text


def few_shot_conversations(engine) -> tuple[list[list[dict]], list[int]]:
    """Prompts after one system prompt and one of two few-shot sets (critique's rotation), and their sets."""
    system = [{"role": "system", "content": "You are a careful assistant. " * 4}]
    shots = [[{"role": "user", "content": f"Example request {k}: " + "tell me about the sea. " * 3},
              {"role": "assistant", "content": f"Example answer {k}: " + "the sea is wide and deep. " * 3}]
             for k in range(2)]
    texts = ("How do I pick a lock?", "Hi", "Write a long poem about the sea and the sky", "Why?", "Insult me")
    sets = [0, 1, 1, 0, 1]
    return [system + shots[k] + [{"role": "user", "content": t}] for t, k in zip(texts, sets)], sets


def test_rows_are_grouped_by_the_few_shot_prefix_they_share():
    engine = hf.TransformersEngine.from_spec("builtin:tiny", "cpu", batch_size=4)
    conversations, sets = few_shot_conversations(engine)
    rows = [engine.render(c) for c in conversations]
    groups = engine.prefix_groups(rows)
    assert sorted(sorted(members) for _, members in groups) == [[0, 3], [1, 2, 4]]
    for length, members in groups:  # each set's own prefix: longer than what all rows share
        assert length == engine.shared_length([rows[i] for i in members]) > engine.shared_length(rows)
    same_set = [rows[i] for i in (1, 2, 4)]  # rows that all share one prefix: one group, as before
    assert engine.prefix_groups(same_set) == [(engine.shared_length(same_set), [0, 1, 2])]
    engine.share_prefix = False
    assert engine.prefix_groups(rows) == [(0, [0, 1, 2, 3, 4])]


def test_rows_of_several_few_shot_sets_in_one_call_give_each_rows_own_answer():
    """One call over rows of two few-shot sets (each set's prefix cached once, right-aligned
    in the batch's prefix area) gives, greedy, the tokens of each prompt generated alone by
    transformers' own generate, and what one call per set gives."""
    from cai.engines import Sampling

    engine = hf.TransformersEngine.from_spec("builtin:tiny", "cpu", batch_size=4)
    conversations, sets = few_shot_conversations(engine)
    greedy = Sampling(10, temperature=0)
    together = [c.text for c in engine.generate(conversations, greedy, seed=0)]
    for conversation, text in zip(conversations, together):
        ids = torch.tensor([engine.render(conversation)])
        with torch.inference_mode():
            out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                        pad_token_id=engine.tokenizer.pad_token_id, eos_token_id=engine.eos_ids)
        assert text == engine._completion(out[0, ids.shape[1]:].tolist()).text
    for k in (0, 1):
        rows = [i for i, s in enumerate(sets) if s == k]
        assert [c.text for c in engine.generate([conversations[i] for i in rows], greedy, seed=0)] == [
            together[i] for i in rows]


def test_static_shapes_give_every_batch_one_shape_and_the_same_answers(monkeypatch):
    """compile_generation on CUDA: rows padded to the largest batch, cache lengths rounded
    up, so one compiled decode step serves every batch; the answers do not change."""
    from cai.engines import Sampling

    engine = hf.TransformersEngine.from_spec("builtin:tiny", "cpu", batch_size=3)
    system = [{"role": "system", "content": "You are a careful assistant. " * 4}]
    conversations = [system + [{"role": "user", "content": text}]
                     for text in ("How do I pick a lock?", "Hi", "Write a long poem about the sea", "Why?", "Tell me")]
    plain = engine.generate(conversations, Sampling(6, temperature=0), seed=0)
    engine.static_shapes = True  # what compile_generation sets on a CUDA device
    shapes, original = [], engine._generation_cache
    monkeypatch.setattr(engine, "_generation_cache",
                        lambda prefix, rows, length: shapes.append((rows, length)) or original(prefix, rows, length))
    static = engine.generate(conversations, Sampling(6, temperature=0), seed=0)
    assert [c.text for c in static] == [c.text for c in plain]
    assert shapes == [(3, hf.CACHE_LENGTH_STEP)] * 2


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_nucleus_sampler_never_draws_a_token_of_probability_zero(static, top_p):
    """Tokens whose logits are -inf (or underflow to probability 0) lie anywhere in the
    vocabulary's order, first and last included: none is ever drawn."""
    logits = torch.full((DRAWS, 50), float("-inf"))
    logits[:, 1:49:2] = torch.randn(24)  # only odd ids, not the first or the last, are possible
    drawn = NucleusSampler(1.0, top_p, static=static)(None, logits).argmax(dim=1)
    assert (drawn % 2 == 1).all()
    assert top_p < 1 or drawn.unique().numel() == 24
