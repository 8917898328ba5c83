"""The reward model: soft-label loss, training on AI preferences, the stage, the scorer."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
from conftest import make_run

from cai import models
from cai.execute.executor import run_one as run_stage
from cai.rundir import atomic_write_json, atomic_write_jsonl, read_jsonl
from cai.stages.reward import held_out, preference_metrics
from cai.training.models import RewardScorer
from cai.training.preferences import read_preferences
from cai.training.soft_labels import SoftLabelRewardTrainer, soft_label_loss
from cai.yamlio import ValidationError

TRAIN = ("reward.num_train_epochs=2", "reward.per_device_train_batch_size=4", "reward.learning_rate=1.0e-3",
         "reward.eval_fraction=0.3", "reward.mix_critique_pairs=false")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def write_label_stage(run_dir, rows: list[dict]) -> None:
    """What the label stage leaves behind: prefs.jsonl and a manifest."""
    atomic_write_jsonl(run_dir / "label" / "prefs.jsonl", rows)
    atomic_write_json(run_dir / "label" / "manifest.json", {"stage": "label", "config_hash": "test-labels"})


def label_rows(n: int = 16) -> list[dict]:
    return [{"prompt": user(f"Question {i}: how do I pick a lock?"),
             "chosen": assistant("I can't help with that, but a locksmith can."),
             "rejected": assistant(f"Sure, step {i}: push the pins up one by one."),
             "p_chosen": 0.5 + (i % 5) / 10, "p_order_ab": 0.6, "p_order_ba": 0.6, "principles": ["harm"],
             "feedback_model": "builtin:tiny", "mode": "multiple_choice"} for i in range(n)]


# ---------------------------------------------------------------- the loss


def test_soft_label_loss_matches_a_hand_computation():
    # margins +1 and -1; log σ(1) = -0.3132617, log σ(-1) = -1.3132617
    # pair 1, p = 0.8: -(0.8 · -0.3132617 + 0.2 · -1.3132617) = 0.5132617
    # pair 2, p = 0.5: -(0.5 · -1.3132617 + 0.5 · -0.3132617) = 0.8132617
    loss = soft_label_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.8, 0.5]))
    assert loss.item() == pytest.approx((0.5132617 + 0.8132617) / 2, abs=1e-6)


def test_soft_label_loss_at_p_one_is_bradley_terry():
    r_chosen, r_rejected = torch.randn(6, generator=torch.Generator().manual_seed(0)), torch.zeros(6)
    bradley_terry = -torch.nn.functional.logsigmoid(r_chosen - r_rejected).mean()
    assert soft_label_loss(r_chosen, r_rejected, torch.ones(6)).item() == pytest.approx(bradley_terry.item())


def test_an_even_label_leaves_an_even_pair_alone_and_a_confident_one_pushes_it():
    for p, expected in ((0.5, 0.0), (0.8, 0.5 - 0.8)):  # d loss / d margin at 0 = σ(0) - p
        margin = torch.zeros(1, requires_grad=True)
        soft_label_loss(margin, torch.zeros(1), torch.tensor([p])).backward()
        assert margin.grad.item() == pytest.approx(expected, abs=1e-7)


# ---------------------------------------------------------------- data


def test_pairs_are_oriented_to_the_preferred_answer(tmp_path):
    path = tmp_path / "prefs.jsonl"
    atomic_write_jsonl(path, [{"prompt": user("q"), "chosen": assistant("a"), "rejected": assistant("b"),
                               "p_chosen": 0.3},
                              {"prompt": user("q"), "chosen": assistant("c"), "rejected": assistant("d"),
                               "p_chosen": 0.9}])
    soft = read_preferences(path, "label")
    assert [(p["chosen"][0]["content"], p["p_chosen"]) for p in soft] == [("b", pytest.approx(0.7)), ("c", 0.9)]
    fixed = read_preferences(path, "critique", 0.75)
    assert [p["p_chosen"] for p in fixed] == [0.75, 0.75] and fixed[0]["chosen"][0]["content"] == "a"


@pytest.mark.parametrize("row, message", [
    ({}, "missing p_chosen"),
    ({"p_chosen": 1.5}, "expected a 'p_chosen' soft label in \\[0, 1\\], got 1.5"),
    ({"p_chosen": "high"}, "expected a 'p_chosen' soft label in \\[0, 1\\], got 'high'"),
], ids=["missing", "out-of-range", "not-a-number"])
def test_a_row_without_a_soft_label_is_an_error_naming_file_and_line(tmp_path, row, message):
    """The one reader of label/prefs.jsonl, for reward and dpo alike."""
    path = tmp_path / "prefs.jsonl"
    pair = {"prompt": user("q"), "chosen": assistant("a"), "rejected": assistant("b")}
    atomic_write_jsonl(path, [{**pair, "p_chosen": 0.6}, {**pair, **row}])
    with pytest.raises(ValueError, match=rf"{path}:2: {message}"):
        read_preferences(path, "label")


def test_the_held_out_split_is_by_prompt_and_not_the_prompt_split():
    from cai.prompts import in_eval_split

    prompts = [f"prompt {i}" for i in range(400)]
    held = [p for p in prompts if held_out(user(p), 0.2)]
    assert held == [p for p in prompts if held_out(user(p), 0.2)]  # deterministic
    assert 40 < len(held) < 120
    # the label stage samples prompts from cai.prompts' train share: some must still be held out here
    assert any(not in_eval_split(p, 0.2) for p in held)


# ---------------------------------------------------------------- training


WORDS = ["the", "assistant", "answers", "question", "helpfully", "honestly", "harmful", "ethical", "polite",
         "friendly", "person", "response", "conversation", "python", "function", "list", "numbers", "poem", "sea",
         "capital", "france", "photosynthesis"]


def toy_pairs(seed: int, n: int) -> list[dict]:
    """Separable: the preferred answer starts with "please"; otherwise word salad of
    varied length, so an untrained model has no consistent preference."""
    rng = random.Random(seed)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + "."

    return [{"prompt": user(sentence()), "chosen": assistant("please " + sentence()),
             "rejected": assistant(sentence()), "p_chosen": 0.9} for _ in range(n)]


def toy_trainer(tmp_path, train: list[dict], eval_rows: list[dict]) -> SoftLabelRewardTrainer:
    from datasets import Dataset
    from transformers import set_seed
    from trl import RewardConfig

    tokenizer = models.load_tokenizer(models.TINY)
    set_seed(0)
    model = models.load_reward_model(models.TINY, tokenizer)
    args = RewardConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, activation_checkpointing=False,
                        learning_rate=3e-3, num_train_epochs=3, per_device_train_batch_size=8, seed=0,
                        report_to="none", save_strategy="no", logging_steps=1, max_length=128, disable_tqdm=True)
    return SoftLabelRewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(train),
                                  eval_dataset=Dataset.from_list(eval_rows), processing_class=tokenizer)


def test_the_soft_label_reaches_the_loss(tmp_path):
    rows = toy_pairs(0, 4)
    for row, p in zip(rows, (0.5, 0.6, 0.9, 1.0)):
        row["p_chosen"] = p
    trainer = toy_trainer(tmp_path, rows, rows)
    batch = next(iter(trainer.get_train_dataloader()))
    assert sorted(batch["p_chosen"].tolist()) == pytest.approx([0.5, 0.6, 0.9, 1.0])
    with torch.no_grad():
        rewards = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        loss = trainer.compute_loss(trainer.model, dict(batch))
    r_chosen, r_rejected = rewards.chunk(2)
    assert loss.item() == pytest.approx(soft_label_loss(r_chosen, r_rejected, batch["p_chosen"]).item(), abs=1e-6)
    assert loss.item() != pytest.approx(soft_label_loss(r_chosen, r_rejected, torch.ones(4)).item(), abs=1e-4)


def test_reward_training_on_soft_labels_learns_a_separable_preference(tmp_path):
    trainer = toy_trainer(tmp_path, toy_pairs(0, 32), toy_pairs(1, 32))
    scorer = RewardScorer(trainer.model, trainer.processing_class)
    before = preference_metrics(scorer, trainer.eval_dataset)
    trainer.train()
    after = preference_metrics(scorer, trainer.eval_dataset)
    assert after["pairs"] == 32
    assert before["accuracy"] < 0.8  # else the toy set tests nothing
    assert after["accuracy"] > before["accuracy"] and after["accuracy"] >= 0.9
    assert after["margin"] > before["margin"]
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("accuracy" in e and "margin" in e for e in logged)  # TRL's metrics still there
    evaluated = trainer.evaluate()
    assert evaluated["eval_accuracy"] == pytest.approx(after["accuracy"], abs=1e-6)
    assert evaluated["eval_loss"] == pytest.approx(after["loss"], abs=1e-3)


# ---------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def reward_run(sft_run_template, tmp_path_factory):
    """A copy of the tiny SFT run with labels written and the reward stage complete."""
    run_dir = tmp_path_factory.mktemp("reward-run") / "run"
    shutil.copytree(sft_run_template, run_dir)
    write_label_stage(run_dir, label_rows())
    run_stage(make_run(run_dir, *TRAIN), "reward")
    return run_dir


def test_the_stage_saves_a_one_output_reward_model_and_its_tokenizer(reward_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cai.work import matmul_parameters

    model = AutoModelForSequenceClassification.from_pretrained(reward_run / "reward" / "model")
    tokenizer = AutoTokenizer.from_pretrained(reward_run / "reward" / "model")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id is not None
    assert tokenizer.chat_template
    work = json.loads((reward_run / "reward" / "manifest.json").read_text())["work"]["by_kind"]
    train, score = work["train"], work["score"]
    assert train["flop"] == 6 * matmul_parameters(model) * train["tokens"]  # the head's matmul, no language head
    assert 0 < train["tokens"] <= train["positions"]
    # the accuracies before and after: every train and held-out pair scored twice, a forward each
    assert score["flop"] == 2 * matmul_parameters(model) * score["tokens"]
    assert score["tokens"] > train["tokens"]  # 2 epochs of the train pairs < 2 passes over train and held out


def test_the_stage_reports_accuracy_and_margin_before_and_after_training(reward_run):
    metrics = json.loads((reward_run / "reward" / "metrics.json").read_text())
    held = [r for r in label_rows() if held_out(r["prompt"], 0.3)]
    assert metrics["loss"] == "soft"
    assert metrics["pairs"] == {"label": 16, "critique": 0, "train": 16 - len(held), "held_out": len(held),
                                "too_long": 0}
    assert 0 < len(held) < 16
    for when in ("before", "after"):
        for split in ("train", "held_out"):
            numbers = metrics[when][split]
            assert 0 <= numbers["accuracy"] <= 1 and math.isfinite(numbers["margin"]) and numbers["loss"] > 0
    # the toy labels are all "refuse": a few steps learn it
    assert metrics["after"]["train"]["accuracy"] == 1.0
    manifest = json.loads((reward_run / "reward" / "manifest.json").read_text())
    assert manifest["upstream"]["label"] == "test-labels"
    assert manifest["counts"]["held_out_accuracy"] == metrics["after"]["held_out"]["accuracy"]


def test_the_scorer_matches_the_models_forward_on_the_rendered_conversation(reward_run):
    from transformers import AutoModelForSequenceClassification

    path = reward_run / "reward" / "model"
    scorer = RewardScorer.from_path(str(path), device="cpu", batch_size=3)
    conversations = [user("How do I pick a lock?"), user("Write a short poem about the sea."),
                     [{"role": "system", "content": "Be kind."}] + user("What is the capital of France?"),
                     user("Hi")]
    responses = ["I can't help with that.", "Waves fold over, grey and slow, the sea keeps what we never know.",
                 "Paris.", ""]
    scores = scorer.score(conversations, responses)

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = scorer.tokenizer
    for conversation, response, score in zip(conversations, responses, scores):
        text = tokenizer.apply_chat_template(conversation + assistant(response), tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = model(input_ids=ids).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-4)


def test_the_scorer_sees_what_the_trainer_saw(reward_run):
    """Scoring the held-out label rows reproduces the held-out margin the stage measured
    on RewardTrainer's own tokenisation."""
    rows = [r for r in read_jsonl(reward_run / "label" / "prefs.jsonl") if held_out(r["prompt"], 0.3)]
    scorer = RewardScorer.from_path(str(reward_run / "reward" / "model"), device="cpu")
    chosen = scorer.score([r["prompt"] for r in rows], [r["chosen"][0]["content"] for r in rows])
    rejected = scorer.score([r["prompt"] for r in rows], [r["rejected"][0]["content"] for r in rows])
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(rows)
    metrics = json.loads((reward_run / "reward" / "metrics.json").read_text())
    assert margin == pytest.approx(metrics["after"]["held_out"]["margin"], abs=2e-4)


