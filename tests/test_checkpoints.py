"""A training stage resumes only from a complete checkpoint: a kill while saving leaves
a `checkpoint-N` folder without its trainer state (or weights), which is removed, and
training goes on from the previous checkpoint or from step 0."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from cai.rundir import StageDir
from cai.training.save import resume_checkpoint, train_and_save


def checkpoint(output_dir: Path, step: int, weights: bool = True, state: str | None = "{}") -> Path:
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if weights:
        (folder / "model.safetensors").write_bytes(b"weights")
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
    return folder


def test_incomplete_checkpoints_are_removed_and_the_last_complete_one_is_used(tmp_path, capsys):
    out = tmp_path / "checkpoints"
    checkpoint(out, 2)
    checkpoint(out, 4, state=None)  # killed before the trainer state was written
    checkpoint(out, 6, state='{"global_step": 6, "log_hi')  # killed while writing it
    checkpoint(out, 8, weights=False)  # weights missing
    checkpoint(out, 10, weights=False, state=None)
    (out / "checkpoint-x").mkdir()  # not a Trainer checkpoint name: left alone

    assert resume_checkpoint(out, "sft") == str(out / "checkpoint-2")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-x"]
    printed = capsys.readouterr().out
    assert "checkpoint-10 was incomplete" in printed and "resuming from checkpoint-2" in printed


def test_no_complete_checkpoint_means_step_0(tmp_path, capsys):
    out = tmp_path / "checkpoints"
    checkpoint(out, 3, state=None)
    assert resume_checkpoint(out, "dpo") is None
    assert not (out / "checkpoint-3").exists()
    assert "training starts at step 0" in capsys.readouterr().out
    assert resume_checkpoint(tmp_path / "absent", "dpo") is None


def test_train_and_save_resumes_from_the_complete_checkpoint(tmp_path):
    out = tmp_path / "sft" / "checkpoints"
    checkpoint(out, 5)
    checkpoint(out, 10, state=None)
    resumed = []

    class Trainer:
        args = SimpleNamespace(output_dir=str(out))
        processing_class = None
        state = SimpleNamespace(log_history=[{"loss": 1.0, "step": 10}], global_step=10)

        def train(self, resume_from_checkpoint=None):
            resumed.append(resume_from_checkpoint)
            return SimpleNamespace(training_loss=0.5, metrics={"train_runtime": 1.0})

        def save_model(self, path):
            Path(path).mkdir(parents=True)
            (Path(path) / "model.safetensors").write_bytes(b"w")

        def pop_callback(self, callback):  # no progress bar of transformers' to replace
            return None

    ctx = SimpleNamespace(name="sft", step="sft", dir=StageDir(tmp_path, "sft"))
    metrics = train_and_save(Trainer(), ctx)
    assert resumed == [str(out / "checkpoint-5")]
    assert metrics["global_steps"] == 10
    assert (tmp_path / "sft" / "model" / "model.safetensors").exists()
    assert json.loads((tmp_path / "sft" / "log_history.json").read_text()) == [{"loss": 1.0, "step": 10}]
