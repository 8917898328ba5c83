"""RL-CAI, AI feedback on pairs of answers (Bai et al. 2022, section 4.1).

The SL-CAI model answers each training prompt twice, with different seeds. A feedback
model then reads a multiple-choice question: the conversation, a principle drawn at
random from the constitution, and the two answers as options (A) and (B). The
normalised probabilities of the option tokens are a soft label: the probability that
one answer is better. Both option orders are asked and averaged, since small models
pick a slot more than an answer; k principles can be drawn and averaged (an ensemble).
With `cot`, the feedback model reasons step by step before answering, and its
probabilities are clamped to a band (the paper's 40-60 %). Against slot bias, the few-shot
examples can be chosen balanced or mirrored, and the probabilities calibrated against a
content-free question (`few_shot_choice`, `calibrate`: cai/feedback.py). Helpful prompts are labelled
too, as in the paper, so the preference model does not learn "refuse everything".

Prompts are processed in fixed chunks of `batch_size` (sorted by length) through the
resumable chunk loop (`cai.chunks`): a chunk's preference rows (prefs.jsonl) and
dropped pairs (dropped.jsonl) are committed together when the chunk is done, so a
killed run resumes losing at most the chunk in flight, and produces exactly what an
uninterrupted run would. The policy and the judge are engines: weights in-process
or `server:NAME` (a judge server must return token log-probabilities, or opt into
`option_scoring: letter`, whose hard labels the manifest and report say).

`cai eval-labeler` measures the feedback model against human labels (the CAI paper's
HHH comparisons, or any prompt/chosen/rejected file): accuracy with one order and with
both averaged, calibration, and how often the model just picks the same slot.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cai.chunks import ChunkLedger, chunked_by_length, run_chunks
from cai.config import setting
from cai.engines import Engine, Sampling, is_degenerate, is_server, server_name
from cai.rundir import atomic_write_json
from cai.yamlio import Problem, ValidationError

UPSTREAM = ("sft",)  # the default policy is the SFT model


@dataclass
class Config:
    policy: str = setting("sft", "who answers: sft (the SL-CAI model), base, another stage, a model spec or "
                                 "server:NAME", model_reference=True)
    feedback_model: str = setting("base", "the judge: base (the run's model, as the paper's pretrained LM), a stage, "
                                          "a model spec or server:NAME", model_reference=True)
    include_helpful: bool = True  # label answers to the helpful training prompts too (as the paper)
    max_prompts: int | None = setting(None, "cap on prompts labelled (a seeded sample), null = all", ge=1)
    principles_per_comparison: int = setting(1, "k feedback principles drawn per pair; their labels are averaged",
                                             ge=1)
    few_shot: int = setting(2, "how many of the constitution's feedback examples go first", ge=0)
    few_shot_choice: Literal["first", "balanced", "mirrored"] = setting(
        "first", "first: the first few_shot examples; balanced: their answers alternate A, B, ...; mirrored: "
                 "each of the first few_shot also with its responses swapped (2x the shots; not with cot)")
    calibrate: bool | None = setting(None, "divide the option probabilities by those of a content-free input and "
                                            "renormalise (Zhao et al. 2021); null = on where it applies (not with "
                                            "cot or a letter-scoring server)")
    cot: bool = False  # chain of thought: the judge reasons before it answers
    cot_clamp: list[float] = field(default_factory=lambda: [0.4, 0.6])  # band for each order's CoT probability
    cot_max_new_tokens: int = setting(128, "length of the judge's reasoning", ge=1)
    batch_size: int = setting(64, "prompts per generation batch and resume chunk; questions per scoring batch",
                              ge=1)
    max_new_tokens: int = setting(128, "length of the policy's answers", ge=1)
    temperature: float = setting(1.0, "sampling temperature of the two answers (high: the pair differs)", ge=0)
    top_p: float = setting(0.95, "nucleus sampling: the smallest token set with this probability", gt=0, le=1)


def check_config(run, cfg: Config, trl: dict) -> list:
    doc, problems = run.source, []

    def problem(key: str, message: str) -> None:
        problems.append(doc.problem(("label", key), message))

    if len(cfg.cot_clamp) != 2 or not 0.0 <= cfg.cot_clamp[0] <= 0.5 <= cfg.cot_clamp[1] <= 1.0:
        problem("cot_clamp", f"'label.cot_clamp' must be [low, high] with 0 <= low <= 0.5 <= high <= 1, "
                             f"got {cfg.cot_clamp}")
    if cfg.cot and cfg.calibrate is True:
        problem("calibrate", "'label.calibrate' does not apply with 'label.cot: true' (a content-free input has "
                             "no reasoning); cot's probabilities are clamped instead")
    if cfg.cot and cfg.few_shot_choice == "mirrored":
        problem("few_shot_choice", "'label.few_shot_choice: mirrored' does not apply with 'label.cot: true' "
                                   "(the examples' reasoning names the letters)")
    server = run.servers.get(server_name(cfg.feedback_model)) if is_server(cfg.feedback_model) else None
    if cfg.calibrate is True and server is not None and server.option_scoring == "letter":
        problem("calibrate", "'label.calibrate' needs option probabilities, but the feedback model's server "
                             "has option_scoring: letter")
    return problems


def model_name(ctx, spec: str) -> str:
    """What a row records about a model: a stage name as is, else the resolved spec."""
    from cai.pipeline import ORDER

    return spec if spec in ORDER else ctx.model_spec(spec)


def make_judge(ctx, cfg: Config):
    """The label section's feedback model as a judge, on its engine (shared with the
    policy when both name the same model)."""
    from cai.feedback import Judge

    return Judge(ctx.engine(cfg.feedback_model, cfg.batch_size), few_shot=cfg.few_shot,
                 few_shot_choice=cfg.few_shot_choice, cot=cfg.cot,
                 calibrate=calibrated(ctx.run, cfg.calibrate, cfg.feedback_model, cfg.cot),
                 cot_clamp=tuple(cfg.cot_clamp), cot_max_new_tokens=cfg.cot_max_new_tokens)


def calibrated(run, calibrate: bool | None, feedback_model: str, cot: bool = False) -> bool:
    """Whether a judge calibrates: as set, else (null) wherever it applies. On the CAI
    paper's HHH pairs it cut SmolLM2-135M's same-slot share from 100 % to 82 % at the same
    accuracy (bench/labeler_hhh.py)."""
    if calibrate is not None:
        return calibrate
    letter = is_server(feedback_model) and run.servers[server_name(feedback_model)].option_scoring == "letter"
    return not cot and not letter


def judge_scoring(run, reference: str) -> str:
    """How a judge's labels are read, for the manifest and the report: option
    probabilities, or (a server opted into `option_scoring: letter`) a parsed letter."""
    if is_server(reference) and run.servers[server_name(reference)].option_scoring == "letter":
        return "letter (degraded: hard labels parsed from a generated letter; the server gives no log-probabilities)"
    return "probabilities"


def training_prompts(ctx, cfg: Config) -> list:
    prompts = list(ctx.prompts.red_team_train) + (list(ctx.prompts.helpful_train) if cfg.include_helpful else [])
    if cfg.max_prompts is not None and cfg.max_prompts < len(prompts):
        keep = set(random.Random(f"{ctx.run.seed}:label").sample(range(len(prompts)), cfg.max_prompts))
        prompts = [p for i, p in enumerate(prompts) if i in keep]
    return prompts


def label_chunk(chunk, policy: Engine, judge, constitution, cfg: Config, seed: int, chunk_seed: int,
                names: dict) -> tuple[list[dict], list[dict]]:
    """Two answers per prompt, then the judge's soft label; returns preference rows and dropped pairs."""
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    conversations = [[{"role": "user", "content": p.text}] for p in chunk]
    answers_1 = policy.generate(conversations, sampling, seed=chunk_seed)
    answers_2 = policy.generate(conversations, sampling, seed=chunk_seed + 1)

    live, dropped = [], []
    for prompt, a, b in zip(chunk, answers_1, answers_2):
        reason = ("degenerate answer" if is_degenerate(a.text) or is_degenerate(b.text)
                  else "identical answers" if a.text == b.text else None)
        if reason:
            dropped.append({"id": prompt.id, "kind": prompt.kind, "reason": reason, "answers": [a.text, b.text]})
        else:
            live.append((prompt, a.text, b.text))

    comparisons = judge.compare(constitution, [[{"role": "user", "content": p.text}] for p, _, _ in live],
                                [a for _, a, _ in live], [b for _, _, b in live], seed=seed,
                                principles_per_comparison=cfg.principles_per_comparison)
    rows = []
    for (prompt, a, b), c in zip(live, comparisons):
        first_wins = c.p_first >= 0.5
        chosen, rejected = (a, b) if first_wins else (b, a)
        # Each order's probability, seen from the chosen answer (the other order of the pair).
        p_ab, p_ba = (c.p_order_ab, c.p_order_ba) if first_wins else (1 - c.p_order_ba, 1 - c.p_order_ab)
        row = {"prompt": [{"role": "user", "content": prompt.text}],
               "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}],
               "p_chosen": max(c.p_first, 1 - c.p_first), "p_order_ab": p_ab, "p_order_ba": p_ba,
               "principles": list(c.principles), "orders_disagree": bool(c.orders_disagree),
               "feedback_model": names["feedback_model"], "policy": names["policy"],
               "mode": "cot" if cfg.cot else "direct", "id": prompt.id, "kind": prompt.kind,
               "category": prompt.category, "source": "label"}
        if c.reasoning:
            row["reasoning"] = list(c.reasoning)
        rows.append(row)
    return rows, dropped


