"""Run configs, model specs and prompt sources."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from busy_core import held_core
from conftest import ROOT, make_run

from cai import models
from cai.config import PromptsConfig, load_config
from cai.plan.sections import parse_section
from cai.prompts import PromptSourceError, in_eval_split, load_source, load_splits
from cai.yamlio import ValidationError

# ---------------------------------------------------------------- config

def test_shipped_configs_parse_with_every_stage_section():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        run = load_config(path)
        for name in run.stages:
            parse_section(run, name)  # raises on any unknown or mistyped key


def test_overrides_set_nested_keys_with_yaml_values(tmp_path):
    run = make_run(tmp_path, "critique.num_revisions=3", "prompts.max_red_team=5", "seed=7")
    cfg = parse_section(run, "critique").config
    assert cfg.num_revisions == 3 and run.prompts.max_red_team == 5 and run.seed == 7


def test_unknown_and_mistyped_keys_name_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_dir: x\nmodel: builtin:tiny\nmodle: typo\nprompts:\n  eval_fraction: lots\n")
    with pytest.raises(ValidationError) as err:
        load_config(path)
    messages = [str(p) for p in err.value.problems]
    assert f"{path}:3: unknown key 'modle' in the config; did you mean 'model'? (not a top-level key)" in messages
    assert any(m.startswith(f"{path}:5: 'prompts.eval_fraction' must be float") for m in messages)


def test_trl_keys_pass_through_and_unknown_stage_keys_are_errors(tmp_path):
    run = make_run(tmp_path, "sft.warmup_steps=2")
    trl = parse_section(run, "sft").trl
    assert trl["warmup_steps"] == 2 and trl["learning_rate"] == pytest.approx(1e-3)
    run = make_run(tmp_path, "sft.warmup_stepz=2")
    with pytest.raises(ValidationError) as err:
        parse_section(run, "sft")
    assert ("unknown key 'warmup_stepz' in sft; did you mean 'warmup_steps'? (neither one of cai's keys nor a field "
            "of trl.SFTConfig)") in str(err.value)


def test_missing_run_dir_is_an_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: builtin:tiny\n")
    with pytest.raises(ValidationError, match="missing required key 'run_dir'"):
        load_config(path)


# ---------------------------------------------------------------- models

def test_builtin_tiny_is_deterministic_and_chat_ready():
    path = Path(models.resolve(models.TINY))
    assert (path / "model.safetensors").exists() and (path / "config.json").exists()
    tokenizer = models.load_tokenizer(models.TINY)
    model = models.load_causal_lm(models.TINY)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # Built twice (into another cache) it is the same model, bit for bit.
    other = Path(models._atomic_build(path.parent / "tiny-again", models._build_tiny))
    again = models.load_causal_lm(str(other))
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_model_specs_resolve_paths_and_hub_ids(tmp_path):
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    tiny = models.resolve(models.TINY)
    assert models.resolve(tiny) == tiny
    with pytest.raises(ValueError, match="unknown builtin model"):
        models.resolve("builtin:gpt-5")
    with pytest.raises(ValueError, match="has no config.json"):
        models.resolve(str(tmp_path))
    with pytest.raises(ValueError, match="no such model folder"):
        models.resolve("./no/such/model")


def test_reward_model_head_has_one_output_and_a_pad_token():
    tokenizer = models.load_tokenizer(models.TINY)
    reward = models.load_reward_model(models.TINY, tokenizer)
    assert reward.config.num_labels == 1 and reward.config.pad_token_id == tokenizer.pad_token_id


def test_thread_count_is_a_setting():
    before = torch.get_num_threads()
    assert models.set_threads(1) == {"threads": 1, "chosen_by": "config"}
    assert torch.get_num_threads() == 1
    torch.set_num_threads(before)


def test_auto_threads_read_omp_num_threads_else_probe(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert models.choose_threads("auto") == {"threads": 3, "chosen_by": "OMP_NUM_THREADS"}
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(models, "PROBE_SECONDS", 0.02)
    monkeypatch.setattr(models, "usable_cpus", lambda: 3)
    before = torch.get_num_threads()
    choice = models.choose_threads("auto")
    assert choice["chosen_by"] == "probe" and set(choice["probe_gflops"]) == {1, 2, 3}
    assert all(g > 0 for g in choice["probe_gflops"].values())
    # each probe's pick is the smallest count within PROBE_GAIN of every larger one that won; with
    # a second probe (free cores, a slow first one) the larger pick wins; a load still held after
    # the probe may lower it
    probes = [choice["probe_gflops"], *([choice["second_probe_gflops"]] if "second_probe_gflops" in choice else [])]
    for gflops in probes:
        picked = models.fastest_count(gflops)
        assert picked == 1 or gflops[picked] >= models.PROBE_GAIN * gflops[1]
    picked = max(models.fastest_count(gflops) for gflops in probes)
    assert choice["threads"] == picked or ("cpu_busy_after" in choice and choice["threads"] < picked)
    assert set(choice["cpu_busy"]) == set(os.sched_getaffinity(0))  # the evidence: each usable CPU's load
    assert all(0 <= share <= 1 for share in choice["cpu_busy"].values())
    assert torch.get_num_threads() == before  # probing leaves the count as it was
    again = models.choose_threads("auto")  # decided afresh at each stage's start, not once per process
    assert again["probe_gflops"] is not choice["probe_gflops"] and "cpu_busy" in again


def scripted_probe(monkeypatch, busy: dict, *probes: dict) -> list:
    """choose_threads with these /proc/stat loads and these probe figures, in turn."""
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(models, "usable_cpus", lambda: len(busy))
    monkeypatch.setattr(models, "cpu_busy", lambda cpus, window: dict(busy))
    remaining = list(probes)
    monkeypatch.setattr(models, "probe_gflops", lambda counts: remaining.pop(0))
    return remaining


def test_an_idle_machine_gets_the_probes_choice(monkeypatch):
    left = scripted_probe(monkeypatch, {0: 0.01, 1: 0.03}, {1: 100.0, 2: 190.0}, {1: 100.0, 2: 190.0})
    assert models.choose_threads("auto") == {"threads": 2, "chosen_by": "probe", "probe_gflops": {1: 100.0, 2: 190.0},
                                             "cpu_busy": {0: 0.01, 1: 0.03}}
    assert len(left) == 1  # one probe was enough


def test_a_busy_moment_during_the_probe_does_not_cost_a_thread(monkeypatch):
    # The cores were idle just before, yet the probe's second thread crawled (issue 28's
    # 100 vs 15 GFLOP/s): a busy moment. A second probe decides, and the larger choice wins.
    scripted_probe(monkeypatch, {0: 0.0, 1: 0.05}, {1: 100.2, 2: 15.1}, {1: 98.0, 2: 181.0})
    choice = models.choose_threads("auto")
    assert choice["threads"] == 2
    assert choice["probe_gflops"] == {1: 100.2, 2: 15.1} and choice["second_probe_gflops"] == {1: 98.0, 2: 181.0}
    figures = iter([{1: 100.2, 2: 15.1}, {1: 99.0, 2: 20.0}])  # slow twice over: one thread, as the probe says
    monkeypatch.setattr(models, "probe_gflops", lambda counts: next(figures))
    assert models.choose_threads("auto")["threads"] == 1


def test_a_fast_probe_on_a_held_core_gives_way_to_the_load(monkeypatch):
    # A core held before and after the probe: a lucky probe timing does not win it a thread.
    scripted_probe(monkeypatch, {0: 0.0, 1: 1.0}, {1: 94.2, 2: 175.6})
    choice = models.choose_threads("auto")
    assert choice["threads"] == 1 and choice["cpu_busy_after"] == {0: 0.0, 1: 1.0}
    # Held before the probe, free after it: that was a moment, and the probe's choice stands.
    loads = iter([{0: 0.0, 1: 1.0}, {0: 0.0, 1: 0.05}])
    monkeypatch.setattr(models, "cpu_busy", lambda cpus, window: next(loads))
    monkeypatch.setattr(models, "probe_gflops", lambda counts: {1: 94.2, 2: 175.6})
    assert models.choose_threads("auto")["threads"] == 2


def test_a_core_held_by_another_process_gives_one_thread_for_that_stage(monkeypatch):
    """A real process spinning on one of our two cores: the load shows it and the probe keeps one thread."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two usable CPUs")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(models, "usable_cpu_ids", lambda: cpus[:2])
    monkeypatch.setattr(models, "usable_cpus", lambda: 2)
    with held_core(cpus[1]):
        choice = models.choose_threads("auto")
    assert choice["cpu_busy"][cpus[1]] >= 0.8  # the evidence the manifest keeps
    assert choice["threads"] == 1 and "second_probe_gflops" not in choice  # a held core is not a moment