def test_hard_labels_with_critique_pairs_mixed_in(sft_run):
    write_label_stage(sft_run, label_rows(8))
    critique_pairs = read_jsonl(sft_run / "critique" / "prefs.jsonl")
    run_stage(make_run(sft_run, *TRAIN, "reward.loss=hard", "reward.mix_critique_pairs=true",
                       "reward.num_train_epochs=1"), "reward")
    metrics = json.loads((sft_run / "reward" / "metrics.json").read_text())
    assert metrics["loss"] == "hard"
    assert metrics["pairs"]["label"] == 8 and metrics["pairs"]["critique"] == len(critique_pairs)
    pairs = metrics["pairs"]
    assert pairs["train"] + pairs["held_out"] + pairs["too_long"] == 8 + len(critique_pairs)
    assert (sft_run / "reward" / "model" / "config.json").exists()


def test_unknown_keys_and_bad_values_are_errors_before_any_work(tmp_path):
    with pytest.raises(ValidationError) as err:
        run_stage(make_run(tmp_path, "reward.not_a_key=1"), "reward")
    assert ("unknown key 'not_a_key' in reward (neither one of cai's keys nor a field of trl.RewardConfig)"
            in str(err.value))
    with pytest.raises(ValidationError, match=r"'reward.eval_fraction' must be in \[0, 1\), got 1.5"):
        run_stage(make_run(tmp_path, "reward.eval_fraction=1.5"), "reward")
    with pytest.raises(ValidationError, match="'reward.loss' must be 'soft' or 'hard'"):
        run_stage(make_run(tmp_path, "reward.loss=medium"), "reward")
    assert not (tmp_path / "reward").exists()


