"""A bad value never costs a run: every malformed input is refused when the config is
loaded, before any stage starts or anything is written, with exit 2 and a message that
names the file and line (or the `--set` argument / flag), never a traceback."""

from __future__ import annotations

import re
import time
import tracemalloc
from pathlib import Path

import pytest

from cai.cli import main
from cai.yamlio import ValidationError, parse_yaml

ROOT = Path(__file__).resolve().parent.parent
SMOKE_TEXT = (ROOT / "configs" / "smoke.yaml").read_text(encoding="utf-8")
HARMLESS_TEXT = (ROOT / "constitutions" / "harmless.yaml").read_text(encoding="utf-8")

# 9 levels of 9 aliases: 2 KB of text, 9^9 (387 million) values if expanded.
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
DEEP_FLOW = "[" * 3000 + "]" * 3000
DEEP_BLOCK = "".join("  " * i + f"k{i}:\n" for i in range(150)) + "  " * 150 + "v\n"
# Tests pin cai's words, never a library's sentence (PyYAML's, TRL's), which changes between
# releases: where cai passes a library's reason through, the test asserts cai's part of the
# message (its prefix, the key, the value), exit 2, FILE:LINE and that nothing was written.
# Deep flow nesting: cai refuses past 100 levels, but PyYAML >= 6.0.4's own parser may stop
# first; cai then reports it as a "YAML syntax error".
TOO_DEEP = re.compile(r"nested more than 100 levels|YAML syntax error")


def says(err: str, expected: str | re.Pattern) -> bool:
    """cai's message is in `err`: a substring, or a pattern where more than one of cai's
    messages is right."""
    return bool(expected.search(err)) if isinstance(expected, re.Pattern) else expected in err


def smoke(old: str = "", new: str = "", append: str = "") -> str:
    """configs/smoke.yaml with one edit."""
    if old:
        assert old in SMOKE_TEXT, old
    return (SMOKE_TEXT.replace(old, new, 1) if old else SMOKE_TEXT) + append


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    index = -1
    for _ in range(occurrence):
        index = text.index(needle, index + 1)
    return text[:index].count("\n") + 1