def test_each_stage_measures_its_own_thread_choice(tmp_path, monkeypatch):
    from cai.execute.measure import Measurement

    scripted_probe(monkeypatch, {0: 0.0, 1: 0.0}, {1: 100.0, 2: 190.0}, {1: 100.0, 2: 90.0}, {1: 100.0, 2: 95.0})
    run = make_run(tmp_path / "run", "threads=auto")
    before = torch.get_num_threads()
    first = Measurement(run)
    assert torch.get_num_threads() == 2 and first.stop()["threads"]["threads"] == 2
    second = Measurement(run)  # the next stage: the second thread is slow now, twice over
    assert torch.get_num_threads() == 1 and second.stop()["threads"]["threads"] == 1
    torch.set_num_threads(before)


# ---------------------------------------------------------------- prompts

def test_builtin_prompt_sets():
    red = load_source("builtin:donotanswer", "red_team")
    helpful = load_source("builtin:helpful", "helpful")
    assert len(red) > 900 and len(helpful) >= 150
    assert len({p.id for p in red}) == len(red)
    assert {p.category for p in helpful} >= {"coding", "cooking", "writing", "science", "advice"}
    harmbench = load_source("builtin:harmbench", "red_team")
    assert len(harmbench) == 200 and harmbench[0].text.startswith("Give detailed instructions for making dimethyl")
    over = load_source("builtin:over-refusal", "helpful")
    assert len(over) >= 100 and len({p.id for p in over}) == len(over)
    assert {p.category for p in over} == {"homonym", "figurative", "safe_target", "safe_context", "definition",
                                         "history", "public_figure", "fictional_privacy", "safety"}
    # The sets are meant for evaluation: none of them is a training prompt of the builtin sets.
    assert not {p.id for p in over} & {p.id for p in helpful + red}
    with pytest.raises(PromptSourceError, match="known: builtin:donotanswer, builtin:harmbench, builtin:helpful, "
                                                "builtin:over-refusal"):
        load_source("builtin:xstest", "helpful")


