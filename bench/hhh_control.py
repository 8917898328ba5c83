"""A positive control with real signal: the reward model and RL on human preference labels.

At 135M the demo's own AI labels sit at chance (docs/results.md), so its reward and rl
stages show nothing about whether they can turn a real preference signal into an effect.
Here the reward model trains on human labels instead: the 438 human-labelled HHH
comparisons the CAI paper evaluates its feedback models on (Bai et al. 2022, its
repository anthropics/ConstitutionalHarmlessnessPaper). Each row asks which of two
assistant answers to a conversation is the most helpful, honest and harmless; the human's
choice is `chosen` (p_chosen 1.0, a hard label).

1. The file (kept outside the repository; its path is an argument) is read with cai's HHH
   reader (`cai.judge.eval_labeler.read_labeled_pairs`: the "Human:/Assistant:" turns of
   the conversation become chat messages) and written as TRL conversational preference
   rows, split by conversation (seeded; 438 comparisons share 188 conversations, so a
   split by row would leak) into OUT/data/train.jsonl and OUT/data/held-out.jsonl.
2. The run folder OUT/run (the run config, default configs/demo.yaml, with overrides)
   links in the critique and sft stages of a finished run (`--reuse`, the grid's
   `link_reused`), or runs them, then `cai reward` with `reward.preferences` = the
   training split (no label stage, no critique pairs, nothing held out by the stage: the
   held-out split is this script's).
3. The reward model scores chosen and rejected of every held-out pair
   (`cai.training.models.RewardScorer`): its accuracy (r_chosen > r_rejected; a tie counts
   half), with a 95 % bootstrap interval over conversations (`cai.stats`: a resample draws
   conversations, each bringing all its pairs); beside it the same figure for "the longer
   answer is better", what a reward model that learnt only length would score.
4. `cai rl` from sft against that reward model (`--algorithm`, default ppo; the run
   config's rl section otherwise: the demo's LoRA policy, 32 prompts, 48 new tokens,
   learning rate 1e-4, kl_coef 0.05), then `cai evaluate` as the demo does (base, sft, rl
   on HarmBench, the over-refusal set, the held-out red-team and helpful prompts, the
   judge on the helpful ones), each figure against sft with its 95 % paired interval
   (`bench/grid.py`'s table).

    .venv/bin/python bench/hhh_control.py --reuse runs/demo --out /tmp/cai-hhh [--until reward]
    .venv/bin/python bench/hhh_control.py --tiny --out /tmp/cai-hhh-tiny    # builtin:tiny, 24 pairs, RLOO
    .venv/bin/python bench/hhh_control.py --out /tmp/cai-hhh --show         # the figures of a finished run

Every stage is a `cai` command: one already complete with the same settings is skipped,
so running the script again after `--until reward` goes on from there. The figures go to
OUT/hhh_control.json.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grid import COLUMNS, EVALUATE, link_reused, reusable, summarize, table  # noqa: E402

from cai.config import load_config  # noqa: E402
from cai.execute.executor import prepare  # noqa: E402
from cai.judge.eval_labeler import read_labeled_pairs  # noqa: E402
from cai.rundir import StageDir, atomic_write_json, atomic_write_jsonl  # noqa: E402
from cai.stats import Resampler, verdict  # noqa: E402

DATA = "../shared/data/hhh-438.jsonl"
TINY_PAIRS = 24


def preference_rows(path: str, limit: int | None = None) -> list[dict]:
    """The HHH comparisons as TRL conversational preference rows (the human's choice chosen)."""
    return [{"prompt": pair.conversation, "chosen": [{"role": "assistant", "content": pair.correct}],
             "rejected": [{"role": "assistant", "content": pair.incorrect}], "p_chosen": 1.0}
            for pair in read_labeled_pairs(path, limit=limit)]


def split_by_conversation(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded `fraction` of the distinct conversations, with all their rows, held out."""
    conversations = list(dict.fromkeys(json.dumps(row["prompt"], sort_keys=True) for row in rows))
    random.Random(seed).shuffle(conversations)
    held = set(conversations[:round(fraction * len(conversations))])
    return ([r for r in rows if json.dumps(r["prompt"], sort_keys=True) not in held],
            [r for r in rows if json.dumps(r["prompt"], sort_keys=True) in held])


def cai(stage: str, config: str, overrides: list[str]) -> float:
    """Run one `cai STAGE` command; its wall time in seconds. A stage complete with the
    same config hash is not started at all (cai would skip it, after a minute of imports)."""
    run = load_config(config, overrides)
    manifest = StageDir(run.path, stage).manifest()
    if manifest is not None and manifest["config_hash"] == prepare(run, stage).config_hash:
        print(f"[hhh] {stage}: already complete in {run.path / stage}", flush=True)
        return manifest["seconds"]
    command = [sys.executable, "-m", "cai", stage, "--config", config]
    for override in overrides:
        command += ["--set", override]
    started = time.time()
    print(f"[hhh] cai {stage}", flush=True)
    subprocess.run(command, check=True)
    seconds = time.time() - started
    print(f"[hhh] cai {stage}: {seconds:.0f}s", flush=True)
    return seconds


def accuracy(rows: list[dict], chosen: list[float], rejected: list[float]) -> dict:
    """Share of pairs whose chosen side scores higher (a tie counts half), with a 95 %
    bootstrap interval over conversations: (hits in the drawn conversations) / (their pairs)."""
    hits = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)]
    keys = [json.dumps(r["prompt"], sort_keys=True) for r in rows]
    where = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    hit_sums, pair_counts = np.zeros(len(where)), np.zeros(len(where))
    np.add.at(hit_sums, [where[k] for k in keys], hits)
    np.add.at(pair_counts, [where[k] for k in keys], 1)
    estimate = Resampler(len(where)).estimate(lambda w: (w @ hit_sums) / (w @ pair_counts), null=0.5)
    return {"pairs": len(rows), "conversations": len(where), **estimate.as_dict(), "verdict": verdict(estimate),
            "margin": round(float(np.mean(np.subtract(chosen, rejected))), 4)}


def held_out_accuracy(model: Path, rows: list[dict], threads) -> dict:
    """The reward model's accuracy on the held-out pairs."""
    from cai.models import set_threads
    from cai.training.models import RewardScorer

    set_threads(threads)
    scorer = RewardScorer.from_path(str(model), device="cpu")
    prompts = [r["prompt"] for r in rows]
    return accuracy(rows, scorer.score(prompts, [r["chosen"][-1]["content"] for r in rows]),
                    scorer.score(prompts, [r["rejected"][-1]["content"] for r in rows]))


def longer_answer(rows: list[dict]) -> dict:
    """The same figure for "the longer answer is better" (characters): what a reward model
    that learnt only length would score."""
    return accuracy(rows, [len(r["chosen"][-1]["content"]) for r in rows],
                    [len(r["rejected"][-1]["content"]) for r in rows])


def figures_table(results: dict, names: list[str]) -> str:
    """Each model's own figures with their 95 % intervals (the paired table gives differences)."""
    lines = ["| model | " + " | ".join(label for label, _, figure in COLUMNS if figure != "head_to_head") + " |",
             "|---" * len(COLUMNS) + "|"]
    for name in names:
        cells = []
        for _, group, figure in COLUMNS:
            if figure == "head_to_head":
                continue
            row = results["per_model"].get(name, {}).get(group, {})
            value, (low, high) = row.get(figure), row.get("ci", {}).get(figure, (None, None))
            cells.append("-" if value is None else f"{100 * value:.0f}% [{100 * low:.0f}, {100 * high:.0f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def show(out: Path) -> None:
    summary = json.loads((out / "hhh_control.json").read_text())
    rm = summary["reward_model"]
    print(f"HHH human labels: {summary['split']['train_pairs']} training pairs "
          f"({summary['split']['train_conversations']} conversations), {rm['pairs']} held out "
          f"({rm['conversations']} conversations)")
    print(f"reward model held-out accuracy {rm['value']:.3f} [{rm['low']:.3f}, {rm['high']:.3f}] (against chance: "
          f"{rm['verdict']}), mean margin {rm['margin']:+.3f}; the stage's own training accuracy "
          f"{summary['reward_stage']['train_before']:.3f} -> {summary['reward_stage']['train_after']:.3f}")
    length = summary["longer_answer"]
    print(f"the longer answer, on the same pairs: {length['value']:.3f} [{length['low']:.3f}, {length['high']:.3f}]")
    print("wall time: " + ", ".join(f"{stage} {seconds:.0f}s" for stage, seconds in summary["seconds"].items()))
    results_path = out / "run" / "evaluate" / "results.json"
    if "evaluate" not in summary["seconds"] or not results_path.exists():
        print("rl / evaluate: not run yet")
        return
    results = json.loads(results_path.read_text())
    rl = json.loads((out / "run" / "rl" / "manifest.json").read_text())
    print(f"rl: algorithm {rl['config']['algorithm']}, {rl['seconds']:.0f}s")
    print(table(summarize(results, {"rl": "rl"}, reference="sft")))
    print(figures_table(results, ["base", "sft", "rl"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DATA, help="the CAI paper's HHH comparisons (JSONL)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--out", default="/tmp/cai-hhh", help="the data splits, the run folder and the figures")
    parser.add_argument("--reuse", action="append", default=[], metavar="RUN_DIR",
                        help="a finished run (e.g. runs/demo): its critique and sft, if complete with the same "
                             "config hash, are linked in, not run again")
    parser.add_argument("--held-out", type=float, default=0.2, help="share of the conversations held out")
    parser.add_argument("--seed", type=int, default=0, help="the split's seed")
    parser.add_argument("--algorithm", default="ppo", help="rl.algorithm")
    parser.add_argument("--until", choices=("reward", "rl", "evaluate"), default="evaluate")
    parser.add_argument("--set", action="append", default=[], help="one more override of the run config")
    parser.add_argument("--tiny", action="store_true",
                        help=f"builtin:tiny on the smoke config, the first {TINY_PAIRS} pairs, RLOO: checks the "
                             f"script, not the method")
    parser.add_argument("--show", action="store_true", help="print the figures of a finished --out, then stop")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if args.show:
        show(out)
        return
    if args.tiny:
        args.config, args.algorithm = str(ROOT / "configs" / "smoke.yaml"), "rloo"

    rows = preference_rows(args.data, TINY_PAIRS if args.tiny else None)
    train, held = split_by_conversation(rows, args.held_out, args.seed)
    if not train or not held:
        parser.error(f"--held-out {args.held_out} leaves {len(train)} training and {len(held)} held-out pairs")
    atomic_write_jsonl(out / "data" / "train.jsonl", train)
    atomic_write_jsonl(out / "data" / "held-out.jsonl", held)
    split = {"data": str(Path(args.data).resolve()), "seed": args.seed, "held_out_fraction": args.held_out,
             "train_pairs": len(train), "held_out_pairs": len(held),
             "train_conversations": len({json.dumps(r["prompt"]) for r in train}),
             "held_out_conversations": len({json.dumps(r["prompt"]) for r in held})}
    print(f"[hhh] {len(rows)} comparisons: {len(train)} to train on, {len(held)} held out (by conversation)")

    overrides = [f"run_dir={out / 'run'}", f"reward.preferences={out / 'data' / 'train.jsonl'}",
                 "reward.mix_critique_pairs=false", "reward.eval_fraction=0", f"rl.algorithm={args.algorithm}",
                 *EVALUATE, "evaluate.models=[base, sft, rl]", "evaluate.judge_pairs=all",
                 "evaluate.reward_prompts=[red_team/held-out, helpful/held-out]", *args.set]
    run = load_config(args.config, overrides)
    done = reusable([Path(r).resolve() for r in args.reuse], ["critique", "sft"])
    for stage in ("critique", "sft"):
        link_reused(run, stage, done, "hhh")

    seconds = {stage: cai(stage, args.config, overrides) for stage in ("critique", "sft", "reward")}
    metrics = json.loads((out / "run" / "reward" / "metrics.json").read_text())
    started = time.time()
    scored = held_out_accuracy(out / "run" / "reward" / "model", held, run.threads)
    seconds["held-out scoring"] = time.time() - started
    summary = {"split": split, "reward_model": scored, "longer_answer": longer_answer(held),
               "config": args.config, "overrides": overrides,
               "reward_stage": {"train_before": metrics["before"]["train"]["accuracy"],
                                "train_after": metrics["after"]["train"]["accuracy"], "pairs": metrics["pairs"]},
               "seconds": seconds}
    atomic_write_json(out / "hhh_control.json", summary)
    for stage in ("rl", "evaluate")[:("reward", "rl", "evaluate").index(args.until)]:
        seconds[stage] = cai(stage, args.config, overrides)
        atomic_write_json(out / "hhh_control.json", summary)
    print()
    show(out)


if __name__ == "__main__":
    main()