def run(ctx) -> dict:
    cfg: Config = ctx.config
    constitution = ctx.constitution
    prompts = training_prompts(ctx, cfg)
    ledger = ChunkLedger(ctx.dir.path, "label", ["prefs.jsonl", "dropped.jsonl"])
    names = {"policy": model_name(ctx, cfg.policy), "feedback_model": model_name(ctx, cfg.feedback_model)}
    models: dict = {}
    started = time.perf_counter()

    def work(index: int, chunk) -> dict:
        if not models:  # loaded only when a chunk is left to do
            models.update(policy=ctx.engine(cfg.policy, cfg.batch_size), judge=make_judge(ctx, cfg))
        rows, dropped = label_chunk(chunk, models["policy"], models["judge"], constitution, cfg, ctx.run.seed,
                                    ctx.run.seed * 100_003 + index * 101, names)
        return {"prefs.jsonl": rows, "dropped.jsonl": dropped}

    ran = run_chunks(ledger, chunked_by_length(prompts, cfg.batch_size), work, desc="label")
    prefs, dropped = ledger.rows("prefs.jsonl"), ledger.rows("dropped.jsonl")
    n = len(prefs)
    counts = {"prompts": len(prompts), "comparisons": n, "dropped": len(dropped),
              "dropped_degenerate": sum(r["reason"] == "degenerate answer" for r in dropped),
              "dropped_identical": sum(r["reason"] == "identical answers" for r in dropped),
              "red_team_comparisons": sum(r["kind"] == "red_team" for r in prefs),
              "helpful_comparisons": sum(r["kind"] == "helpful" for r in prefs),
              "orders_disagree_rate": round(sum(r["orders_disagree"] for r in prefs) / n, 4) if n else None,
              "mean_p_chosen": round(sum(r["p_chosen"] for r in prefs) / n, 4) if n else None,
              "policy": names["policy"], "feedback_model": names["feedback_model"],
              "mode": "cot" if cfg.cot else "direct", "judge_scoring": judge_scoring(ctx.run, cfg.feedback_model),
              "chunks_this_session": ran,
              "seconds_this_session": round(time.perf_counter() - started, 2)}
    if models:
        judge, policy = models["judge"], models["policy"]
        counts.update(comparisons_this_session=judge.comparisons,
                      feedback_seconds_this_session=round(judge.seconds, 2),
                      comparisons_per_second=round(judge.comparisons / judge.seconds, 3) if judge.seconds else None,
                      policy_tokens_per_second=round(policy.tokens_per_second, 2))
    return counts


