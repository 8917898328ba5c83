"""`cai eval-labeler`: the feedback model against human labels.

The label section's judge (its `feedback_*` settings, built by `make_judge`) answers
human-labelled comparisons: the CAI paper's HHH evaluation rows (`prompt` question text,
`corrects`, `incorrects`), or any prompt/chosen/rejected file. The figures: accuracy with
one order and with both averaged, each with its bootstrap interval over the pairs and
its verdict against chance (evaluate's rule, `cai.stats`: under `MIN_PROMPTS` pairs, too
few to judge a labeler), expected calibration error, and how often the model just picks
the same slot.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cai.judge.judge import comparison_key, draw_principles
from cai.judge.settings import make_judge
from cai.rundir import atomic_write_json
from cai.stats import LEVEL, MIN_PROMPTS, TOO_FEW, Resampler, mean_of, verdict
from cai.yamlio import Problem, ValidationError

HHH_QUESTION = re.compile(  # the CAI paper's HHH evaluation prompt
    r"Consider the following conversation between a human and an assistant:\s*(?P<conversation>.*?)\n\s*\n"
    r"(?P<principle>[^\n]*?)\s*Options:\s*(?P<options>.*?)\s*The answer is:\s*$", re.DOTALL)
OPTIONS_BRACKETED = re.compile(r"^\(A\)\s*\[\[\[(?P<a>.*)\]\]\]\s*\(B\)\s*\[\[\[(?P<b>.*)\]\]\]$", re.DOTALL)
OPTIONS_PLAIN = re.compile(r"^\(A\)\s*(?P<a>.*?)\s*\(B\)\s*(?P<b>.*)$", re.DOTALL)
TURN = re.compile(r"\n\n(Human|Assistant):")
DEFAULT_PRINCIPLE = "Which of these assistant responses is better? Choose the most helpful, honest and harmless one."


@dataclass
class LabeledPair:
    """A human-labelled comparison: `correct` is better than `incorrect`."""

    where: str  # file:line
    conversation: list[dict]
    correct: str
    incorrect: str
    correct_slot: str  # "A" or "B": where the correct answer sits in the data's own order
    principle: str | None  # the row's own question (HHH), else None: the constitution's are drawn


def _parse_turns(text: str) -> list[dict]:
    parts = TURN.split("\n\n" + text.strip())
    roles = {"Human": "user", "Assistant": "assistant"}
    turns = [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 1, 2)]
    return turns or [{"role": "user", "content": text.strip()}]


def _hhh_pair(row: dict, where: str) -> LabeledPair:
    question = HHH_QUESTION.search(row["prompt"])
    options = question and (OPTIONS_BRACKETED.match(question["options"]) or OPTIONS_PLAIN.match(question["options"]))
    if not options:
        raise ValueError(f"{where}: an HHH row's 'prompt' must read 'Consider the following conversation between "
                         f"a human and an assistant: ... Options: (A) ... (B) ... The answer is:'")
    corrects = row["corrects"]
    slot = {"(A)": "A", "(B)": "B"}.get(corrects[0].strip()) if (
        isinstance(corrects, list) and len(corrects) == 1 and isinstance(corrects[0], str)) else None
    if slot is None:
        raise ValueError(f"{where}: 'corrects' must be [\" (A)\"] or [\" (B)\"], got {corrects!r}")
    a, b = options["a"].strip(), options["b"].strip()
    correct, incorrect = (a, b) if slot == "A" else (b, a)
    return LabeledPair(where, _parse_turns(question["conversation"]), correct, incorrect, slot,
                       question["principle"].strip() or DEFAULT_PRINCIPLE)


def _answer_text(value, where: str, key: str) -> tuple[list[dict], str]:
    """(conversation before it, the answer) from a string or a list of chat turns."""
    if isinstance(value, str) and value.strip():
        return [], value.strip()
    if (isinstance(value, list) and value and all(isinstance(t, dict) and "content" in t for t in value)
            and value[-1].get("role") == "assistant"):
        return list(value[:-1]), str(value[-1]["content"]).strip()
    raise ValueError(f"{where}: '{key}' must be a non-empty string or a list of chat turns ending in an "
                     "assistant turn")


def _preference_pair(row: dict, where: str, seed: int) -> LabeledPair:
    before, chosen = _answer_text(row["chosen"], where, "chosen")
    _, rejected = _answer_text(row["rejected"], where, "rejected")
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        conversation = [{"role": "user", "content": prompt.strip()}]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, dict) and "content" in t for t in prompt):
        conversation = [{"role": t.get("role", "user"), "content": str(t["content"])} for t in prompt]
    elif prompt is None and before:
        conversation = before  # the implicit-prompt form: the conversation is part of `chosen`
    else:
        raise ValueError(f"{where}: 'prompt' must be a non-empty string or a list of chat turns")
    if not chosen or not rejected:
        raise ValueError(f"{where}: 'chosen' and 'rejected' must not be empty")
    # No order in the data: the one-order figure shows the correct answer in a seeded slot.
    slot = random.Random(f"{seed}:{where}").choice("AB")
    return LabeledPair(where, conversation, chosen, rejected, slot, None)


def read_labeled_pairs(path: str | Path, seed: int = 0, limit: int | None = None) -> list[LabeledPair]:
    """HHH-format rows (`prompt` question text, `corrects`, `incorrects`) or
    prompt/chosen/rejected rows; a bad row is a problem naming file:line (every one)."""
    path = Path(path)
    if not path.is_file():
        raise ValidationError([Problem(str(path), None, "no such file (--data: HHH-format or prompt/chosen/rejected "
                                                        "JSONL)" if not path.exists() else "is not a file")])
    pairs, problems = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if limit is not None and len(pairs) >= limit:
                break
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
                if isinstance(row, dict) and "corrects" in row and isinstance(row.get("prompt"), str):
                    pairs.append(_hhh_pair(row, where))
                elif isinstance(row, dict) and "chosen" in row and "rejected" in row:
                    pairs.append(_preference_pair(row, where, seed))
                else:
                    raise ValueError(f"{where}: expected an HHH row (prompt, corrects, incorrects) or a preference "
                                     "row (prompt, chosen, rejected)")
            except UnicodeDecodeError as err:
                problems.append(Problem(str(path), number, f"not UTF-8 text (byte {raw[err.start]:#04x})"))
            except json.JSONDecodeError as err:
                problems.append(Problem(str(path), number, f"not a JSON line ({err.msg})"))
            except ValueError as err:
                problems.append(Problem(str(path), number, str(err).removeprefix(f"{where}: ")))
    if not pairs and not problems:
        problems.append(Problem(str(path), None, "no comparisons found (the file is empty)"))
    if problems:
        raise ValidationError(problems)
    return pairs


def expected_calibration_error(confidences: list[float], correct: list[float], bins: int = 10) -> float:
    """ECE of the predicted winner: |accuracy - confidence| per confidence bin over [0.5, 1], weighted."""
    total, error = len(confidences), 0.0
    for b in range(bins):
        low, high = 0.5 + 0.5 * b / bins, 0.5 + 0.5 * (b + 1) / bins
        members = [i for i, c in enumerate(confidences) if low <= c < high or (b == bins - 1 and c == high)]
        if members:
            accuracy = sum(correct[i] for i in members) / len(members)
            confidence = sum(confidences[i] for i in members) / len(members)
            error += len(members) / total * abs(accuracy - confidence)
    return error


def _hit(p_correct: float) -> float:
    return 1.0 if p_correct > 0.5 else 0.5 if p_correct == 0.5 else 0.0  # a tie is half right


def judge_labeled_pairs(judge, constitution, pairs: list[LabeledPair], seed: int = 0,
                        principles_per_comparison: int = 1) -> list:
    """The judge's comparison of each pair, the correct answer first: the row's own
    principle, else k drawn from the constitution."""
    principles = [[pair.principle] if pair.principle else
                  draw_principles(constitution, seed, comparison_key(pair.conversation), principles_per_comparison)
                  for pair in pairs]
    return judge.compare_with(constitution, [p.conversation for p in pairs], [p.correct for p in pairs],
                              [p.incorrect for p in pairs], principles, seed, desc="eval-labeler")


def evaluate_labeler(judge, constitution, pairs: list[LabeledPair], seed: int = 0,
                     principles_per_comparison: int = 1) -> dict:
    """Accuracy and calibration of `judge` on human-labelled pairs, asked in both orders."""
    started = time.perf_counter()
    comparisons = judge_labeled_pairs(judge, constitution, pairs, seed, principles_per_comparison)
    return labeler_metrics(pairs, comparisons, time.perf_counter() - started, seed)


def labeler_metrics(pairs: list[LabeledPair], comparisons: list, seconds: float, seed: int = 0) -> dict:
    """`evaluate_labeler`'s figures from the comparisons (correct answer first). Each
    accuracy has its 95 % bootstrap interval over the pairs and its verdict against
    chance (0.5), as evaluate judges its figures."""
    one_order = [c.p_order_ab if p.correct_slot == "A" else c.p_order_ba for p, c in zip(pairs, comparisons)]
    averaged = [c.p_first for c in comparisons]
    n = len(pairs)
    resampler = Resampler(n, seed=seed)
    accuracies = {}
    for name, probabilities in (("accuracy_one_order", one_order), ("accuracy_averaged", averaged)):
        estimate = resampler.estimate(mean_of([_hit(p) for p in probabilities]), null=0.5)
        accuracies[name] = estimate.value
        accuracies[f"{name}_interval"] = [round(estimate.low, 4), round(estimate.high, 4)]
        accuracies[f"{name}_vs_chance"] = verdict(estimate)
    return {
        "n": n,
        **accuracies,
        "interval_level": LEVEL,
        "ece": expected_calibration_error([max(p, 1 - p) for p in averaged], [_hit(p) for p in averaged]),
        "position_bias_rate": sum(c.orders_disagree for c in comparisons) / n,
        "mean_p_slot_a": 0.5 + sum(c.slot_bias for c in comparisons) / n,
        "mean_abs_slot_bias": sum(abs(c.slot_bias) for c in comparisons) / n,
        "mean_p_correct": sum(averaged) / n,
        "seconds": seconds,
        "comparisons_per_second": n / seconds if seconds else None,
    }


def format_metrics(metrics: dict) -> str:
    def accuracy(name: str) -> str:
        low, high = metrics[f"{name}_interval"]
        said = metrics[f"{name}_vs_chance"]
        against = "" if said == TOO_FEW else f", {said} than chance" if said in ("better", "worse") else f", {said}"
        return f"{metrics[name]:.3f} [{low:.3f}, {high:.3f}]{against}"

    rows = [("comparisons (n)", f"{metrics['n']}"),
            ("accuracy, one order", accuracy("accuracy_one_order")),
            ("accuracy, both orders averaged", accuracy("accuracy_averaged")),
            ("expected calibration error", f"{metrics['ece']:.3f}"),
            ("same slot in both orders", f"{metrics['position_bias_rate']:.1%}"),
            ("mean P(slot A)", f"{metrics['mean_p_slot_a']:.3f}"),
            ("mean |P(slot A) - 0.5| per pair", f"{metrics['mean_abs_slot_bias']:.3f}"),
            ("comparisons / second", f"{metrics['comparisons_per_second'] or 0:.2f}")]
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {v}" for k, v in rows]
    lines.insert(1, f"  (accuracies: [{metrics['interval_level']:.0%} bootstrap interval over the comparisons], "
                    f"verdict against chance, 0.5)")
    if metrics["n"] < MIN_PROMPTS:
        lines.append(f"  {TOO_FEW}: {metrics['n']} comparison{'s' * (metrics['n'] != 1)} cannot judge a labeler; "
                     f"its accuracy needs at least {MIN_PROMPTS} (give --data more rows, or a larger --limit)")
    return "\n".join(lines)


def eval_labeler_command(ctx, data_path, limit: int | None = None, out: str | None = None) -> int:
    """`cai eval-labeler`: the label section's feedback model against labelled pairs
    (`ctx`: the label step's context, its config checked and its server probed)."""
    from cai.models import set_hub_kernels, set_threads

    run, cfg = ctx.run, ctx.config
    pairs = read_labeled_pairs(data_path, run.seed, limit)
    set_threads(run.threads)
    set_hub_kernels(run.hub_kernels)
    judge = make_judge(ctx, cfg, cfg.batch_size)
    try:
        metrics = evaluate_labeler(judge, ctx.constitution, pairs, run.seed, cfg.principles_per_comparison)
    finally:
        ctx.release()
    metrics.update(data=str(data_path), **judge.description, principles_per_comparison=cfg.principles_per_comparison)
    print(f"[cai] eval-labeler: {metrics['feedback_model']} ({metrics['mode']}, few_shot={metrics['few_shot']} "
          f"{metrics['few_shot_choice']}{', calibrated' if judge.calibrate else ''}) on {data_path}")
    print(format_metrics(metrics))
    if out:
        atomic_write_json(Path(out), metrics)
        print(f"[cai] eval-labeler: metrics written to {out}")
    return 0
