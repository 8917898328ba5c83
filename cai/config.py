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

import copy
import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cai.engines import is_server
from cai.engines.openai import ServerConfig
from cai.registry import ORDER as STAGE_SECTIONS
from cai.schema import parse_dataclass, setting
from cai.yamlio import LocatedYaml, Problem, ValidationError, describe, load_yaml, parse_yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class PromptsConfig:
    """Where prompts come from and how they split into train and eval."""

    red_team: str | dict[str, Any] = setting("builtin:donotanswer", "builtin:donotanswer, a .jsonl/.txt file, a "
                                                                    "datasets dir, or {dataset: ID, split: ..., "
                                                                    "column: ...} (cai.prompts.DatasetSource)")
    helpful: str | dict[str, Any] | None = setting("builtin:helpful", "helpful prompts mixed into training and "
                                                                      "evaluation (a source as red_team)")
    eval_fraction: float = setting(0.1, "share of prompts held out for evaluation (by hash of the text)",
                                   ge=0, lt=1)
    max_red_team: int | None = setting(None, "cap on red-team training prompts (a seeded sample), null = all",
                                       ge=1)
    max_helpful: int | None = setting(None, "cap on helpful training prompts, null = all", ge=1)
    max_eval: int | None = setting(None, "cap on eval prompts per kind, null = all", ge=1)


@dataclass
class RunConfig:
    run_dir: str = setting(help="the run's folder: one subfolder per stage (~ is expanded)")
    seed: int = setting(0, "seeds sampling, data order and initialisation", ge=0, lt=2**32)
    rounds: int = setting(1, "iterated RLAIF: label, reward, rl and dpo run this many times, round k from round "
                             "k-1's policy, in RUN_DIR/roundK/ (round 1 in RUN_DIR); 1 = one pass", ge=1, le=100)
    model: str = setting("builtin:tiny", "the base model: builtin:NAME, a local folder or a hub id")
    constitution: str = setting("constitutions/harmless.yaml", "the constitution YAML")
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    threads: int | Literal["auto"] = setting("auto", "torch intra-op threads, or auto: $OMP_NUM_THREADS if set, "
                                                     "else the cores' load and a short matmul probe at each "
                                                     "stage's start (cai.models.choose_threads)",
                                             ge=1)
    device: str = setting("auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")
    memory_budget: float | Literal["auto"] = setting("auto", "GiB a training stage may hold; with "
                                                     "activation_checkpointing: auto (the CPU default) it recomputes "
                                                     "activations only when keeping them would not fit. auto: what "
                                                     "the process holds plus 90 % of the free memory at the stage's "
                                                     "start (cai.training.memory)", gt=0)
    hub_kernels: bool = setting(False, "let transformers replace layers (rotary embedding, RMSNorm, attention, ...) "
                                       "with compiled kernels it downloads from the Hugging Face hub "
                                       "(kernels-community/*, through the `kernels` package) and runs in this "
                                       "process; off: cai sets USE_HUB_KERNELS=NO whatever the environment says")
    report_to: str | list[str] = setting("none", "where every training stage reports (TRL's report_to: none, "
                                                 "wandb, tensorboard, trackio, ...); a stage's own key wins")
    run_name: str | None = setting(None, "the run name trackers show (TRL's run_name) for every training stage")
    # OpenAI-compatible servers a data stage can use instead of weights, as `server:NAME`
    servers: dict[str, ServerConfig] = field(default_factory=dict)
    # top-level cai.models.ModelOptions keys (dtype, use_peft, ...), for every stage; resolved per stage
    model_options: dict[str, Any] = field(default_factory=dict, init=False)
    stages: dict[str, dict] = field(default_factory=dict)  # raw stage sections, parsed by stage_config
    source: LocatedYaml | None = field(default=None, repr=False, compare=False)
    # `cai ... --check`: hub models and datasets are looked up in the local caches only
    # (nothing is fetched), and one that is not there is a `cai.prompts.NotCached` problem
    cache_only: bool = field(default=False, init=False, repr=False, compare=False)

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