# ---------------------------------------------------------------- cai eval-labeler

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
    from cai.feedback import comparison_key, draw_principles

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
    return labeler_metrics(pairs, comparisons, time.perf_counter() - started)


def labeler_metrics(pairs: list[LabeledPair], comparisons: list, seconds: float) -> dict:
    """`evaluate_labeler`'s figures from the comparisons (correct answer first)."""
    one_order = [c.p_order_ab if p.correct_slot == "A" else c.p_order_ba for p, c in zip(pairs, comparisons)]
    averaged = [c.p_first for c in comparisons]
    n = len(pairs)
    return {
        "n": n,
        "accuracy_one_order": sum(map(_hit, one_order)) / n,
        "accuracy_averaged": sum(map(_hit, averaged)) / n,
        "ece": expected_calibration_error([max(p, 1 - p) for p in averaged], [_hit(p) for p in averaged]),
        "position_bias_rate": sum(c.orders_disagree for c in comparisons) / n,
        "mean_p_slot_a": 0.5 + sum(c.slot_bias for c in comparisons) / n,
        "mean_abs_slot_bias": sum(abs(c.slot_bias) for c in comparisons) / n,
        "mean_p_correct": sum(averaged) / n,
        "seconds": seconds,
        "comparisons_per_second": n / seconds if seconds else None,
    }


