"""Training, resuming and saving: checkpoints in the stage folder, a killed run resumes
from the newest complete one; the trained weights (or adapter, and the adapter merged)
saved with save_pretrained and a model card."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from cai import console, distributed
from cai.models import ModelOptions
from cai.rundir import WriteError, atomic_write_json, atomic_write_text, follow_umask, writing
from cai.training.args import checkpointing_is_auto
from cai.training.lm_head import use_plain_lm_head
from cai.training.memory import choose_activation_checkpointing


def train_and_save(trainer, ctx, model_dir: str = "model", base: str = "", data: dict[str, int] | None = None) -> dict:
    """Train (resuming from the newest checkpoint if one exists), save the model, write
    the trainer's log history next to it, and delete the checkpoints (unless the stage's
    `keep_checkpoints`). `base`: the spec the stage trained from; `data`: {file: rows}
    it trained on (both for the model card)."""
    main = distributed.is_main()
    output_dir = Path(trainer.args.output_dir)
    checkpointing = None
    run = getattr(ctx, "run", None)
    if run is not None and checkpointing_is_auto(run, getattr(ctx, "trl", None) or {}):
        # before the work is counted: recomputing activations is work
        checkpointing = choose_activation_checkpointing(trainer, trained_model(trainer), run.memory_budget, ctx.step)
    if getattr(ctx, "work", None) is not None:
        count_training_work(trainer, ctx.work)
    use_plain_lm_head(trainer)  # on a CPU: TRL's fused LM head scores every position, and slowly
    checkpoint = distributed.broadcast(resume_checkpoint(output_dir, ctx.name) if main else None)
    use_training_bar(trainer, f"{ctx.step}: training")
    try:
        with writing(output_dir):  # a checkpoint save that fails (disk full) names the checkpoints folder
            result = trainer.train(resume_from_checkpoint=checkpoint)
    except WriteError:
        if main:  # free the half-written checkpoint's space now; the complete ones stay for the resume
            for folder in output_dir.glob("checkpoint-*"):
                if not checkpoint_complete(folder):
                    shutil.rmtree(folder, ignore_errors=True)
        raise
    saved = save_trained_model(trainer, ctx, model_dir, base, data or {})
    atomic_write_json(ctx.dir / "log_history.json", trainer.state.log_history)
    options = getattr(ctx, "model_options", None) or ModelOptions()
    if main and not options.keep_checkpoints:
        shutil.rmtree(output_dir, ignore_errors=True)  # the model is saved: they only cost disk
    elif main and output_dir.is_dir():
        follow_umask(output_dir)  # kept checkpoints: readable like the model
    distributed.barrier()
    return {"train_loss": round(result.training_loss, 6), "global_steps": trainer.state.global_step,
            "train_seconds": round(result.metrics.get("train_runtime", 0.0), 2),
            **({"activation_checkpointing": checkpointing} if checkpointing else {}), **saved}


def use_training_bar(trainer, desc: str) -> None:
    """The trainer's progress bar named after the step, with the latest loss on it, in
    place of transformers' bar, which prints a dict at every logging step (the log
    history, saved next to the model, keeps every one; -v prints them too). A trainer the
    user gave `disable_tqdm: true` keeps its plain printout."""
    from transformers.trainer_callback import ProgressCallback

    class TrainingBar(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.training_bar = console.bar(total=state.max_steps, desc=desc, unit="step", dynamic_ncols=True)
            self.current_step = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if console.verbosity == console.VERBOSE:  # -v: every logged dict, as transformers prints them
                super().on_log(args, state, control, logs=logs, **kwargs)
            loss = next((logs[k] for k in ("loss", "loss/policy_avg") if k in (logs or {})), None)
            if self.training_bar is not None and isinstance(loss, (int, float)):
                self.training_bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(TrainingBar())


def count_training_work(trainer, work) -> None:
    """Count each training forward's tokens into the stage's `work` (cai.work): real
    tokens (the attention mask's ones; every position without a mask, as padding-free
    batches have) against positions computed. Wraps the trainer's `compute_loss`, which
    sees the batch as the model gets it. A DPO trainer without precomputed reference
    log-probabilities also runs the reference forward on every token (precomputed, as
    cai's dpo does by default, that pass runs while the trainer is built and cai's DPO
    trainers count it themselves: `cai.training.soft_labels.CountsReferencePass`).
    RLOO/GRPO's generation counts from what it returns (prompt: prefill, completion:
    decode), with the reference forward when beta > 0 (their recomputed old
    log-probabilities are not counted; their reward model's scoring counts itself,
    `cai.training.models.RewardScorer`); cai's PPO, which trains in its own loop, counts
    its own (`count_work`). A resumed stage counts the work of this session, as its
    seconds are."""
    from cai.work import batch_tokens, matmul_parameters, training_flop_per_token

    if hasattr(trainer, "count_work"):
        trainer.count_work(work)
        return
    model = trained_model(trainer)
    if model is None:
        return
    per_token = training_flop_per_token(model, bool(getattr(trainer.args, "activation_checkpointing", False)))
    forward = 2 * matmul_parameters(model)
    reference = hasattr(trainer, "precompute_ref_logps") and not trainer.precompute_ref_logps
    compute_loss = trainer.compute_loss

    def counted_loss(model_, inputs, *args, **kwargs):
        if model_.training:
            tokens, positions = batch_tokens(inputs)
            work.add("train", tokens, positions, per_token)
            if reference:
                work.add("reference", tokens, positions, forward)
        return compute_loss(model_, inputs, *args, **kwargs)

    trainer.compute_loss = counted_loss
    if hasattr(trainer, "_generate_and_score_completions"):  # RLOO, GRPO
        generate = trainer._generate_and_score_completions

        def counted_generation(*args, **kwargs):
            batch = generate(*args, **kwargs)
            for kind, ids, mask in (("prefill", "prompt_ids", "prompt_mask"),
                                    ("decode", "completion_ids", "completion_mask")):
                work.add(kind, int(batch[mask].sum()), batch[ids].numel(), forward)
            if getattr(trainer, "beta", 0.0) != 0.0:
                work.add("reference", *batch_tokens(batch), forward)
            return batch

        trainer._generate_and_score_completions = counted_generation


def trained_model(trainer):
    """The model the trainer optimised, unwrapped (PPO's policy, without its value head)."""
    model = getattr(trainer, "model", None)
    if model is None:
        return None
    accelerator = getattr(trainer, "accelerator", None)
    model = accelerator.unwrap_model(model) if accelerator is not None else model
    return getattr(model, "policy", model)


def save_trained_model(trainer, ctx, model_dir: str, base: str, data: dict[str, int]) -> dict:
    """Save with save_pretrained, in the dtype the stage trained in, each folder written
    aside and renamed into place, with a model card (README.md):

    - full fine-tuning: STAGE/model/;
    - LoRA (`use_peft`): the adapter in STAGE/adapter/ (its `base_model_name_or_path` an
      absolute path, so it loads from any working folder) and, with `merge_adapter`, the
      adapter merged into a fresh, unquantised copy of its base in STAGE/model/, which
      AutoModel loads like any model (later stages and evaluate read it unchanged).

    The saved config's pad token is the saved tokenizer's (PPO may pad with another token
    than the one the model was loaded with).

    Several processes: only the main one writes; with sharded weights (FSDP, ZeRO-3) the
    others take part in the trainer's save, which gathers them."""
    from accelerate.utils import is_peft_model

    from cai import models

    main = distributed.is_main()
    if not main and not _sharded(trainer):
        return {}
    options = getattr(ctx, "model_options", None) or ModelOptions()
    tokenizer = trainer.processing_class
    model = trained_model(trainer)
    if model is not None and tokenizer is not None:
        align_pad_token(model, tokenizer)
    if model is None or not is_peft_model(model):
        _write_folder(ctx.dir / model_dir, lambda out: _save(trainer, tokenizer, out))
        write_model_card(ctx.dir / model_dir, ctx, trainer, base, data, adapter=False)
        return {}

    adapter_dir = ctx.dir / "adapter"

    def save_adapter(out: Path) -> None:
        _save(trainer, tokenizer, out)
        config = out / models.ADAPTER_CONFIG
        settings = json.loads(config.read_text(encoding="utf-8"))
        base_path = Path(settings.get("base_model_name_or_path") or "")
        if main and base_path.exists():  # a relative path would depend on the working folder
            settings["base_model_name_or_path"] = str(base_path.resolve())
            config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    _write_folder(adapter_dir, save_adapter)
    write_model_card(adapter_dir, ctx, trainer, base, data, adapter=True)
    if not main:
        return {}
    if not options.merge_adapter:
        shutil.rmtree(ctx.dir / model_dir, ignore_errors=True)  # no stale merged model from an earlier attempt
        return {"adapter": str(adapter_dir)}
    seq_cls = models.adapter_task(str(adapter_dir)) == "SEQ_CLS"
    if seq_cls:
        merged = models.load_reward_model(str(adapter_dir), tokenizer, options)
    else:
        merged = models.load_causal_lm(str(adapter_dir), "cpu", options)
    align_pad_token(merged, tokenizer)

    def save_merged(out: Path) -> None:
        merged.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)

    _write_folder(ctx.dir / model_dir, save_merged)
    write_model_card(ctx.dir / model_dir, ctx, trainer, base, data, adapter=False, merged=True)
    return {"adapter": str(adapter_dir)}


