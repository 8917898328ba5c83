"""The executor: a short loop over a plan's steps. Each step is decided once
(`decide`), the decisions' refusals stop the command before any work, and each step that
runs gets its context, its measurements and, once done, its manifest."""

from __future__ import annotations

import dataclasses
import logging
import time

from cai import distributed
from cai.engines import EngineError, server_name
from cai.execute.context import StageContext
from cai.execute.decide import Decision, decide, folder_size
from cai.execute.measure import StagePeak, set_up, versions
from cai.rundir import StageDir, atomic_write_json
from cai.yamlio import Problem, ValidationError, problem

log = logging.getLogger(__name__)


def execute(plan, force: bool = False, remember: bool = False) -> list[dict]:
    """Run a plan: refuse before any work if any step would be refused, check the servers
    its running steps use, then run each step in order. `remember`: keep the config in
    RUN_DIR/config.yaml (a command's run). Returns the steps' manifests."""
    decisions = distributed.broadcast([decide(step, plan.run.path, force) for step in plan.steps]
                                      if distributed.is_main() else None)
    if refusals := [refusal(d) for d in decisions if d.action == "refuse"]:
        raise ValidationError(refusals)
    check_servers(plan.run, [s for s, d in zip(plan.steps, decisions) if d.action != "skip"])
    if remember and distributed.is_main():
        remember_config(plan.run)
    return [run_step(plan.run, step, force, plan.run_steps) for step in plan.steps]


def refusal(decision: Decision) -> Problem:
    return Problem(decision.where, None, decision.message)


def run_step(run, step, force: bool = False, run_steps: tuple = ()) -> dict:
    """Run one planned step: skip it if complete with the same fingerprint, resume it if
    interrupted, redo it (old folder moved aside) if forced or stale."""
    ctx = StageContext.of(step, run, run_steps)
    folder = ctx.dir
    # The main process decides and sets the folder up; the others follow its decision
    # once it has (several processes: cai.distributed).
    decision = distributed.broadcast(decide(step, run.path, force) if distributed.is_main() else None)
    if decision.action == "skip":
        log.info("%s: complete with the same config (%s), skipped", step.step, step.fingerprint)
        print(f"[cai] {step.step}: already complete ({folder.path}), skipped")
        return decision.manifest
    if decision.action == "refuse":
        raise ValidationError([refusal(decision)])
    if distributed.is_main():
        if decision.action == "redo":
            aside = decision.aside(folder.path)
            size = folder_size(folder.path)
            folder.path.rename(aside)
            print(f"[cai] {step.step}: redone: {decision.message}")
            print(f"[cai] {step.step}: old outputs moved to {aside} ({size} kept on disk; delete the folder when it "
                  f"is no longer needed)")
        folder.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder.marker_path, {"config_hash": step.fingerprint, "settings": step.settings})
    distributed.barrier()
    resumed = decision.action == "resume"
    threads = set_up(run)
    print(f"[cai] {step.step}: {'resuming' if resumed else 'running'} in {folder.path}")
    memory = StagePeak()
    started = time.time()
    try:
        from cai.plan.sections import stage_module

        counts = stage_module(step.name).run(ctx) or {}
        ctx.release()
    except BaseException as err:
        ctx.release()
        memory.stop()
        # A stage that failed before doing any work it would keep (say, a trainer that
        # refused its settings) must not leave a marker that would refuse a retry with
        # other settings. (An interrupted one keeps it: the same command resumes.)
        if distributed.is_main() and not isinstance(err, KeyboardInterrupt) and not kept_work(folder):
            folder.marker_path.unlink(missing_ok=True)
            if not any(folder.path.iterdir()):
                folder.path.rmdir()
        raise
    manifest = {
        "stage": step.name, **({"round": step.round} if step.step != step.name else {}),
        "config_hash": step.fingerprint, "config": dataclasses.asdict(step.config), "trl": step.trl,
        "shared": {**step.settings["shared"], "constitution_sha256": constitution_sha256(run)},
        "upstream": step.upstream, "settings": step.settings, "counts": counts, "resumed": resumed,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 2), "versions": versions(), "threads": threads,
        "peak_memory": memory.stop(),
    }
    if distributed.distributed():
        manifest["processes"] = distributed.world_size()
    if ctx.engines_used:
        manifest["engines"] = ctx.engines_used
    if distributed.is_main():
        atomic_write_json(folder.manifest_path, manifest)
        folder.marker_path.unlink(missing_ok=True)
    distributed.barrier()  # the next stage reads this one's manifest and outputs
    peak = manifest["peak_memory"]
    print(f"[cai] {step.step}: done in {manifest['seconds']:.1f}s, peak RSS {peak['rss_bytes'] / 2**30:.2f} GiB"
          + (f", CUDA {peak['cuda_max_allocated_bytes'] / 2**30:.2f} GiB" if "cuda_max_allocated_bytes" in peak else "")
          + f" {counts}")
    return manifest