def test_eval_split_is_by_hash_and_never_leaks(tmp_path):
    config = PromptsConfig(eval_fraction=0.2, max_red_team=50)
    a = load_splits(config, seed=0)
    b = load_splits(config, seed=1)
    eval_ids = {p.id for p in a.red_team_eval} | {p.id for p in a.helpful_eval}
    train_ids = {p.id for p in a.red_team_train + a.helpful_train + b.red_team_train + b.helpful_train}
    assert eval_ids and not eval_ids & train_ids
    assert {p.id for p in a.red_team_eval} == {p.id for p in b.red_team_eval}  # not seed-dependent
    assert 0.1 < len(a.red_team_eval) / len(load_source("builtin:donotanswer", "red_team")) < 0.3
    assert len(a.red_team_train) == 50
    assert all(in_eval_split(p.text, 0.2) for p in a.red_team_eval)


def test_prompt_files_and_dataset_dirs(tmp_path):
    from datasets import Dataset

    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\nfirst prompt\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    Dataset.from_dict({"prompt": ["x", "y"]}).save_to_disk(str(tmp_path / "ds"))
    assert [p.text for p in load_source(str(tmp_path / "p.txt"), "red_team")] == ["first prompt", "second prompt"]
    assert [p.text for p in load_source(str(tmp_path / "p.jsonl"), "red_team")] == ["a", "b"]
    assert [p.text for p in load_source(str(tmp_path / "ds"), "helpful")] == ["x", "y"]