# (id, --set arguments, the part of the message that must appear)
SET_CASES = [
    # ranges, declared once in the Config fields' metadata
    ("critique-rounds-0", ["critique.num_revisions=0"], "'critique.num_revisions' must be at least 1"),
    ("critique-batch-0", ["critique.batch_size=0"], "'critique.batch_size' must be at least 1"),
    ("critique-few-shot-neg", ["critique.few_shot=-1"], "'critique.few_shot' must be at least 0"),
    ("critique-tokens-0", ["critique.max_new_tokens=0"], "'critique.max_new_tokens' must be at least 1"),
    ("critique-critique-tokens-0", ["critique.critique_max_new_tokens=0"], "critique_max_new_tokens"),
    ("critique-top-p-0", ["critique.top_p=0"], "'critique.top_p' must be in (0, 1]"),
    ("critique-top-p-1.5", ["critique.top_p=1.5"], "'critique.top_p' must be in (0, 1]"),
    ("critique-temperature-neg", ["critique.temperature=-0.1"], "'critique.temperature' must be at least 0"),
    ("critique-temperature-inf", ["critique.temperature=.inf"], "'critique.temperature' must be at least 0"),
    ("critique-rounds-float", ["critique.num_revisions=1.5"], "'critique.num_revisions' must be int"),
    ("critique-batch-bool", ["critique.batch_size=true"], "'critique.batch_size' must be int"),
    ("critique-typo", ["critique.num_revisons=1"], "unknown key 'num_revisons'"),
    ("critique-best-of-0", ["critique.best_of=0"], "'critique.best_of' must be at least 1"),
    ("critique-best-of-greedy", ["critique.best_of=2", "critique.revision_temperature=0"],
     "'critique.best_of' is 2 but revisions are greedy"),
    ("critique-revision-temperature-neg", ["critique.revision_temperature=-1"],
     "'critique.revision_temperature' must be at least 0"),
    ("critique-critique-not-bool", ["critique.critique=sometimes"], "'critique.critique' must be bool"),
    ("critique-judge-typo", ["critique.feedback_model=bsae", "critique.best_of=2"], "did you mean 'base'"),
    ("sft-generation-batch-0", ["sft.generation_batch_size=0"], "'sft.generation_batch_size' must be at least 1"),
    ("sft-helpful-neg", ["sft.helpful_prompts=-1"], "'sft.helpful_prompts' must be at least 0"),
    ("sft-temperature-neg", ["sft.helpful_temperature=-1"], "'sft.helpful_temperature' must be at least 0"),
    ("label-batch-0", ["label.batch_size=0"], "'label.batch_size' must be at least 1"),
    ("label-max-prompts-0", ["label.max_prompts=0"], "'label.max_prompts' must be at least 1 (or null)"),
    ("label-top-p-0", ["label.top_p=0"], "'label.top_p' must be in (0, 1]"),
    ("label-k-0", ["label.principles_per_comparison=0"], "'label.principles_per_comparison' must be at least 1"),
    ("label-cot-clamp", ["label.feedback_cot_clamp=[0.6, 0.4]", "label.feedback_cot=true"],
     "'label.feedback_cot_clamp' must be [low, high]"),
    ("label-few-shot-choice", ["label.feedback_few_shot_choice=random"],
     "'label.feedback_few_shot_choice' must be 'first' or 'balanced' or 'mirrored', got str 'random'"),
    ("label-calibrate-str", ["label.feedback_calibrate=maybe"], "'label.feedback_calibrate' must be bool"),
    ("label-cot-calibrate", ["label.feedback_calibrate=true", "label.feedback_cot=true"],
     "'label.feedback_calibrate' does not apply with 'label.feedback_cot'"),
    ("label-cot-mirrored", ["label.feedback_few_shot_choice=mirrored", "label.feedback_cot=true"],
     "'label.feedback_few_shot_choice' mirrored does not apply with 'label.feedback_cot'"),
    # the judge's settings are the same keys in every stage, checked by the same rules
    ("critique-cot-calibrate", ["critique.feedback_calibrate=true", "critique.feedback_cot=true", "critique.best_of=2"],
     "'critique.feedback_calibrate' does not apply with 'critique.feedback_cot'"),
    ("evaluate-cot-clamp", ["evaluate.feedback_cot_clamp=[0.2]", "evaluate.feedback_cot=true"],
     "'evaluate.feedback_cot_clamp' must be [low, high]"),
    ("rl-pointwise-calibrate", ["rl.feedback_calibrate=true", "rl.algorithm=grpo", "rl.reward=judge"],
     "'rl.feedback_calibrate' does not apply to rl's judge, which rates one answer at a time"),
    # keys of earlier versions: refused with their new name
    ("label-renamed-few-shot", ["label.few_shot=1"], "'label.few_shot' is renamed to 'label.feedback_few_shot'"),
    ("label-renamed-cot", ["label.cot=true"], "'label.cot' is renamed to 'label.feedback_cot'"),
    ("evaluate-renamed-calibrate", ["evaluate.calibrate=true"],
     "'evaluate.calibrate' is renamed to 'evaluate.feedback_calibrate'"),
    ("rl-renamed-judge-few-shot", ["rl.judge_few_shot=1"], "'rl.judge_few_shot' is renamed to 'rl.feedback_few_shot'"),
    ("rl-renamed-judge-batch", ["rl.judge_batch_size=8"],
     "'rl.judge_batch_size' is renamed to 'rl.feedback_batch_size'"),
    ("reward-eval-fraction-1", ["reward.eval_fraction=1"], "'reward.eval_fraction' must be in [0, 1)"),
    ("reward-eval-fraction-neg", ["reward.eval_fraction=-0.1"], "'reward.eval_fraction' must be in [0, 1)"),
    ("reward-pair-label", ["reward.critique_pair_label=2"], "'reward.critique_pair_label' must be in [0, 1]"),
    ("rl-helpful-fraction-1", ["rl.helpful_fraction=1"], "'rl.helpful_fraction' must be in [0, 1)"),
    ("rl-max-prompts-0", ["rl.max_prompts=0"], "'rl.max_prompts' must be at least 1 (or null)"),
    ("rl-kl-neg", ["rl.kl_coef=-1"], "'rl.kl_coef' must be at least 0"),
    ("rl-ppo-removed-key", ["rl.stop_token_id=2"], "'rl.stop_token_id' was a key of TRL 1.12's PPOConfig"),
    ("rl-judge-few-shot-neg", ["rl.feedback_few_shot=-1"], "'rl.feedback_few_shot' must be at least 0"),
    ("dpo-min-confidence", ["dpo.min_confidence=0.3"], "'dpo.min_confidence' must be in [0.5, 1]"),
    ("evaluate-batch-0", ["evaluate.batch_size=0"], "'evaluate.batch_size' must be at least 1"),
    ("evaluate-temperature-neg", ["evaluate.temperature=-1"], "'evaluate.temperature' must be at least 0"),
    ("evaluate-top-p-2", ["evaluate.top_p=2"], "'evaluate.top_p' must be in (0, 1]"),
    ("evaluate-few-shot-neg", ["evaluate.feedback_few_shot=-1"], "'evaluate.feedback_few_shot' must be at least 0"),
    ("evaluate-few-shot-choice", ["evaluate.feedback_few_shot_choice=last"],
     "'evaluate.feedback_few_shot_choice' must be 'first'"),
    ("evaluate-calibrate-str", ["evaluate.feedback_calibrate=1"], "'evaluate.feedback_calibrate' must be bool"),
    ("threads-0", ["threads=0"], "'threads' must be at least 1"),
    ("seed-neg", ["seed=-1"], "'seed' must be in [0, 4294967296)"),
    ("prompts-eval-fraction-1", ["prompts.eval_fraction=1.0"], "'prompts.eval_fraction' must be in [0, 1)"),
    ("prompts-eval-fraction-nan", ["prompts.eval_fraction=.nan"], "'prompts.eval_fraction' must be in [0, 1)"),
    ("prompts-max-eval-0", ["prompts.max_eval=0"], "'prompts.max_eval' must be at least 1 (or null)"),
    ("prompts-max-red-team-0", ["prompts.max_red_team=0"], "'prompts.max_red_team' must be at least 1"),
    # TRL values: types, ranges, then the config object built as the stage builds it
    ("sft-lr-abc", ["sft.learning_rate=abc"], "'sft.learning_rate' must be float, got str 'abc'"),
    ("sft-scheduler-typo", ["sft.lr_scheduler_type=cosinee"], re.compile(r"'sft\.lr_scheduler_type': .*cosinee")),
    ("reward-optim-typo", ["reward.optim=adamw_foo"], re.compile(r"'reward\.optim': .*adamw_foo")),
    ("sft-batch-0", ["sft.per_device_train_batch_size=0"], "'sft.per_device_train_batch_size' must be at least 1"),
    ("dpo-accumulation-0", ["dpo.gradient_accumulation_steps=0"], "'dpo.gradient_accumulation_steps' must be"),
    ("rl-mini-batches-0", ["rl.num_mini_batches=0"], "'rl.num_mini_batches' must be at least 1"),
    ("rl-batch-str", ["rl.per_device_train_batch_size=four"], "'rl.per_device_train_batch_size' must be int"),
    ("sft-epochs-neg", ["sft.num_train_epochs=-1"], "'sft.num_train_epochs' must be at least 0"),
    ("sft-warmup-steps-neg", ["sft.warmup_steps=-1"], "'sft.warmup_steps' must be at least 0"),
    ("rl-other-algorithm-key", ["rl.num_generations=4"], "'rl.num_generations' is not a field of PPOConfig"),
    ("sft-output-dir", ["sft.output_dir=/tmp/elsewhere"], "'sft.output_dir': checkpoints always go to the stage"),
    ("reward-output-dir", ["reward.output_dir=shared"], "'reward.output_dir'"),
    # model options (TRL's ModelConfig names), at the top level or in a stage's section
    ("lora-r-0", ["sft.lora_r=0"], "'sft.lora_r' must be at least 1"),
    ("top-lora-r-0", ["lora_r=0"], "'lora_r' must be at least 1"),
    ("lora-alpha-float", ["dpo.lora_alpha=0.5"], "'dpo.lora_alpha' must be int"),
    ("lora-dropout-1", ["rl.lora_dropout=1"], "'rl.lora_dropout' must be in [0, 1)"),
    ("dtype-float13", ["dtype=float13"], "'dtype' must be 'auto' or 'bfloat16' or 'float16' or 'float32'"),
    ("stage-dtype-float13", ["critique.dtype=float13"], "'critique.dtype' must be"),
    ("use-peft-maybe", ["reward.use_peft=maybe"], "'reward.use_peft' must be bool"),
    ("target-modules-int", ["lora_target_modules=3"], "'lora_target_modules' must be"),
    ("load-in-4bit-cpu", ["load_in_4bit=true", "use_peft=true", "device=cpu"],
     "bitsandbytes quantisation needs a CUDA GPU and the bitsandbytes package"),
    ("load-in-8bit-no-lora", ["sft.load_in_8bit=true"], "quantised base weights cannot be trained in full"),
    ("load-in-both", ["sft.load_in_8bit=true", "sft.load_in_4bit=true", "sft.use_peft=true"], "are exclusive"),
    ("flash-attention-cpu", ["attn_implementation=flash_attention_2", "device=cpu"], "runs on CUDA GPUs only"),
    ("attention-unknown", ["label.attn_implementation=fastest"], "unknown attention implementation 'fastest'"),
    ("lora-in-a-data-stage", ["critique.use_peft=true"], "'critique.use_peft': critique only generates"),
    ("reward-task-type", ["reward.lora_task_type=CAUSAL_LM"], "'reward.lora_task_type': reward trains a sequence"),
    ("task-type-typo", ["sft.lora_task_type=causal"], "'sft.lora_task_type' must be"),
    ("keep-checkpoints-str", ["keep_checkpoints=sometimes"], "'keep_checkpoints' must be bool"),
    # code from a model is never run
    ("sft-trust-remote-code", ["sft.trust_remote_code=true"], "cai never runs code shipped with a model"),
    ("sft-model-init-kwargs", ["sft.model_init_kwargs={trust_remote_code: true}"],
     "'sft.model_init_kwargs.trust_remote_code': cai never runs code"),
    ("dpo-model-init-kwargs", ["dpo.model_init_kwargs={torch_dtype: float32, trust_remote_code: yes}"],
     "cai never runs code"),
    ("top-level-trust-remote-code", ["trust_remote_code=true"], "cai never runs code"),
    # --set itself
    ("set-syntax", ["critique.num_revisions=[1"], "YAML syntax error"),
    ("set-python-tag", ["critique.num_revisions=!!python/object/apply:os.system [ls]"], "unsupported YAML"),
    ("set-bomb", [f"critique.num_revisions={{{BOMB.replace(chr(10), ', ')}}}"], "aliases are expanded"),
    ("set-deep", [f"critique.num_revisions={DEEP_FLOW}"], TOO_DEEP),
    ("set-duplicate", ["critique={batch_size: 1, batch_size: 2}"], "duplicate key 'batch_size'"),
    ("set-no-equals", ["critique.num_revisions"], "expected KEY=VALUE"),
    ("set-empty-part", ["critique..num_revisions=1"], "expected KEY=VALUE"),
    ("set-no-key", ["=1"], "expected KEY=VALUE"),
    ("set-through-scalar", ["model.name=x"], "'model' is str 'builtin:tiny', not a section"),
    ("set-through-list", ["evaluate.models=[base]", "evaluate.models.0=x"], "'evaluate.models' is list"),
    ("set-new-section-located", ["evaluate.models.first=x"],
     "--set evaluate.models.first=x: 'evaluate.models' must be"),
    ("set-section-scalar", ["critique=3"], "section 'critique' must be a mapping"),
    # run directories
    ("run-dir-empty", ["run_dir=''"], "'run_dir' is empty"),
    ("run-dir-null", ["run_dir=null"], "'run_dir' must be str"),
    ("run-dir-dev-null", ["run_dir=/dev/null"], "/dev/null is not a folder"),
    ("run-dir-under-file", ["run_dir={file}/sub"], "which is not a folder"),
    ("run-dir-is-file", ["run_dir={file}"], "is not a folder"),
    ("run-dir-nul", ["run_dir=runs/a\x00b"], "character #x0000 is not allowed"),
    ("run-dir-unwritable", ["run_dir=/proc/cai-run"], "cannot write in /proc"),
    # files a run reads
    ("constitution-missing", ["constitution=no/such/constitution.yaml"], "'constitution': no such file"),
    ("device-type", ["device=[cpu]"], "'device' must be str"),
    ("device-unknown", ["device=tpu"], "'device': unknown device 'tpu' (expected auto, cpu, cuda, cuda:N or mps)"),
    ("device-cuda-out-of-range", ["device=cuda:99"], "'device': cuda:99, but"),
    # models, wherever one is named (no weights are loaded to check them)
    ("model-unknown-builtin", ["model=builtin:gpt-5"], "unknown builtin model 'builtin:gpt-5'"),
    ("model-missing-path", ["model=./no/such/model"], "no such model folder ./no/such/model"),
    ("model-stage-name", ["model=sft"], "'model': 'sft' is not a model"),
    ("model-hub-id-offline", ["model=someone/not-cached"], "cannot be fetched: HF_HUB_OFFLINE is set"),
    ("critique-model-no-config", ["critique.model={folder}"], "has no config.json"),
    ("sft-model-adapter-no-base", ["sft.model={adapter}"], "is a LoRA adapter whose adapter_config.json names no "
                                                           "base_model_name_or_path"),
    ("sft-model-adapter-missing-base", ["sft.model={orphan}"], "is a LoRA adapter of /nonexistent/base, which cannot "
                                                               "be used: no such model folder /nonexistent/base"),
    ("sft-model-file", ["sft.model={file}"], "is a file; expected a folder"),
    ("label-policy-typo", ["label.policy=sfft"], "'label.policy': 'sfft' is neither a stage name (base, sft, "
                                                 "reward, rl, dpo) nor a model"),
    ("label-feedback-hub-offline", ["label.feedback_model=someone/judge"], "no network is available"),
    ("reward-model-typo", ["reward.model=sfy"], "did you mean 'sft'?"),
    ("rl-reward-model-missing", ["rl.reward_model=/no/such/reward"], "no such model folder /no/such/reward"),
    ("dpo-policy-unknown-builtin", ["dpo.policy=builtin:nope"], "unknown builtin model 'builtin:nope'"),
    ("evaluate-models-typo", ["evaluate.models=[base, dpp]"], "'evaluate.models': 'dpp' is neither a stage name"),
    ("evaluate-judge-no-model", ["evaluate.feedback_model=critique"], "stage 'critique' saves no model"),
    # prompt sources
    ("prompts-unknown-builtin", ["prompts.red_team=builtin:nope"], "unknown builtin prompt set 'builtin:nope'"),
    ("prompts-missing-file", ["prompts.helpful=no/such.jsonl"], "no such prompt file no/such.jsonl"),
    ("prompts-extension", ["prompts.red_team={file}"], "expected a .jsonl or .txt file or a datasets folder"),
    ("prompts-plain-folder", ["prompts.red_team={folder}"], "is not a datasets folder"),
    ("prompts-nothing-to-train", ["prompts.eval_fraction=0.999999"], "no red-team training prompts for critique"),
    ("prompts-nothing-to-evaluate", ["prompts.eval_fraction=0"], "no held-out red_team prompts for evaluate"),
]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A working folder with a regular file, a plain folder and a PEFT adapter folder in
    it; the run folder must stay absent."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "an-adapter").mkdir()
    (tmp_path / "an-adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "an-orphan").mkdir()  # an adapter of a base model that is gone
    (tmp_path / "an-orphan" / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "base_model_name_or_path": "/nonexistent/base"}')
    return tmp_path


def placed(argument: str, workspace: Path) -> str:
    return (argument.replace("{file}", str(workspace / "a-file")).replace("{folder}", str(workspace / "a-folder"))
            .replace("{adapter}", str(workspace / "an-adapter")).replace("{orphan}", str(workspace / "an-orphan")))


def refused(capsys, argv: list[str], run_dir: Path | None = None) -> str:
    """Run the CLI in-process; assert exit 2, no traceback, nothing written; return stderr."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in out + err
    if run_dir is not None:
        assert not run_dir.exists(), f"{run_dir} was written"
    return err


@pytest.mark.parametrize("overrides, expected", [c[1:] for c in SET_CASES], ids=[c[0] for c in SET_CASES])
def test_set_values_are_refused_before_any_work(workspace, capsys, overrides, expected):
    run_dir = workspace / "run"
    overrides = [placed(o, workspace) for o in overrides]
    argv = ["run", "--config", str(ROOT / "configs" / "smoke.yaml"), "--set", f"run_dir={run_dir}"]
    for item in overrides:
        argv += ["--set", item]
    err = refused(capsys, argv, run_dir)
    assert says(err, expected), err
    if not any(k in overrides[0] for k in ("run_dir", "constitution", "evaluate.models", "..", "=1")):
        # The message names the --set argument (it was not on a YAML line).
        key = overrides[0].partition("=")[0]
        assert f"--set {key}" in err
    assert not (workspace / "cai-error").exists()


# (id, file name, content, line the message must name, the message part)
PROMPT_FILE_CASES = [
    ("bad-json", "p.jsonl", b'{"prompt": "ok"}\n{not json\n', 2, "not a JSON line"),
    ("number", "p.jsonl", b'{"prompt": "ok"}\n\n{"prompt": 5}\n', 3, "'prompt' must be a string, got int"),
    ("blank", "p.jsonl", b'{"text": "   "}\n', 1, "'text' is blank"),
    ("no-field", "p.jsonl", b'{"prompt": "ok"}\n{"question": "why?"}\n', 2, "no 'prompt' (or 'text') field"),
    ("not-an-object", "p.jsonl", b'["a prompt"]\n', 1, "expected a JSON object"),
    ("latin-1", "p.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', 2, "not UTF-8 text (byte 0xe9"),
    ("latin-1-txt", "p.txt", b"fine\nalso fine\ncaf\xe9\n", 3, "not UTF-8"),
    ("empty-jsonl", "p.jsonl", b"", 1, "no prompts in the file"),
    ("blank-txt", "p.txt", b"\n  \n", 1, "no prompts in the file"),
]


@pytest.mark.parametrize("key", ["red_team", "helpful"])
@pytest.mark.parametrize("name, content, line, expected", [c[1:] for c in PROMPT_FILE_CASES],
                         ids=[c[0] for c in PROMPT_FILE_CASES])
def test_prompt_files_are_read_and_checked_before_any_work(workspace, capsys, key, name, content, line, expected):
    prompts = workspace / name
    prompts.write_bytes(content)
    argv = ["run", "--config", str(ROOT / "configs" / "smoke.yaml"), "--set", f"run_dir={workspace / 'run'}",
            "--set", f"prompts.{key}={prompts}"]
    assert f"{prompts}:{line}: {expected}" in refused(capsys, argv, workspace / "run")


def test_every_bad_prompt_line_is_reported(workspace, capsys):
    prompts = workspace / "p.jsonl"
    prompts.write_text('{"prompt": 1}\n{"prompt": "ok"}\n{oops\n')
    err = refused(capsys, ["critique", "--config", str(ROOT / "configs" / "smoke.yaml"), "--set",
                           f"run_dir={workspace / 'run'}", "--set", f"prompts.red_team={prompts}"], workspace / "run")
    assert f"{prompts}:1: " in err and f"{prompts}:3: " in err


def fake_hub_cache(root: Path, repo_id: str) -> None:
    """The layout huggingface_hub leaves after downloading `repo_id`'s config."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")


def test_a_hub_id_is_fine_offline_when_cached_and_refused_without_a_network(workspace, monkeypatch):
    from huggingface_hub import constants

    from cai.config import load_config
    from cai.plan.plan import validate

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(workspace / "hub"))
    fake_hub_cache(workspace / "hub", "someone/cached")
    run = load_config(ROOT / "configs" / "smoke.yaml", [f"run_dir={workspace / 'run'}", "label.feedback_model="
                                                        "someone/cached"])
    validate(run, ["label"])  # cached: usable offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing answers
    run = load_config(ROOT / "configs" / "smoke.yaml", [f"run_dir={workspace / 'run'}", "label.feedback_model="
                                                        "someone/elsewhere"])
    with pytest.raises(ValidationError, match=r"someone/elsewhere .* cannot be fetched: no network is available"):
        validate(run, ["label"])
    assert not (workspace / "run").exists()


