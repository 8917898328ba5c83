"""The optimisers learn, and PPO's maths is right.

Learning: PPO, RLOO and GRPO, each run through the rl stage's own code with a scripted
reward (the share of answer tokens whose id lies in the upper half of the vocabulary: the
tiny SFT policy scores about a half from the first batch, so the signal is there at once),
raise that share over the run, while the same run with a constant reward does not. Each
fails when its signal's sign is flipped (PPO's surrogate, or the scripted reward: the share
then falls to about 0).

Maths: `cai.training.ppo`'s pieces against numbers worked out by hand (or by a plain
Python loop written here), so a sign error, an off-by-one in the value target or a
reward read at the wrong token fails a test.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_run

from cai.training.ppo import (
    PPOTrainer,
    Rollout,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)

# ---------------------------------------------------------------- PPO's maths, by hand


def test_masked_mean_averages_the_masked_entries_only():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 60.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert masked_mean(values, mask).item() == pytest.approx((1 + 2 + 4) / 3)
    # per row; an empty row is 0, not nan
    assert masked_mean(values, mask, dim=1).tolist() == pytest.approx([1.5, 4.0, 0.0])


def test_masked_whiten_uses_the_unbiased_variance_and_zeroes_what_is_masked():
    values = torch.tensor([[2.0, 4.0], [6.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    # mean 4, unbiased variance ((2-4)² + 0 + (6-4)²) / (3 - 1) = 4, std 2
    assert masked_whiten(values, mask).tolist() == [pytest.approx([-1.0, 0.0]), pytest.approx([1.0, 0.0])]
    # shift_mean=False adds the mean back: the scale changes, the sign of a reward stays
    assert masked_whiten(values, mask, shift_mean=False).tolist() == [pytest.approx([3.0, 4.0]),
                                                                      pytest.approx([5.0, 0.0])]


def test_kl_penalty_k1_is_the_log_ratio_and_k3_is_never_negative():
    logprobs = torch.log(torch.tensor([0.5, 0.25, 0.4]))
    ref_logprobs = torch.log(torch.tensor([0.25, 0.5, 0.4]))
    # k1 = log π − log π_ref: log 2, −log 2 (negative where π < π_ref), 0
    assert kl_penalty(logprobs, ref_logprobs, "k1").tolist() == pytest.approx([math.log(2), -math.log(2), 0.0])
    # k3 = (ρ − 1) − log ρ, ρ = π_ref / π: ρ = 0.5, 2, 1
    assert kl_penalty(logprobs, ref_logprobs, "k3").tolist() == pytest.approx(
        [(0.5 - 1) - math.log(0.5), (2 - 1) - math.log(2), 0.0])
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=generator) * 3, torch.randn(1000, generator=generator) * 3
    assert (kl_penalty(a, b, "k3") >= 0).all()
    assert (kl_penalty(a, b, "k1") < 0).any()


def gae_by_hand(rewards: list[list[float]], values: list[list[float]], lengths: list[int], gamma: float,
                lam: float) -> tuple[list[list[float]], list[list[float]]]:
    """GAE row by row: only the first `length` tokens are real, V after the last one is 0."""
    advantages, returns = [], []
    for r, v, length in zip(rewards, values, lengths):
        a = [0.0] * len(r)
        following = 0.0
        for t in reversed(range(length)):
            next_value = v[t + 1] if t + 1 < length else 0.0
            delta = r[t] + gamma * next_value - v[t]
            following = delta + gamma * lam * following
            a[t] = following
        advantages.append(a)
        returns.append([a[t] + v[t] if t < length else 0.0 for t in range(len(r))])
    return advantages, returns


def test_gae_with_gamma_and_lambda_one_is_the_reward_to_go_minus_the_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)  # the second answer ends after 2 tokens
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 1: A_t = 1 − V_t. Row 2: what lies past its end (reward 5, value 9) is not seen:
    # A_1 = 2 + 0 − 0.4 (the value after the last token is 0), A_0 = 0 + 0.4 − 0.3 + 1.6
    assert advantages.tolist() == [pytest.approx([0.5, 0.8, 0.9]), pytest.approx([1.7, 1.6, 0.0])]
    assert returns.tolist() == [pytest.approx([1.0, 1.0, 1.0]), pytest.approx([2.0, 2.0, 0.0])]


def test_gae_discounts_with_gamma_and_lambda():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, -1.0, 3.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.2, 0.7, -4.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # row 1 by hand: δ_2 = 1 − 0.1 = 0.9; δ_1 = 0.5·0.1 − 0.2 = −0.15, A_1 = −0.15 + 0.25·0.9 = 0.075;
    # δ_0 = 0.5·0.2 − 0.5 = −0.4, A_0 = −0.4 + 0.25·0.075 = −0.38125
    assert advantages[0].tolist() == pytest.approx([-0.38125, 0.075, 0.9])
    assert returns[0].tolist() == pytest.approx([-0.38125 + 0.5, 0.075 + 0.2, 0.9 + 0.1])
    expected_advantages, expected_returns = gae_by_hand(rewards.tolist(), values.tolist(), [3, 2], 0.5, 0.5)
    assert advantages.tolist() == [pytest.approx(row) for row in expected_advantages]
    assert returns.tolist() == [pytest.approx(row) for row in expected_returns]


def test_gae_matches_a_plain_loop_on_random_rows_of_different_lengths():
    generator = torch.Generator().manual_seed(1)
    lengths = [6, 1, 4, 0, 3]
    rewards, values = torch.randn(5, 6, generator=generator), torch.randn(5, 6, generator=generator)
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected_advantages, expected_returns = gae_by_hand(rewards.tolist(), values.tolist(), lengths, 0.9, 0.8)
    for row in range(5):
        assert advantages[row].tolist() == pytest.approx(expected_advantages[row], abs=1e-6)
        assert returns[row].tolist() == pytest.approx(expected_returns[row], abs=1e-6)


def test_policy_loss_clips_the_ratio_on_the_side_the_advantage_favours():
    # (advantage, ratio) per token, cliprange 0.2; the last token is masked out
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0, 100.0]])
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    old_logprobs = torch.full_like(ratios, -2.0)
    logprobs = (old_logprobs + ratios.log()).requires_grad_(True)
    loss, clipfrac, approxkl = policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    # per token max(−A·ρ, −A·clip(ρ, 0.8, 1.2)):
    #   A=+1, ρ=1.5: max(−1.5, −1.2) = −1.2 (clipped: no more credit past 1 + ε)
    #   A=+1, ρ=0.5: max(−0.5, −0.8) = −0.5 (not clipped: a loss on a good token is not capped)
    #   A=−1, ρ=0.5: max(0.5, 0.8) = 0.8 (clipped)
    #   A=−1, ρ=1.5: max(1.5, 1.2) = 1.5 (not clipped)
    #   A=+2, ρ=1.1: −2.2 (inside the range)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5 - 2.2) / 5)
    assert clipfrac.item() == pytest.approx(2 / 5)
    log_ratios = [math.log(r) for r in (1.5, 0.5, 0.5, 1.5, 1.1)]
    assert approxkl.item() == pytest.approx(0.5 * sum(x * x for x in log_ratios) / 5)
    # Where the clip decided, no gradient; elsewhere d(−A·ρ)/d log π = −A·ρ, over 5 tokens.
    loss.backward()
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, -0.5 / 5, 0.0, 1.5 / 5, -2.2 / 5, 0.0])


def test_a_gradient_step_on_the_policy_loss_raises_the_log_prob_of_tokens_with_positive_advantage():
    advantages = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    old = torch.tensor([[-1.0, -1.0]])
    logprobs = old.clone().requires_grad_(True)
    loss, _, _ = policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    loss.backward()
    step = logprobs - 0.1 * logprobs.grad
    assert step[0, 0] > old[0, 0] and step[0, 1] < old[0, 1]


def test_value_loss_takes_the_larger_of_the_clipped_and_unclipped_errors():
    values = torch.tensor([[1.0, 0.6, 0.0, 50.0]])
    old_values = torch.tensor([[0.5, 0.5, 0.5, 0.0]])
    returns = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    loss, clipfrac = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # V=1.0 clipped to 0.7: max(0², 0.3²) = 0.09 (the clipped term, larger);
    # V=0.6 inside 0.5 ± 0.2: 0.36 both; V=0.0 clipped to 0.3: max(1², 0.7²) = 1 (unclipped)
    assert loss.item() == pytest.approx(0.5 * (0.09 + 0.36 + 1.0) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    junk = -50.0  # masked out
    assert explained_variance(torch.tensor([[1.0, 2.0, 3.0, 4.0, junk]]), returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 5), 2.5), returns, mask) == pytest.approx(0.0)
    # residual (1, 0, 0, 0): variance 0.1875 against the returns' 1.25
    assert explained_variance(torch.tensor([[0.0, 2.0, 3.0, 4.0, junk]]), returns, mask) == pytest.approx(
        1 - 0.1875 / 1.25)
    assert math.isnan(explained_variance(returns, torch.ones(1, 5), mask))


def hand_rollout(mask_lengths: list[int], width: int, scores: list[float], logprobs=None, ref_logprobs=None):
    rows = len(mask_lengths)
    mask = torch.arange(width)[None, :] < torch.tensor(mask_lengths)[:, None]
    zeros = torch.zeros(rows, width)
    return Rollout(input_ids=torch.zeros(rows, width, dtype=torch.long), attention_mask=mask.long(),
                   position_ids=torch.zeros(rows, width, dtype=torch.long), answer_start=0,
                   answers=torch.zeros(rows, width, dtype=torch.long), mask=mask,
                   logprobs=zeros if logprobs is None else logprobs,
                   ref_logprobs=zeros if ref_logprobs is None else ref_logprobs, values=zeros.clone(),
                   scores=torch.tensor(scores), finished=torch.ones(rows, dtype=torch.bool))


def advantage_settings(**changes):
    from types import SimpleNamespace

    settings = dict(kl_coef=0.0, kl_estimator="k1", whiten_rewards=False, gamma=0.5, lam=1.0)
    return SimpleNamespace(args=SimpleNamespace(**{**settings, **changes}))


def test_the_score_lands_on_the_answers_last_real_token():
    """With no KL, V = 0, λ = 1 and γ = 0.5, the return at token t is 0.5^(last − t) ·
    score: it shows exactly where the score was added. Advantages are the returns
    whitened over the batch's real tokens."""
    rollout = hand_rollout([3, 1, 4], width=4, scores=[1.0, 2.0, -4.0])
    targets = PPOTrainer.advantages(advantage_settings(), rollout)
    assert targets["returns"].tolist() == [pytest.approx([0.25, 0.5, 1.0, 0.0]), pytest.approx([2.0, 0, 0, 0]),
                                           pytest.approx([-0.5, -1.0, -2.0, -4.0])]
    real = targets["returns"][rollout.mask]
    whitened = (real - real.mean()) / real.std()  # torch's std is the unbiased one
    assert targets["advantages"][rollout.mask].tolist() == pytest.approx(whitened.tolist(), abs=1e-5)
    assert (targets["advantages"][~rollout.mask] == 0).all()


