"""One YAML per run: shared keys plus one section per stage.

```yaml
run_dir: runs/demo
seed: 0
model: builtin:smollm2-135m-instruct
constitution: constitutions/harmless.yaml
prompts: {red_team: builtin:donotanswer, helpful: builtin:helpful, eval_fraction: 0.1}
critique: {num_revisions: 2, ...}
sft: {num_train_epochs: 1, ...}     # cai keys + any trl.SFTConfig field
```

Every key is checked before any work starts; a problem names file, line and key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cai.engines import is_server
from cai.engines.openai import ServerConfig
from cai.yamlio import LocatedYaml, Problem, ValidationError, describe, load_yaml

STAGE_SECTIONS = ("critique", "sft", "label", "reward", "rl", "dpo", "evaluate")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class PromptsConfig:
    """Where prompts come from and how they split into train and eval."""

    red_team: str = "builtin:donotanswer"  # builtin:donotanswer, a .jsonl/.txt file, or a datasets dir
    helpful: str | None = "builtin:helpful"  # helpful prompts mixed into training and evaluation
    eval_fraction: float = 0.1  # share of prompts held out for evaluation (by hash of the text)
    max_red_team: int | None = None  # cap on red-team training prompts (a seeded sample), None = all
    max_helpful: int | None = None  # cap on helpful training prompts
    max_eval: int | None = None  # cap on eval prompts per kind


@dataclass
class RunConfig:
    run_dir: str
    seed: int = 0
    model: str = "builtin:tiny"
    constitution: str = "constitutions/harmless.yaml"
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    threads: int = 1  # torch intra-op threads; 1 is fastest for small models on 2 cores (bench/threads.py)
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:1, ...
    # OpenAI-compatible servers a data stage can use instead of weights, as `server:NAME`
    servers: dict[str, ServerConfig] = field(default_factory=dict)
    stages: dict[str, dict] = field(default_factory=dict)  # raw stage sections, parsed by stage_config
    source: LocatedYaml | None = field(default=None, repr=False, compare=False)

    @property
    def path(self) -> Path:
        return Path(self.run_dir)

    def constitution_path(self) -> Path:
        return find_file(self.constitution, self.source)


def find_file(name: str, source: LocatedYaml | None) -> Path:
    """Resolve a relative path: the working directory, then the config's folder, then the project."""
    path = Path(name).expanduser()
    if path.is_absolute() or path.exists():
        return path
    bases = ([Path(source.file).parent] if source else []) + [PROJECT_ROOT]
    for base in bases:
        if (base / path).exists():
            return base / path
    return path


# ---------------------------------------------------------------- type checking


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (inner,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _hint_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def parse_dataclass(cls: type, raw: Any, doc: LocatedYaml, path: tuple, extra: set[str] | None = None,
                    extra_name: str = "") -> tuple[Any, dict, list[Problem]]:
    """Build `cls` from a mapping. Keys in `extra` (a TRL config's fields) are returned
    apart; any other unknown key, a wrong type or a missing required field is a problem."""
    where = ".".join(str(p) for p in path) or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        return None, {}, [doc.problem(path, f"'{where}' must be a mapping, got {describe(raw)}")]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in ("trl",)}
    problems, values, passthrough = [], {}, {}
    for key, value in raw.items():
        if key in fields:
            if not _matches(value, hints[key]):
                problems.append(doc.problem(path + (key,), f"'{where}.{key}' must be {_hint_name(hints[key])}, "
                                                           f"got {describe(value)}"))
            else:
                values[key] = value
        elif extra is not None and key in extra:
            passthrough[key] = value
        else:
            known = f"a {cls.__name__} field" + (f" nor a field of {extra_name}" if extra_name else "")
            problems.append(doc.problem(path + (key,), f"unknown key '{key}' in {where}: not {known}"))
    for name, f in fields.items():
        if (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                and name not in values):
            problems.append(doc.problem(path, f"missing required key '{name}' in {where}"))
    if problems:
        return None, passthrough, problems
    return cls(**values), passthrough, []