def test_a_warning_about_a_set_argument_names_the_argument_alone(workspace, capsys):
    """`--check` with a hub id given by --set: the warning is located at the argument,
    never at a line number it has not got."""
    argument = "model=someone/not-cached"
    assert main(["run", "--config", str(ROOT / "configs" / "smoke.yaml"), "--set", f"run_dir={workspace / 'run'}",
                 "--set", argument, "--check"]) == 0
    err = capsys.readouterr().err
    assert f"--set {argument}: warning: 'model': model someone/not-cached is not in the local" in err
    assert ":None" not in err


@pytest.mark.skipif(__import__("torch").backends.mps.is_available(), reason="this machine has MPS")
def test_mps_without_mps_is_refused(workspace, capsys):
    argv = ["run", "--config", str(ROOT / "configs" / "smoke.yaml"), "--set", f"run_dir={workspace / 'run'}",
            "--set", "device=mps"]
    assert "--set device=mps: 'device': mps, but MPS is not available" in refused(capsys, argv, workspace / "run")


def test_a_stage_that_is_not_part_of_the_run_is_skipped_not_refused(workspace):
    from cai.config import load_config
    from cai.plan.plan import validate

    run = load_config(ROOT / "configs" / "smoke.yaml", [f"run_dir={workspace / 'run'}", "rl=null", "dpo=null",
                                                        "evaluate.models=[base, sft, rl, dpo]"])
    validate(run, ["evaluate"])  # evaluate skips rl and dpo, as it did before