def test_the_kl_penalty_is_subtracted_from_each_tokens_reward():
    # log π − log π_ref = 0.5 on every token, kl_coef 0.2: r_t = −0.1, plus the score at the end
    logprobs = torch.full((2, 3), -1.0)
    ref_logprobs = torch.full((2, 3), -1.5)
    rollout = hand_rollout([3, 2], width=3, scores=[1.0, 0.0], logprobs=logprobs, ref_logprobs=ref_logprobs)
    targets = PPOTrainer.advantages(advantage_settings(kl_coef=0.2, gamma=1.0), rollout)
    assert targets["kl"].tolist() == [pytest.approx([0.5, 0.5, 0.5]), pytest.approx([0.5, 0.5, 0.0])]
    assert targets["non_score"].tolist() == [pytest.approx([-0.1, -0.1, -0.1]), pytest.approx([-0.1, -0.1, 0.0])]
    # γ = λ = 1, V = 0: the return is the reward to go
    assert targets["returns"].tolist() == [pytest.approx([0.7, 0.8, 0.9]), pytest.approx([-0.2, -0.1, 0.0])]


def test_a_rollout_cuts_each_answer_after_its_first_eos_when_pad_is_eos(tmp_path):
    """The tokenizer pads with its EOS (as many chat models do): each sampled row is cut
    after its first EOS (the EOS is the answer's last action), what follows it is masked,
    the reward reads exactly the kept ids, and the log-probs and values of a padded row are
    those of the same prompt and answer scored alone."""
    from cai import models
    from cai.training.ppo import PPOConfig, backbone

    tokenizer = models.load_tokenizer(models.TINY, padding_side="left")
    tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    policy = models.load_causal_lm(models.TINY, "cpu")
    reference = models.load_causal_lm(models.TINY, "cpu")
    value_model = models.load_reward_model(models.TINY, tokenizer)
    prompts = [[{"role": "user", "content": text}] for text in
               ("Hi", "Which of these assistant responses is less harmful?", "Please rewrite the response", "Why?")]
    seen = {}

    def reward(prompts, completions, completion_ids, **_):
        seen.update(completions=completions, completion_ids=completion_ids)
        return [1.0, 2.0, 3.0, 4.0]

    args = PPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, response_length=5, temperature=0.7,
                     missing_eos_penalty=1.0, report_to=[], use_cpu=True, bf16=False, seed=0)
    trainer = PPOTrainer(args, policy, tokenizer, prompts, reward, reference=reference, value_model=value_model)
    sampled = [[5, 6, eos, eos, eos], [7, eos, 8, 9, eos], [5, 6, 7, 8, 9], [eos] * 5]
    engine = trainer.engine()
    engine.generate_tokens = lambda prompt_ids, sampling, seed: [list(row) for row in sampled]
    rollout = trainer.rollout(0)

    kept = [[5, 6, eos], [7, eos], [5, 6, 7, 8, 9], [eos]]
    assert seen["completion_ids"] == kept
    assert [c[0]["content"] for c in seen["completions"]] == [
        tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in ([5, 6], [7], [5, 6, 7, 8, 9], [])]
    assert rollout.mask.tolist() == [[True] * 3 + [False] * 2, [True] * 2 + [False] * 3, [True] * 5,
                                     [True] + [False] * 4]
    assert rollout.finished.tolist() == [True, True, False, True]
    assert rollout.scores.tolist() == [1.0, 2.0, 2.0, 4.0]  # the unfinished answer loses missing_eos_penalty
    start = rollout.answer_start
    assert torch.equal(rollout.attention_mask[:, start:].bool(), rollout.mask)
    order = trainer.prompts_of_update(0)
    for row, answer in enumerate(kept):
        assert rollout.answers[row, :len(answer)].tolist() == answer
        prompt = trainer.prompt_ids[order[row]]
        assert rollout.attention_mask[row, :start].sum() == len(prompt)
        alone = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = policy(alone).logits[0, len(prompt) - 1:-1] / 0.7
            hidden = backbone(value_model)(alone).last_hidden_state[0, len(prompt) - 1:-1]
            values = value_model.score(hidden).squeeze(-1)
        logprobs = logits.log_softmax(-1)[torch.arange(len(answer)), torch.tensor(answer)]
        assert rollout.logprobs[row, :len(answer)].tolist() == pytest.approx(logprobs.tolist(), abs=1e-5)
        assert rollout.ref_logprobs[row, :len(answer)].tolist() == pytest.approx(logprobs.tolist(), abs=1e-5)
        assert rollout.values[row, :len(answer)].tolist() == pytest.approx(values.tolist(), abs=1e-5)