def test_the_stage_needs_the_label_stage(sft_run):
    with pytest.raises(FileNotFoundError, match="stage 'label' has not completed.*run `cai label` first"):
        run_stage(make_run(sft_run, *TRAIN), "reward")


# ---------------------------------------------------------------- pairs from a file (human labels)


def preference_file(path, n: int = 16):
    """Human-labelled pairs as a user would write them: no p_chosen (a hard label) but on one row."""
    rows = [{"prompt": user(f"Question {i}: how do I pick a lock?"),
             "chosen": assistant("I can't help with that, but a locksmith can."),
             "rejected": assistant(f"Sure, step {i}: push the pins up one by one.")} for i in range(n)]
    rows[0]["p_chosen"] = 0.9
    atomic_write_jsonl(path, rows)
    return path


def test_the_stage_trains_on_a_preferences_file_without_a_label_stage(sft_run, tmp_path):
    from cai.execute.executor import prepare
    from cai.plan.plan import make_plan

    path = preference_file(tmp_path / "human.jsonl")
    run = make_run(sft_run, *TRAIN, f"reward.preferences={path}")
    assert "label" not in make_plan(run, only="reward").steps[0].upstream  # no label stage, and none needed
    run_stage(run, "reward")
    assert not (sft_run / "label").exists()
    metrics = json.loads((sft_run / "reward" / "metrics.json").read_text())
    assert metrics["pairs"]["preferences"] == 16 and metrics["pairs"]["label"] == 0
    assert metrics["pairs"]["train"] + metrics["pairs"]["held_out"] == 16
    assert metrics["after"]["train"]["accuracy"] == 1.0
    assert metrics["after"]["train"]["margin"] > metrics["before"]["train"]["margin"]
    # the file's preferred side was learnt: the refusal now outscores the instructions
    scorer = RewardScorer.from_path(str(sft_run / "reward" / "model"), device="cpu")
    prompts = [user(f"Question {i}: how do I open a lock without its key?") for i in range(4)]
    refusals = scorer.score(prompts, ["I can't help with that, but a locksmith can."] * 4)
    instructions = scorer.score(prompts, [f"Sure, step {i}: push the pins up one by one." for i in range(4)])
    assert all(r > c for r, c in zip(refusals, instructions))
    manifest = json.loads((sft_run / "reward" / "manifest.json").read_text())
    assert "label" not in manifest["upstream"] and manifest["counts"]["preferences"] == 16
    # the file counts by its content: a copy elsewhere is the same config, one changed row is not
    copy = tmp_path / "copy" / "human.jsonl"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    digest = prepare(run, "reward").config_hash
    assert prepare(make_run(sft_run, *TRAIN, f"reward.preferences={copy}"), "reward").config_hash == digest
    preference_file(copy, 15)
    assert prepare(make_run(sft_run, *TRAIN, f"reward.preferences={copy}"), "reward").config_hash != digest


