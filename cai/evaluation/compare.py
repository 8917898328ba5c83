"""`cai compare RUN_A RUN_B [RUN_C ...]`: the models of evaluated runs on the prompts they
share, each run against the first.

Pairing is by prompt content (kind and text), set by set (`red_team/harmbench`, each kind,
...): a prompt both runs evaluated gives one paired difference per figure, so what differs
between the runs is their models' answers, not the prompts. Every figure the evaluation
has per answer (`cai.evaluation.figures`) is compared as B minus A on the same bootstrap
resamples of the shared prompts, with its 95 % interval and verdict (`cai.stats`); the
reward only where one reward model scored both runs; the judge's "beats base" where both
runs judged the model against base on every shared prompt of the set. With a judge, the
runs' final policies also meet head to head (`head_to_head`): both option orders, a
principle drawn per prompt, resumable chunk by chunk like every judge pass.

A comparison means something only when the runs differ in what is compared: what else
differs (model, seed, stage settings) is listed first, since it confounds the comparison,
then what differs in their constitutions (`cai.plan.fingerprint.constitution_diff`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import yaml

from cai.chunks import ChunkLedger, chunk_seed, run_chunks
from cai.constitution import change_line, check_constitution, constitution_diff
from cai.evaluation.figures import ANSWER_FIGURES, BY_KEY, PRINCIPLE_SETS, direction
from cai.evaluation.statistics import answer_figures, principle_win_rates, rounded_estimate
from cai.judge.judge import comparison_key, draw_principles, principle_id
from cai.leakage import few_shot_index
from cai.refusals import EVASIVE_MAX_WORDS
from cai.registry import POLICY_STAGES, PROMPTED_BASE, split_step
from cai.rundir import StageDir, folder_steps, read_jsonl
from cai.stats import LEVEL, RESAMPLES, Resampler, mean_of, verdict
from cai.yamlio import Problem, ValidationError

# Settings two runs differ in by design: what is being compared (the constitution's parts
# enter each step's settings apart; its file's digest and path are the same thing again).
NOT_CONFOUNDERS = ("constitution", "constitution_sha256")
JUDGE_BATCH = 16


@dataclasses.dataclass
class EvaluatedRun:
    """One run folder's evaluation, keyed by prompt content: a prompt is (kind, text)."""

    path: Path
    results: dict
    config: dict  # RUN_DIR/config.yaml ({} for a folder without one)
    answers: dict  # {model: {prompt: generations row}}
    groups: dict  # {group: [prompt, ...]}, in the evaluation's order
    rewards: dict  # {(model, prompt): reward}
    beats: dict  # {(model, reference): {prompt: P(model beats reference)}}
    constitution: object | None

    @property
    def name(self) -> str:
        return self.path.name

    def final_policy(self) -> str | None:
        """The run's last policy model evaluated (dpo, else rl, else sft; a later round's first)."""
        policies = [m for m in self.results["models"] if split_step(m)[0] in POLICY_STAGES]
        return policies[-1] if policies else None


def load_evaluated(path: Path) -> EvaluatedRun:
    """A run folder's evaluation; a folder that has none is a problem naming it."""
    results_path = path / "evaluate" / "results.json"
    if not results_path.exists():
        raise ValidationError([Problem(str(path), None, "no evaluation to compare (evaluate/results.json): run "
                                                        "`cai evaluate` or `cai run` in it first")])
    results = json.loads(results_path.read_text(encoding="utf-8"))
    config_path = path / "config.yaml"
    config = (yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}) if config_path.exists() else {}
    generations = read_jsonl(path / "evaluate" / "generations.jsonl")
    text = {row["id"]: (row["kind"], row["prompt"]) for row in generations}
    answers: dict = {}
    for row in generations:
        answers.setdefault(row["model"], {})[text[row["id"]]] = row
    if "prompt_ids" in results:
        groups = {group: [text[i] for i in ids if i in text] for group, ids in results["prompt_ids"].items()}
    else:  # evaluated before results.json named each group's prompts: its kinds only
        groups = {kind: list(dict.fromkeys(p for p in text.values() if p[0] == kind)) for kind in results["kinds"]}
    rewards = {(row["model"], text[row["id"]]): row["reward"]
               for row in read_jsonl(path / "evaluate" / "rewards.jsonl") if row["id"] in text}
    beats: dict = {}
    for row in read_jsonl(path / "evaluate" / "comparisons.jsonl"):
        if row["id"] in text:
            prompt = text[row["id"]]
            beats.setdefault((row["second"], row["first"]), {})[prompt] = 1 - row["p_first"]
            beats.setdefault((row["first"], row["second"]), {})[prompt] = row["p_first"]
    source = config.get("constitution") or results["run"].get("constitution")
    constitution = check_constitution(source)[0] if source and Path(source).exists() else None
    return EvaluatedRun(path, results, config, answers, groups, rewards, beats, constitution)


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def effective_settings(path: Path) -> dict[str, object]:
    """{setting: value} of what a run's steps were computed from (each manifest's hashed
    settings: defaults included, where it logs and saves left out), the constitution and
    the upstream steps' hashes aside: `seed`, `prompts.max_eval`, `dpo.beta`, ..."""
    flat: dict[str, object] = {}
    for step in folder_steps(path):
        manifest = StageDir(path, step).manifest()
        if manifest is None:
            continue
        settings = manifest.get("settings", {})
        flat[f"{step} (stage)"] = "ran"
        for part in ("shared", "servers"):
            for key, value in _flat(settings.get(part, {})).items():
                if key.split(".")[0] not in NOT_CONFOUNDERS:
                    flat[f"{part}.{key}" if part == "servers" else key] = value
        for part in ("config", "trl", "model_options"):
            flat.update({f"{step}.{key}": value for key, value in _flat(settings.get(part, {})).items()})
    return flat