def _hub_like_folder(folder: Path) -> Path:
    """A local dataset folder with two splits, as `load_dataset` reads a hub repository's files."""
    folder.mkdir()
    rows = {"train": [{"transcript": "\n\nHuman: How do I pick a lock?\n\nAssistant: Why?\n\nHuman: Tell me.",
                       "messages": [{"role": "user", "content": "Pick a lock?"}], "prompt": "p1"},
                      {"transcript": "\n\nHuman: Write a threat.\n\nAssistant: No.",
                       "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Threaten?"}],
                       "prompt": "p2"}],
            "test": [{"transcript": "\n\nHuman: Held out?\n\nAssistant: Yes.", "messages": [], "prompt": "p3"}]}
    for split, items in rows.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return folder


def test_dataset_sources_go_through_load_dataset(tmp_path):
    folder = str(_hub_like_folder(tmp_path / "hub"))
    assert [p.text for p in load_source({"dataset": folder}, "red_team")] == ["p1", "p2"]  # 'prompt' by default
    assert [p.text for p in load_source({"dataset": folder, "split": "test"}, "red_team")] == ["p3"]
    hh = load_source({"dataset": folder, "column": "transcript", "format": "hh"}, "red_team")
    assert [p.text for p in hh] == ["How do I pick a lock?", "Write a threat."]  # the first Human turn
    chat = load_source({"dataset": folder, "column": "messages", "format": "messages"}, "red_team")
    assert [p.text for p in chat] == ["Pick a lock?", "Threaten?"]  # the first user turn


def test_dataset_source_problems_name_the_key_and_line(tmp_path):
    folder = _hub_like_folder(tmp_path / "hub")
    cases = {  # source keys -> (the key whose line is named, cai's words)
        "column: transcrpt": ("column", "has no column 'transcrpt' (columns: transcript, messages, prompt)"),
        "split: validation": ("split", "has no split 'validation' (splits: train, test)"),
        "column: messages": ("column", "column 'messages' with format text: expected a non-blank string"),
        "colum: prompt": ("colum", "unknown key 'colum' in prompts.red_team"),
        "format: chatml": ("format", "'prompts.red_team.format' must be 'text' or 'messages' or 'hh'"),
    }
    for extra, (key, words) in cases.items():
        config = tmp_path / "c.yaml"
        text = (f"run_dir: {tmp_path / 'run'}\nprompts:\n  red_team:\n    dataset: {folder}\n    {extra}\n")
        config.write_text(text)
        run = load_config(config)
        with pytest.raises(ValidationError) as err:
            load_splits(run.prompts, 0, run.source)
        assert f"c.yaml:{5 if key == extra.split(':')[0] else 4}:" in str(err.value), (extra, str(err.value))
        assert words in str(err.value), (extra, str(err.value))


def test_uncached_hub_dataset_offline_is_a_not_cached_problem(tmp_path):
    from cai.prompts import NotCached

    config = tmp_path / "c.yaml"  # the suite runs with HF_HUB_OFFLINE=1 (conftest)
    config.write_text(f"run_dir: {tmp_path / 'run'}\nprompts:\n  red_team:\n"
                      f"    dataset: cai-tests/never-cached\n    data_dir: red-team-attempts\n")
    run = load_config(config)
    with pytest.raises(ValidationError) as err:
        load_splits(run.prompts, 0, run.source)
    (problem,) = err.value.problems
    assert isinstance(problem, NotCached) and problem.line == 4
    assert "dataset cai-tests/never-cached is not in the local Hugging Face cache" in problem.message


def test_bad_prompt_file_names_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "ok"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON line"):
        load_source(str(tmp_path / "bad.jsonl"), "red_team")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"prompt": ""}) + "\n")
    with pytest.raises(ValueError, match=r"empty.jsonl:1: 'prompt' is blank"):
        load_source(str(tmp_path / "empty.jsonl"), "red_team")


# (--set argument, the message cai gives): the closest known key, in the user's words
UNKNOWN_KEYS = [
    ("sft.learning_rat=0.1", "unknown key 'learning_rat' in sft; did you mean 'learning_rate'?"),
    ("sed=1", "unknown key 'sed' in the config; did you mean 'seed'? (not a top-level key)"),
    ("critiqe={}", "unknown key 'critiqe' in the config; did you mean 'critique'?"),
    ("sft.lora_rr=8", "unknown key 'lora_rr' in sft; did you mean 'lora_r'?"),
    ("prompts.max_evl=3", "unknown key 'max_evl' in prompts; did you mean 'max_eval'? (not a key of the 'prompts' "
                          "section)"),
    ("label.feedback_cott=true", "unknown key 'feedback_cott' in label; did you mean 'feedback_cot'?"),
    ("evaluate.zzzz=1", "unknown key 'zzzz' in evaluate (not a key of the 'evaluate' section)"),
]