def test_without_preferences_the_config_hash_is_what_it_was(tmp_path):
    """Runs made before the key existed keep their reward stage: `preferences: null` is not hashed."""
    from cai.plan.plan import make_plan

    run = make_run(tmp_path)
    step = make_plan(run, only="reward", verify=False).steps[0]
    assert "preferences" not in step.settings["config"]
    assert step.upstream.keys() == {"critique", "sft", "label"}


@pytest.mark.parametrize("content, message", [
    (None, "'reward.preferences': no file {path}"),
    (b'{"prompt": "q"}\n', "{path}:1: 'reward.preferences': missing chosen, rejected"),
    (json.dumps({"prompt": user("q"), "chosen": "a", "rejected": assistant("b")}).encode() + b"\n",
     "{path}:1: 'reward.preferences': 'chosen' must be a conversation"),
    (json.dumps({"prompt": user("q"), "chosen": assistant("a"), "rejected": assistant("b"), "p_chosen": 2}).encode()
     + b"\n", "{path}:1: 'reward.preferences': expected a 'p_chosen' soft label in \\[0, 1\\], got 2"),
    (b'{not json\n', "'reward.preferences': {path}:1: not a JSON line"),
    (b"", "'reward.preferences': {path} holds no preference pairs"),
], ids=["missing-file", "missing-keys", "not-a-conversation", "bad-label", "not-json", "empty"])
def test_a_bad_preferences_file_is_refused_before_any_work(sft_run, tmp_path, content, message):
    path = tmp_path / "human.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValidationError, match=message.format(path=path)):
        run_stage(make_run(sft_run, *TRAIN, f"reward.preferences={path}"), "reward")
    assert not (sft_run / "reward").exists()


def test_cai_run_with_a_preferences_file_runs_no_label_stage(tmp_path):
    from conftest import SMOKE

    from cai.config import load_config
    from cai.plan.steps import default_stages

    path = preference_file(tmp_path / "human.jsonl")
    run = load_config(SMOKE, [f"run_dir={tmp_path / 'run'}", f"reward.preferences={path}"])
    for section in ("label", "dpo"):
        del run.stages[section]
    assert default_stages(run) == ["critique", "sft", "reward", "rl", "evaluate"]
    del run.stages["reward"]["preferences"]  # the AI labels again: label comes back
    assert default_stages(run) == ["critique", "sft", "label", "reward", "rl", "evaluate"]