def _sharded(trainer) -> bool:
    return bool(getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False))


def _save(trainer, tokenizer, out: Path) -> None:
    trainer.save_model(str(out))  # the Trainer writes on the main process only
    if tokenizer is not None and distributed.is_main():
        tokenizer.save_pretrained(str(out))


def _write_folder(target: Path, write) -> None:
    """Write a folder aside and rename it into place (a kill leaves the old one or none).
    The main process prepares and renames; every process that got here runs `write`."""
    staging = target.with_name(target.name + ".tmp")
    if distributed.is_main():
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
    with writing(target):
        try:
            write(staging)
            if distributed.is_main():
                follow_umask(staging)  # safetensors writes its files 0600
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
        except BaseException:
            if distributed.is_main():
                shutil.rmtree(staging, ignore_errors=True)  # a failed save leaves no half folder
            raise


def align_pad_token(model, tokenizer) -> None:
    """The model's config (and generation config) pad with the tokenizer's pad token."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        return
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    model.config.pad_token_id = pad
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.pad_token_id = pad


def write_model_card(folder: Path, ctx, trainer, base: str, data: dict[str, int], adapter: bool,
                     merged: bool = False) -> None:
    """A short README.md: where the weights come from, on what, with which settings, and
    how to load them."""
    from cai import models

    options = getattr(ctx, "model_options", None) or ModelOptions()
    args = trainer.args
    run = getattr(ctx, "run", None)
    seq_cls = (folder / "config.json").is_file() and "ForSequenceClassification" in (folder / "config.json").read_text()
    if adapter:
        seq_cls = models.adapter_task(str(folder)) == "SEQ_CLS"
    auto = "AutoModelForSequenceClassification" if seq_cls else "AutoModelForCausalLM"
    try:
        resolved = models.resolve(base) if base else ""
    except ValueError:
        resolved = ""
    try:
        constitution = f"{ctx.constitution.name} ({run.constitution})"
    except (AttributeError, OSError, ValueError):
        constitution = getattr(run, "constitution", "unknown")
    if options.use_peft:
        method = (f"LoRA r={options.lora_r}, alpha={options.lora_alpha}, dropout={options.lora_dropout}, "
                  f"target modules {options.lora_target_modules or 'peft default'}"
                  + (", base quantised to 4 bits (QLoRA)" if options.load_in_4bit else "")
                  + (", base quantised to 8 bits" if options.load_in_8bit else ""))
    else:
        method = "full fine-tuning"
    schedule = [f"learning rate {getattr(args, 'learning_rate', '?')}",
                f"epochs {getattr(args, 'num_train_epochs', '?')}"]
    if getattr(args, "max_steps", -1) and getattr(args, "max_steps", -1) > 0:
        schedule.append(f"max steps {args.max_steps}")
    if getattr(args, "total_episodes", None):
        schedule.append(f"total episodes {args.total_episodes}")
    schedule.append(f"steps trained {trainer.state.global_step}")
    what = ("the LoRA adapter" if adapter else "the adapter merged into its base" if merged else "the weights")
    lines = [
        f"# cai {ctx.name} model ({what})", "",
        f"Trained by cai's `{ctx.name}` stage ({type(trainer).__name__}, Constitutional AI / RLAIF).", "",
        f"- base model: {base or 'unknown'}" + (f" (resolved to `{resolved}`)" if resolved not in ("", base) else ""),
        "- data: " + (", ".join(f"{name} ({rows} rows)" for name, rows in data.items()) or "see the stage's manifest"),
        f"- constitution: {constitution}",
        f"- dtype: {options.dtype}; method: {method}",
        f"- {', '.join(schedule)}",
        f"- seed {getattr(run, 'seed', '?')}; config hash {getattr(ctx, 'config_hash', '?')} "
        "(the stage's manifest.json has every setting)", "",
        "## Loading", "", "```python",
    ]
    if adapter:
        lines += [f"from peft import AutoPeftModel{'ForSequenceClassification' if seq_cls else 'ForCausalLM'}", "",
                  f"model = AutoPeftModel{'ForSequenceClassification' if seq_cls else 'ForCausalLM'}"
                  f".from_pretrained(\"{folder.resolve()}\")",
                  "```", "", "The base model is `base_model_name_or_path` in adapter_config.json. In a cai config "
                  "this folder is a model spec: cai loads the base and merges the adapter."]
    else:
        lines += [f"from transformers import {auto}, AutoTokenizer", "",
                  f"model = {auto}.from_pretrained(\"{folder.resolve()}\"" + ")",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{folder.resolve()}\")", "```", "",
                  "In a cai config this folder (or the stage name) is a model spec."]
    atomic_write_text(folder / "README.md", "\n".join(lines) + "\n")


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


def checkpoint_complete(folder: Path) -> bool:
    """Weights and a readable trainer_state.json (the Trainer writes the state after the
    weights and optimizer, so a kill during saving leaves it missing or torn)."""
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def resume_checkpoint(output_dir: Path, stage: str) -> str | None:
    """The newest complete checkpoint in `output_dir` (None: start at step 0). Incomplete
    ones are removed, with a message: resuming from one would fail or, worse, load
    half-written weights, and the Trainer's rotation would count them as checkpoints."""
    if not output_dir.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in output_dir.iterdir()
                   if p.is_dir() and (m := _CHECKPOINT.match(p.name)))
    complete = [p for _, p in found if checkpoint_complete(p)]
    for _, path in found:
        if path not in complete:
            shutil.rmtree(path)
            print(f"[cai] {stage}: {path.name} was incomplete (a kill while saving?) and is removed")
    if not complete:
        if found:
            print(f"[cai] {stage}: no complete checkpoint left, training starts at step 0")
        return None
    print(f"[cai] {stage}: resuming from {complete[-1].name}")
    return str(complete[-1])