def shared_lora_wrapper():
    """A tiny policy with cai's two LoRA adapters, both random (at LoRA's usual zero init
    the two adapters would compute the same thing and hide a mix-up), and a random head."""
    from peft import LoraConfig

    from cai import models
    from cai.training.ppo import lora_policy_and_value

    policy = models.load_causal_lm(models.TINY, "cpu")
    torch.manual_seed(0)  # after the load: building builtin:tiny the first time draws from the same generator
    wrapper = lora_policy_and_value(policy, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        wrapper.value_head.weight.normal_()
    return wrapper


def test_recomputed_activations_give_the_shared_bases_gradients_of_each_adapter():
    """With activation checkpointing, backward recomputes the value pass's layers after the
    forward has switched back to the policy adapter: each recompute must run under the
    adapter of its own forward (without that, the value adapter's gradients are off by
    about 10³ here)."""
    from cai.training.ppo import token_logprobs

    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        wrapper = shared_lora_wrapper()
        wrapper.train()
        if checkpointing:
            wrapper.activation_checkpointing_enable()
        logits, values = wrapper(ids, attention, attention.cumsum(1) - 1, 6)
        (token_logprobs(logits, ids[:, 6:]).sum() + (values ** 2).sum()).backward()
        return {n: p.grad for n, p in wrapper.named_parameters() if p.grad is not None}

    plain, recomputed = gradients(False), gradients(True)
    assert plain.keys() == recomputed.keys()
    assert any(".value." in name for name in plain) and any(".default." in name for name in plain)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-4, atol=1e-5)


