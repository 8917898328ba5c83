"""The rl stage: PPO, RLOO and GRPO optimise the SFT policy against the reward model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_run

# A few steps with 8-token answers: enough to see the policy move and the logs fill.
TINY_RL = ("rl.max_prompts=8", "rl.max_new_tokens=8", "rl.learning_rate=1.0e-3", "rl.per_device_train_batch_size=4")
REWARD_KEY = {"ppo": "objective/scores", "rloo": "reward", "grpo": "reward"}
KL_KEY = {"ppo": "objective/kl", "rloo": "kl", "grpo": "kl"}


def add_reward_stage(run_dir) -> None:
    """What the reward stage leaves behind: a sequence-classification model saved with
    its tokenizer in reward/model, and a manifest."""
    from cai import models

    tokenizer = models.load_tokenizer(str(run_dir / "sft" / "model"))
    reward_model = models.load_reward_model(str(run_dir / "sft" / "model"), tokenizer)
    reward_model.save_pretrained(run_dir / "reward" / "model")
    tokenizer.save_pretrained(run_dir / "reward" / "model")
    (run_dir / "reward" / "manifest.json").write_text(json.dumps({"stage": "reward", "config_hash": "test-reward"}))


def weights(path) -> dict:
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


@pytest.fixture
def rl_run(sft_run):
    add_reward_stage(sft_run)
    return sft_run


@pytest.mark.parametrize("algorithm, settings", [
    ("ppo", ("rl.total_episodes=8", "rl.num_ppo_epochs=1")),  # 8 episodes / batch 4 = 2 updates
    ("rloo", ("rl.max_steps=2",)),
    ("grpo", ("rl.max_steps=2", "rl.num_generations=2")),
])
def test_each_algorithm_moves_the_policy_and_logs_reward_kl_and_length(rl_run, algorithm, settings):
    from cai.pipeline import run_stage

    run = make_run(rl_run, f"rl.algorithm={algorithm}", *TINY_RL, *settings)
    manifest = run_stage(run, "rl")

    assert manifest["counts"]["global_steps"] == 2
    assert manifest["counts"]["prompts"] == 8 and 0 < manifest["counts"]["helpful_prompts"] < 8
    before, after = weights(rl_run / "sft" / "model"), weights(rl_run / "rl" / "model")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the policy did not change"
    logs = json.loads((rl_run / "rl" / "log_history.json").read_text())
    steps = [entry for entry in logs if REWARD_KEY[algorithm] in entry]
    assert len(steps) == 2
    assert all(KL_KEY[algorithm] in entry and entry["completions/mean_length"] <= 8 for entry in steps)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(rl_run / "rl" / "model").chat_template


@pytest.mark.parametrize("overrides, message", [
    (("rl.algorithm=grpo", "rl.per_device_train_batch_size=3", "rl.num_generations=2"),
     "must be divisible by rl.num_generations"),
    (("rl.algorithm=rloo", "rl.num_generations=1"), "'rl.num_generations' must be at least 2"),
    (("rl.algorithm=ppo", "rl.num_generations=4"), "'rl.num_generations' is not a field of PPOConfig"),
    (("rl.no_such_key=1",), "unknown key 'no_such_key'"),
])
def test_config_errors_are_reported_before_any_work(rl_run, overrides, message):
    from cai.pipeline import run_stage
    from cai.yamlio import ValidationError

    run = make_run(rl_run, *overrides)
    with pytest.raises(ValidationError, match=message):
        run_stage(run, "rl")
    assert not (rl_run / "rl").exists()


def test_ppo_refuses_a_reward_model_with_another_tokenizer(rl_run, tmp_path):
    from cai import models
    from cai.pipeline import run_stage

    other = tmp_path / "other-tokenizer"
    tokenizer = models.load_tokenizer(str(rl_run / "reward" / "model"))
    tokenizer.add_tokens(["<|not-in-the-policy|>"])
    tokenizer.save_pretrained(other)
    models.load_reward_model(str(rl_run / "reward" / "model"), tokenizer).save_pretrained(other)
    run = make_run(rl_run, *TINY_RL, f"rl.reward_model={other}")
    with pytest.raises(ValueError, match="same tokenizer"):
        run_stage(run, "rl")


def test_ppo_pads_with_a_token_the_chat_template_does_not_use(rl_run):
    """SmolLM2 pads with its EOS, <|im_end|>, which also closes every chat turn: TRL's PPO
    would take the prompt's own turn ends for padding."""
    from cai import models
    from cai.stages.rl import ppo_pad_token

    tokenizer = models.load_tokenizer(str(rl_run / "sft" / "model"), padding_side="left")
    tokenizer.pad_token = tokenizer.eos_token
    ppo_pad_token(tokenizer)

    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"]
