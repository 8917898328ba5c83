"""`cai <stage> --config CFG`, `cai run`, `cai report`, `cai constitution check|show`, ..."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import traceback

from cai.registry import STAGES
from cai.yamlio import Problem, ValidationError


def _verbosity_flags(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="everything the libraries say (their progress bars and the warnings cai hides: "
                             "cai.console.NOISE), debug logging, and the traceback of an internal error")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress bars and no line when a step starts: each step's summary line, "
                             "warnings and errors")


def _add_config_args(parser: argparse.ArgumentParser, run_dir: bool = False) -> None:
    if run_dir:  # `cai run RUN_DIR`: the config the run folder keeps
        parser.add_argument("run_dir", nargs="?", metavar="RUN_DIR",
                            help="continue the run in this folder with the config it keeps (RUN_DIR/config.yaml)")
    parser.add_argument("--config", required=not run_dir, help="run config YAML (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set critique.num_revisions=1 (repeatable)")
    parser.add_argument("--force", action="store_true",
                        help="redo a stage completed with other settings (its old folder is moved aside)")


def _load(args):
    from pathlib import Path

    from cai.config import load_config
    from cai.plan.sections import misplaced_key_hint

    run_dir = getattr(args, "run_dir", None)
    if run_dir is not None and args.config is not None:
        raise ValidationError([Problem(run_dir, None, "give a run folder or --config, not both (a run folder "
                                                      "continues with its own config.yaml)")])
    if run_dir is None and args.config is None:
        raise ValidationError([Problem("cai run", None, "name the config (--config FILE) or a run folder to "
                                                        "continue (cai run RUN_DIR)")])
    config = args.config
    if run_dir is not None:
        config = Path(run_dir).expanduser() / "config.yaml"
        if not config.is_file():
            raise ValidationError([Problem(str(config), None, f"no such file: {run_dir} holds no config.yaml "
                                                              f"(a run folder keeps the config its first run used)")])
    return load_config(config, args.overrides, elsewhere=misplaced_key_hint)


def _plan(args, **kwargs):
    """load config -> make_plan, every problem of the file at once: the run config's own,
    and its stage sections' as far as the config can be read without the faulty keys."""
    from cai.config import ConfigError
    from cai.plan.plan import make_plan

    try:
        run, problems = _load(args), []
    except ConfigError as err:
        if err.partial is None:
            raise
        run, problems = err.partial, err.problems
    run.cache_only = args.check
    try:
        plan = make_plan(run, **kwargs)
    except ValidationError as err:
        raise ValidationError(list(dict.fromkeys(problems + err.problems))) from None
    if problems:
        raise ValidationError(problems)
    return run, plan


def _add_check_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true",
                        help="make the plan and print it, then exit (0: usable, 2: FILE:LINE problems): every "
                             "problem of the config, and what each step would do (skip, run, resume, redo); no "
                             "weights loaded, no server reached, nothing written; hub models and datasets are "
                             "looked up in the local caches only, and one not there is a warning")


def print_plan(plan, force: bool = False) -> int:
    """`--check`: the plan, what each step would do in the run folder, and every refusal
    (exit 2). Hub ids that are not cached are warnings."""
    from cai.execute.decide import decide
    from cai.rundir import step_state

    for problem in plan.warnings:
        print(Problem(problem.file, problem.line, f"warning: {problem.message}"), file=sys.stderr)
    note = f" ({len(plan.warnings)} warning{'s' * (len(plan.warnings) != 1)})" if plan.warnings else ""
    print(f"[cai] {plan.run.source.file}: ok for {', '.join(s.step for s in plan.steps)}{note}")
    print(f"[cai] run folder: {plan.folder}")
    refusals = []
    width = max(len(s.step) for s in (*plan.steps, *plan.others))
    for step in sorted((*plan.steps, *plan.others), key=lambda s: plan.run_steps.index(s.step)
                       if s.step in plan.run_steps else len(plan.run_steps)):
        if not step.selected:
            state, redone = step_state(plan.run.path, step.step)
            after = f" (upstream {', '.join(redone)} redone after it)" if redone else ""
            print(f"  {step.step:<{width}}  not selected: {state}{after}")
            continue
        decision = decide(step, plan.run.path, force)
        models = ", ".join(f"{role}={ref}" for role, ref in step.models.items())
        words = {"skip": "skip (complete with these settings)", "run": "run", "resume": "resume (interrupted)",
                 "redo": "redo", "refuse": "refused"}[decision.action]
        print(f"  {step.step:<{width}}  {words}  [{step.fingerprint}]" + (f"  {models}" if models else ""))
        if decision.action == "redo":
            print("      " + decision.message.replace("\n", "\n      "))
        if decision.action == "refuse":
            refusals.append(Problem(decision.where, None, decision.message))
    if refusals:
        raise ValidationError(refusals)
    return 0


