"""cai's PPO against TRL 1.12's (`trl.experimental.ppo`, the last TRL release with PPO):
the same prompts, policy, reward model and seed, the same number of updates, side by side.

Three rows, each its own process, one at a time (so each peak RSS is that process's own):

    trl-1.12   TRL 1.12's PPOTrainer (bench/ppo_trl112.py, in a venv of its own with trl==1.12.0):
               full fine-tuning, four models (policy, its reference copy, reward model, and a
               value model initialised from the reward model)
    cai        `cai rl` with rl.algorithm=ppo, full fine-tuning
    cai-lora   the same with rl.use_peft=true: a LoRA policy on one base (the reference is the adapter
               disabled, the value model a second adapter)
    cai-ckpt, cai-lora-ckpt
               cai and cai-lora with activation checkpointing (not run by default): TRL 1.12's
               PPO has no such row, as its training loop never turns checkpointing on
               (`gradient_checkpointing: true` is ignored there: it replaces Trainer.train, which
               is where transformers turns it on)

Every row starts from a finished run's stages (`--reuse`, linked in as bench/grid.py links
them: the config must be the one that run was made with) and scores with one reward model
folder (`--reward`). The prompts are the rl stage's training prompts
(`cai.stages.rl.training_prompts`), rendered with the policy's chat template in this
process and handed to TRL 1.12 as token ids. Both sides get the same settings: learning
rate (the LoRA row its own), batch, updates (total_episodes = updates x batch),
num_ppo_epochs, num_mini_batches, kl_coef, temperature, max_new_tokens (TRL's
response_length), the run's seed, fp32, no activation checkpointing (but in the -ckpt
rows), CPU, and the same torch thread count (`--threads`, cai's `threads:`).

    .venv/bin/python bench/ppo_compare.py --reuse runs/demo --reward RUN/reward/model [--threads 2]
        [--updates 8] [--batch 8] [--prompts 16] [--max-new-tokens 48] [--rows trl-1.12,cai,cai-lora]
    .venv/bin/python bench/ppo_compare.py --tiny        # builtin:tiny, the smoke config: checks the script
    .venv/bin/python bench/ppo_compare.py --show RUNS   # the table of a finished comparison

The first call makes TRL 1.12's venv (`--venv`, default bench/data/trl112-venv): torch
2.13.0 first (the CPU wheel, as the Makefile installs it), then trl==1.12.0 and requests,
every other package at the version requirements.lock pins.

The table (ratios against the trl-1.12 row of the same invocation):

    updates      PPO updates run (log_history entries)
    s/update     seconds of training (models loaded before the clock starts) / updates
    peak RSS     the process's peak resident set size: ru_maxrss of the row's process from
                 os.wait4 (the process and any it waited for; imports and loading included)
    score        mean reward-model score (`objective/scores`) over the first updates -> the last
    gain         last minus first (the window: --window updates, default a quarter of them)
    KL end       `objective/kl` (summed over the answer's tokens), mean over the last window
    wall s, CPU s  the whole process (loading included): wall-clock, and user + system CPU
                 seconds (steadier than wall-clock when other work shares the cores)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.grid import link_reused, reusable  # noqa: E402
from cai.config import load_config  # noqa: E402
from cai.execute.executor import prepare  # noqa: E402
from cai.plan.plan import validate  # noqa: E402
from cai.plan.steps import required_stages  # noqa: E402
from cai.registry import ORDER  # noqa: E402
from cai.rundir import StageDir  # noqa: E402
from cai.yamlio import ValidationError  # noqa: E402

TRL_VERSION = "1.12.0"
ROWS = ("trl-1.12", "cai", "cai-lora", "cai-ckpt", "cai-lora-ckpt")
DEFAULT_ROWS = ROWS[:3]
UPSTREAM = ORDER[:ORDER.index("rl")]  # the stages a reused run may hold for rl
# --tiny: builtin:tiny's smoke run, seconds per row.
TINY = {"config": "configs/smoke.yaml", "prompts": 8, "updates": 4, "batch": 4, "max_new_tokens": 16}
FULL = {"config": "configs/demo.yaml", "prompts": 16, "updates": 8, "batch": 8, "max_new_tokens": 48}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="builtin:tiny on configs/smoke.yaml (a check)")
    parser.add_argument("--show", metavar="RUNS", help="print the table of a finished comparison")
    parser.add_argument("--config", help="the run config the reused run was made with (default configs/demo.yaml)")
    parser.add_argument("--reuse", type=Path, help="finished run folder whose sft (and earlier) stages every row "
                                                   "starts from (default runs/demo; --tiny builds one)")
    parser.add_argument("--reward", type=Path, help="reward model folder (default the reused run's reward model)")
    parser.add_argument("--runs", type=Path, help="output folder (default bench/data/ppo-compare[-tiny])")
    parser.add_argument("--venv", type=Path, default=ROOT / "bench/data/trl112-venv", help="TRL 1.12's venv")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every row")
    parser.add_argument("--prompts", type=int, help="training prompts (rl.max_prompts)")
    parser.add_argument("--updates", type=int, help="PPO updates")
    parser.add_argument("--batch", type=int, help="prompts per update")
    parser.add_argument("--max-new-tokens", type=int, help="answer length (TRL's response_length)")
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="full fine-tuning rows")
    parser.add_argument("--lora-learning-rate", type=float, default=1e-4, help="the LoRA row")
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--num-ppo-epochs", type=int, default=4)
    parser.add_argument("--num-mini-batches", type=int, default=1)
    parser.add_argument("--window", type=int, help="updates averaged at each end (default updates // 4, at least 1)")
    args = parser.parse_args()
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # Paths absolute: the rows run from the repository root. A default is the repository's.
    args.config = Path(args.config).resolve() if Path(args.config).exists() else ROOT / args.config
    args.runs = (args.runs or ROOT / "bench/data" / ("ppo-compare-tiny" if args.tiny else "ppo-compare")).resolve()
    args.venv = args.venv.resolve()
    args.rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    if unknown := [row for row in args.rows if row not in ROWS]:
        parser.error(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    args.window = args.window or max(1, args.updates // 4)
    return args


# ---------------------------------------------------------------- TRL 1.12's venv


def trl_python(venv: Path) -> Path:
    """The venv's python with trl==1.12.0, made on first use."""
    python = venv / "bin" / "python"
    if python.exists() and _installed_trl(python) == TRL_VERSION:
        return python
    print(f"[ppo] making TRL {TRL_VERSION}'s venv in {venv}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # requirements.lock's versions, but TRL 1.12 (the lock pins the TRL cai needs).
    lock = (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines()
    constraints = venv / "constraints.txt"
    constraints.write_text("\n".join(line for line in lock if not line.lower().startswith("trl=="))
                           + f"\ntrl=={TRL_VERSION}\n", encoding="utf-8")
    pip = [str(python), "-m", "pip", "install", "-q", "-c", str(constraints)]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU wheel first, as the Makefile does
    subprocess.run([*pip, f"trl=={TRL_VERSION}", "requests"], check=True)  # TRL 1.12 imports requests
    if (found := _installed_trl(python)) != TRL_VERSION:
        raise SystemExit(f"{venv}: trl {found} installed, expected {TRL_VERSION}")
    return python


def _installed_trl(python: Path) -> str | None:
    found = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('trl'))"],
                           capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


# ---------------------------------------------------------------- the rows' run folders and prompts


def common_overrides(args, reward: Path) -> list[str]:
    """The rl settings every row shares (the trl-1.12 row reads them from the same config)."""
    return [f"threads={args.threads}", "rl.algorithm=ppo", f"rl.max_prompts={args.prompts}",
            f"rl.per_device_train_batch_size={args.batch}", "rl.gradient_accumulation_steps=1",
            f"rl.total_episodes={args.updates * args.batch}", f"rl.max_new_tokens={args.max_new_tokens}",
            f"rl.kl_coef={args.kl_coef}", f"rl.temperature={args.temperature}",
            f"rl.num_ppo_epochs={args.num_ppo_epochs}", f"rl.num_mini_batches={args.num_mini_batches}",
            "rl.activation_checkpointing=false", f"rl.reward_model={json.dumps(str(reward))}"]


def row_overrides(args, row: str) -> list[str]:
    checkpointing = ["rl.activation_checkpointing=true"] if row.endswith("-ckpt") else []
    if row.startswith("cai-lora"):
        return ["rl.use_peft=true", f"rl.learning_rate={args.lora_learning_rate}", *checkpointing]
    return ["rl.use_peft=false", f"rl.learning_rate={args.learning_rate}", *checkpointing]


def row_run(args, row: str, overrides: list[str], done: dict):
    """RUNS/ROW: a run folder whose upstream stages are the reused run's, linked in."""
    run = load_config(args.config, [*overrides, *row_overrides(args, row), f"run_dir={args.runs / row}"])
    for stage in UPSTREAM:
        link_reused(run, stage, done, row)
    try:  # what `cai rl` checks first, here before any row runs
        validate(run, ["rl"])
    except ValidationError as err:
        raise SystemExit(f"[ppo] {row}: the rl settings are refused:\n{err}") from None
    cfg = prepare(run, "rl").config
    for stage, why in required_stages("rl", cfg):
        if not StageDir(run.path, stage).complete():
            raise SystemExit(f"[ppo] {args.reuse / stage} cannot be reused ({why}): it is missing, or it was made "
                             f"with other settings than {args.config} gives (other config hash). Pass the "
                             f"--config that run was made with")
    return run


def export_prompts(run, path: Path) -> dict:
    """The rl stage's training prompts, rendered with the policy's chat template and
    tokenised as cai's PPO reads them (no special tokens added to the rendered text)."""
    from cai.models import load_tokenizer
    from cai.stages.rl import training_prompts

    ctx = prepare(run, "rl")
    policy = str(Path(ctx.model_spec(ctx.config.policy, ctx.newest_policy())).resolve())
    tokenizer = load_tokenizer(policy, padding_side="left")
    texts = [tokenizer.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True)
             for p in training_prompts(ctx, ctx.config)]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    exported = {"policy": policy, "seed": run.seed, "texts": texts, "ids": ids}
    path.write_text(json.dumps(exported, indent=1) + "\n", encoding="utf-8")
    return exported


