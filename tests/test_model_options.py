"""Model options (TRL's ModelConfig names): dtype round-trips, LoRA in every training
stage (adapter trained, base frozen, merged model loadable), precedence of a stage's keys
over the top level, config hashes, checkpoints and model cards."""

from __future__ import annotations

import json

import torch
from conftest import make_run
from safetensors import safe_open
from test_dpo import TINY_DPO, add_label_stage
from test_rl import TINY_RL, add_reward_stage

LORA = ("use_peft=true", "lora_r=4", "lora_alpha=8", "lora_dropout=0", "lora_target_modules=[q_proj, v_proj]")
SCALE = 8 / 4  # lora_alpha / lora_r


def saved_dtypes(folder) -> set:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 - safe_open is not iterable


def state(folder, auto="AutoModelForCausalLM") -> dict:
    import transformers

    model = getattr(transformers, auto).from_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


def adapter_weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def check_lora(base: dict, merged: dict, adapter: dict, prefix: str = "") -> None:
    """Every weight LoRA does not target is the base's, bit for bit (frozen); every
    targeted one is the base's plus (alpha / r)·B·A of the saved, trained adapter."""
    targeted = 0
    for name, value in base.items():
        if name.startswith("lm_head") or prefix + name not in merged:
            continue
        stem = name.rsplit(".weight", 1)[0]
        lora_a = next((v for k, v in adapter.items() if k.endswith(f"{stem}.lora_A.weight")), None)
        if lora_a is None:
            assert torch.equal(merged[prefix + name], value), f"{name} changed but LoRA does not target it"
            continue
        lora_b = next(v for k, v in adapter.items() if k.endswith(f"{stem}.lora_B.weight"))
        assert lora_b.abs().sum() > 0, f"{stem}: lora_B is still its zero initialisation"
        assert torch.allclose(merged[prefix + name], value + SCALE * lora_b @ lora_a, atol=1e-6)
        targeted += 1
    assert targeted == 4  # q_proj and v_proj in each of tiny's 2 layers


def check_folder(folder, tokenizer_pad: bool = True) -> None:
    assert (folder / "README.md").read_text().startswith("# cai ")
    if tokenizer_pad and (folder / "config.json").exists():
        from transformers import AutoTokenizer

        config = json.loads((folder / "config.json").read_text())
        assert config["pad_token_id"] == AutoTokenizer.from_pretrained(folder).pad_token_id