def test_ppo_recomputes_activations_when_asked(tmp_path):
    """`activation_checkpointing: true` reaches the model (cai's PPO has its own training
    loop, so the Trainer's own `train`, which sets it, never runs)."""
    from peft import LoraConfig

    from cai import models
    from cai.training.ppo import PPOConfig

    tokenizer = models.load_tokenizer(models.TINY, padding_side="left")
    prompts = [[{"role": "user", "content": text}] for text in ("Hi", "Why?")]
    args = PPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, total_episodes=2, response_length=3,
                     activation_checkpointing=True, report_to=[], use_cpu=True, bf16=False, seed=0,
                     save_strategy="no")
    trainer = PPOTrainer(args, models.load_causal_lm(models.TINY, "cpu"), tokenizer, prompts,
                         lambda prompts, completions, **_: [1.0] * len(completions),
                         peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    policy = trainer.model.policy
    assert not policy.is_activation_checkpointing
    trainer.train()
    assert policy.is_activation_checkpointing


# ---------------------------------------------------------------- the optimisers learn


class UpperHalfShare:
    """A scripted reward: the share of an answer's tokens whose id is in the upper half of
    the vocabulary (the EOS, id 2, is not), or a `constant` in its place. Each call records
    the batch's mean share, the measure the tests compare."""

    def __init__(self, vocabulary: int, constant: float | None = None):
        self.__name__ = "upper_half"  # the name TRL logs the reward under
        self.half = vocabulary // 2
        self.constant = constant
        self.measure: list[float] = []

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]], **_) -> list[float]:
        shares = [sum(token >= self.half for token in ids) / len(ids) if ids else 0.0 for ids in completion_ids]
        self.measure.append(sum(shares) / len(shares))
        return shares if self.constant is None else [self.constant] * len(shares)

    def counts(self) -> dict:
        return {"reward": "scripted"}