# (id, config text, needle whose line the message must name, occurrence, the message part)
FILE_CASES = [
    ("duplicate-stage-key", smoke("  few_shot: 1\n", "  few_shot: 1\n  few_shot: 2\n"), "  few_shot: 2", 1,
     "duplicate key 'few_shot' (first given at line"),
    ("duplicate-section", smoke(append="\ncritique:\n  num_revisions: 1\n"), "\ncritique:", 2,
     "duplicate key 'critique'"),
    ("duplicate-top-key", smoke("seed: 0\n", "seed: 0\nseed: 1\n"), "seed: 1", 1, "duplicate key 'seed'"),
    ("billion-laughs", smoke(append="\nbomb:\n" + "".join("  " + line + "\n" for line in BOMB.splitlines())),
     None, 1, "aliases are expanded"),
    ("deep-flow", smoke(append=f"\ndeep: {DEEP_FLOW}\n"), "deep:", 1, TOO_DEEP),
    ("deep-block", smoke(append="\n" + DEEP_BLOCK), "k99:", 1, "nested more than 100 levels"),
    ("self-alias", smoke(append="\nloop: &loop [*loop]\n"), "loop:", 1, "refers to a value that contains it"),
    ("python-tag", smoke("model: builtin:tiny", "model: !!python/object/apply:os.system [echo hi]"), "model:", 1,
     "unsupported YAML"),
    ("unclosed-bracket", smoke("  max_eval: 4\n", "  max_eval: [4\n"), "\ncritique:", 1, "YAML syntax error"),
    ("tab-indent", smoke("  few_shot: 1\n", "\tfew_shot: 1\n"), "\tfew_shot", 1, "YAML syntax error"),
    ("undefined-alias", smoke("seed: 0", "seed: *nothing"), "seed:", 1, "YAML syntax error"),
    ("two-documents", smoke(append="---\nseed: 1\n"), "---", 1, "YAML syntax error"),
    ("not-a-mapping", "- a\n- b\n", "- a", 1, "a run config must be a mapping"),
    ("nul-character", smoke("seed: 0", "seed: 0\x00"), "seed:", 1, "YAML syntax error"),
    ("bad-range-line", smoke("  batch_size: 4\n", "  batch_size: -4\n"), "  batch_size: -4", 1,
     "'critique.batch_size' must be at least 1"),
    ("bad-trl-line", smoke("  learning_rate: 1.0e-3\n", "  learning_rate: fast\n"), "learning_rate: fast", 1,
     "'sft.learning_rate' must be float"),
    ("run-dir-nul-in-file", smoke("run_dir: runs/smoke", 'run_dir: "runs/a\\0b"'), "run_dir:", 1, "NUL"),
    ("unknown-section", smoke(append="\ncritiqe:\n  num_revisions: 1\n"), "critiqe:", 1, "unknown key 'critiqe'"),
    # a key in the wrong place: the sections that take it
    ("stage-key-at-top-level", smoke("threads: 1\n", "threads: 1\nlearning_rate: 0.1\n"), "learning_rate: 0.1", 1,
     "unknown key 'learning_rate' in the config (not a top-level key); 'learning_rate' is a stage setting: write it "
     "in the section of the stage it is for: sft.learning_rate, reward.learning_rate, rl.learning_rate or "
     "dpo.learning_rate"),
    ("section-that-is-no-stage", smoke(append="\nppo:\n  kl_coef: 0.1\n"), "\nppo:", 1,
     "unknown key 'ppo' in the config (not a top-level key); 'ppo' is not a stage (critique, sft, label, reward, rl, "
     "dpo, evaluate): its keys belong in a stage's section, e.g. rl.kl_coef"),
    ("top-level-dtype", smoke("threads: 1\n", "threads: 1\ndtype: float13\n"), "dtype: float13", 1,
     "'dtype' must be 'auto' or"),
    ("stage-lora-r", smoke("  helpful_prompts: 4\n", "  helpful_prompts: 4\n  lora_r: 0\n"), "  lora_r: 0", 1,
     "'sft.lora_r' must be at least 1"),
    # a stage's keys override the top level's: sft trains in full, and its own load_in_8bit is refused there
    ("stage-overrides-top", smoke("threads: 1\n", "threads: 1\nuse_peft: true\n")
     .replace("  helpful_prompts: 4\n", "  helpful_prompts: 4\n  use_peft: false\n  load_in_8bit: true\n"),
     "  load_in_8bit: true", 1, "'sft.load_in_8bit': quantised base weights cannot be trained in full"),
]


