"""The dpo stage: DPO on the AI preferences, with the soft labels thresholded or weighted."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_run

# Eight pairs; with the default min_confidence 0.55, the first two are too unsure to keep.
SOFT_LABELS = [0.5, 0.52, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0]
TINY_DPO = ("dpo.num_train_epochs=1", "dpo.per_device_train_batch_size=4", "dpo.learning_rate=1.0e-3",
            "dpo.max_length=128")


def add_label_stage(run_dir, soft_labels=SOFT_LABELS) -> None:
    """What the label stage leaves behind: prefs.jsonl with soft labels, and a manifest."""
    from cai.rundir import read_jsonl

    revisions = read_jsonl(run_dir / "critique" / "sft.jsonl")
    rows = []
    for i, p_chosen in enumerate(soft_labels):
        user, answer = revisions[i % len(revisions)]["messages"]
        rows.append({"prompt": [user], "chosen": [answer],
                     "rejected": [{"role": "assistant", "content": f"I will not answer that, number {i}."}],
                     "p_chosen": p_chosen, "p_order_ab": p_chosen, "p_order_ba": p_chosen,
                     "principles": ["harmless"], "feedback_model": "builtin:tiny", "mode": "multiple_choice"})
    (run_dir / "label").mkdir(exist_ok=True)
    (run_dir / "label" / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "label" / "manifest.json").write_text(json.dumps({"stage": "label", "config_hash": "test-label"}))


def weights(path) -> dict:
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


@pytest.fixture
def label_run(sft_run):
    add_label_stage(sft_run)
    return sft_run


@pytest.mark.parametrize("soft_labels, kept", [("threshold", 6), ("weighted", 8)])
def test_dpo_trains_the_sft_policy_on_the_ai_preferences(label_run, soft_labels, kept):
    from transformers import AutoModelForCausalLM

    from cai.execute.executor import run_one as run_stage
    from cai.work import matmul_parameters

    manifest = run_stage(make_run(label_run, f"dpo.soft_labels={soft_labels}", *TINY_DPO), "dpo")

    counts = manifest["counts"]
    assert counts["label_pairs"] == kept and counts["dropped_low_confidence"] == 8 - kept
    assert counts["global_steps"] == 2  # ceil(kept / 4), one epoch
    before, after = weights(label_run / "sft" / "model"), weights(label_run / "dpo" / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before), "the policy did not change"
    logs = json.loads((label_run / "dpo" / "log_history.json").read_text())
    assert [entry["step"] for entry in logs if "loss" in entry] == [1, 2]
    work = manifest["work"]["by_kind"]  # the trained tokens are TRL's count of them
    assert work["train"]["tokens"] == max(entry["num_tokens"] for entry in logs if "num_tokens" in entry)
    assert 0 < work["train"]["tokens"] < work["train"]["positions"]  # chosen and rejected padded to one width
    # the reference log-probs, precomputed when the trainer is built (cai's default): one forward of each pair
    reference = work["reference"]
    assert reference["tokens"] == work["train"]["tokens"]  # one epoch: the same pairs' tokens
    assert reference["flop"] == 2 * matmul_parameters(AutoModelForCausalLM.from_pretrained(
        label_run / "dpo" / "model")) * reference["tokens"]


def test_threshold_mode_keeps_pairs_at_or_above_min_confidence(label_run):
    from cai.execute.executor import prepare
    from cai.stages.dpo import preference_pairs

    ctx = prepare(make_run(label_run, "dpo.soft_labels=threshold", "dpo.min_confidence=0.8",
                           "dpo.mix_critique_pairs=true"), "dpo")
    pairs, counts = preference_pairs(ctx, ctx.config)

    critique_pairs = len((label_run / "critique" / "prefs.jsonl").read_text().splitlines())
    assert counts == {"label_pairs": 3, "dropped_low_confidence": 5, "critique_pairs": critique_pairs}
    assert [p["p_chosen"] for p in pairs] == [0.8, 0.9, 1.0] + [1.0] * critique_pairs


def sequence_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each completion, computed directly from the model."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    logps = (token_logps * batch["completion_mask"][:, 1:]).sum(1)
    return logps.chunk(2)  # chosen rows first, then rejected


def test_weighted_loss_is_the_soft_label_cross_entropy_and_plain_dpo_at_p_1(label_run):
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer

    from cai.execute.executor import prepare
    from cai.stages.dpo import dpo_trainer, preference_pairs

    ctx = prepare(make_run(label_run, "dpo.soft_labels=weighted", "dpo.beta=0.5", *TINY_DPO), "dpo")
    pairs, _ = preference_pairs(ctx, ctx.config)
    trainer = dpo_trainer(ctx, ctx.config, pairs[4:])  # p = 0.7, 0.8, 0.9, 1.0: one batch
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference, so the margins are not 0
        for parameter in trainer.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    reference = AutoModelForCausalLM.from_pretrained(label_run / "sft" / "model")

    with torch.no_grad():
        chosen, rejected = sequence_logps(trainer.model, batch)
        ref_chosen, ref_rejected = sequence_logps(reference, batch)
        margin = (chosen - ref_chosen) - (rejected - ref_rejected)
        p, beta = batch["p_chosen"], 0.5
        by_hand = -(p * torch.log(torch.sigmoid(beta * margin))
                    + (1 - p) * torch.log(torch.sigmoid(-beta * margin))).mean()
        loss = trainer.compute_loss(trainer.model, batch)
        assert margin.abs().min() > 1e-3
        assert torch.allclose(loss, by_hand, atol=1e-5)

        certain = {**batch, "p_chosen": torch.ones_like(p)}
        plain_dpo = -torch.log(torch.sigmoid(beta * margin)).mean()
        trl_sigmoid_dpo = DPOTrainer.compute_loss(trainer, trainer.model, {k: v for k, v in batch.items()
                                                                            if k != "p_chosen"})
        assert torch.allclose(trainer.compute_loss(trainer.model, certain), plain_dpo, atol=1e-5)
        assert torch.allclose(trl_sigmoid_dpo, plain_dpo, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (("dpo.soft_labels=weighted", "dpo.loss_type=[ipo]"), "does not work with dpo.soft_labels: weighted"),
    (("dpo.min_confidence=0.3",), "must be in \\[0.5, 1\\]"),
    (("dpo.soft_labels=sometimes",), "'dpo.soft_labels' must be 'threshold' or 'weighted'"),
])
def test_config_errors_are_reported_before_any_work(label_run, overrides, message):
    from cai.execute.executor import run_one as run_stage
    from cai.yamlio import ValidationError

    with pytest.raises(ValidationError, match=message):
        run_stage(make_run(label_run, *overrides), "dpo")
    assert not (label_run / "dpo").exists()