# ---------------------------------------------------------------- overrides


def apply_overrides(doc: LocatedYaml, overrides: list[str]) -> None:
    """`--set sft.learning_rate=1e-4`: dotted key, YAML value (read like the config file,
    with the same limits). A problem names the `--set` argument; so do later problems
    with the value it set."""
    problems = []
    for item in overrides:
        argument = f"--set {item if len(item) <= 80 else item[:77] + '...'}"
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            problems.append(Problem(argument, None, "expected KEY=VALUE with a dotted KEY, "
                                                    "e.g. --set critique.num_revisions=1"))
            continue
        try:
            value = parse_yaml(text, argument).data
        except ValidationError as err:
            problems += [Problem(argument, None, p.message) for p in err.problems]
            continue
        node = doc.data
        for depth, part in enumerate(parts[:-1], start=1):
            if node.get(part) is None:
                node[part] = {}
                doc.override(tuple(parts[:depth]), argument)
            node = node[part]
            if not isinstance(node, dict):
                section = ".".join(parts[:depth])
                problems.append(Problem(argument, None, f"'{section}' is {describe(node)}, not a section "
                                                        f"with keys, so '{key}' cannot be set"))
                break
        else:
            node[parts[-1]] = value
            doc.override(tuple(parts), argument)
    if problems:
        raise ValidationError(problems)


# Keys that would make transformers import and run Python files shipped with a model.
CODE_LOADING_KEYS = ("trust_remote_code",)


def code_loading_problems(doc: LocatedYaml) -> list[Problem]:
    """`trust_remote_code` (or a like key) anywhere in the config, e.g. in a TRL section's
    `model_init_kwargs`, is refused: cai never runs code that comes with a model."""
    problems = []

    def visit(value: Any, path: tuple) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in CODE_LOADING_KEYS and item not in (False, None):
                    where = ".".join(str(p) for p in path + (key,))
                    problems.append(doc.problem(path + (key,), f"'{where}': cai never runs code shipped with a "
                                                               f"model, so {key} must be false or absent"))
                visit(item, path + (key,))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                visit(item, path + (i,))

    visit(doc.data, ())
    return problems


def run_dir_problem(run_dir: str) -> str | None:
    """Why `run_dir` cannot hold a run (checked before any stage writes), or None."""
    if not run_dir.strip():
        return "'run_dir' is empty: name the run's folder, e.g. runs/demo"
    if "\x00" in run_dir:
        return "'run_dir' contains a NUL character"
    path = Path(run_dir)
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            return f"'run_dir' {run_dir}: {existing} is a broken symbolic link"
        existing = existing.parent
    if not existing.is_dir():
        where = "is" if existing == path else f"is under {existing}, which is"
        return f"'run_dir' {run_dir} {where} not a folder"
    try:  # an anonymous file (O_TMPFILE): proves the folder writable and leaves nothing behind
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"'run_dir' {run_dir}: cannot write in {existing} ({err.strerror or err})"
    return None