def confounders(a: EvaluatedRun, b: EvaluatedRun) -> list[str]:
    """`key: A -> B` for every setting the runs' steps differ in besides the constitution
    (a step only one run has: `rl (stage): ran -> (not run)`; a TRL key one config leaves
    to its default: `dpo.beta: (default) -> 0.2`)."""
    flat_a, flat_b = effective_settings(a.path), effective_settings(b.path)
    lines = []
    for key in sorted(set(flat_a) | set(flat_b), key=lambda k: (k.endswith("(stage)"), k)):
        missing = "(not run)" if key.endswith("(stage)") else "(default)"
        old, new = flat_a.get(key, missing), flat_b.get(key, missing)
        if old != new:
            lines.append(f"{key}: {old} -> {new}")
    return lines


def shared_prompts(a: EvaluatedRun, b: EvaluatedRun) -> dict[str, list]:
    """{group: the prompts both runs evaluated in it}, groups in A's order; `all` aside."""
    shared = {}
    for group, prompts in a.groups.items():
        if group != "all" and group in b.groups:
            theirs = set(b.groups[group])
            if both := [p for p in prompts if p in theirs]:
                shared[group] = both
    return shared


def no_shared_problem(a: EvaluatedRun, b: EvaluatedRun) -> Problem:
    def sets(run: EvaluatedRun) -> str:
        return ", ".join(f"{g} ({len(p)})" for g, p in run.groups.items() if g != "all") or "none"

    return Problem(str(b.path), None, f"shares no evaluation prompts with {a.path}: pairing is by prompt text, set "
                                      f"by set; {a.name} evaluated {sets(a)}; {b.name} evaluated {sets(b)}. "
                                      f"Evaluate both on the same sets (evaluate.prompts) first")


def _same_reward_model(a: EvaluatedRun, b: EvaluatedRun) -> bool:
    paths = [run.results.get("reward_model") for run in (a, b)]
    return None not in paths and Path(paths[0]).resolve() == Path(paths[1]).resolve()


def paired_figures(a: EvaluatedRun, b: EvaluatedRun, group: str, prompts: list, seed: int,
                   resamples: int = RESAMPLES) -> dict:
    """{model: {figure: {a, b, value (b - a), low, high, verdict}}} for the models both runs
    evaluated, on the same resamples of the shared prompts of one group."""
    resampler = Resampler(len(prompts), resamples, seed)
    rewards = _same_reward_model(a, b)
    out = {}
    for model in (m for m in a.results["models"] if m in b.results["models"]):
        first, second = ([answer_figures({**run.answers[model][p], "model": model, "id": p},
                                          run.rewards if rewards else None,
                                          run.results.get("generation", {}).get("evasive_max_words", EVASIVE_MAX_WORDS),
                                          few_shot_index(run.constitution) if run.constitution is not None else None)
                           for p in prompts] for run in (a, b))
        rows = {}
        for figure in ANSWER_FIGURES:
            x, y = [f[figure] for f in first], [f[figure] for f in second]
            if None in x or None in y:
                continue
            rows[figure] = _row(resampler, x, y, figure, direction(figure, group))
        if model != "base":  # the judge's verdict against base, where both runs judged it on these prompts
            x, y = (run.beats.get((model, "base"), {}) for run in (a, b))
            if all(p in x and p in y for p in prompts):
                rows["head_to_head"] = _row(resampler, [x[p] for p in prompts], [y[p] for p in prompts],
                                            "head_to_head", True)
        out[model] = rows
    return out