def cmd_stage(args) -> int:
    from cai.execute.executor import execute
    from cai.plan.plan import make_plan
    from cai.registry import step_name
    from cai.rundir import RunLock

    run = _load(args)
    round_number = getattr(args, "round", 1)
    if round_number > run.rounds:
        raise ValidationError([Problem("--round", None, f"round {round_number}, but {args.config} has "
                                                        f"rounds: {run.rounds}")])
    step = step_name(args.command, round_number)
    run.cache_only = args.check
    plan = make_plan(run, only=step, upstream=not args.check)  # --check of one stage: its config, run or not
    if args.check:
        return print_plan(plan, args.force)
    with RunLock(run.path, f"cai {step}"):
        execute(plan, force=args.force, remember=True)
        if args.command == "evaluate":
            refresh_report(run)
    return 0


def cmd_run(args) -> int:
    from pathlib import Path

    from cai.execute.executor import execute
    from cai.rundir import RunLock

    run, plan = _plan(args, start=args.start, until=args.until)
    if args.check:
        return print_plan(plan, args.force)
    reuse = [Path(folder).expanduser() for folder in args.reuse]
    for folder in reuse:
        if not folder.is_dir():
            raise ValidationError([Problem(str(folder), None, "--reuse: no such run folder")])
    with RunLock(run.path, "cai run"):
        execute(plan, force=args.force, remember=True, reuse=tuple(reuse))
        refresh_report(run)
    return 0


def refresh_report(run) -> None:
    """RUN_DIR/report/index.html, rewritten from what the run folder holds, evaluated or
    not: after `cai run` and after `cai evaluate`, whose results it shows."""
    from cai import distributed
    from cai.report import write_report

    if distributed.is_main():
        evaluated = (run.path / "evaluate" / "manifest.json").exists()
        note = "" if evaluated else " (no evaluation yet: evaluate has not run, so the page shows training only)"
        print(f"[cai] report: {write_report(run.path)}{note}")


def cmd_status(args) -> int:
    """`cai status RUN_DIR`: each step's state from its folder (complete, stale, partial,
    pending), the steps of the config the folder keeps, or of the folders it holds."""
    from pathlib import Path

    from cai.config import load_config
    from cai.registry import ORDER, steps
    from cai.rundir import StageDir, step_state

    run_dir = Path(args.run_dir).expanduser()
    if (run_dir / "config.yaml").is_file():
        from cai.plan.steps import default_stages

        names = default_stages(load_config(run_dir / "config.yaml"))
    elif run_dir.is_dir() and any(StageDir(run_dir, s).path.is_dir() for s in ORDER):
        rounds = [int(p.name[5:]) for p in run_dir.glob("round*") if p.name[5:].isdigit()]
        names = [s for s in steps(ORDER, max(rounds, default=1)) if StageDir(run_dir, s).path.is_dir()]
    else:
        raise ValidationError([Problem(str(run_dir), None, "not a run folder: it holds no config.yaml and no "
                                                           "stage folder")])
    print(f"[cai] {run_dir.resolve()}")
    width = max(len(s) for s in names)
    for step in names:
        state, redone = step_state(run_dir, step)
        after = f": upstream {', '.join(redone)} redone after it (cai run redoes it)" if redone else ""
        print(f"  {step:<{width}}  {state}{after}")
    return 0


def cmd_report(args) -> int:
    from pathlib import Path

    from cai.report import write_report

    print(write_report(Path(args.run_dir).expanduser()))
    return 0