def remember_config(run) -> None:
    """RUN_DIR/config.yaml: the config this run uses, every `--set` applied, so `cai run
    RUN_DIR` continues it with no flags. Written by the first run; a later run with
    other settings replaces it (the folder keeps the config of its latest run), saying so."""
    import yaml

    from cai.config import resolved_config
    from cai.rundir import atomic_write_text

    path = run.path / "config.yaml"
    text = ("# The config of the latest run in this folder, every --set applied: `cai run RUN_DIR` continues it\n"
            + yaml.safe_dump(resolved_config(run), sort_keys=False, allow_unicode=True))
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    if path.exists():
        print(f"[cai] {path}: updated to this run's config")
    atomic_write_text(path, text)


def constitution_sha256(run) -> str | None:
    """The constitution file's digest, recorded (the report shows it), never hashed: the
    fingerprint has the parts each stage uses."""
    import hashlib

    path = run.constitution_path()
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def kept_work(folder: StageDir) -> bool:
    """Work a resume would keep: a committed chunk, a checkpoint, a saved model or adapter."""
    return (any(ledger.stat().st_size for ledger in folder.path.glob(".*.chunks.jsonl"))
            or any((folder.path / "checkpoints").glob("checkpoint-*")) or folder.saved_model() is not None)


def check_servers(run, steps, roles: tuple[str, ...] | None = None) -> None:
    """Before any work: every server a step that will run uses (in these `roles`, or all)
    answers, serves its model and, for a judge, returns log-probabilities (one probe per
    server, not per process)."""
    from cai.plan.sections import JUDGE_KEYS, is_server

    used: dict[str, bool] = {}
    for step in steps:
        for f in dataclasses.fields(step.config):
            values = getattr(step.config, f.name)
            for reference in values if isinstance(values, list) else [values]:
                if is_server(reference) and (roles is None or f.name in roles):
                    used[reference] = used.get(reference, False) or f.name in JUDGE_KEYS
    error = None
    if distributed.is_main():
        for reference, judge in used.items():
            if (error := server_check_problem(run, reference, judge)) is not None:
                break
    error = distributed.broadcast(error)
    if error:
        raise ValidationError([error])


def server_check_problem(run, reference: str, judge: bool) -> Problem | None:
    """A server that does not answer, serves another model or (for a judge) gives no
    log-probabilities is a refusal of input, at the line that declares it."""
    from cai.engines.openai import OpenAIEngine

    name = server_name(reference)
    try:
        OpenAIEngine(run.servers[name], reference).check(judge=judge)
    except EngineError as err:
        return problem(run.source, ("servers", name), str(err))
    return None


def prepare(run, step: str) -> StageContext:
    """The context of one step planned alone (a script's, a test's): its own section checked."""
    from cai.plan.plan import make_plan

    plan = make_plan(run, only=step, verify=False)
    return StageContext.of(plan.steps[0], run, plan.run_steps)


def run_one(run, step: str, force: bool = False) -> dict:
    """One step planned alone and run (a script's, a test's: `cai STAGE` checks the whole config)."""
    from cai.plan.plan import make_plan

    plan = make_plan(run, only=step, verify=False)
    return run_step(run, plan.steps[0], force, plan.run_steps)
