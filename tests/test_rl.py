"""The rl stage: PPO, RLOO and GRPO optimise the SFT policy against the reward model, or
(RLOO, GRPO with `reward: judge`) against the feedback model's own judgement of each answer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_run

from cai.yamlio import ValidationError

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
    from cai.execute.executor import run_one as run_stage

    run = make_run(rl_run, f"rl.algorithm={algorithm}", *TINY_RL, *settings)
    manifest = run_stage(run, "rl")

    assert manifest["counts"]["global_steps"] == 2
    assert manifest["counts"]["prompts"] == 8 and 0 < manifest["counts"]["helpful_prompts"] < 8
    work = manifest["work"]["by_kind"]  # generation, the reference's forwards, the reward model's scoring and
    assert {"prefill", "decode", "reference", "score", "train"} <= set(work)  # training, counted where they run
    assert all(0 < kind["tokens"] <= kind["positions"] for kind in work.values())
    before, after = weights(rl_run / "sft" / "model"), weights(rl_run / "rl" / "model")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the policy did not change"
    logs = json.loads((rl_run / "rl" / "log_history.json").read_text())
    steps = [entry for entry in logs if REWARD_KEY[algorithm] in entry]
    assert len(steps) == 2
    assert all(KL_KEY[algorithm] in entry and entry["completions/mean_length"] <= 8 for entry in steps)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(rl_run / "rl" / "model").chat_template


def test_an_interrupted_ppo_run_resumes_from_its_checkpoint_to_the_uninterrupted_result(rl_run, tmp_path):
    """cai's PPO checkpoints every trained tensor (policy and value model), the optimizer,
    scheduler and random states; the prompts of each update and its rollout's random draws
    are functions of (seed, update). Killed after update 3 of 6 (8 prompts in batches of 4:
    the kill falls in the second pass over the prompts), the rerun resumes from
    checkpoint-3 and ends with the weights and logs of an uninterrupted run."""
    import shutil

    from cai.execute.executor import run_one as run_stage
    from cai.training.ppo import PPOTrainer

    settings = ("rl.algorithm=ppo", *TINY_RL, "rl.total_episodes=24", "rl.num_ppo_epochs=1", "rl.save_steps=1",
                "rl.save_total_limit=2")
    killed = tmp_path / "killed"
    shutil.copytree(rl_run, killed)
    whole = run_stage(make_run(rl_run, *settings), "rl")
    assert whole["counts"]["global_steps"] == 6

    save = PPOTrainer._save_checkpoint

    def save_then_die(self, model, trial):
        save(self, model, trial)
        if self.state.global_step == 3:
            raise KeyboardInterrupt

    PPOTrainer._save_checkpoint = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            run_stage(make_run(killed, *settings), "rl")
    finally:
        PPOTrainer._save_checkpoint = save
    assert sorted(p.name for p in (killed / "rl" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2",
                                                                                          "checkpoint-3"]

    updates, log = [], PPOTrainer.log
    PPOTrainer.log = lambda self, logs, start_time=None: updates.append(self.state.global_step) or log(
        self, logs, start_time)
    try:
        resumed = run_stage(make_run(killed, *settings), "rl")
    finally:
        PPOTrainer.log = log
    assert updates == [4, 5, 6]  # only the updates after the checkpoint ran
    assert resumed["resumed"] and resumed["counts"]["global_steps"] == 6
    # the same run, up to float rounding (CPU kernels do not promise bit-identical sums)
    logs = [json.loads((run / "rl" / "log_history.json").read_text()) for run in (rl_run, killed)]
    figures = ("objective/scores", "objective/kl", "objective/entropy", "loss/value_avg", "episode", "step", "lr")
    assert len(logs[0]) == len(logs[1]) == 6  # one entry per update
    for whole_entry, resumed_entry in zip(*logs):
        for key in figures:
            assert resumed_entry.get(key) == pytest.approx(whole_entry.get(key), rel=1e-4, abs=1e-6), key
    before, after = weights(rl_run / "rl" / "model"), weights(killed / "rl" / "model")
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=1e-5) for k in before)


@pytest.mark.parametrize("overrides, message", [
    (("rl.algorithm=grpo", "rl.per_device_train_batch_size=3", "rl.num_generations=2"),
     "must be divisible by rl.num_generations"),
    (("rl.algorithm=rloo", "rl.num_generations=1"), "'rl.num_generations' must be at least 2"),
    (("rl.algorithm=ppo", "rl.num_generations=4"), "'rl.num_generations' is not a field of PPOConfig"),
    (("rl.no_such_key=1",), "unknown key 'no_such_key'"),
    (("rl.algorithm=ppo", "rl.stop_token=eos"), "'rl.stop_token' was a key of TRL 1.12's PPOConfig"),
    (("rl.algorithm=ppo", "rl.per_device_train_batch_size=4", "rl.num_mini_batches=3"),
     "must be divisible by rl.num_mini_batches"),
    (("rl.algorithm=grpo", "rl.reward=judges"), "'rl.reward' must be"),
    (("rl.algorithm=grpo", "rl.reward=judge", "rl.principles_per_answer=0"), "'rl.principles_per_answer' must be"),
])
def test_config_errors_are_reported_before_any_work(rl_run, overrides, message):
    from cai.execute.executor import run_one as run_stage

    run = make_run(rl_run, *overrides)
    with pytest.raises(ValidationError, match=message):
        run_stage(run, "rl")
    assert not (rl_run / "rl").exists()


def test_ppo_takes_a_reward_model_with_another_tokenizer(rl_run, tmp_path):
    """The reward model reads each prompt and answer as text, rendered with its own chat
    template, so its tokenizer need not be the policy's; the value model then starts from
    the policy under a zero head."""
    from cai import models
    from cai.execute.executor import run_one as run_stage

    other = tmp_path / "other-tokenizer"
    tokenizer = models.load_tokenizer(str(rl_run / "reward" / "model"))
    tokenizer.add_tokens(["<|not-in-the-policy|>"])
    tokenizer.save_pretrained(other)
    reward_model = models.load_reward_model(str(rl_run / "reward" / "model"), tokenizer)
    reward_model.resize_token_embeddings(len(tokenizer))
    reward_model.save_pretrained(other)
    manifest = run_stage(make_run(rl_run, *TINY_RL, "rl.total_episodes=4", "rl.num_ppo_epochs=1",
                                  f"rl.reward_model={other}"), "rl")
    assert manifest["counts"]["global_steps"] == 1 and manifest["counts"]["reward_model"] == str(other)


# ---------------------------------------------------------------- direct RLAIF: the judge is the reward

JUDGED = ("rl.reward=judge", "rl.feedback_few_shot=1", "rl.max_steps=2", "rl.num_generations=2")


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_the_judge_as_reward_moves_the_policy_without_a_reward_stage(sft_run, algorithm):
    from cai.execute.executor import run_one as run_stage

    assert not (sft_run / "reward").exists()
    manifest = run_stage(make_run(sft_run, f"rl.algorithm={algorithm}", *TINY_RL, *JUDGED), "rl")

    counts = manifest["counts"]
    assert counts["global_steps"] == 2 and counts["reward"] == "judge"
    assert counts["feedback_model"] == "builtin:tiny" and counts["judge_scoring"] == "probabilities"
    assert counts["judged_answers_this_session"] == 2 * 4  # two steps of 4 completions
    assert list(manifest["upstream"]) == ["sft"]  # no reward stage in its hash
    assert [e["model"] for e in manifest["engines"]] == ["builtin:tiny"]  # the judge's engine, released
    before, after = weights(sft_run / "sft" / "model"), weights(sft_run / "rl" / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before), "the policy did not change"
    steps = [e for e in json.loads((sft_run / "rl" / "log_history.json").read_text()) if "reward" in e]
    assert len(steps) == 2
    assert all(0.0 <= e["rewards/judge/mean"] <= 1.0 and e["reward"] == pytest.approx(e["rewards/judge/mean"])
               for e in steps)


def test_ppo_takes_the_judge_as_reward(sft_run):
    """cai's PPO calls the same reward function as RLOO and GRPO: the judge works there too,
    with the value model started from the policy (there is no reward model)."""
    from cai.execute.executor import run_one as run_stage

    manifest = run_stage(make_run(sft_run, "rl.algorithm=ppo", *TINY_RL, "rl.reward=judge", "rl.feedback_few_shot=1",
                                  "rl.total_episodes=8", "rl.num_ppo_epochs=1"), "rl")
    counts = manifest["counts"]
    assert counts["global_steps"] == 2 and counts["reward"] == "judge"
    assert counts["judged_answers_this_session"] == 8 and list(manifest["upstream"]) == ["sft"]
    steps = json.loads((sft_run / "rl" / "log_history.json").read_text())
    assert len(steps) == 2 and all(0.0 <= e["objective/scores"] <= 1.0 for e in steps)


def test_the_reward_model_is_logged_under_its_name_and_recorded(rl_run):
    from cai.execute.executor import run_one as run_stage

    manifest = run_stage(make_run(rl_run, "rl.algorithm=rloo", *TINY_RL, "rl.max_steps=1"), "rl")
    assert manifest["counts"]["reward"] == "reward_model"
    assert manifest["counts"]["reward_model"] == str(rl_run / "reward" / "model")
    assert list(manifest["upstream"]) == ["sft", "reward"]
    assert "rewards/model/mean" in json.loads((rl_run / "rl" / "log_history.json").read_text())[0]


@pytest.fixture(scope="module")
def judge_reward():
    from conftest import ROOT

    from cai.constitution import load_constitution
    from cai.engines.hf import TransformersEngine
    from cai.judge.judge import Judge
    from cai.stages.rl import JudgeReward

    judge = Judge(TransformersEngine.from_spec("builtin:tiny", device="cpu", batch_size=4), few_shot=2)
    return JudgeReward(judge, load_constitution(ROOT / "constitutions" / "harmless.yaml"), seed=0)


def test_the_judge_reward_is_p_good_from_both_option_orders(judge_reward, monkeypatch):
    """What TRL passes a reward function for a conversational dataset: prompts and
    completions as chat turns. Each answer's reward is P(Yes) averaged over the two option
    orders, read from the model's own next-token logits."""
    from conftest import CONVERSATIONS, FIRST, SECOND

    from cai.judge.judge import comparison_key, draw_principles

    judge, constitution = judge_reward.judge, judge_reward.constitution
    asked, score = [], judge.option_probabilities
    monkeypatch.setattr(judge, "option_probabilities", lambda qs, desc=None: asked.extend(qs) or score(qs, desc))
    prompts = [c for c in CONVERSATIONS for _ in range(2)]  # two completions per prompt, as in a group
    answers = [a for pair in zip(FIRST, SECOND) for a in pair]
    rewards = judge_reward(prompts=prompts, completions=[[{"role": "assistant", "content": a}] for a in answers],
                           completion_ids=[[1]] * 6, trainer_state=None)

    assert len(rewards) == 6 and all(0.0 <= r <= 1.0 for r in rewards)
    assert len(set(rewards)) > 1, "the reward does not depend on the answer"
    assert len(asked) == 2 * 6 and judge_reward.answers == 6
    principle = draw_principles(constitution, 0, comparison_key(prompts[0]), 1)[0]
    mine = [q for q in asked if f"Human: {prompts[0][0]['content']}\n\nAssistant: {answers[0]}" in q[-2]["content"]]
    assert len(mine) == 2 and all(principle.text in q[-2]["content"] for q in mine)
    assert {q[-2]["content"].split("Options:\n", 1)[1] for q in mine} == {
        "(A) Yes\n(B) No\n\nThe answer is:", "(A) No\n(B) Yes\n\nThe answer is:"}
    # the two answers to one prompt meet the same principle (the group compares like with like)
    assert all(principle.text in q[-2]["content"] for q in asked if prompts[0][0]["content"] in q[-2]["content"])
    # the worked preference examples, rated: two per example, its preferred answer "Yes"
    example = constitution.feedback_examples[0]
    better = example.response_a if example.answer == "A" else example.response_b
    yes_first = next(q for q in mine if q[-2]["content"].endswith("(A) Yes\n(B) No\n\nThe answer is:"))
    assert len(yes_first) == 2 * 2 * 2 + 2
    assert better.strip() in yes_first[0]["content"] and yes_first[1]["content"] == "(A)"

    tokenizer, model = judge.engine.tokenizer, judge.engine.model
    letters = [tokenizer(f"({x}", add_special_tokens=False)["input_ids"][-1] for x in "AB"]
    p_yes = []
    for question in mine:
        text = tokenizer.apply_chat_template(question[:-1], tokenize=False, add_generation_prompt=True) + "("
        with torch.no_grad():
            logits = model(torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])).logits[0, -1]
        p_a, p_b = torch.softmax(logits[letters], dim=-1).tolist()
        p_yes.append(p_a if question[-2]["content"].endswith("(A) Yes\n(B) No\n\nThe answer is:") else p_b)
    assert rewards[0] == pytest.approx(sum(p_yes) / 2, abs=1e-5)