def format_metrics(metrics: dict) -> str:
    rows = [("comparisons (n)", f"{metrics['n']}"),
            ("accuracy, one order", f"{metrics['accuracy_one_order']:.3f}"),
            ("accuracy, both orders averaged", f"{metrics['accuracy_averaged']:.3f}"),
            ("expected calibration error", f"{metrics['ece']:.3f}"),
            ("same slot in both orders", f"{metrics['position_bias_rate']:.1%}"),
            ("mean P(slot A)", f"{metrics['mean_p_slot_a']:.3f}"),
            ("mean |P(slot A) - 0.5| per pair", f"{metrics['mean_abs_slot_bias']:.3f}"),
            ("comparisons / second", f"{metrics['comparisons_per_second'] or 0:.2f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def eval_labeler_command(run, data_path, limit: int | None = None, out: str | None = None) -> int:
    """`cai eval-labeler`: the label section's feedback model against labelled pairs."""
    from cai.models import set_hub_kernels, set_threads
    from cai.pipeline import prepare

    ctx = prepare(run, "label")
    cfg: Config = ctx.config
    pairs = read_labeled_pairs(data_path, run.seed, limit)
    if is_server(cfg.feedback_model):
        from cai.pipeline import server_check_problem

        if (problem := server_check_problem(run, cfg.feedback_model, judge=True)) is not None:
            raise ValidationError([problem])
    set_threads(run.threads)
    set_hub_kernels(run.hub_kernels)
    judge = make_judge(ctx, cfg)
    try:
        metrics = evaluate_labeler(judge, ctx.constitution, pairs, run.seed, cfg.principles_per_comparison)
    finally:
        ctx.release()
    metrics.update(data=str(data_path), feedback_model=model_name(ctx, cfg.feedback_model),
                   judge_scoring=judge_scoring(run, cfg.feedback_model), mode="cot" if cfg.cot else "direct",
                   few_shot=cfg.few_shot, few_shot_choice=cfg.few_shot_choice, calibrate=judge.calibrate,
                   principles_per_comparison=cfg.principles_per_comparison)
    print(f"[cai] eval-labeler: {metrics['feedback_model']} ({metrics['mode']}, few_shot={cfg.few_shot} "
          f"{cfg.few_shot_choice}{', calibrated' if judge.calibrate else ''}) on {data_path}")
    print(format_metrics(metrics))
    if out:
        atomic_write_json(Path(out), metrics)
        print(f"[cai] eval-labeler: metrics written to {out}")
    return 0