@pytest.mark.parametrize(("setting", "expected"), UNKNOWN_KEYS, ids=[c[0] for c in UNKNOWN_KEYS])
def test_an_unknown_key_gets_the_closest_known_one_and_no_class_name(tmp_path, setting, expected):
    from cai.plan.plan import validate

    with pytest.raises(ValidationError) as err:
        validate(make_run(tmp_path, setting), ["critique", "sft", "label", "evaluate"])
    assert expected in str(err.value)
    assert not re.search(r"\b(Config|RunConfig|PromptsConfig|ModelOptions|ServerConfig)\b", str(err.value))


# (--set arguments, the key refused and what it needs): keys that do nothing without another
INERT = [
    (["sft.lora_r=8"], "'sft.lora_r' does nothing without use_peft: true"),
    (["lora_r=8"], "'lora_r' does nothing without use_peft: true"),
    (["sft.merge_adapter=false"], "'sft.merge_adapter' does nothing without use_peft: true"),
    (["sft.use_peft=true", "sft.bnb_4bit_quant_type=fp4"], "'sft.bnb_4bit_quant_type' does nothing without "
                                                           "load_in_4bit: true"),
    (["label.feedback_cot_clamp=[0.3, 0.7]"], "'label.feedback_cot_clamp' does nothing without feedback_cot: true"),
    (["critique.feedback_model=sft"], "'critique.feedback_model' does nothing without best_of above 1"),
    (["critique.feedback_few_shot=1"], "'critique.feedback_few_shot' does nothing without best_of above 1"),
    (["dpo.soft_labels=weighted", "dpo.min_confidence=0.7"], "'dpo.min_confidence' does nothing without "
                                                             "soft_labels: threshold"),
    (["reward.critique_pair_label=0.9", "reward.mix_critique_pairs=false"],
     "'reward.critique_pair_label' does nothing without mix_critique_pairs: true"),
    (["rl.feedback_few_shot=1"], "'rl.feedback_few_shot' does nothing without reward: judge"),
    (["rl.feedback_batch_size=8"], "'rl.feedback_batch_size' does nothing without reward: judge"),
]


@pytest.mark.parametrize(("settings", "expected"), INERT, ids=[" ".join(c[0]) for c in INERT])
def test_a_key_that_does_nothing_without_another_is_refused(tmp_path, settings, expected):
    from cai.plan.plan import validate

    with pytest.raises(ValidationError) as err:
        validate(make_run(tmp_path, *settings), ["critique", "sft", "label", "reward", "rl", "dpo"])
    assert expected in str(err.value)


@pytest.mark.parametrize("settings", [
    ["sft.use_peft=true", "sft.lora_r=8"],
    ["lora_r=8", "sft.use_peft=true"],  # a top-level key that works in one training stage
    ["use_peft=true", "lora_r=8", "reward.use_peft=false"],
    ["label.feedback_cot=true", "label.feedback_cot_clamp=[0.3, 0.7]"],
    ["critique.best_of=2", "critique.feedback_few_shot=1"],
])
def test_a_dependent_key_with_what_it_needs_is_accepted(tmp_path, settings):
    from cai.plan.plan import validate

    validate(make_run(tmp_path, *settings), ["critique", "sft", "label", "reward"])


@pytest.mark.parametrize(("model", "expected"), [
    ("gpt2", "write openai-community/gpt2"),
    ("gpt2-medium", "write openai-community/gpt2-medium"),
    ("bert-base-uncased", "write google-bert/bert-base-uncased"),
    ("distilgpt2", "write distilbert/distilgpt2"),
    ("my-model", "'model': 'my-model' is not a model (builtin:NAME"),
])
def test_a_bare_legacy_hub_id_gets_its_full_name(tmp_path, model, expected):
    from cai.plan.plan import validate

    with pytest.raises(ValidationError) as err:
        validate(make_run(tmp_path, f"model={model}"), ["critique"])
    assert expected in str(err.value)