def cmd_constitution(args) -> int:
    from cai.constitution import check_constitution, format_constitution

    if args.action == "diff":
        return constitution_diff_command(args.paths)
    if args.action == "show":
        failed = False
        for number, path in enumerate(args.paths):
            constitution, problems = check_constitution(path)
            for problem in problems:
                print(problem, file=sys.stderr)
            if problems:
                failed = True
                continue
            if len(args.paths) > 1:
                print(("\n" if number else "") + f"==> {path} <==")
            print(format_constitution(constitution))
        return 2 if failed else 0
    failed = False
    for path in args.paths:
        constitution, problems = check_constitution(path)
        for problem in problems:
            print(problem)
        if problems:
            failed = True
        else:
            print(f"{path}: ok ({len(constitution.critique_revision)} critique/revision principles, "
                  f"{len(constitution.feedback)} feedback principles)")
    return 2 if failed else 0


def constitution_diff_command(paths: list[str]) -> int:
    """`cai constitution diff A B`, as `diff` answers: 0 the same meaning, 1 different, 2 a bad file."""
    from cai.constitution import change_line, check_constitution, constitution_diff

    if len(paths) != 2:
        raise ValidationError([Problem("cai constitution diff", None, f"takes two constitution files, got "
                                                                      f"{len(paths)}")])
    loaded, problems = [], []
    for path in paths:
        constitution, found = check_constitution(path)
        loaded.append(constitution)
        problems += found
    if problems:
        raise ValidationError(problems)
    changes = constitution_diff(*loaded)
    if not changes:
        print(f"{paths[0]} and {paths[1]} mean the same (comments, key order and line folding aside)")
        return 0
    print(f"--- {paths[0]}\n+++ {paths[1]}")
    for change in changes:
        print(change_line(change))
        for sign, value in (("-", change["old"]), ("+", change["new"])):
            if isinstance(value, dict):  # a whole principle or example added or removed: its texts
                value = "; ".join(f"{k}: {' '.join(str(v).split())}" for k, v in value.items()
                                  if k not in ("id",) and isinstance(v, str))
            elif isinstance(value, list):
                value = ", ".join(map(str, value))
            if value:
                print(f"  {sign} {' '.join(str(value).split())}")
    print(f"{len(changes)} difference{'s' if len(changes) > 1 else ''}")
    return 1


def cmd_compare(args) -> int:
    from pathlib import Path

    from cai.evaluation.compare import (
        comparison,
        format_comparison,
        head_to_head,
        judged_models,
        load_evaluated,
        shared_prompts,
    )
    from cai.report.page import write_comparison
    from cai.rundir import atomic_write_json

    paths = [Path(p).expanduser() for p in args.run_dirs]
    if len(paths) < 2:
        raise ValidationError([Problem("cai compare", None, "takes two run folders or more (the first is A)")])
    problems, runs = [], []
    for path in paths:
        try:
            runs.append(load_evaluated(path))
        except ValidationError as err:
            problems += err.problems
    if problems:
        raise ValidationError(problems)
    seed = args.seed if args.seed is not None else runs[0].results["run"].get("seed", 0)
    result = comparison(runs, seed)  # refuses runs that share no prompts, before any judge runs
    out = Path(args.output_dir).expanduser() if args.output_dir else \
        paths[0].resolve().parent / ("compare-" + "-".join(p.resolve().name for p in paths))
    if args.judge:
        models = [judged_models(runs[0], run, args.model) for run in runs[1:]]
        ctx, judge = compare_judge(paths[0], args.judge)
        out.mkdir(parents=True, exist_ok=True)
        try:
            for run, other, (model_a, model_b) in zip(runs[1:], result["against"], models):
                other["head_to_head"] = {
                    **head_to_head(judge, runs[0], run, model_a, model_b, shared_prompts(runs[0], run), out, seed,
                                   ctx.constitution),
                    "judge": judge.description["feedback_model"], "constitution": runs[0].name}
        finally:
            ctx.release()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "comparison.json", result)
    print(format_comparison(result))
    print(f"[cai] compare: {write_comparison(out, result)}")
    return 0