@pytest.mark.parametrize("text, needle, occurrence, expected", [c[1:] for c in FILE_CASES],
                         ids=[c[0] for c in FILE_CASES])
def test_config_files_are_refused_with_file_and_line(workspace, capsys, text, needle, occurrence, expected):
    config = workspace / "cfg.yaml"
    config.write_text(text.replace("run_dir: runs/smoke", f"run_dir: {workspace / 'run'}"), encoding="utf-8")
    started = time.perf_counter()
    err = refused(capsys, ["run", "--config", str(config)], workspace / "run")
    assert time.perf_counter() - started < 2
    assert says(err, expected), err
    if needle is None:  # the line where the expansion passed the limit
        assert re.search(rf"{re.escape(str(config))}:\d+: ", err)
    else:
        assert f"{config}:{line_of(text, needle, occurrence) + (1 if needle.startswith(chr(10)) else 0)}:" in err


@pytest.mark.parametrize("name, edit, needle, expected", [
    ("duplicate-principle-key", ("  - id: dangerous-help\n", "  - id: dangerous-help\n    id: again\n"),
     "    id: again", "duplicate key 'id'"),
    ("duplicate-section", ("critique_revision:\n", "critique_revision: []\ncritique_revision:\n"),
     "critique_revision:\n  - id", "duplicate key 'critique_revision'"),
    ("bomb", ("name: harmless\n", "name: harmless\n" + BOMB.replace("a: &a", "x0: &a")), "f: &f",
     "more than 100,000 values once aliases are expanded"),
])
def test_constitution_problems_are_refused_before_the_first_stage(workspace, capsys, name, edit, needle, expected):
    constitution = workspace / "constitution.yaml"
    text = HARMLESS_TEXT.replace(*edit, 1)
    constitution.write_text(text, encoding="utf-8")
    err = refused(capsys, ["run", "--config", str(ROOT / "configs" / "smoke.yaml"), "--set",
                           f"run_dir={workspace / 'run'}", "--set", f"constitution={constitution}"], workspace / "run")
    assert f"{constitution}:{line_of(text, needle)}: {expected}" in err