# ---------------------------------------------------------------- overrides


def apply_overrides(data: dict, overrides: list[str]) -> None:
    """`--set sft.learning_rate=1e-4`: dotted key, YAML value."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValidationError([Problem("--set", 1, f"expected KEY=VALUE, got {item!r}")])
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ValidationError([Problem("--set", 1, f"{key}: '{part}' is not a section")])
        node[parts[-1]] = yaml.safe_load(value)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    doc = load_yaml(path)
    if doc.data is None:
        doc.data = {}
    if not isinstance(doc.data, dict):
        raise ValidationError([doc.problem((), "a run config must be a mapping of keys")])
    apply_overrides(doc.data, overrides or [])
    raw = dict(doc.data)
    stages = {name: raw.pop(name) for name in STAGE_SECTIONS if name in raw}
    prompts_raw = raw.pop("prompts", None)
    servers_raw = raw.pop("servers", None) or {}
    run, _, problems = parse_dataclass(RunConfig, raw, doc, (), extra=None)
    prompts, _, more = parse_dataclass(PromptsConfig, prompts_raw, doc, ("prompts",))
    problems += more
    servers, more = parse_servers(servers_raw, doc)
    problems += more
    for name, section in stages.items():
        if section is not None and not isinstance(section, dict):
            problems.append(doc.problem((name,), f"section '{name}' must be a mapping, got {describe(section)}"))
    if run is not None and is_server(run.model):
        problems.append(doc.problem(("model",), f"'model': {run.model} is a server, but the run's model is the one "
                                                f"sft fine-tunes: it must be weights (builtin:, a folder or a hub id); "
                                                f"point critique.model, label.policy / feedback_model or "
                                                f"evaluate.models / feedback_model at a server instead"))
    if problems:
        raise ValidationError(problems)
    run.prompts = prompts
    run.servers = servers
    run.stages = {k: (v or {}) for k, v in stages.items()}
    run.source = doc
    return run


def parse_servers(raw: Any, doc: LocatedYaml) -> tuple[dict[str, ServerConfig], list[Problem]]:
    """The `servers:` section: a mapping of names to ServerConfig fields."""
    if not isinstance(raw, dict):
        return {}, [doc.problem(("servers",), f"'servers' must be a mapping of names to servers, got {describe(raw)}")]
    servers, problems = {}, []
    for name, section in raw.items():
        if not isinstance(name, str) or not name or ":" in name:
            problems.append(doc.problem(("servers", name), f"'servers': {name!r} is not a usable name "
                                                            f"(a non-empty string without ':')"))
            continue
        server, _, more = parse_dataclass(ServerConfig, section, doc, ("servers", name))
        problems += more
        if server is None:
            continue
        for spec in dataclasses.fields(ServerConfig):
            key = spec.name
            value, low, high = getattr(server, key), spec.metadata.get("min"), spec.metadata.get("max")
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = " and ".join(b for b in (f">= {low}" if low is not None else "",
                                                  f"<= {high}" if high is not None else "") if b)
                problems.append(doc.problem(("servers", name, key), f"'servers.{name}.{key}' must be {bounds}, "
                                                                     f"got {value!r}"))
        if not server.base_url.startswith(("http://", "https://")):
            problems.append(doc.problem(("servers", name, "base_url"), f"'servers.{name}.base_url' must be an "
                                        f"http:// or https:// URL such as http://127.0.0.1:8000/v1, got {server.base_url!r}"))
        servers[name] = server
    return servers, problems


def shared_fingerprint(run: RunConfig) -> dict:
    """The shared keys a stage's outputs depend on (threads and device do not change results)."""
    constitution = run.constitution_path()
    digest = hashlib.sha256(constitution.read_bytes()).hexdigest() if constitution.exists() else None
    return {"seed": run.seed, "model": run.model, "constitution_sha256": digest,
            "prompts": dataclasses.asdict(run.prompts)}


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