def _row(resampler: Resampler, x: list, y: list, figure: str, better) -> dict:
    estimate = rounded_estimate(resampler.difference(mean_of(y), mean_of(x)), figure)
    means = [rounded_estimate(resampler.estimate(mean_of(v)), figure).value for v in (x, y)]
    return {"a": means[0], "b": means[1], **estimate.as_dict(), "verdict": verdict(estimate, better)}


def comparison(runs: list[EvaluatedRun], seed: int = 0) -> dict:
    """Each run against the first: its confounders, its constitution's changes, the shared
    prompt sets and every paired figure. Refuses (before any judge runs) a run that shares
    no prompt set with the first."""
    first = runs[0]
    problems = [no_shared_problem(first, run) for run in runs[1:] if not shared_prompts(first, run)]
    if problems:
        raise ValidationError(problems)
    against = []
    for run in runs[1:]:
        shared = shared_prompts(first, run)
        changes = (constitution_diff(first.constitution, run.constitution)
                   if first.constitution is not None and run.constitution is not None else None)
        notes = []
        if not _same_reward_model(first, run):
            notes.append("reward: not compared (the runs' reward models differ, or one run has none)")
        left_out = [g for g in list(first.groups) + list(run.groups) if g != "all" and g not in shared]
        paired = {g: paired_figures(first, run, g, p, seed) for g, p in shared.items()}
        if changes and any("head_to_head" in rows for models in paired.values() for rows in models.values()):
            notes.append("beats base: each run's judge read its own constitution (principles, few-shot examples), "
                         "so its difference mixes the answers' change with the judge's; --judge compares the "
                         "answers under one constitution")
        against.append({
            "run": str(run.path), "name": run.name, "confounders": confounders(first, run),
            "constitution_changes": ([change_line(c) for c in changes] if changes is not None
                                     else ["(a constitution file is missing: not compared)"]),
            "shared": {g: {"n": len(p), "a": len(first.groups[g]), "b": len(run.groups[g])} for g, p in shared.items()},
            "not_shared": list(dict.fromkeys(left_out)),
            "models": [m for m in first.results["models"] if m in run.results["models"]],
            "paired": paired,
            "notes": notes})
    return {"reference": {"run": str(first.path), "name": first.name},
            "runs": [{"run": str(r.path), "name": r.name, "models": r.results["models"],
                      "constitution": (r.config.get("constitution") or r.results["run"].get("constitution"))}
                     for r in runs],
            "against": against,
            "bootstrap": {"resamples": RESAMPLES, "level": LEVEL, "seed": seed, "unit": "shared prompt",
                          "method": "percentile bootstrap; both runs' answers to the same resampled prompts"}}


def digest(prompts: list) -> str:
    """A chunk's key: its prompts, so the same out folder never mixes two prompt lists."""
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:12]


def head_to_head(judge, a: EvaluatedRun, b: EvaluatedRun, model_a: str, model_b: str, shared: dict,
                 out: Path, seed: int, constitution) -> dict:
    """The judge compares A's `model_a` with B's `model_b` on every shared prompt, both
    option orders, under a principle drawn for the prompt from `constitution`'s evaluation
    principles of its kind, chunk by chunk in `out` (a killed pass resumes). Where both
    runs gave the same answer the prompt is a tie (P = 0.5, `identical`) and the judge is
    not asked. Returns, per shared group, P(B's answer is better) with its interval and
    how many answers were identical, and per principle drawn."""
    prompts = list(dict.fromkeys(p for group in shared.values() for p in group))
    ledger = ChunkLedger(out, f"head_to_head.{b.name}", [f"head_to_head.{b.name}.jsonl"])
    chunks = [(f"{model_a}~{model_b}/{digest(prompts[start:start + JUDGE_BATCH])}", prompts[start:start + JUDGE_BATCH])
              for start in range(0, len(prompts), JUDGE_BATCH)]

    def work(index, chunk) -> dict:
        conversations = [[{"role": "user", "content": text}] for _, text in chunk]
        principles = [draw_principles(constitution, seed, comparison_key(c), 1,
                                      pool=constitution.evaluation_principles(kind))
                      for (kind, _), c in zip(chunk, conversations)]
        first = [a.answers[model_a][p]["response"] for p in chunk]
        second = [b.answers[model_b][p]["response"] for p in chunk]
        # the same answer in both runs is a tie (what both orders averaged give): no judge call
        judged = [i for i in range(len(chunk)) if first[i] != second[i]]
        verdicts = {}
        if judged:
            verdicts = dict(zip(judged, judge.compare_with(
                constitution, [conversations[i] for i in judged], [first[i] for i in judged],
                [second[i] for i in judged], [principles[i] for i in judged], seed=chunk_seed(seed, index))))
        rows = []
        for i, (kind, text) in enumerate(chunk):
            row = {"kind": kind, "prompt": text, "first": f"{a.name}/{model_a}", "second": f"{b.name}/{model_b}",
                   "principle_set": PRINCIPLE_SETS[kind]}
            v = verdicts.get(i)
            if v is None:
                row.update(p_first=0.5, p_order_ab=None, p_order_ba=None,
                           principles=[principle_id(p) for p in principles[i]],
                           orders_disagree=False, identical=True)
            else:
                row.update(p_first=v.p_first, p_order_ab=v.p_order_ab, p_order_ba=v.p_order_ba,
                           principles=list(v.principles), orders_disagree=bool(v.orders_disagree), identical=False)
            rows.append(row)
        return {f"head_to_head.{b.name}.jsonl": rows}

    run_chunks(ledger, chunks, work, desc="compare: judging head to head")
    rows = {(r["kind"], r["prompt"]): r for r in ledger.rows(f"head_to_head.{b.name}.jsonl")}
    groups = {}
    for group, members in shared.items():
        resampler = Resampler(len(members), RESAMPLES, seed)
        estimate = rounded_estimate(resampler.estimate(mean_of([1 - rows[p]["p_first"] for p in members]), null=0.5),
                            "head_to_head")
        groups[group] = {"n": len(members), "identical": sum(bool(rows[p].get("identical")) for p in members),
                         **estimate.as_dict(), "verdict": verdict(estimate)}
    judged = [r for r in rows.values() if not r.get("identical")]
    return {"a": f"{a.name}/{model_a}", "b": f"{b.name}/{model_b}", "groups": groups,
            "principles": principle_win_rates(list(rows.values()), seed),
            "identical": len(rows) - len(judged),
            "orders_disagree": round(sum(r["orders_disagree"] for r in judged) / max(len(judged), 1), 4)}