def test_missing_unreadable_and_binary_config_files(workspace, capsys):
    assert "no such file" in refused(capsys, ["run", "--config", str(workspace / "nope.yaml")])
    assert "is a folder" in refused(capsys, ["run", "--config", str(workspace)])
    (workspace / "binary.yaml").write_bytes(b"seed: \xff\xfe\n")
    assert "not UTF-8" in refused(capsys, ["run", "--config", str(workspace / "binary.yaml")])


@pytest.mark.parametrize("flags, expected", [
    (["--from", "rl", "--until", "label"], "--from: 'rl' comes after --until 'label'"),
    (["--from", "nonsense"], "--from: 'nonsense' is not one of this run's stages"),
    (["--until", "critiqe"], "--until: 'critiqe' is not one of this run's stages"),
    (["--from", "rl@2"], ": the config has rounds: 1, so rl runs in round 1 (raise rounds to run round 2)"),
    (["--from", "rl@3", "--set", "rounds=2"], ": the config has rounds: 2, so rl runs in rounds 1 to 2 (raise rounds "
                                              "to run round 3)"),
    (["--until", "sft@2"], "--until: 'sft@2' is not one of this run's stages (critique, sft, label, reward, rl, dpo, "
                           "evaluate): sft runs once, not per round"),
])
def test_stage_range_flags(workspace, capsys, flags, expected):
    run_dir = workspace / "run"
    argv = ["run", "--config", str(ROOT / "configs" / "smoke.yaml"), "--set", f"run_dir={run_dir}", *flags]
    assert expected in refused(capsys, argv, run_dir)