# ---------------------------------------------------------------- running a row


def run_measured(command: list[str], log: Path, threads: int) -> tuple[float, float, int]:
    """Run a command to its end, output to `log`: (wall seconds, CPU seconds, peak RSS in
    bytes), the last two of that child alone (os.wait4's rusage), so rows run one after
    another never see each other's peaks. CPU seconds (user + system) move less than wall
    seconds when other work shares the cores."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    with log.open("w", encoding="utf-8") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-25:])
        raise SystemExit(f"[ppo] {' '.join(command[:3])} ... failed ({child.returncode}); {log}:\n{tail}")
    return time.time() - started, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024  # KiB on Linux


def run_trl(args, python: Path, prompts: dict, reward: Path) -> dict:
    folder = args.runs / "trl-1.12" / "ppo"  # beside the linked stages of its run folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    job = {"policy": prompts["policy"], "reward": str(reward), "prompt_ids": prompts["ids"], "seed": prompts["seed"],
           "threads": args.threads, "output_dir": str(folder),
           "ppo": {"learning_rate": args.learning_rate, "per_device_train_batch_size": args.batch,
                   "gradient_accumulation_steps": 1, "total_episodes": args.updates * args.batch,
                   "num_ppo_epochs": args.num_ppo_epochs, "num_mini_batches": args.num_mini_batches,
                   "kl_coef": args.kl_coef, "temperature": args.temperature,
                   "response_length": args.max_new_tokens}}
    (folder / "job.json").write_text(json.dumps(job, indent=1) + "\n", encoding="utf-8")
    wall, cpu, rss = run_measured([str(python), str(ROOT / "bench/ppo_trl112.py"), str(folder / "job.json")],
                                  folder / "log.txt", args.threads)
    result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    return {"log_history": result["log_history"], "train_seconds": result["train_seconds"],
            "global_steps": result["global_steps"], "peak_rss_bytes": rss, "wall_seconds": round(wall, 1),
            "cpu_seconds": round(cpu, 1),
            "threads": result["threads"], "versions": result["versions"]}


def run_cai(args, run, row: str, overrides: list[str]) -> dict:
    rl = StageDir(run.path, "rl")
    shutil.rmtree(rl.path, ignore_errors=True)  # a fresh rl each time: a skipped stage measures nothing
    command = [str(Path(sys.executable).parent / "cai"), "rl", "--config", str(args.config)]
    for item in [*overrides, *row_overrides(args, row), f"run_dir={run.path}"]:
        command += ["--set", item]
    wall, cpu, rss = run_measured(command, args.runs / f"{row}.log", args.threads)
    manifest = rl.manifest()
    counts = manifest["counts"]
    return {"log_history": json.loads((rl / "log_history.json").read_text(encoding="utf-8")),
            "train_seconds": counts["train_seconds"], "global_steps": counts["global_steps"],
            "peak_rss_bytes": rss, "stage_peak_rss_bytes": manifest["peak_memory"]["rss_bytes"],
            "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "threads": manifest["threads"]["threads"],
            "versions": manifest["versions"]}


# ---------------------------------------------------------------- the table


def summarize(result: dict, window: int) -> dict:
    updates = [entry for entry in result["log_history"] if "objective/scores" in entry]
    scores = [entry["objective/scores"] for entry in updates]
    kls = [entry["objective/kl"] for entry in updates]

    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    first, last = mean(scores[:window]), mean(scores[-window:])
    return {"updates": len(updates), "seconds_per_update": result["train_seconds"] / max(1, len(updates)),
            "score_first": first, "score_last": last, "gain": last - first, "kl_end": mean(kls[-window:])}


def table(summary: dict) -> str:
    rows, settings = summary["rows"], summary["settings"]
    base = rows.get("trl-1.12")

    def versus(value: float, base_value: float | None, name: str) -> str:
        return f"{value / base_value:.2f}x" if base_value and name != "trl-1.12" else "-"

    lines = [f"threads {settings['threads']}; {settings['prompts']} prompts, batch {settings['batch']}, "
             f"{settings['updates']} updates, {settings['max_new_tokens']} new tokens, "
             f"lr {settings['learning_rate']:g} (LoRA {settings['lora_learning_rate']:g}), "
             f"kl_coef {settings['kl_coef']:g}, temperature {settings['temperature']:g}, "
             f"{settings['num_ppo_epochs']} PPO epochs x {settings['num_mini_batches']} mini-batch(es); "
             f"score and KL: mean of {settings['window']} update(s) at each end",
             "",
             "| row | updates | s/update | vs TRL | peak RSS | vs TRL | score first -> last | gain | KL end | wall s "
             "| CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        s = row["summary"]
        lines.append(
            f"| {name} | {s['updates']} | {s['seconds_per_update']:.2f} | "
            f"{versus(s['seconds_per_update'], base and base['summary']['seconds_per_update'], name)} | "
            f"{row['peak_rss_bytes'] / 2**30:.2f} GiB | "
            f"{versus(row['peak_rss_bytes'], base and base['peak_rss_bytes'], name)} | "
            f"{s['score_first']:+.3f} -> {s['score_last']:+.3f} | {s['gain']:+.3f} | {s['kl_end']:.3f} | "
            f"{row['wall_seconds']:.0f} | {row.get('cpu_seconds', float('nan')):.0f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.show:
        print(table(json.loads((Path(args.show) / "compare.json").read_text(encoding="utf-8"))))
        return
    args.runs.mkdir(parents=True, exist_ok=True)
    python = trl_python(args.venv) if "trl-1.12" in args.rows else None
    if args.reuse is None and args.tiny:
        args.reuse = args.runs / "base"
        if not StageDir(args.reuse, "reward").complete():  # the smoke run's stages up to reward: seconds
            subprocess.run([str(Path(sys.executable).parent / "cai"), "run", "--config", args.config,
                            "--set", f"run_dir={args.reuse}", "--set", f"threads={args.threads}",
                            "--until", "reward"], check=True, cwd=ROOT)
    args.reuse = (args.reuse or ROOT / "runs/demo").resolve()
    reward = args.reward or StageDir(args.reuse, "reward").saved_model()
    if reward is None or not Path(reward).is_dir():
        raise SystemExit(f"[ppo] no reward model: {args.reuse / 'reward'} has none; pass --reward FOLDER")
    reward = Path(reward).resolve()

    overrides = common_overrides(args, reward)
    done = reusable([args.reuse], list(UPSTREAM))
    runs = {row: row_run(args, row, overrides, done) for row in args.rows}
    prompts = export_prompts(next(iter(runs.values())), args.runs / "prompts.json")
    print(f"[ppo] {len(prompts['ids'])} prompts from {prompts['policy']}; reward model {reward}", flush=True)

    settings = {key: getattr(args, key) for key in ("threads", "prompts", "updates", "batch", "max_new_tokens",
                                                    "learning_rate", "lora_learning_rate", "kl_coef", "temperature",
                                                    "num_ppo_epochs", "num_mini_batches", "window")}
    summary = {"settings": {**settings, "config": str(args.config), "reuse": str(args.reuse), "reward": str(reward),
                            "policy": prompts["policy"]}, "rows": {}}
    for row in args.rows:
        print(f"[ppo] {row}: running", flush=True)
        result = run_trl(args, python, prompts, reward) if row == "trl-1.12" else run_cai(args, runs[row], row,
                                                                                          overrides)
        result["summary"] = summarize(result, args.window)
        summary["rows"][row] = result
        stage_peak = (f" (the rl manifest's: {result['stage_peak_rss_bytes'] / 2**30:.2f} GiB)"
                      if "stage_peak_rss_bytes" in result else "")
        print(f"[ppo] {row}: {result['summary']['updates']} updates, "
              f"{result['summary']['seconds_per_update']:.2f} s/update, peak RSS "
              f"{result['peak_rss_bytes'] / 2**30:.2f} GiB{stage_peak}, {result['wall_seconds']:.0f} s", flush=True)
        (args.runs / "compare.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(table(summary))


if __name__ == "__main__":
    main()