def test_sft_with_lora_saves_the_adapter_and_a_merged_model_and_base_weights_stay_frozen(sft_run):
    from cai import models
    from cai.execute.executor import run_one as run_stage

    manifest = run_stage(make_run(sft_run, *LORA), "sft", force=True)

    stage = sft_run / "sft"
    assert manifest["counts"]["adapter"] == str(stage / "adapter")
    adapter_config = json.loads((stage / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "CAUSAL_LM"
    assert adapter_config["base_model_name_or_path"] == models.resolve("builtin:tiny")  # builtin:tiny's cache folder
    check_lora(state(models.resolve("builtin:tiny")), state(stage / "model"), adapter_weights(stage / "adapter"))
    check_folder(stage / "model")
    check_folder(stage / "adapter")
    assert "LoRA r=4, alpha=8" in (stage / "model" / "README.md").read_text()
    assert not (stage / "checkpoints").exists()  # deleted once the model is saved
    # The adapter folder is a model spec: its base is loaded and the adapter merged.
    ids = torch.tensor([[5, 6, 7, 8]])
    from_adapter = models.load_causal_lm(str(stage / "adapter"), "cpu")(ids).logits
    from_merged = models.load_causal_lm(str(stage / "model"), "cpu")(ids).logits
    assert torch.allclose(from_adapter, from_merged, atol=1e-5)


def test_reward_with_lora_trains_the_score_head_and_merges_into_a_classifier(sft_run):
    from cai.execute.executor import run_one as run_stage

    add_label_stage(sft_run)
    run_stage(make_run(sft_run, *LORA, "reward.mix_critique_pairs=false"), "reward")

    stage = sft_run / "reward"
    adapter_config = json.loads((stage / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and "score" in adapter_config["modules_to_save"]
    adapter = adapter_weights(stage / "adapter")
    assert any("score" in k for k in adapter), "the score head is not saved with the adapter"
    merged = state(stage / "model", "AutoModelForSequenceClassification")
    assert merged["score.weight"].shape[0] == 1
    check_lora(state(sft_run / "sft" / "model"), merged, adapter)
    check_folder(stage / "model")
    assert "AutoModelForSequenceClassification" in (stage / "model" / "README.md").read_text()


def test_dpo_with_lora_has_no_reference_copy_and_keeps_the_soft_label_loss(sft_run):
    from accelerate.utils import is_peft_model

    from cai.execute.executor import prepare
    from cai.stages.dpo import dpo_trainer, preference_pairs
    from cai.training.save import train_and_save
    from cai.training.soft_labels import SoftLabelDPOTrainer

    add_label_stage(sft_run)
    ctx = prepare(make_run(sft_run, *LORA, "dpo.merge_adapter=false", "dpo.soft_labels=weighted", *TINY_DPO), "dpo")
    ctx.dir.path.mkdir()
    trainer = dpo_trainer(ctx, ctx.config, preference_pairs(ctx, ctx.config)[0])
    assert isinstance(trainer, SoftLabelDPOTrainer) and is_peft_model(trainer.model)
    assert trainer.ref_model is None  # the reference is the policy with its adapter disabled
    train_and_save(trainer, ctx)

    stage = sft_run / "dpo"
    assert not (stage / "model").exists()  # merge_adapter: false
    adapter = adapter_weights(stage / "adapter")
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    check_folder(stage / "adapter")
    (stage / "manifest.json").write_text(json.dumps({"config_hash": "x"}))
    assert ctx.model_spec("dpo") == str(stage / "adapter")  # what later stages load


def test_rloo_with_lora_moves_only_the_adapter(sft_run):
    from cai.execute.executor import run_one as run_stage

    add_reward_stage(sft_run)
    run_stage(make_run(sft_run, *LORA, "rl.algorithm=rloo", *TINY_RL, "rl.max_steps=1"), "rl")

    stage = sft_run / "rl"
    check_lora(state(sft_run / "sft" / "model"), state(stage / "model"), adapter_weights(stage / "adapter"))
    check_folder(stage / "model")


def test_a_bf16_run_saves_bf16_and_auto_keeps_the_checkpoint_dtype(sft_run, tmp_path):
    from cai.execute.executor import run_one as run_stage

    run_stage(make_run(sft_run, "dtype=bfloat16", "sft.keep_checkpoints=true", "sft.save_steps=1"), "sft", force=True)
    sft = sft_run / "sft"
    assert saved_dtypes(sft / "model") == {"BF16"}
    assert json.loads((sft / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    assert any((sft / "checkpoints").glob("checkpoint-*"))  # kept
    assert "dtype: bfloat16" in (sft / "model" / "README.md").read_text()

    # dtype auto on the bf16 folder: the next stage trains and saves bf16 too (float32 would double it).
    other = tmp_path / "other"
    other.mkdir()
    (other / "critique").symlink_to(sft_run / "critique")
    run_stage(make_run(other, "dtype=auto", f"sft.model={sft / 'model'}"), "sft")
    assert saved_dtypes(other / "sft" / "model") == {"BF16"}
    assert not (other / "sft" / "checkpoints").exists()


def test_a_stage_key_overrides_the_top_level_and_defaults_keep_config_hashes(tmp_path):
    from cai.execute.executor import prepare

    def fingerprint(*overrides, stage="sft"):
        return prepare(make_run(tmp_path, *overrides), stage).config_hash

    run = make_run(tmp_path, "use_peft=true", "lora_r=8", "sft.use_peft=false", "dpo.lora_r=2")
    assert prepare(run, "sft").model_options.use_peft is False
    dpo = prepare(run, "dpo").model_options
    assert dpo.use_peft and dpo.lora_r == 2
    assert prepare(run, "reward").model_options.lora_r == 8
    assert "use_peft" not in prepare(run, "sft").trl  # never passed to TRL

    plain = fingerprint()
    assert fingerprint("dtype=float32", "merge_adapter=true", "keep_checkpoints=true") == plain
    assert fingerprint("dtype=bfloat16") != plain
    assert fingerprint("use_peft=true") != plain
    # a data stage ignores the top level's LoRA keys: its hash does not move
    assert fingerprint("use_peft=true", "lora_r=4", stage="critique") == fingerprint(stage="critique")
    assert fingerprint("dtype=bfloat16", stage="critique") != fingerprint(stage="critique")


def test_ppo_trains_a_policy_that_pads_with_its_eos(sft_run):
    """SmolLM2 pads with its EOS, <|im_end|>, which also closes every chat turn: cai's PPO
    finds answers and padding by position (each answer cut after its first EOS), never by
    token id, so it trains such a policy as it is, and the saved config pads like its
    tokenizer."""
    from cai import models
    from cai.execute.executor import run_one as run_stage

    sft = sft_run / "sft" / "model"
    tokenizer = models.load_tokenizer(str(sft))
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(sft)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((sft / name).read_text())
        (sft / name).write_text(json.dumps({**config, "pad_token_id": tokenizer.eos_token_id}))
    add_reward_stage(sft_run)
    run_stage(make_run(sft_run, *LORA, *TINY_RL, "rl.total_episodes=4", "rl.num_ppo_epochs=1"), "rl")

    check_folder(sft_run / "rl" / "model")
    assert json.loads((sft_run / "rl" / "model" / "config.json").read_text())["pad_token_id"] == tokenizer.eos_token_id
    assert (sft_run / "rl" / "adapter" / "adapter_config.json").exists()  # PPO trained a LoRA policy
    logs = json.loads((sft_run / "rl" / "log_history.json").read_text())
    assert all(0 < entry["completions/mean_length"] <= 8 for entry in logs)


def test_unmerged_adapters_chain_through_reward_and_rl(sft_run):
    """`use_peft: true, merge_adapter: false`: reward starts from sft's causal-LM adapter
    (its body is sft's merged weights, under a new reward head), and each stage's adapter
    names the adapter it was trained on as its base, so loading it brings every delta.
    (Reward used to die loading sft's causal-LM adapter onto a classifier: "object has no
    attribute 'prepare_inputs_for_generation'".)"""
    from cai import models
    from cai.execute.executor import run_one as run_stage

    unmerged = (*LORA, "merge_adapter=false")
    run_stage(make_run(sft_run, *unmerged), "sft", force=True)
    sft_adapter = sft_run / "sft" / "adapter"
    assert not (sft_run / "sft" / "model").exists()
    sft_body = {k: v.clone() for k, v in models.load_causal_lm(str(sft_adapter), "cpu").state_dict().items()}

    add_label_stage(sft_run)
    run_stage(make_run(sft_run, *unmerged, "reward.mix_critique_pairs=false"), "reward")
    reward_adapter = sft_run / "reward" / "adapter"
    assert json.loads((reward_adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        sft_adapter)
    tokenizer = models.load_tokenizer(str(reward_adapter))
    reward = models.load_reward_model(str(reward_adapter), tokenizer).state_dict()
    trained = adapter_weights(reward_adapter)
    check_lora(sft_body, reward, trained)  # sft's delta, then reward's own
    [score] = [v for k, v in trained.items() if "score" in k]
    assert torch.equal(reward["score.weight"], score)  # the trained head, not a fresh one
    try:
        models.load_causal_lm(str(reward_adapter), "cpu")
    except ValueError as err:
        assert "adapter of a reward model" in str(err) and "cannot be loaded as a causal language model" in str(err)
    else:
        raise AssertionError("a reward model's adapter loaded as a causal LM")

    run_stage(make_run(sft_run, *unmerged, "rl.algorithm=rloo", *TINY_RL, "rl.max_steps=1"), "rl")
    rl_adapter = sft_run / "rl" / "adapter"
    assert json.loads((rl_adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(sft_adapter)
    policy = models.load_causal_lm(str(rl_adapter), "cpu").state_dict()
    check_lora(sft_body, policy, adapter_weights(rl_adapter))