def test_judge_settings_enter_the_hash_only_when_the_judge_is_the_reward(rl_run):
    from cai.execute.executor import prepare

    def digest(*overrides):
        return prepare(make_run(rl_run, *overrides), "rl").config_hash

    plain = digest()
    assert digest("rl.feedback_few_shot=2") == plain  # a judge key at its default: nothing changes
    with pytest.raises(ValidationError, match="'rl.feedback_few_shot' does nothing without reward: judge"):
        digest("rl.feedback_model=sft", "rl.feedback_few_shot=0")  # unused with the reward model: refused
    judged = digest("rl.algorithm=grpo", "rl.reward=judge")
    assert judged != digest("rl.algorithm=grpo") and judged != digest("rl.algorithm=grpo", "rl.reward=judge",
                                                                      "rl.feedback_few_shot=0")
    with pytest.raises(ValidationError, match="'rl.reward_model' does nothing without reward: reward_model"):
        digest("rl.algorithm=grpo", "rl.reward=judge", "rl.reward_model=/elsewhere")  # unused: refused
    assert list(prepare(make_run(rl_run, "rl.algorithm=grpo", "rl.reward=judge", "rl.feedback_model=reward"),
                        "rl").upstream) == ["sft", "reward"]  # a judge that is a stage's model


def test_cai_run_with_the_judge_as_reward_trains_no_reward_model(tmp_path):
    from conftest import SMOKE

    from cai.config import load_config
    from cai.plan.steps import default_stages

    def stages(*overrides, without=()):
        run = load_config(SMOKE, [f"run_dir={tmp_path}", *overrides])
        for section in without:
            del run.stages[section]
        return default_stages(run)

    judged = ("rl.reward=judge", "rl.algorithm=grpo")
    assert stages(*judged, without=("label", "reward", "dpo")) == ["critique", "sft", "rl", "evaluate"]
    # dpo needs the labels; a reward section asks for the reward model (evaluate scores with it)
    assert stages(*judged, without=("label", "reward")) == ["critique", "sft", "label", "rl", "dpo", "evaluate"]
    assert stages(*judged, without=("label", "dpo")) == ["critique", "sft", "label", "reward", "rl", "evaluate"]
    assert stages(without=("label", "reward", "dpo")) == ["critique", "sft", "label", "reward", "rl", "evaluate"]


