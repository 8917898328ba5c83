"""The runner: each step (a stage, in a round), its context, skip and resume.

The stages, their order, their upstream and which of them run per round are
`cai.registry`'s. Every stage module in `cai/stages/` exposes
- `Config`: a dataclass of the stage's own knobs (documented fields with defaults);
- `TRL_CONFIG()` (optional): the TRL config class whose fields the section passes through
  (rl's is the union of PPO/RLOO/GRPO configs; its `check_config` narrows it);
- `hashed_config(cfg, run)` (optional): the settings that enter the config hash, when some
  settings are unused in some modes or a file counts by its content (default: all of them);
- `run(ctx: StageContext) -> dict`: does the work, returns counts for the manifest.

A completed step (manifest with the same config hash) is skipped; an interrupted one
resumes; one completed with other settings is an error unless `force` moves it aside.
With `rounds: N`, round k >= 2 repeats label, reward, rl and dpo in `roundK/`: a stage
name there means that round's step (`ctx.stage("label")` is `round2/label` in round 2),
the newest policy is round k-1's (`StageContext.newest_policy`), and the reward model
trains on the labels of every round so far (`StageContext.every_round_so_far`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from cai import distributed, registry
from cai.config import RunConfig, config_hash, shared_fingerprint
from cai.engines import EngineError, is_server, server_name
from cai.registry import DATA_STAGES, MODEL_STAGES, ORDER, round_of, split_step, step_command, step_name
from cai.rundir import StageDir, atomic_write_json
from cai.schema import parse_dataclass
from cai.yamlio import Problem, ValidationError

log = logging.getLogger(__name__)


def stage_module(name: str):
    """The recipe module of a stage (or of a step, `rl@2`)."""
    return importlib.import_module(registry.stage(name).module)


def trl_fields(module) -> tuple[set[str] | None, str]:
    trl_config = getattr(module, "TRL_CONFIG", None)
    if trl_config is None:
        return None, ""
    cls = trl_config() if not isinstance(trl_config, type) else trl_config
    return {f.name for f in dataclasses.fields(cls) if f.init}, f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def _model_option_keys() -> tuple[str, ...]:
    from cai.models import ModelOptions

    return tuple(f.name for f in dataclasses.fields(ModelOptions))


def stage_config(run: RunConfig, name: str) -> tuple[Any, dict]:
    """The stage's Config and its TRL pass-through keys, validated (errors name lines):
    its own keys, the stage's checks, and for a training stage the TRL config object built
    as the stage will build it, so a bad TRL value fails now, not after earlier stages."""
    from cai.judge.settings import renamed_key_problems
    from cai.models import split_model_options, stage_model_options
    from cai.training.args import trl_build_problems, trl_value_problems

    module = stage_module(name)
    extra, extra_name = trl_fields(module)
    _, section = split_model_options(run.stages.get(name))  # ModelOptions keys: checked apart, never passed to TRL
    problems = renamed_key_problems(run.source, name, section)
    if problems:
        raise ValidationError(problems)
    cfg, trl, problems = parse_dataclass(module.Config, section, run.source, (name,), extra=extra,
                                         extra_name=extra_name, suggest=_model_option_keys())
    problems += stage_model_options(run, name)[1]
    if problems:
        raise ValidationError(problems)
    problems = server_problems(run, name, cfg)
    if problems:
        raise ValidationError(problems)
    settings = getattr(module, "trl_settings", None)
    if settings is not None:
        cls, defaults = settings(cfg)
        problems = trl_value_problems(run.source, name, cls, trl)
        if problems:
            raise ValidationError(problems)
    check = getattr(module, "check_config", None)  # stage-specific checks, still before any work
    if check is not None:
        problems = check(run, cfg, trl)
        if problems:
            raise ValidationError(problems)
    if settings is not None:
        problems = trl_build_problems(run, name, cls, defaults, trl)
        if problems:
            raise ValidationError(problems)
    return cfg, trl


# Roles that score options (a server must return log-probabilities); a judge only scores,
# so it may be a server in any stage (rl's judge, with reward: judge).
JUDGE_KEYS = ("feedback_model",)


def config_values(cfg):
    """(field, value) for every value of a stage config, each item of a list field apart."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for item in value if isinstance(value, list) else [value]:
            yield f, item


def server_references(cfg) -> dict[str, bool]:
    """{`server:NAME`: used as a judge} for every model role of a stage config."""
    found: dict[str, bool] = {}
    for f, item in config_values(cfg):
        if is_server(item):
            found[item] = found.get(item, False) or f.name in JUDGE_KEYS
    return found


