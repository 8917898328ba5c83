"""The executor: a short loop over a plan's steps. Each step is decided once
(`decide`), the decisions' refusals stop the command before any work, and each step that
runs gets its context, its measurements and, once done, its manifest."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from cai import console, distributed
from cai.engines import EngineError, server_name
from cai.execute.context import StageContext
from cai.execute.decide import decide_all, decide_now, refuse
from cai.execute.measure import Measurement, summary, utilisation_words
from cai.yamlio import Problem, ValidationError, problem


def execute(plan, force: bool = False, remember: bool = False, reuse: tuple = ()) -> list[dict]:
    """Run a plan: check the servers its running steps use, refuse before any work if any
    step would be refused, then run each step in order. `remember`: keep the config in
    RUN_DIR/config.yaml (a command's run); `reuse`: other run folders whose complete steps
    with the same fingerprint are linked in instead of run again. Returns the steps' manifests."""
    linked = set()  # said "reused from" already: not "already complete" again
    if reuse and distributed.is_main():
        done = reusable(reuse, [step.step for step in plan.steps])
        linked = {step.step for step in plan.steps if link_reused(step, done)}
    distributed.barrier()
    decisions = decide_all(plan, force)
    check_servers(plan.run, [s for s, d in zip(plan.steps, decisions) if d.action != "skip"])  # a dead server first
    refuse(decisions)
    if remember and distributed.is_main():
        remember_config(plan.run)
    if any(d.action != "skip" for d in decisions):
        console.info(f"[cai] run folder: {plan.run.path.resolve()}")
    return [run_step(plan.run, step, force, plan.run_steps, said=step.step in linked) for step in plan.steps]


def run_step(run, step, force: bool = False, run_steps: tuple = (), said: bool = False) -> dict:
    """Run one planned step: skip it if complete with the same fingerprint (`said`: its
    line was printed already), resume it if interrupted, redo it (old folder moved aside)
    if forced or stale."""
    decision = decide_now(step, run.path, force)
    ctx = StageContext.of(step, run, run_steps)
    if decision.action == "skip":
        if not said:
            console.info(f"[cai] {step.step}: already complete ({ctx.dir.path}), skipped")
        return decision.manifest
    if distributed.is_main():  # the main process sets the folder up; the others wait for it
        aside = decision.aside(ctx.dir.path) if decision.action == "redo" else None
        size = ctx.dir.begin(step.fingerprint, step.settings, aside)
        if aside is not None:
            print(f"[cai] {step.step}: redone: {decision.message}\n[cai] {step.step}: old outputs moved to {aside} "
                  f"({size} kept on disk; delete the folder when it is no longer needed)")
    distributed.barrier()
    resumed = decision.action == "resume"
    measured = Measurement(run)
    console.info(f"[cai] {step.step}: {'resuming' if resumed else 'running'}")
    try:
        counts = ctx.run_stage()
    except BaseException as err:
        measured.abort()
        if distributed.is_main() and not isinstance(err, KeyboardInterrupt):
            ctx.dir.abandon()
        raise
    record = measured.stop(ctx.work)
    manifest = {
        "stage": step.name, **({"round": step.round} if step.step != step.name else {}),
        "config_hash": step.fingerprint, "config": dataclasses.asdict(step.config), "trl": step.trl,
        "shared": {**step.settings["shared"], "constitution_sha256": measured.constitution_sha256},
        "upstream": step.upstream, "settings": step.settings, "counts": counts, "resumed": resumed, **record,
        **({"engines": ctx.engines_used} if ctx.engines_used else {})}
    if distributed.is_main():
        ctx.dir.finish(manifest)
    distributed.barrier()  # the next stage reads this one's manifest and outputs
    print(f"[cai] {step.step}: {summary(record, counts)}{utilisation_words(record)}")
    return manifest


def reusable(folders, steps: list[str]) -> dict[tuple[str, str], Path]:
    """The complete steps of other run folders: {(step, fingerprint): its folder}."""
    from cai.rundir import StageDir

    done: dict[tuple[str, str], Path] = {}
    for folder in folders:
        for name in steps:
            previous = StageDir(Path(folder), name)
            if previous.complete() and (manifest := previous.manifest()) is not None:
                done.setdefault((name, manifest["config_hash"]), previous.path.resolve())
    return done


def link_reused(step, done: dict[tuple[str, str], Path], who: str = "cai") -> bool:
    """Link in the folder `done` holds for this step's fingerprint (the same settings, the
    same constitution parts, the same upstream steps), unless the run folder has the step
    already: the executor then skips it as complete. A link, not a copy: a model is not
    stored twice, and the other folder must stay where it is."""
    here = Path(step.folder)
    if (step.step, step.fingerprint) not in done or here.exists() or here.is_symlink():
        return False
    here.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(done[(step.step, step.fingerprint)], here, target_is_directory=True)
    print(f"[{who}] {step.step}: reused from {done[(step.step, step.fingerprint)]} (the same fingerprint)",
          flush=True)
    return True


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