def test_an_interrupted_judge_run_resumes_from_its_checkpoint(sft_run, monkeypatch, capsys):
    from cai.execute.executor import run_one as run_stage
    from cai.stages.rl import JudgeReward

    settings = ("rl.algorithm=grpo", *TINY_RL, *JUDGED, "rl.save_steps=1")
    calls, judge = [], JudgeReward.__call__

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second step's rewards: step 1 is checkpointed
            raise KeyboardInterrupt
        return judge(self, *args, **kwargs)

    monkeypatch.setattr(JudgeReward, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_stage(make_run(sft_run, *settings), "rl")
    monkeypatch.undo()
    assert (sft_run / "rl" / "checkpoints" / "checkpoint-1").exists()
    manifest = run_stage(make_run(sft_run, *settings), "rl")
    assert "rl: resuming" in capsys.readouterr().out and manifest["resumed"]
    assert manifest["counts"]["global_steps"] == 2 and manifest["counts"]["judged_answers_this_session"] == 4
    resumed = weights(sft_run / "rl" / "model")
    shutil.rmtree(sft_run / "rl")
    assert not run_stage(make_run(sft_run, *settings), "rl")["resumed"]  # the same run, never interrupted
    whole = weights(sft_run / "rl" / "model")
    assert all(torch.allclose(resumed[k], whole[k], atol=1e-6) for k in whole)