def load_config(path: str | Path, overrides: list[str] | None = None, elsewhere=None) -> RunConfig:
    """The run config of `path`, every `--set` applied, checked. `elsewhere(key, value)`:
    where an unknown top-level key belongs, added to its problem (the plan knows the
    stages' keys: `cai.plan.sections.misplaced_key_hint`)."""
    doc = load_yaml(path)
    if doc.data is None:
        doc.data = {}
    if not isinstance(doc.data, dict):
        raise ValidationError([doc.problem((), "a run config must be a mapping of keys")])
    apply_overrides(doc, overrides or [])
    raw = dict(doc.data)
    stages = {name: raw.pop(name) for name in STAGE_SECTIONS if name in raw}
    prompts_raw = raw.pop("prompts", None)
    servers_raw = raw.pop("servers", None) or {}
    from cai.models import ModelOptions, inert_top_level_options, split_model_options

    model_options, raw = split_model_options(raw)
    top_level = (*STAGE_SECTIONS, "prompts", "servers", *(f.name for f in dataclasses.fields(ModelOptions)))
    run, _, problems = parse_dataclass(RunConfig, raw, doc, (), extra=None, suggest=top_level, elsewhere=elsewhere)
    options_problems = parse_dataclass(ModelOptions, model_options, doc, (), inert=False)[2]
    problems += options_problems
    if not problems:
        problems += inert_top_level_options(model_options, stages, doc)
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
                                                f"point critique.model, label.policy / feedback_model, "
                                                f"evaluate.models / feedback_model or rl.feedback_model at a "
                                                f"server instead"))
    problems += code_loading_problems(doc)
    if run is not None:
        run.run_dir = os.path.expanduser(run.run_dir)
        if (reason := run_dir_problem(run.run_dir)) is not None:
            problems.append(doc.problem(("run_dir",), reason))
    if problems and run is None:  # the stage sections are still checked, on the keys that have no problem
        run = _without_bad_keys(raw, doc)
    if run is not None:
        run.prompts = prompts or PromptsConfig()
        run.servers = servers
        run.model_options = {} if options_problems else model_options
        run.stages = {k: (v if isinstance(v, dict) else {}) for k, v in stages.items()}
        run.source = doc
    if problems:
        raise ConfigError(problems, run)
    return run


class ConfigError(ValidationError):
    """The run config's own problems, with the config as it would be without the keys that
    have them (`partial`, None when it cannot be built): the stage sections can still be
    checked, so a file with several mistakes gets all of them at once."""

    def __init__(self, problems: list[Problem], partial: RunConfig | None):
        super().__init__(problems)
        self.partial = partial


def _without_bad_keys(raw: dict, doc: LocatedYaml) -> RunConfig | None:
    """The RunConfig of the top-level keys that have no problem on their own."""
    if "run_dir" not in raw or parse_dataclass(RunConfig, {"run_dir": raw["run_dir"]}, doc, ())[2]:
        return None
    good = {key: value for key, value in raw.items()
            if not parse_dataclass(RunConfig, {"run_dir": raw["run_dir"], key: value}, doc, ())[2]}
    run = parse_dataclass(RunConfig, good, doc, ())[0]
    if run is not None:
        run.run_dir = os.path.expanduser(run.run_dir)
        if run_dir_problem(run.run_dir) is not None or is_server(run.model):
            return None
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
        if not server.base_url.startswith(("http://", "https://")):
            problems.append(doc.problem(("servers", name, "base_url"),
                                        f"'servers.{name}.base_url' must be an http:// or https:// URL such as "
                                        f"http://127.0.0.1:8000/v1, got {server.base_url!r}"))
        servers[name] = server
    return servers, problems


def local_path(value: Any, source: LocatedYaml | None) -> Any:
    """A relative path naming a file or folder that exists (`find_file`): its absolute
    path, so it means the same from any working directory; any other value as is."""
    if not isinstance(value, str) or not value or ":" in value or Path(value).expanduser().is_absolute():
        return value
    path = find_file(value, source)
    return str(path.resolve()) if path.exists() else value


def resolved_config(run: RunConfig) -> dict:
    """The run's config as it was used: the file with every `--set` applied, the run
    folder and the files it names (model, constitution, prompt sources) as absolute paths,
    so `cai run RUN_DIR` continues it from anywhere with no flags."""
    data = copy.deepcopy(run.source.data)
    data["run_dir"] = str(run.path.resolve())
    for key in ("model", "constitution"):
        if key in data:
            data[key] = local_path(data[key], run.source)
    prompts = data.get("prompts")
    for key in ("red_team", "helpful") if isinstance(prompts, dict) else ():
        value = prompts.get(key)
        if isinstance(value, dict) and "dataset" in value:
            value["dataset"] = local_path(value["dataset"], run.source)
        elif key in prompts:
            prompts[key] = local_path(value, run.source)
    return data
