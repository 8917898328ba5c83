"""cai's plain LM head on a CPU (`cai.training.lm_head`) gives what TRL's fused head gives:
the same per-token log-probs and gradients, and the same metrics' inputs."""

from __future__ import annotations

import pytest
import torch

from cai import models
from cai.training.lm_head import _install


def fused_pair(temperature: float = 1.0):
    """Two copies of builtin:tiny with TRL's fused head at `temperature` (as RLOO installs
    it), to be given cai's in front of the second."""
    from trl.trainer.utils import add_fused_lm_head

    pair = []
    for _ in range(2):
        model = models.load_causal_lm(models.TINY, "cpu")
        add_fused_lm_head(model, temperature=temperature,
                          outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
        pair.append(model)
    return pair


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_plain_head_gives_the_fused_heads_outputs_and_gradients(temperature):
    trl_model, cai_model = fused_pair(temperature)
    assert _install(cai_model, temperature)
    ids = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    attention[2, :3] = 0  # a left-padded row
    labels = ids.masked_fill(torch.arange(10)[None, :] < torch.tensor([[4], [6], [5]]), -100)
    outputs = [m(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
               for m in (trl_model, cai_model)]
    for field in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        torch.testing.assert_close(getattr(outputs[1], field), getattr(outputs[0], field), rtol=1e-4, atol=1e-5)
    assert torch.equal(outputs[1].is_top1, outputs[0].is_top1)
    assert torch.equal(outputs[1].label_mask, outputs[0].label_mask)
    assert (outputs[1].log_probs[~outputs[1].label_mask] == 0).all()
    torch.testing.assert_close(outputs[1].loss, outputs[0].loss)
    for output in outputs:
        (output.log_probs.sum() * 0.5).backward()
    grads = [{n: p.grad for n, p in m.named_parameters()} for m in (trl_model, cai_model)]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_calls_without_the_fused_head_and_oversized_batches_go_to_trls_forward(monkeypatch):
    import cai.training.lm_head as lm_head

    trl_model, cai_model = fused_pair()
    assert _install(cai_model, 1.0)
    assert not _install(cai_model, 1.0)  # once only
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    plain = cai_model(input_ids=ids)  # generation and plain forwards keep their logits
    torch.testing.assert_close(plain.logits, trl_model(input_ids=ids).logits)
    monkeypatch.setattr(lm_head, "MAX_SCORED", 1)
    monkeypatch.setattr(lm_head, "plain_head_output", lambda *a, **k: pytest.fail("the plain head ran"))
    output = cai_model(input_ids=ids, labels=ids, fused_lm_head=True)
    torch.testing.assert_close(output.log_probs, trl_model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs)


def test_sft_trains_through_it_on_a_cpu(tmp_path, monkeypatch):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    import cai.training.lm_head as lm_head

    calls = []
    real = lm_head.plain_head_output
    monkeypatch.setattr(lm_head, "plain_head_output", lambda *a, **k: calls.append(1) or real(*a, **k))
    tokenizer = models.load_tokenizer(models.TINY)
    rows = [{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]}]
    trainer = SFTTrainer(model=models.load_causal_lm(models.TINY, "cpu"), processing_class=tokenizer,
                         train_dataset=Dataset.from_list(rows),
                         args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1,
                                        activation_checkpointing=False, save_strategy="no"))
    assert lm_head.use_plain_lm_head(trainer)
    trainer.train()
    assert calls