def server_problems(run: RunConfig, name: str, cfg) -> list:
    """`server:NAME` only in data stages' model roles, and only for declared servers."""
    problems = []

    def problem(key: str, message: str):
        return run.source.problem((name, key), message) if run.source else message

    for f, item in config_values(cfg):
        if not is_server(item):
            continue
        if name not in DATA_STAGES and f.name not in JUDGE_KEYS:
            problems.append(problem(f.name, f"'{name}.{f.name}': {item} is a server, but {name} trains weights: "
                                            f"it needs a model it can load (builtin:, a folder or a hub id)"))
        elif server_name(item) not in run.servers:
            declared = ", ".join(sorted(run.servers)) or "none"
            problems.append(problem(f.name, f"'{name}.{f.name}': {item} names no server under 'servers:' "
                                            f"(declared: {declared})"))
    return problems


def check_servers(run: RunConfig, names: list[str]) -> None:
    """Before any work: every server a stage that will run uses answers, serves its
    model and, for a judge, returns log-probabilities. Stages already complete with
    the same settings are skipped, so their servers need not be up."""
    used: dict[str, bool] = {}
    for step in names:
        cfg, trl = stage_config(run, split_step(step)[0])
        references = server_references(cfg)
        if not references:
            continue
        manifest = StageDir(run.path, step).manifest()
        if manifest and manifest["config_hash"] == _fingerprint(run, step, cfg, trl)[0]:
            continue
        for reference, judge in references.items():
            used[reference] = used.get(reference, False) or judge
    error = None
    if distributed.is_main():  # one probe per server, not one per process
        for reference, judge in used.items():
            error = server_check_problem(run, reference, judge)
            if error is not None:
                break
    error = distributed.broadcast(error)
    if error:
        raise ValidationError([error])


def server_check_problem(run: RunConfig, reference: str, judge: bool) -> Problem | None:
    """A server that does not answer, serves another model or (for a judge) gives no
    log-probabilities is a refusal of input, at the line that declares it."""
    from cai.engines.openai import OpenAIEngine

    name = server_name(reference)
    try:
        OpenAIEngine(run.servers[name], reference).check(judge=judge)
    except EngineError as err:
        return run.source.problem(("servers", name), str(err)) if run.source else Problem(reference, None, str(err))
    return None


def optimisers(run: RunConfig) -> list[str]:
    """The policy optimisers a run has: rl and dpo when their section is present, rl when neither is."""
    return [s for s in ("rl", "dpo") if s in run.stages] or ["rl"]


def in_round(run: RunConfig, reference: str, round_number: int) -> str:
    """The step a stage name means in a round: `label` in round 2 is `label@2`; `rl@1` is
    `rl`; a stage outside the rounds, `base` or a model spec is itself."""
    name, number = split_step(reference)
    if name not in registry.BY_NAME:
        return reference
    return step_name(name, number if number is not None else round_number)


def newest_policy(run: RunConfig, name: str, round_number: int) -> str:
    """The policy a step starts from or samples with when its config names none: sft in
    round 1; in round k, round k-1's model of the same optimiser (rl from rl, dpo from
    dpo), or for another stage (label) round k-1's rl, else its dpo: `rl@1`, a reference
    that means round 1's rl in any round."""
    if round_number <= 1:
        return "sft"
    source = name if name in optimisers(run) else optimisers(run)[0]
    return f"{source}@{round_number - 1}"


