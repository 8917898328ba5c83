"""The preference pairs the reward and DPO stages train on: one reader of the label
stage's `prefs.jsonl` (soft labels), the critique stage's (final revision over first
answer, a fixed label) and a user's file of pairs (`reward.preferences`: human labels,
`p_chosen` 1.0 where a row has none)."""

from __future__ import annotations

import shutil
from pathlib import Path

from cai import distributed
from cai.registry import step_folder
from cai.rundir import read_jsonl
from cai.yamlio import Problem, ValidationError


def is_conversation(value) -> bool:
    """TRL's conversational form: a non-empty list of {role, content} messages."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def read_preferences(path: Path, source: str, label: float | None = None, default: float | None = None) -> list[dict]:
    """Rows in TRL's conversational preference form plus `p_chosen` (the row's own soft
    label, else `default`; or `label` for every row) and `source`. A label under 0.5 means
    `rejected` is the better answer: the pair is flipped, so `chosen` is always the
    preferred side (TRL's accuracy counts r_chosen > r_rejected, DPO raises chosen). A bad
    row is a ValidationError naming file:line."""
    def bad(number: int, message: str) -> ValidationError:
        return ValidationError([Problem(str(path), number, message)])

    pairs = []
    for number, row in enumerate(read_jsonl(path), start=1):
        if not isinstance(row, dict):
            raise bad(number, "expected a JSON object with prompt/chosen/rejected conversations")
        needs_label = label is None and default is None
        missing = [k for k in ("prompt", "chosen", "rejected") + (("p_chosen",) if needs_label else ())
                   if k not in row]
        if missing:
            raise bad(number, f"missing {', '.join(missing)} "
                              "(expected prompt/chosen/rejected conversations and a p_chosen soft label)")
        for key in ("prompt", "chosen", "rejected"):
            if not is_conversation(row[key]):
                raise bad(number, f"'{key}' must be a conversation: a non-empty list of {{role, content}} messages")
        p = label if label is not None else row.get("p_chosen", default)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise bad(number, f"expected a 'p_chosen' soft label in [0, 1], got {p!r}")
        chosen, rejected, p = row["chosen"], row["rejected"], float(p)
        if p < 0.5:
            chosen, rejected, p = rejected, chosen, 1.0 - p
        pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "p_chosen": p,
                      "source": source})
    return pairs


def training_preferences(ctx, mix_critique_pairs: bool, critique_label: float = 1.0,
                         every_round: bool = False, preferences: Path | None = None) -> tuple[list[dict], dict]:
    """The label stage's pairs (this round's, or with `every_round` those of every round so
    far: `rounds`), or the `preferences` file's instead (a missing `p_chosen` is 1.0: a
    person's hard label), then (`mix_critique_pairs`) the critique stage's with
    `critique_label`; and {file: pairs} for the model card."""
    pairs, data = [], {}
    if preferences is not None:
        pairs = read_preferences(preferences, "preferences", default=1.0)
        data[str(preferences)] = len(pairs)
    else:
        for stage in ctx.every_round_so_far("label") if every_round else [ctx.stage("label")]:
            rows = read_preferences(stage.require("its prefs.jsonl is the training set") / "prefs.jsonl", "label")
            pairs += rows
            data[f"{step_folder(stage.name)}/prefs.jsonl"] = len(rows)
    if mix_critique_pairs:
        critique = ctx.stage("critique").require("mix_critique_pairs reads its prefs.jsonl") / "prefs.jsonl"
        more = read_preferences(critique, "critique", critique_label)
        pairs += more
        data["critique/prefs.jsonl"] = len(more)
    return pairs, data


def shared_dataset(ctx, name: str, rows: list[dict]):
    """A `datasets.Dataset` of `rows`, saved in the stage folder and memory-mapped from
    there, so the caches TRL writes beside it (DPO's precomputed reference
    log-probabilities) sit where every process finds them; an in-memory dataset would
    put them in each process's own temp folder."""
    from datasets import Dataset, load_from_disk

    folder = ctx.dir / "datasets" / name
    if distributed.is_main():
        shutil.rmtree(folder, ignore_errors=True)
        Dataset.from_list(rows).save_to_disk(str(folder))
    distributed.barrier()
    return load_from_disk(str(folder))

