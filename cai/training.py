"""TRL plumbing shared by the training stages: config defaults, resume, saving, logs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers.trainer_utils import get_last_checkpoint

from cai.rundir import atomic_write_json


def trl_config(ctx, cls, **stage_defaults):
    """Build a TRL config: cai's defaults, then the stage's, then the user's `ctx.trl` keys.

    On CPU, bf16 and gradient checkpointing are off (TRL defaults both on; checkpointing
    costs about a third more time on small models). Checkpoints go to the stage folder so
    a killed run resumes from the last one.
    """
    on_gpu = torch.cuda.is_available() and ctx.run.device != "cpu"
    defaults = {
        "output_dir": str(ctx.dir / "checkpoints"), "seed": ctx.run.seed, "data_seed": ctx.run.seed,
        "report_to": "none", "logging_steps": 1, "save_strategy": "steps", "save_steps": 50,
        "save_total_limit": 1, "dataloader_num_workers": 0, "use_cpu": not on_gpu,
    }
    if not on_gpu:
        defaults.update(bf16=False, fp16=False)
        if not {"gradient_checkpointing", "activation_checkpointing"} & set(ctx.trl):
            defaults["activation_checkpointing"] = False  # transformers 5's name; the old one is deprecated
    values = {**defaults, **stage_defaults, **ctx.trl}
    for key, value in values.items():
        if key.endswith("_strategy") and value is False:
            values[key] = "no"  # YAML reads a bare `no` as false
    return cls(**values)


def train_and_save(trainer, ctx, model_dir: str = "model") -> dict:
    """Train (resuming from the newest checkpoint if one exists), save the model with
    save_pretrained, and write the trainer's log history next to it."""
    checkpoint = None
    output_dir = Path(trainer.args.output_dir)
    if output_dir.is_dir():
        checkpoint = get_last_checkpoint(str(output_dir))
    result = trainer.train(resume_from_checkpoint=checkpoint)
    target = ctx.dir / model_dir
    staging = target.with_name(model_dir + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(str(staging))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    atomic_write_json(ctx.dir / "log_history.json", trainer.state.log_history)
    return {"train_loss": round(result.training_loss, 6), "global_steps": trainer.state.global_step,
            "train_seconds": round(result.metrics.get("train_runtime", 0.0), 2)}


def read_log_history(stage_dir: Path) -> list[dict]:
    path = Path(stage_dir) / "log_history.json"
    return json.loads(path.read_text()) if path.exists() else []