def compare_judge(run_dir, reference: str):
    """The judge of `cai compare --judge`: the evaluate section's judge settings of the first
    run's config (RUN_DIR/config.yaml), with `reference` as its feedback model, checked (and
    its server probed) before any work; its principles are that run's constitution's."""
    from cai.config import load_config
    from cai.execute.context import StageContext
    from cai.execute.executor import check_servers
    from cai.judge.settings import make_judge
    from cai.models import set_threads
    from cai.plan.plan import make_plan

    config = run_dir / "config.yaml"
    if not config.exists():
        raise ValidationError([Problem(str(run_dir), None, "--judge reads the judge's settings from the first run's "
                                                           "config.yaml, and it has none")])
    run = load_config(str(config), [f"evaluate.feedback_model={reference}"])
    plan = make_plan(run, only="evaluate", upstream=False)
    step = plan.steps[0]
    check_servers(run, [step], roles=("feedback_model",))
    ctx = StageContext.of(step, run, plan.run_steps)
    set_threads(run.threads)
    return ctx, make_judge(ctx, ctx.config, ctx.config.batch_size)


def cmd_eval_labeler(args) -> int:
    from cai.execute.context import StageContext
    from cai.execute.executor import check_servers
    from cai.judge.eval_labeler import eval_labeler_command
    from cai.plan.plan import make_plan

    run = _load(args)
    # the checks `cai label` makes (models, constitution, prompts), before any work; the
    # labeler reads no upstream step
    plan = make_plan(run, only="label", upstream=False)
    step = plan.steps[0]
    check_servers(run, [step], roles=("feedback_model",))
    return eval_labeler_command(StageContext.of(step, run, plan.run_steps), args.data, args.limit, args.out)


class _Version(argparse.Action):
    """--version, built only when asked for: it imports torch to name the device."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):  # noqa: A002
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from cai.execute.measure import version_text

        print(version_text())
        parser.exit()


class _SettingsHelp(argparse.Action):
    """-h / --help that also lists every setting (`cai.help`), built only when asked for:
    it imports the stage recipes and TRL, which a plain command does not need at start."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None,  # noqa: A002
                 stage=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)
        self.stage = stage

    def __call__(self, parser, namespace, values, option_string=None):
        from cai.help import run_settings, stage_settings

        parser.epilog = stage_settings(self.stage) if self.stage else run_settings()
        parser.print_help()
        parser.exit()


def _add_settings_help(parser: argparse.ArgumentParser, stage: str | None) -> None:
    parser.add_argument("-h", "--help", action=_SettingsHelp, stage=stage,
                        help="show this help, with every setting, its default and its help text, and exit")