@dataclass
class StageContext:
    run: RunConfig
    name: str  # the stage (`label`); `step` is the stage in its round (`label@2`)
    config: Any
    trl: dict
    dir: StageDir
    config_hash: str
    upstream: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict, repr=False)  # what config_hash is computed from
    model_options: Any = None  # cai.models.ModelOptions: the run's top-level keys, then the stage's
    round: int = 1
    _engines: dict = field(default_factory=dict, repr=False)
    engines_used: list = field(default_factory=list, repr=False)  # what each released engine did

    @property
    def step(self) -> str:
        return self.dir.name

    def stage(self, name: str) -> StageDir:
        """A stage's folder as this step sees it: a per-round stage's in this round
        (`label` in round 2 is `round2/label`), `NAME@K` in round K."""
        return StageDir(self.run.path, in_round(self.run, name, self.round))

    def every_round_so_far(self, name: str) -> list[StageDir]:
        """A per-round stage's folder in each round up to this one (round 1 first)."""
        return [StageDir(self.run.path, step_name(name, k)) for k in range(1, self.round + 1)]

    def every_round(self, name: str) -> list[str]:
        """The names of a per-round stage's steps over all rounds, as model references:
        `rl` with one round, `rl@1`, `rl@2`, ... with several; any other name as is."""
        if name not in registry.ROUND_STAGES or self.run.rounds == 1:
            return [name]
        return [f"{name}@{k}" for k in range(1, self.run.rounds + 1)]

    def newest_policy(self) -> str:
        """The default policy of this step (`newest_policy`): sft in round 1, round k-1's after."""
        return newest_policy(self.run, self.name, self.round)

    def model_spec(self, spec: str | None, default: str = "base") -> str:
        """Resolve a model reference: `base` (the run's model), a stage name whose
        `model/` folder it means (`sft`, `rl`, `dpo`, `reward`; a per-round stage's in
        this round, `rl@K` round K's), or any model spec."""
        spec = spec or default
        if spec == "base":
            return self.run.model
        if split_step(spec)[0] in ORDER:
            stage = self.stage(spec).require(f"its model is needed by {self.step}")
            return str(stage.saved_model() or stage.path / "model")
        return spec

    def engine(self, reference: str | None, batch_size: int = 8):
        """The engine of a model reference (see `model_spec`), opened once per stage:
        roles that name the same model (a policy that also judges) share it."""
        from cai.engines import open_engine

        spec = self.model_spec(reference)
        if spec not in self._engines:
            self._engines[spec] = open_engine(spec, self.run, batch_size, self.model_options)
        return self._engines[spec]

    def release(self, reference: str | None = None) -> None:
        """Close one engine (or all), freeing its weights before the next is loaded."""
        import gc

        specs = [self.model_spec(reference)] if reference is not None else list(self._engines)
        for spec in specs:
            engine = self._engines.pop(spec, None)
            if engine is not None:
                self.engines_used.append(engine.describe())
                engine.close()
        gc.collect()

    @cached_property
    def constitution(self):
        from cai.constitution import load_constitution

        return load_constitution(self.run.constitution_path())

    @cached_property
    def prompts(self):
        from cai.prompts import load_splits

        return load_splits(self.run.prompts, self.run.seed, self.run.source)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for package in ("cai", "torch", "transformers", "trl", "datasets", "accelerate"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[package] = md.version(package)
    return out


def upstream_steps(run: RunConfig, step: str, cfg) -> list[str]:
    """The steps whose outputs a step reads: its stage's upstream in its round, and in
    round k >= 2 the newest policy (round k-1's). Evaluate, after the rounds, reads every
    round's steps. With one round these are the stage names, as before rounds existed."""
    name = split_step(step)[0]
    round_number = round_of(step, run.rounds)
    found = []
    for up in registry.stage(name).upstream_of(cfg):
        if registry.stage(up).per_round and not registry.stage(name).per_round:
            found += [step_name(split_step(up)[0], k) for k in range(1, run.rounds + 1)]
        else:
            found.append(in_round(run, up, round_number))
    if registry.stage(name).per_round and round_number > 1:
        found.append(in_round(run, newest_policy(run, name, round_number), round_number))
    return list(dict.fromkeys(found))


def _fingerprint(run: RunConfig, step: str, cfg: Any, trl: dict) -> tuple[str, dict]:
    """The step's config hash and its upstream steps' hashes."""
    body = hashed_settings(run, step, cfg, trl)
    return config_hash(body), body["upstream"]


def hashed_settings(run: RunConfig, step: str, cfg: Any, trl: dict) -> dict:
    """Everything a step's config hash is computed from (kept in its marker and manifest,
    so a refusal can say which setting changed)."""
    name = split_step(step)[0]
    module = stage_module(name)
    upstream = {}
    for up in upstream_steps(run, step, cfg):
        manifest = StageDir(run.path, up).manifest()
        upstream[up] = manifest["config_hash"] if manifest else None
    hashed = module.hashed_config(cfg, run) if hasattr(module, "hashed_config") else dataclasses.asdict(cfg)
    body = {"stage": name, "shared": shared_fingerprint(run), "config": hashed,
            "trl": {key: value for key, value in trl.items() if changes_results(key)}, "upstream": upstream}
    servers = {ref: run.servers[server_name(ref)].fingerprint() for ref in server_references(cfg)}
    if servers:  # only then, so runs without servers keep their hashes
        body["servers"] = servers
    model_options = _model_options(run, name).fingerprint()
    if model_options:  # only settings other than the defaults, so existing runs keep their hashes
        body["model_options"] = model_options
    return body


# TRL settings that change where and how often a run logs, saves or reports, never what
# it computes: they stay out of the config hash, so changing them does not redo a stage.
NON_RESULT_TRL_KEYS = {"report_to", "run_name", "disable_tqdm", "log_level", "log_level_replica", "log_on_each_node",
                       "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
                       "dataloader_prefetch_factor", "include_num_input_tokens_seen", "include_tokens_per_second"}
NON_RESULT_TRL_PREFIXES = ("logging_", "save_", "push_to_hub", "hub_")


def changes_results(trl_key: str) -> bool:
    return trl_key not in NON_RESULT_TRL_KEYS and not trl_key.startswith(NON_RESULT_TRL_PREFIXES)


def _model_options(run: RunConfig, name: str):
    from cai.models import stage_model_options

    options, problems = stage_model_options(run, name)
    if problems:
        raise ValidationError(problems)
    return options


def prepare(run: RunConfig, step: str) -> StageContext:
    """The context of a step: a stage name (round 1, or evaluate after the rounds) or `STAGE@K`."""
    name = split_step(step)[0]
    step = in_round(run, step, 1)  # `rl@1` is `rl`
    cfg, trl = stage_config(run, name)
    settings = hashed_settings(run, step, cfg, trl)
    return StageContext(run, name, cfg, trl, StageDir(run.path, step), config_hash(settings), settings["upstream"],
                        settings=settings, model_options=_model_options(run, name), round=round_of(step, run.rounds))


def run_stage(run: RunConfig, step: str, force: bool = False) -> dict:
    """Run one step: skip it if complete with the same config, resume it if interrupted."""
    from cai.models import set_hub_kernels, set_threads

    ctx = prepare(run, step)
    name = ctx.step
    stage_dir = ctx.dir
    marker = stage_dir / ".in_progress.json"
    # The main process decides (skip, refuse, move aside) and sets the folder up; the
    # others follow its decision once it has (several processes: cai.distributed).
    decision = distributed.broadcast(_decide(ctx, force) if distributed.is_main() else None)
    if decision["action"] == "skip":
        log.info("%s: complete with the same config (%s), skipped", name, ctx.config_hash)
        print(f"[cai] {name}: already complete ({stage_dir.path}), skipped")
        return decision["manifest"]
    if decision["action"] == "refuse":
        raise ValidationError([Problem(decision.get("where", str(stage_dir.path)), None, decision["message"])])
    if distributed.is_main():
        if decision.get("aside"):
            size = folder_size(stage_dir.path)
            stage_dir.path.rename(decision["aside"])
            print(f"[cai] {name}: old outputs moved to {decision['aside']} ({size} kept on disk; delete the folder "
                  f"when it is no longer needed)")
        stage_dir.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, {"config_hash": ctx.config_hash, "settings": ctx.settings})
    distributed.barrier()
    resumed = decision["resumed"]
    threads = set_threads(run.threads)
    set_hub_kernels(run.hub_kernels)
    print(f"[cai] {name}: {'resuming' if resumed else 'running'} in {stage_dir.path}")
    memory = StagePeak()
    started = time.time()
    try:
        counts = stage_module(name).run(ctx) or {}
        ctx.release()
    except BaseException as err:
        ctx.release()
        memory.stop()
        # A stage that failed before doing any work it would keep (say, a missing upstream
        # stage, or a trainer that refused its settings) must not leave a marker that would
        # refuse a retry with other settings or the then-complete inputs. (An interrupted
        # one keeps it: the same command resumes.)
        if distributed.is_main() and not isinstance(err, KeyboardInterrupt) and not _kept_work(stage_dir):
            marker.unlink(missing_ok=True)
            if not any(stage_dir.path.iterdir()):
                stage_dir.path.rmdir()
        raise
    manifest = {
        "stage": ctx.name, **({"round": ctx.round} if ctx.step != ctx.name else {}),
        "config_hash": ctx.config_hash, "config": dataclasses.asdict(ctx.config), "trl": ctx.trl,
        "shared": shared_fingerprint(run), "upstream": ctx.upstream, "settings": ctx.settings,
        "counts": counts, "resumed": resumed,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 2), "versions": _versions(), "threads": threads,
        "peak_memory": memory.stop(),
    }
    if distributed.distributed():
        manifest["processes"] = distributed.world_size()
    if ctx.engines_used:
        manifest["engines"] = ctx.engines_used
    if distributed.is_main():
        atomic_write_json(stage_dir.manifest_path, manifest)
        marker.unlink(missing_ok=True)
    distributed.barrier()  # the next stage reads this one's manifest and outputs
    peak = manifest["peak_memory"]
    print(f"[cai] {name}: done in {manifest['seconds']:.1f}s, peak RSS {peak['rss_bytes'] / 2**30:.2f} GiB"
          + (f", CUDA {peak['cuda_max_allocated_bytes'] / 2**30:.2f} GiB" if "cuda_max_allocated_bytes" in peak else "")
          + f" {counts}")
    return manifest