@pytest.mark.parametrize("setup, expected", [
    ("file", "is a file, not a run folder"),
    ("missing", "no such folder"),
    ("bad-manifest", "sft/manifest.json:1: not valid JSON"),
    ("list-results", "evaluate/results.json:1: expected a JSON object, got list"),
    ("wrong-shape-results", "evaluate/results.json: not what cai writes (KeyError"),
    ("bad-log-history", "sft/log_history.json:1: expected a JSON list"),
])
def test_report_on_bad_run_folders(workspace, capsys, setup, expected):
    run_dir = workspace / "run"
    if setup == "file":
        run_dir = workspace / "a-file"
    elif setup != "missing":
        (run_dir / "sft").mkdir(parents=True)
        (run_dir / "evaluate").mkdir()
        files = {"bad-manifest": ("sft/manifest.json", "{bad"), "list-results": ("evaluate/results.json", "[1]"),
                 "wrong-shape-results": ("evaluate/results.json", '{"models": ["base"]}'),
                 "bad-log-history": ("sft/log_history.json", '{"step": 1}')}
        name, content = files[setup]
        (run_dir / name).write_text(content)
    err = refused(capsys, ["report", str(run_dir)])
    assert says(err, expected), err
    assert not (run_dir / "report").exists()


def test_yaml_bombs_are_refused_fast_and_small():
    for text in (BOMB, DEEP_FLOW, "[" * 100_000, DEEP_BLOCK, "x: &x " + "[*x, " * 50):
        tracemalloc.start()
        started = time.perf_counter()
        with pytest.raises(ValidationError) as err:
            parse_yaml(text, "bomb.yaml")
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert seconds < 2 and peak < 50e6, (text[:40], seconds, peak)
        assert re.match(r"bomb\.yaml:\d+: ", str(err.value))