def format_comparison(result: dict) -> str:
    """The comparison in console lines: per run against the first, what else differs, the
    constitution's changes, then per shared set each model's differences with intervals."""
    from cai.evaluation.summary import show, show_difference

    reference = result["reference"]["name"]
    lines = []
    for other in result["against"]:
        lines.append(f"{other['name']} vs {reference} (B - A, paired by prompt text, 95 % intervals):")
        lines.append("  other differences: " + ("; ".join(other["confounders"]) or "none (only the constitution)"))
        lines.append("  constitution: " + ("; ".join(other["constitution_changes"]) or "the same meaning"))
        for note in other["notes"]:
            lines.append(f"  {note}")
        width = max(len(m) for m in other["models"])
        for group, pairs in other["paired"].items():
            shared = other["shared"][group]
            lines.append(f"  {group} ({shared['n']} shared prompts):")
            for model, rows in pairs.items():
                shown = []
                for figure in ("head_to_head", "asr", "refusal", "evasive", "reward", "words"):
                    if figure not in rows or (figure == "asr" and not group.startswith("red_team")):
                        continue
                    row = rows[figure]
                    name = "beats base" if figure == "head_to_head" else BY_KEY[figure].console(group)
                    said = "" if row["verdict"] in ("within noise", "too few to compare") else f" {row['verdict']}"
                    shown.append(f"{name} {show(row['a'], figure)}->{show(row['b'], figure)} "
                                 f"{show_difference(row['value'], figure)} [{show_difference(row['low'], figure)}, "
                                 f"{show_difference(row['high'], figure)}]{said}")
                lines.append(f"    {model:<{width}}  " + "; ".join(shown))
        match = other.get("head_to_head")
        if match:
            lines.append(f"  head to head, {match['b']} vs {match['a']} (P(B better), judge {match['judge']}):")
            for group, row in match["groups"].items():
                same = f" ({row['identical']} of the answers identical: ties)" if row.get("identical") else ""
                lines.append(f"    {group} ({row['n']}): {show(row['value'], 'head_to_head')} "
                             f"[{show(row['low'], 'head_to_head')}, {show(row['high'], 'head_to_head')}] "
                             f"{row['verdict']}{same}")
    return "\n".join(lines)


def judged_models(a: EvaluatedRun, b: EvaluatedRun, model: str | None) -> tuple[str, str]:
    """The models a head-to-head pass compares: `model` in both runs, or each run's final policy."""
    if model is not None:
        missing = [r.name for r in (a, b) if model not in r.answers]
        if missing:
            raise ValidationError([Problem("--model", None, f"'{model}' was not evaluated in {', '.join(missing)} "
                                                            f"(its models: {', '.join(b.results['models'])})")])
        return model, model
    finals = [r.final_policy() for r in (a, b)]
    if None in finals:
        raise ValidationError([Problem("--judge", None, "a run evaluated no policy model (sft, rl, dpo): name the "
                                                        f"models to judge with --model (e.g. {PROMPTED_BASE})")])
    return finals[0], finals[1]