class StagePeak:
    """A stage's peak memory, without resetting the process's high-water mark (which
    `/usr/bin/time -v` and `ru_maxrss` report for the whole run, so they stay the run's
    true peak). A thread samples the resident set size every `interval` seconds; when the
    process's peak (VmHWM) rises during the stage, the stage set it and VmHWM is its exact
    peak (`rss_scope: stage`), else the highest sample is (`rss_scope: sampled`: a spike
    shorter than the interval can be missed). Without /proc: the process's peak since it
    started (`rss_scope: process`). On a GPU, torch's CUDA peak, reset per stage."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="cai-stage-peak", daemon=True)
        self.start_hwm = _status_kib("VmHWM")
        self.sampled = _resident_bytes() or 0
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        if self.start_hwm is not None:
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.sampled = max(self.sampled, _resident_bytes() or 0)

    def stop(self) -> dict:
        """What the manifest records of the stage's memory (see the class)."""
        import resource

        import torch

        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        self.sampled = max(self.sampled, _resident_bytes() or 0)
        hwm = _status_kib("VmHWM")
        if hwm is not None and self.start_hwm is not None:
            peak = ({"rss_bytes": hwm * 1024, "rss_scope": "stage"} if hwm > self.start_hwm
                    else {"rss_bytes": self.sampled, "rss_scope": "sampled"})
        else:
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            peak = {"rss_bytes": kib if platform.system() == "Darwin" else kib * 1024, "rss_scope": "process"}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        return peak