def test_a_wide_document_under_the_limits_still_loads():
    text = "x: &x [" + ", ".join(["1"] * 1000) + "]\n" + "".join(f"k{i}: *x\n" for i in range(50))
    data = parse_yaml(text, "wide.yaml").data
    assert len(data) == 51 and data["k49"] == [1] * 1000
    assert parse_yaml("lr: 1e-4\nexp: 2E+3\nword: 1e5x\n", "f.yaml").data == {"lr": 1e-4, "exp": 2e3, "word": "1e5x"}


def test_merge_keys_are_not_duplicates():
    data = parse_yaml("base: &b {x: 1, y: 2}\nthis: {<<: *b, x: 3}\n", "m.yaml").data
    assert data["this"] == {"x": 3, "y": 2}


def test_an_internal_error_prints_one_line_and_saves_the_traceback(workspace, capsys, monkeypatch):
    import cai.execute.executor

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cai.execute.executor, "execute", broken)
    argv = ["run", "--config", str(ROOT / "configs" / "smoke.yaml"), "--set", f"run_dir={workspace / 'run'}"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cai: internal error: ZeroDivisionError: a bug" in err
    log = Path(re.search(r"the traceback is in (\S+)", err).group(1))
    assert "Traceback" in log.read_text() and "ZeroDivisionError" in log.read_text()
    log.unlink()
    assert main(["-v", *argv]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    Path(re.search(r"the traceback is in (\S+)", err).group(1)).unlink()


def test_run_dir_tilde_is_expanded(workspace, monkeypatch):
    from cai.config import load_config

    monkeypatch.setenv("HOME", str(workspace))
    run = load_config(ROOT / "configs" / "smoke.yaml", ["run_dir=~/runs/x"])
    assert run.run_dir == str(workspace / "runs" / "x")
    assert not (workspace / "runs").exists()