# Answers of 8 tokens, batches of 8 answers, no KL penalty, a large step: the tiny policy
# learns in seconds. PPO: 96 episodes = 12 updates (4 epochs each); RLOO, GRPO: 20 steps,
# 2 prompts x 4 answers each.
LEARNING = ("rl.max_new_tokens=8", "rl.kl_coef=0", "rl.per_device_train_batch_size=8", "rl.learning_rate=3e-2",
            "rl.temperature=1.0")
UPDATES = {"ppo": ("rl.total_episodes=96",), "rloo": ("rl.num_generations=4", "rl.max_steps=20"),
           "grpo": ("rl.num_generations=4", "rl.max_steps=20")}
CALLS = {"ppo": 12, "rloo": 20, "grpo": 20}  # one reward call per update
# The share starts near 0.5 and ends near 1 when learned (rise ≥ 0.31 over seeds 0-2); with a
# constant reward it wanders by less than 0.1.
MARGIN = 0.25


def train_on(run_dir, monkeypatch, algorithm: str, reward: UpperHalfShare) -> list[float]:
    """Run the rl stage with `reward` in place of the reward model; the measure per update."""
    import cai.stages.rl
    from cai.execute.executor import run_one as run_stage

    monkeypatch.setattr(cai.stages.rl, "reward_function", lambda ctx, cfg, device: reward)
    manifest = run_stage(make_run(run_dir, f"rl.algorithm={algorithm}", *LEARNING, *UPDATES[algorithm]), "rl")
    assert manifest["counts"]["reward"] == "scripted"
    assert len(reward.measure) == CALLS[algorithm]
    return reward.measure


def rise(measure: list[float]) -> float:
    """The mean of the last 3 updates' measure over that of the first 2."""
    return sum(measure[-3:]) / 3 - sum(measure[:2]) / 2


def vocabulary_size(run_dir) -> int:
    from cai import models

    return len(models.load_tokenizer(str(run_dir / "sft" / "model")))


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo"])
def test_each_algorithm_raises_a_scripted_reward(sft_run, monkeypatch, algorithm):
    measure = train_on(sft_run, monkeypatch, algorithm, UpperHalfShare(vocabulary_size(sft_run)))
    assert rise(measure) >= MARGIN, f"{algorithm} did not learn: {[round(m, 2) for m in measure]}"


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo"])
def test_a_constant_reward_does_not_raise_the_same_measure(sft_run, monkeypatch, algorithm):
    measure = train_on(sft_run, monkeypatch, algorithm, UpperHalfShare(vocabulary_size(sft_run), constant=0.5))
    assert rise(measure) < MARGIN, f"{algorithm} moved without a signal: {[round(m, 2) for m in measure]}"