def _status_kib(field: str) -> int | None:
    """A /proc/self/status figure in KiB (VmHWM: the process's peak resident set size)."""
    import re

    try:
        return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return None


def _resident_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _kept_work(stage_dir: StageDir) -> bool:
    """Work a resume would keep: a committed chunk, a checkpoint, a saved model or adapter."""
    folder = stage_dir.path
    return (any(ledger.stat().st_size for ledger in folder.glob(".*.chunks.jsonl"))
            or any((folder / "checkpoints").glob("checkpoint-*")) or stage_dir.saved_model() is not None)


def _decide(ctx: StageContext, force: bool) -> dict:
    """Skip (complete with the same config), refuse (other settings, or a saved model that
    cannot be loaded, here or upstream, without --force) or run (resuming if a marker says
    it started), and where a replaced folder goes."""
    manifest = ctx.dir.manifest()
    marker = ctx.dir / ".in_progress.json"
    previous = manifest["config_hash"] if manifest else None
    before = manifest
    if previous is None and marker.exists():
        before = json.loads(marker.read_text())
        previous = before["config_hash"]
    corrupt = ctx.dir.model_problem() if manifest else None  # a saved model that would fail its readers
    if previous == ctx.config_hash and manifest:
        if not corrupt:
            return {"action": "skip", "manifest": manifest}
        if not force:
            return corrupt_refusal(ctx.step, corrupt)
    for up in ctx.upstream:  # the models this stage will load are readable, before any work (keys: steps)
        if (problem := StageDir(ctx.run.path, up).model_problem()) is not None:
            return corrupt_refusal(up, problem)
    aside = None
    if corrupt or previous is not None and previous != ctx.config_hash:
        if not force:
            state = "completed" if manifest else "started"
            return {"action": "refuse", "message": (
                f"stage '{ctx.step}' in {ctx.dir.path} was {state} with other settings or inputs "
                f"(config hash {previous}, now {ctx.config_hash}):\n"
                + "\n".join(f"  {line}" for line in settings_diff(before, ctx.settings))
                + f"\nNothing was changed. Use another run_dir, or pass --force to move the old folder aside "
                  f"(a full copy, {folder_size(ctx.dir.path)}) and redo the stage.")}
        aside = str(ctx.dir.path.with_name(f"{ctx.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))
    return {"action": "run", "aside": aside, "resumed": marker.exists() and aside is None}


def corrupt_refusal(stage: str, problem: tuple[Path, str]) -> dict:
    """The refusal of a complete stage whose saved model cannot be loaded, at the file."""
    path, why = problem
    return {"action": "refuse", "where": str(path), "message": (
        f"{why}: stage '{stage}' is complete but its saved model cannot be loaded. Nothing was changed. Redo the "
        f"stage: `{registry.step_command(stage)} --force` with this config moves its folder aside and runs it again")}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def settings_diff(before: dict, now: dict) -> list[str]:
    """`key: old -> new` for every setting that entered the old and the new config hash
    differently (`before`: the old manifest or marker). An upstream stage redone shows as
    its hash; the constitution as its file's digest."""
    if "settings" not in before:  # written before cai kept the hashed settings: what the manifest has
        old = {k: before.get(k) for k in ("config", "trl", "shared", "upstream")}
        now = {k: now.get(k) for k in ("config", "trl", "shared", "upstream")}
    else:
        old = before["settings"]
    names = {"shared.constitution_sha256": "constitution (the file's content)"}
    flat_old, flat_now = _flat(old), _flat(now)
    lines = []
    for key in sorted(set(flat_old) | set(flat_now)):
        a, b = flat_old.get(key, "(not set)"), flat_now.get(key, "(not set)")
        if a == b:
            continue
        shown = names.get(key) or key.removeprefix("shared.").removeprefix("config.").removeprefix("trl.")
        if key.startswith("upstream."):
            shown = f"upstream stage '{key.split('.', 1)[1]}' (its config hash: it was redone)"
        elif key.startswith(("config.", "trl.", "model_options.")):
            shown = f"{before.get('stage', now.get('stage'))}.{shown.removeprefix('model_options.')}"
        lines.append(f"{shown}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}")
    return lines or ["(no setting differs: the stage's code changed how its settings are hashed)"]


def folder_size(path: Path) -> str:
    """The disk a folder uses, for the note on what --force keeps."""
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    for unit in ("bytes", "KB", "MB", "GB"):
        if total < 1024 or unit == "GB":
            return f"{total:.0f} {unit}" if unit == "bytes" else f"{total:.1f} {unit}"
        total /= 1024
    return ""


def default_stages(run: RunConfig) -> list[str]:
    """The steps `cai run` runs: all stages, but rl and dpo only when their section is
    present (rl is the default when neither is). rl with `reward: judge` needs no reward
    model: then reward runs only when its section is present (evaluate scores with it),
    and label only when reward (without `reward.preferences`) or dpo runs or its section
    is present. With `rounds: N` the per-round ones repeat N times (`cai.registry.steps`)."""
    chosen = optimisers(run)
    wanted = {"critique", "sft", "evaluate", *chosen}
    judge_reward = "rl" in chosen and run.stages.get("rl", {}).get("reward") == "judge"
    if not judge_reward or "reward" in run.stages:
        wanted.add("reward")
    reads_labels = not (run.stages.get("reward") or {}).get("preferences")  # else it reads a file of pairs
    if ("reward" in wanted and reads_labels) or "dpo" in wanted or "label" in run.stages:
        wanted.add("label")
    return registry.steps([s for s in ORDER if s in wanted], run.rounds)


# What a stage reads from other stages besides the models it names: (stage, why).
DATA_READS = {"sft": (("critique", "its sft.jsonl is the training set"),),
              "reward": (("label", "its prefs.jsonl is the training set"),),
              "dpo": (("label", "its prefs.jsonl is the training set"),)}
# A model role left null means this stage's model.
NULL_ROLES = {"policy": "sft", "reward_model": "reward"}


def required_stages(name: str, cfg) -> list[tuple[str, str]]:
    """The stages `name` cannot run without, and why: the data it reads (DATA_READS, when
    upstream in this config: reward with `preferences` reads no labels; critique's pairs
    with `mix_critique_pairs`) and every stage its model roles name (evaluate's `models`
    aside: it skips a stage that has not run)."""
    from cai.schema import applies

    upstream = registry.stage(name).upstream_of(cfg)
    needed = [(stage, why) for stage, why in DATA_READS.get(name, ()) if stage in upstream]
    if getattr(cfg, "mix_critique_pairs", False):
        needed.append(("critique", "mix_critique_pairs reads its prefs.jsonl"))
    for f, item in config_values(cfg):
        if (not f.metadata.get("model_reference") or not applies(cfg, f)  # rl's reward_model with reward: judge
                or (name, f.name) == ("evaluate", "models")):
            continue
        item = NULL_ROLES.get(f.name) if item is None else item
        if item in ORDER and item != name:
            needed.append((item, f"its model is {name}.{f.name}"))
    return list(dict.fromkeys(needed))


def upstream_problems(run: RunConfig, selected: list[str], flag: str | None = None) -> list[Problem]:
    """Every step a selected step needs (in its round) has completed in the run folder or
    runs before it in this command: checked before any stage folder is made. `flag`: the
    `--from` argument of `cai run` (None: a single step's command)."""
    problems, will_run = [], set()
    for step in selected:
        name = split_step(step)[0]
        cfg, _ = stage_config(run, name)
        for up, why in required_stages(name, cfg):
            needed = in_round(run, up, round_of(step, run.rounds))
            if needed in will_run or StageDir(run.path, needed).complete():
                continue
            advice = f"start from it (--from {up})" if flag else f"run `{step_command(needed)}` first"
            problems.append(Problem(flag or step_command(step), None,
                                    f"{name} needs stage '{needed}' ({why}), which has not completed in {run.path}: "
                                    f"{advice}"))
        will_run.add(step)
    return problems


def run_pipeline(run: RunConfig, start: str | None = None, until: str | None = None,
                 force: bool = False) -> list[dict]:
    selected = select_stages(run, start, until)
    # Every section is checked before any work starts, the unselected ones too: the config
    # is one unit, and `--until critique` today is `--from sft` tomorrow.
    validate(run, default_stages(run))
    if problems := upstream_problems(run, selected, f"--from {start}" if start else "cai run"):
        raise ValidationError(problems)
    check_servers(run, selected)
    return [run_stage(run, name, force=force) for name in selected]


def validate(run: RunConfig, names: list[str]) -> None:
    """Every problem of these stages' sections, of what they name (models, prompt files,
    the device) and of the constitution, before any work. No weights are loaded."""
    from cai.constitution import check_constitution
    from cai.models import device_problem

    problems = []
    if (reason := device_problem(run.device)) is not None:
        problems.append(run.source.problem(("device",), reason))
    problems += model_problems(run, ("model",), run.model)
    for name in dict.fromkeys(split_step(step)[0] for step in names):
        try:
            cfg, _ = stage_config(run, name)
        except ValidationError as err:
            problems += err.problems
            continue
        problems += reference_problems(run, name, cfg)
    problems += prompt_problems(run, names)
    path = run.constitution_path()
    if path.is_file():
        problems += check_constitution(path)[1]
    else:
        problems.append(run.source.problem(("constitution",), f"'constitution': no file {run.constitution}"))
    if problems:
        raise ValidationError(list(dict.fromkeys(problems)))  # a top-level key's problem once, not per stage


def reference_problems(run: RunConfig, name: str, cfg) -> list[Problem]:
    """Every model a stage's config names (fields marked `model_reference`) exists: a
    stage name, a declared server (`server_problems`) or a model spec `models.spec_problem`
    accepts. A stage that is not part of this run is not an error here (evaluate skips it)."""
    problems = []
    for f, item in config_values(cfg):
        if f.metadata.get("model_reference") and item is not None and not is_server(item):
            problems += model_problems(run, (name, f.name), item)
    return problems


# The hub's legacy ids without an owner (gpt2, bert-base-uncased, ...) now live under one;
# transformers still redirects some, cai's checks need the full id. By the id's first word.
LEGACY_HUB_OWNERS = {"gpt2": "openai-community", "openai": "openai-community", "distilgpt2": "distilbert",
                     "distilbert": "distilbert", "bert": "google-bert", "roberta": "FacebookAI",
                     "xlm": "FacebookAI", "t5": "google-t5", "albert": "albert", "ctrl": "Salesforce"}


def model_problems(run: RunConfig, key: tuple, reference: str) -> list[Problem]:
    import difflib

    from cai.models import spec_problem

    where = ".".join(key)
    stage_role = key != ("model",)  # the run's own model must be weights, not a stage
    name, number = split_step(reference)
    if stage_role and number is not None and name in MODEL_STAGES:
        if not registry.stage(name).per_round:
            return [run.source.problem(key, f"'{where}': '{reference}': {name} runs once, not per round; "
                                            f"name it '{name}'")]
        if not 1 <= number <= run.rounds:
            return [run.source.problem(key, f"'{where}': '{reference}' names round {number}, but this run has "
                                            f"rounds: {run.rounds}")]
        return []
    if stage_role and reference in MODEL_STAGES:
        return []
    if stage_role and reference in ORDER:
        return [run.source.problem(key, f"'{where}': stage '{reference}' saves no model "
                                        f"(stages with a model: {', '.join(MODEL_STAGES)})")]
    if "/" not in reference and ":" not in reference and not Path(reference).expanduser().exists():
        model = "a model (builtin:NAME, an existing folder, or a hub id owner/name)"
        what = f"neither a stage name ({', '.join(MODEL_STAGES)}) nor {model}" if stage_role else f"not {model}"
        close = difflib.get_close_matches(reference, MODEL_STAGES if stage_role else [], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        if not close and (owner := LEGACY_HUB_OWNERS.get(reference.split("-")[0])) is not None:
            hint = f"; the hub moved its old ids without an owner under one: write {owner}/{reference}"
        return [run.source.problem(key, f"'{where}': '{reference}' is {what}{hint}")]
    if run.cache_only:  # --check: a hub id is looked up in the cache, never on the hub
        if (reason := spec_problem(reference, hub=False)) is not None:
            return [run.source.problem(key, f"'{where}': {reason}")]
        if hub_id_uncached(reference):
            from cai.prompts import NotCached

            return [NotCached(*run.source.where(key), f"'{where}': model {reference} is not in the local Hugging "
                                                      f"Face cache (cai --check reads caches only; a run fetches "
                                                      f"it over a network)")]
        return []
    if (reason := spec_problem(reference)) is not None:
        return [run.source.problem(key, f"'{where}': {reason}")]
    return []


def hub_id_uncached(reference: str) -> bool:
    """A hub id (owner/name, no such local path) whose config is not in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    if reference.startswith("builtin:") or Path(reference).expanduser().exists():
        return False
    try:
        return not isinstance(try_to_load_from_cache(reference, "config.json"), str)
    except ValueError:  # not a well-formed hub id: not in any cache either
        return True


def prompt_problems(run: RunConfig, names: list[str]) -> list[Problem]:
    """The prompt files read and checked line by line, and no stage that will run left
    with nothing to do: training prompts for critique, label and rl, held-out ones for evaluate."""
    from cai.prompts import load_splits

    needed = {name: registry.stage(name).prompts for name in dict.fromkeys(split_step(s)[0] for s in names)}
    needed = {name: split for name, split in needed.items() if split}
    if not needed:
        return []
    try:
        splits = load_splits(run.prompts, run.seed, run.source, cache_only=run.cache_only)
    except ValidationError as err:
        return err.problems
    needs = set(needed.values())
    fraction = run.prompts.eval_fraction
    problems = []
    if "train" in needs and not splits.red_team_train:
        users = ", ".join(n for n, split in needed.items() if split == "train")
        problems.append(run.source.problem(("prompts", "eval_fraction"), (
            f"'prompts.eval_fraction': no red-team training prompts for {users}: every prompt of "
            f"{run.prompts.red_team} "
            f"falls in the eval split (eval_fraction {fraction}); add prompts or lower eval_fraction")))
    if "eval" in needs:
        problems += eval_split_problems(run, splits)
    return problems


def eval_split_problems(run: RunConfig, splits) -> list[Problem]:
    """Every kind evaluate measures has held-out prompts: red-team prompts (harmlessness)
    and, when `prompts.helpful` is set, helpful ones (helpfulness). A kind whose split is
    empty is refused, never dropped from the results in silence; a file in
    `evaluate.prompts.KIND` replaces that kind's split (its own checks are evaluate's)."""
    own = (run.stages.get("evaluate") or {}).get("prompts")
    own = own if isinstance(own, dict) else {}
    fraction = run.prompts.eval_fraction
    held_out = {"red_team": (run.prompts.red_team, splits.red_team_eval),
                "helpful": (run.prompts.helpful, splits.helpful_eval)}
    problems = []
    for kind, (source, prompts) in held_out.items():
        if source is None or kind in own or prompts:
            continue
        measure = "harmlessness" if kind == "red_team" else "helpfulness"
        problems.append(run.source.problem(("prompts", "eval_fraction"), (
            f"'prompts.eval_fraction': no held-out {kind} prompts for evaluate ({measure} would not be measured): "
            f"eval_fraction {fraction} puts none of the prompts of {source} in the eval split; raise it, add "
            f"prompts, or name a prompt file in evaluate.prompts.{kind}")))
    return problems


def select_stages(run: RunConfig, start: str | None, until: str | None) -> list[str]:
    """The stages `--from START --until UNTIL` selects (a usage error names the flag)."""
    stages = default_stages(run)
    problems = [Problem(flag, None, f"'{bound}' is not one of this run's stages ({', '.join(stages)})")
                for flag, bound in (("--from", start), ("--until", until)) if bound is not None and bound not in stages]
    if not problems and start and until and stages.index(start) > stages.index(until):
        problems.append(Problem("--from", None, f"'{start}' comes after --until '{until}' "
                                                f"(stage order: {', '.join(stages)}), so nothing would run"))
    if problems:
        raise ValidationError(problems)
    begin = stages.index(start) if start else 0
    end = stages.index(until) + 1 if until else len(stages)
    return stages[begin:end]