def _round(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a round number 1, 2, ..., got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cai", description="Constitutional AI / RLAIF training with TRL")
    _verbosity_flags(parser, False)
    parser.add_argument("--version", action=_Version, help="print the versions of cai, torch, transformers, trl "
                                                             "and accelerate, and the device, then exit")
    # -v after the command too (`cai run -v ...`): SUPPRESS keeps a missing one from
    # overwriting the flag given before the command.
    common = argparse.ArgumentParser(add_help=False)
    _verbosity_flags(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for entry in STAGES:
        stage = sub.add_parser(entry.name, help=entry.help, description=entry.help, parents=[common],
                               add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_settings_help(stage, entry.name)
        _add_config_args(stage)
        _add_check_arg(stage)
        if entry.per_round:
            stage.add_argument("--round", type=_round, default=1, metavar="K",
                               help="the round to run (rounds: N in the config; default 1)")
        stage.set_defaults(func=cmd_stage)

    run = sub.add_parser("run", help="run the stages in order, skipping completed ones", parents=[common],
                         add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_settings_help(run, None)
    _add_config_args(run, run_dir=True)
    run.add_argument("--from", dest="start", help="first stage to run (a later round's: rl@2)")
    run.add_argument("--until", help="last stage to run (a later round's: rl@2)")
    run.add_argument("--reuse", action="append", default=[], metavar="RUN_DIR",
                     help="link in each step another run folder holds complete with the same fingerprint (same "
                          "settings, constitution parts and upstream steps) instead of running it again; "
                          "repeatable. A link: keep that folder where it is")
    _add_check_arg(run)
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="each step's state in a run folder: complete, stale, partial, pending",
                            parents=[common])
    status.add_argument("run_dir", metavar="RUN_DIR")
    status.set_defaults(func=cmd_status)

    report = sub.add_parser("report", help="write RUN_DIR/report/index.html", parents=[common])
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)

    constitution = sub.add_parser(
        "constitution", help="check, show or diff constitution files", parents=[common],
        description="check: validate files; show: print them; diff A B: what differs in meaning (principles and "
                    "examples added, removed, changed; comments and key order ignored), exit 0 the same, 1 "
                    "different, 2 a bad file")
    constitution.add_argument("action", choices=["check", "show", "diff"])
    constitution.add_argument("paths", nargs="+", metavar="PATH")
    constitution.set_defaults(func=cmd_constitution)

    compare = sub.add_parser(
        "compare", help="compare evaluated runs on the prompts they share (one page, paired intervals)",
        parents=[common], description="Each run against the first, on the prompts both evaluated (paired by prompt "
                                      "text, set by set): what else differs besides the constitution, what the "
                                      "constitution changes, and every evaluation figure as B - A with a 95 % "
                                      "interval. Writes OUT/index.html and OUT/comparison.json.")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="evaluated run folders; the first is A")
    compare.add_argument("--judge", metavar="MODEL_OR_SERVER", default=None,
                         help="also judge the runs' final policies head to head on the shared prompts (a model "
                              "spec, a stage of the first run, or server:NAME of its config), both option orders, "
                              "resumable")
    compare.add_argument("--model", default=None, help="the model to judge head to head in every run (default: "
                                                      "each run's final policy: dpo, else rl, else sft)")
    compare.add_argument("--output-dir", default=None, metavar="OUT",
                         help="where the page and its data go (default: compare-A-B... beside the first run)")
    compare.add_argument("--seed", type=int, default=None, help="bootstrap and principle seed (default: the first "
                                                               "run's seed)")
    compare.set_defaults(func=cmd_compare)

    labeler = sub.add_parser("eval-labeler", help="accuracy of the feedback model on labelled comparisons",
                             parents=[common])
    _add_config_args(labeler)
    labeler.add_argument("--data", required=True, help="HHH-format or prompt/chosen/rejected JSONL")
    labeler.add_argument("--limit", type=int, default=None, help="use only the first N comparisons")
    labeler.add_argument("--out", default=None, help="write the metrics as JSON here")
    labeler.set_defaults(func=cmd_eval_labeler)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # before --help, which imports the stages
    args = build_parser().parse_args(argv)
    from cai import console

    if args.verbose and args.quiet:
        print("cai: error: -q and -v exclude each other", file=sys.stderr)
        return 2
    console.setup(console.VERBOSE if args.verbose else console.QUIET if args.quiet else console.DEFAULT)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _quiet_unless_main()
    try:
        code = args.func(args)
        from cai import distributed

        distributed.finish()
        return code
    except ValidationError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        if args.verbose:
            traceback.print_exc()
        print(f"cai: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncai: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cai constitution show X | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:  # noqa: BLE001 - a bug in cai: one line here, the traceback in a file
        from cai.rundir import WriteError, write_failure

        if (failure := write_failure(err)) is not None:  # a full disk, a folder made read-only: no bug
            if args.verbose:
                traceback.print_exc()
            print(f"cai: error: {WriteError(failure[0] or '?', failure[1])}", file=sys.stderr)
            return 1
        log_path = _write_traceback()
        if args.verbose:
            traceback.print_exc()
        print(f"cai: internal error: {type(err).__name__}: {str(err)[:300]}\n"
              f"cai: the traceback is in {log_path}" + ("" if args.verbose else " (-v prints it)"), file=sys.stderr)
        return 1


def _quiet_unless_main() -> None:
    """Under `accelerate launch` / `torchrun`, only the main process prints progress
    (errors still reach stderr from every process)."""
    from cai import distributed

    if distributed.distributed() and not distributed.is_main():
        os.environ["TQDM_DISABLE"] = "1"
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def _write_traceback() -> str:
    """Save the current exception's traceback to a fresh file in the temp folder; return its path."""
    try:
        fd, path = tempfile.mkstemp(prefix="cai-error-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(" ".join(sys.argv) + "\n\n" + traceback.format_exc())
        return path
    except OSError as err:
        return f"(not saved: {err})"


if __name__ == "__main__":
    sys.exit(main())
