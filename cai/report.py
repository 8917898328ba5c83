"""`cai report RUN_DIR`: one self-contained HTML page about a run.

The page reads offline: CSS is inline and every chart is a PNG drawn with matplotlib's
Agg canvas and embedded as a base64 data URI. It shows what the run directory holds:
the run summary and stage timings, training curves from each stage's log history, the
evaluation tables, each stage's answers to the same held-out prompts side by side,
critique-and-revision chains, the reward model's metrics and the AI labels. A stage that
has not run is left out with a note. All model text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import Counter
from pathlib import Path

from cai.registry import ORDER, POLICY_STAGES, ROUND_STAGES, TRAINING_STAGES, split_step, step_folder, steps
from cai.rundir import atomic_write_text, read_jsonl, step_state
from cai.yamlio import Problem, ValidationError

CURVE_WORDS = ("loss", "reward", "score", "kl", "length")  # log-history keys worth a curve
MAX_CURVES = 9  # panels per stage
SAMPLE_PROMPTS = 3  # held-out prompts per kind shown side by side
SAMPLE_CHAINS = 3  # critique chains shown
MAX_CHARS = 1500  # longer model text is cut, with a mark
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # invalid in HTML; tiny models emit them
KIND_NAMES = {"red_team": "red-team", "helpful": "helpful", "all": "all prompts"}
ANCHOR = 1000.0  # the Elo of the anchor model (base)

CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1f2328; background: #f6f8fa; margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 28px; margin: 8px 0 4px; }
h2 { font-size: 21px; margin: 40px 0 10px; padding-bottom: 6px; border-bottom: 2px solid #d0d7de; }
h3 { font-size: 17px; margin: 24px 0 8px; }
.subtitle, .note { color: #59636e; }
.note { font-size: 13px; margin: 6px 0; }
.warning { font-size: 13px; margin: 6px 0; padding: 6px 10px; background: #fff8c5; border-left: 3px solid #d4a72c; }
.missing { color: #8c5a00; background: #fff8e1; border-left: 4px solid #e3b341; padding: 6px 12px; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 5px 9px; text-align: left; vertical-align: top; }
th { background: #eef1f4; font-weight: 600; }
tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.better { font-weight: 700; color: #1a7f37; background: #dafbe1 !important; }
td.worse { font-weight: 700; color: #a40e26; background: #ffebe9 !important; }
td.noise { color: #59636e; }
.ci { color: #59636e; font-size: 12px; }
.verdict { display: block; font-size: 12px; font-weight: 400; }
.text { white-space: pre-wrap; word-break: break-word; }
table.side { width: 100%; table-layout: fixed; }
table.side td { font-size: 13px; }
.score { display: block; margin-top: 6px; color: #59636e; font-size: 12px; }
img.chart { max-width: 100%; border: 1px solid #eaeef2; border-radius: 4px; margin: 6px 0; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.chain { border: 1px solid #d0d7de; border-radius: 6px; padding: 10px 14px; margin: 12px 0; }
.chain h4 { margin: 10px 0 4px; font-size: 14px; }
.round { border-left: 3px solid #8250df; padding: 2px 12px; margin: 10px 0; }
.round.dropped { border-left-color: #cf222e; opacity: .75; }
.tag { display: inline-block; font-size: 12px; padding: 0 7px; border-radius: 10px; background: #ddf4ff;
       color: #0550ae; margin-right: 6px; }
.tag.warn { background: #ffebe9; color: #a40e26; }
nav a { margin-right: 14px; color: #0969da; text-decoration: none; }
"""


# ---------------------------------------------------------------- small helpers


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def text_block(value: str | None) -> str:
    """Model text, escaped, line breaks kept, cut at MAX_CHARS."""
    value = CONTROL.sub("\ufffd", value or "")
    cut = len(value) > MAX_CHARS
    body = esc(value[:MAX_CHARS]) + (" <span class='note'>[… cut]</span>" if cut else "")
    return f"<div class='text'>{body or '<span class=note>(empty)</span>'}</div>"


def fmt(value, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if percent:
            return f"{100 * value:.1f} %"
        if isinstance(value, int):
            return f"{value:,}"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return esc(value)


def table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """`rows` hold ready HTML cells (`<td>...</td>`); header names are escaped here."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(f"<tr>{''.join(r)}</tr>" for r in rows)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def td(value, percent: bool = False) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) or value is None:
        return f"<td class='num'>{fmt(value, percent)}</td>"
    return f"<td>{fmt(value)}</td>"


def fmt_interval(value, interval, percent: bool = False, signed: bool = False) -> str:
    """`value [low, high]` (escaped HTML); the interval is left out when there is none."""
    def show(v):
        text = fmt(v, percent)
        return f"+{text}" if signed and isinstance(v, (int, float)) and v > 0 else text
    if value is None:
        return "–"
    if not interval or interval[0] is None:
        return show(value)
    return f"{show(value)} <span class='ci'>[{show(interval[0])}, {show(interval[1])}]</span>"


# A verdict colours a cell only when the interval excludes no difference (cai.stats).
VERDICT_CLASS = {"better": "better", "worse": "worse", "within noise": "noise"}


def td_interval(value, interval, percent: bool = False, verdict: str | None = None, signed: bool = False) -> str:
    classes = "num " + VERDICT_CLASS.get(verdict or "", "")
    return f"<td class='{classes.strip()}'>{fmt_interval(value, interval, percent, signed)}</td>"


def missing(what: str) -> str:
    return f"<p class='missing'>{esc(what)}</p>"


def section(anchor: str, title: str, body: str) -> str:
    return f"<section id='{anchor}'><h2>{esc(title)}</h2>{body}</section>"


def read_json(path: Path, kind: type = dict):
    """A run file's JSON (None if absent); bad JSON or another top-level type than `kind`
    is a problem naming the file, not a traceback."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValidationError([Problem(str(path), None, f"not UTF-8 text ({err.reason})")]) from None
    except json.JSONDecodeError as err:
        raise ValidationError([Problem(str(path), err.lineno, f"not valid JSON: {err.msg}")]) from None
    if not isinstance(value, kind):
        raise ValidationError([Problem(str(path), 1, f"expected a JSON {'object' if kind is dict else 'list'}, "
                                                     f"got {type(value).__name__}")])
    return value


def chart(draw, alt: str, width: float = 5.6, height: float = 3.2) -> str:
    """Draw on a fresh matplotlib Figure (Agg canvas) and return it as an embedded <img>."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    draw(figure)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img class='chart' alt='{esc(alt)}' src='data:image/png;base64,{data}'>"


def bar_chart(title: str, values: dict[str, float], ylabel: str, baseline: float | None = None,
              intervals: dict[str, list] | None = None) -> str:
    def draw(figure):
        axes = figure.add_subplot()
        names = list(values)
        bottom = baseline or 0.0  # Elo bars grow up or down from the anchor's 1000
        error = None
        if intervals and all(intervals.get(n) for n in names):  # 95 % intervals as error bars
            error = [[max(values[n] - intervals[n][0], 0) for n in names],
                     [max(intervals[n][1] - values[n], 0) for n in names]]
        bars = axes.bar(names, [values[n] - bottom for n in names], bottom=bottom, color="#4c78a8",
                        yerr=error, capsize=4, ecolor="#333")
        axes.bar_label(bars, labels=[f"{values[n]:.4g}" for n in names], fontsize=8, padding=2)
        axes.margins(y=0.15)  # room for the labels
        if baseline is not None:
            axes.axhline(baseline, color="#888", linewidth=1, linestyle="--")
        axes.set_title(title, fontsize=11)
        axes.set_ylabel(ylabel)
        axes.grid(axis="y", alpha=.3)
        finite = [v for v in values.values() if math.isfinite(v)]
        if error is not None:
            finite += [v for n in names for v in intervals[n] if math.isfinite(v)]
        if finite and baseline is not None:
            low, high = min(finite + [baseline]), max(finite + [baseline])
            pad = max(10.0, (high - low) * 0.15)
            axes.set_ylim(low - pad, high + pad)
    return chart(draw, title, width=3.6, height=2.8)


# ---------------------------------------------------------------- sections


def run_steps(run_dir: Path, names=ORDER) -> list[str]:
    """The steps of these stages a run directory may hold: one round, or as many as its
    `roundK/` folders say (`rounds: N`)."""
    found = [int(p.name[5:]) for p in run_dir.glob("round*") if p.is_dir() and p.name[5:].isdigit()]
    return steps(names, max(found, default=1))


def summary_section(run_dir: Path, manifests: dict) -> str:
    results = read_json(run_dir / "evaluate" / "results.json") or {}
    run = dict(results.get("run") or {})
    shared = next((m.get("shared") for m in manifests.values() if m and m.get("shared")), None) or {}
    run.setdefault("model", shared.get("model"))
    run.setdefault("seed", shared.get("seed"))
    constitution = run.get("constitution")
    if run.get("constitution_name"):
        constitution = f"{run['constitution_name']} ({constitution})"
    facts = [("Run directory", str(run_dir.resolve())), ("Model", run.get("model")),
             ("Constitution", constitution),
             ("Constitution sha256", (shared.get("constitution_sha256") or "")[:16] or None),
             ("Seed", run.get("seed")), ("Prompts", shared.get("prompts") and
                                         ", ".join(f"{k}={v}" for k, v in shared["prompts"].items()))]
    rows = [[f"<th>{esc(k)}</th>", f"<td>{esc(v)}</td>"] for k, v in facts if v not in (None, "")]
    body = f"<table>{''.join('<tr>' + ''.join(r) + '</tr>' for r in rows)}</table>"

    stage_rows = []
    for name in run_steps(run_dir):
        manifest = manifests.get(name)
        if manifest:
            counts = manifest.get("counts") or {}
            shown = ", ".join(f"{esc(k)}={fmt(v)}" for k, v in counts.items() if not isinstance(v, (dict, list)))
            state, redone = step_state(run_dir, name)
            if redone:
                state = f"stale: {', '.join(redone)} redone after it"
            stage_rows.append([f"<td>{esc(name)}</td>", f"<td>{esc(state)}</td>",
                               f"<td>{esc(manifest.get('started', ''))}</td>", td(manifest.get("seconds")),
                               f"<td class='note'>{shown}</td>"])
        elif step_state(run_dir, name)[0] == "partial":
            stage_rows.append([f"<td>{esc(name)}</td>", "<td>interrupted / running</td>", "<td></td>",
                               td(None), "<td></td>"])
    if stage_rows:
        body += "<h3>Stages</h3>" + table(["Stage", "Status", "Started", "Seconds", "Counts"], stage_rows)
        total = sum(m.get("seconds") or 0 for m in manifests.values() if m)
        absent = [s for s in run_steps(run_dir) if step_state(run_dir, s)[0] == "pending"]
        body += f"<p class='note'>Total {total:,.0f} s over {len(manifests)} completed stages."
        body += f" Not run: {esc(', '.join(absent))}.</p>" if absent else "</p>"
    else:
        body += missing("No stage has completed in this run directory yet.")
    return body


def curve_keys(history: list[dict]) -> list[str]:
    """Numeric log keys about loss, reward, KL or length that change over steps."""
    keys = {}
    for entry in history:
        for key, value in entry.items():
            if (isinstance(value, (int, float)) and not isinstance(value, bool) and not key.startswith("train_")
                    and any(word in key.lower() for word in CURVE_WORDS)):
                keys[key] = keys.get(key, 0) + 1

    def priority(key: str):
        lower = key.lower()
        word = next(i for i, w in enumerate(CURVE_WORDS) if w in lower)
        return (word, "std" in lower or "min" in lower or "max" in lower, key)

    return sorted(keys, key=priority)[:MAX_CURVES]


def curves_chart(stage: str, history: list[dict], keys: list[str]) -> str:
    from matplotlib.ticker import MaxNLocator

    def draw(figure):
        columns = min(3, len(keys))
        rows = math.ceil(len(keys) / columns)
        for index, key in enumerate(keys):
            axes = figure.add_subplot(rows, columns, index + 1)
            points = [(entry.get("step", i), entry[key]) for i, entry in enumerate(history)
                      if isinstance(entry.get(key), (int, float))]
            xs, ys = zip(*points)
            axes.plot(xs, ys, marker="o" if len(points) < 20 else None, markersize=3, color="#4c78a8")
            axes.set_title(key, fontsize=9)
            axes.tick_params(labelsize=8)
            axes.grid(alpha=.3)
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            if index >= len(keys) - columns:
                axes.set_xlabel("step", fontsize=8)
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    return chart(draw, f"{stage} training curves", width=3.8 * columns, height=2.6 * rows + 0.3)


def training_section(run_dir: Path) -> str:
    body, notes = "", []
    for stage in run_steps(run_dir, TRAINING_STAGES):
        history = read_json(run_dir / step_folder(stage) / "log_history.json", list)
        if not history:
            notes.append(stage)
            continue
        keys = curve_keys(history)
        if not keys:
            body += f"<h3>{esc(stage)}</h3><p class='note'>No loss, reward, KL or length values were logged.</p>"
            continue
        steps = max((e.get("step") for e in history if isinstance(e.get("step"), (int, float))), default=0)
        body += (f"<h3>{esc(stage)}</h3><p class='note'>{len(history)} log entries, {fmt(steps)} steps.</p>"
                 + curves_chart(stage, history, keys))
    if notes:
        body += missing(f"No training log for: {', '.join(notes)} (stage not run).")
    return body


def degraded_scoring_note(scoring) -> str:
    """A judge whose server gives no log-probabilities (`option_scoring: letter`) made hard
    labels: say so wherever its labels are shown."""
    if not isinstance(scoring, str) or not scoring.startswith("letter"):
        return ""
    return f"<p class='warning'><b>Degraded judge</b>: {esc(scoring)}.</p>"


# What the evaluation tables show per prompt kind: (figure, column name, percent).
KIND_FIGURES = {
    "red_team": [("asr", "Attack success", True), ("judge_asr", "Judged harmful", True), ("refusal", "Refusal", True),
                 ("evasive", "Evasive", True),
                 ("few_shot_span", "Few-shot span", True), ("win_rate", "Win rate (harmless)", True),
                 ("elo", "Elo (harmless)", False), ("reward", "Reward", False), ("words", "Words", False)],
    "helpful": [("refusal", "Over-refusal", True), ("evasive", "Evasive", True),
                ("few_shot_span", "Few-shot span", True), ("win_rate", "Win rate (helpful)", True),
                ("elo", "Elo (helpful)", False), ("reward", "Reward", False), ("words", "Words", False)],
}
KIND_TITLES = {"red_team": "Harmlessness on red-team prompts", "helpful": "Helpfulness on helpful prompts"}


def round_traces(names: list[str]) -> list[list[str]]:
    """With rounds, each optimiser's path through them: sft, rl@1, rl@2, ... (when evaluated)."""
    traces = []
    for stage in (s for s in POLICY_STAGES if s in ROUND_STAGES):
        rounds = sorted((split_step(n)[1], n) for n in names if split_step(n)[0] == stage and split_step(n)[1])
        if len(rounds) > 1:
            traces.append((["sft"] if "sft" in names else []) + [n for _, n in rounds])
    return traces


def tradeoff_chart(names: list[str], per_model: dict) -> str | None:
    """The paper's picture (Bai et al. 2022, figures 2 and 8): harmlessness Elo on red-team
    prompts against helpfulness Elo on helpful prompts, with 95 % intervals on both axes;
    with rounds, a line traces each optimiser from sft through its rounds (the paper's
    curves over training)."""
    points = {}
    for name in names:
        x, y = per_model[name].get("helpful", {}), per_model[name].get("red_team", {})
        if not isinstance(x.get("elo"), (int, float)) or not isinstance(y.get("elo"), (int, float)):
            return None
        points[name] = (x["elo"], (x.get("ci") or {}).get("elo"), y["elo"], (y.get("ci") or {}).get("elo"))
    if len(points) < 2:
        return None

    def spread(value, interval):
        return [[max(value - interval[0], 0)], [max(interval[1] - value, 0)]] if interval else None

    def draw(figure):
        axes = figure.add_subplot()
        colours = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d"]
        for k, (name, (x, x_ci, y, y_ci)) in enumerate(points.items()):
            colour = colours[k % len(colours)]
            axes.errorbar([x], [y], xerr=spread(x, x_ci), yerr=spread(y, y_ci), fmt="o", color=colour,
                          ecolor=colour, capsize=4, markersize=7, label=name)
            axes.annotate(name, (x, y), textcoords="offset points", xytext=(7, 6), fontsize=9)
        for trace in round_traces(list(points)):
            xs, ys = [points[n][0] for n in trace], [points[n][2] for n in trace]
            axes.plot(xs, ys, color="#555", linewidth=1, alpha=.7, zorder=0,
                      label=f"rounds of {split_step(trace[-1])[0]}")
        axes.axhline(ANCHOR, color="#888", linewidth=1, linestyle="--")
        axes.axvline(ANCHOR, color="#888", linewidth=1, linestyle="--")
        axes.set_xlabel("helpfulness Elo (helpful prompts)")
        axes.set_ylabel("harmlessness Elo (red-team prompts)")
        axes.set_title("Harmlessness vs helpfulness, 95 % intervals", fontsize=11)
        axes.grid(alpha=.3)
        axes.margins(0.2)
    return chart(draw, "harmlessness vs helpfulness", width=5.6, height=4.4)



def kind_table(kind: str, names: list[str], per_model: dict, paired: dict) -> str:
    """Each model's figures on one kind of prompt (or one prompt set, KIND/NAME), with
    intervals; a cell is coloured only when the model's paired difference from base
    excludes zero."""
    against_base = paired.get(kind, {}).get("base", {})
    rows = []
    for name in names:
        figures = per_model[name][kind]
        intervals = figures.get("ci") or {}
        cells = [f"<td><b>{esc(name)}</b></td>", td(figures.get("n"))]
        for figure, _, percent in KIND_FIGURES[kind.split("/")[0]]:
            call = (against_base.get(name) or {}).get(figure, {}).get("verdict")
            cells.append(td_interval(figures.get(figure), intervals.get(figure), percent,
                                     call if call in ("better", "worse") else None))
        rows.append(cells)
    header = ["Model", "Prompts"] + [title for _, title, _ in KIND_FIGURES[kind.split("/")[0]]]
    return table(header, rows, f"models {kind}")


def paired_table(kind: str, reference: str, rows_by_model: dict) -> str:
    """Each model minus the reference on the same resampled prompts, with its interval and
    verdict; "beats" is the judge's head-to-head win probability (null 0.5)."""
    figures = [("head_to_head", "Beats " + reference, True)] + KIND_FIGURES[kind.split("/")[0]]
    rows = []
    for name, differences in rows_by_model.items():
        cells = [f"<td><b>{esc(name)}</b></td>"]
        for figure, _, percent in figures:
            row = differences.get(figure)
            if row is None:
                cells.append(td(None))
                continue
            shown = td_interval(row["value"], [row["low"], row["high"]], percent, row["verdict"],
                                signed=figure != "head_to_head")
            cells.append(shown.replace("</td>", f"<span class='verdict'>{esc(row['verdict'])}</span></td>"))
        rows.append(cells)
    header = ["Model"] + [title if figure == "head_to_head" else f"Δ {title}" for figure, title, _ in figures]
    return table(header, rows, f"paired {kind} vs-{reference}")


def principle_section(principles: dict | None) -> str:
    if not principles or not any(principles.values()):
        return ""
    body = "<h3>Principles</h3>"
    critique = principles.get("critique") or []
    if critique:
        rows = [[f"<td>{esc(r['id'])}</td>", td(r["drawn"]), td(r["kept"]), td(r["kept_share"], percent=True),
                 td(r.get("revision_reward")), td(r.get("reward_gain")), td(r.get("scored"))] for r in critique]
        body += ("<p class='note'>Critique principles (critique/records.jsonl): how often each was drawn, how many "
                 "of its rounds were kept (a degenerate or meta revision is not), and the reward model's mean score "
                 "of the revisions kept under it, with its mean gain over the answer each replaced.</p>"
                 + table(["Critique principle", "Drawn", "Kept", "Kept share", "Revision reward", "Reward gain",
                          "Scored"], rows, "principles critique"))
    for key, what in (("feedback", "Feedback principles (label/prefs.jsonl): how often each was drawn to label "
                                   "a training pair"),
                      ("evaluation", "Evaluation principles (evaluate/comparisons.jsonl): how often each was drawn "
                                     "to judge a pair of models")):
        rows = principles.get(key) or []
        if rows:
            cells = [[f"<td>{esc(r['id'])}</td>"] + ([f"<td>{esc(r['set'])}</td>"] if key == "evaluation" else [])
                     + [td(r["drawn"]), td(r["mean_confidence"]), td(r["orders_disagree"], percent=True)]
                     for r in rows]
            header = ([f"{key.capitalize()} principle"] + (["Set"] if key == "evaluation" else [])
                      + ["Drawn", "Mean confidence |p − 0.5|", "Orders disagree"])
            body += (f"<p class='note'>{esc(what)}; the mean confidence of those judgements, |p − 0.5| (0: a coin "
                     f"flip, 0.5: certain), and how often the two option orders disagreed.</p>"
                     + table(header, cells, f"principles {key}"))
    return body


def evaluation_section(results: dict | None) -> str:
    if not results:
        return missing("The evaluate stage has not run: `cai evaluate --config CFG` compares every stage's model.")
    names = results["models"]
    per_model, pairwise = results["per_model"], results["pairwise"]
    paired = results.get("paired") or {}
    kinds = results.get("kinds", [])
    sources = results.get("prompt_sources") or {}
    counts = ", ".join(f"{fmt(n)} {esc(KIND_NAMES.get(k, k))}" for k, n in results["prompts"].items() if k != "all")
    body = (f"<p>Evaluation prompts: {counts}"
            + (f" ({esc('; '.join(sources.values()))})" if sources else "") + ". "
            f"Answers generated with at most {fmt(results['generation']['max_new_tokens'])} new tokens, "
            f"temperature {fmt(results['generation']['temperature'])}.</p>")
    overlap = {k: n for k, n in (results.get("prompts_in_training") or {}).items() if n}
    if overlap:
        body += ("<p class='warning'>" + esc("; ".join(f"{n} of the {KIND_NAMES.get(k, k)} evaluation prompts are "
                                                       f"also training prompts" for k, n in overlap.items()))
                 + ".</p>")
    if results.get("skipped"):
        skipped = "; ".join(f"{k}: {v}" for k, v in results["skipped"].items())
        body += "<p class='note'>Not evaluated: " + esc(skipped) + "</p>"
    bootstrap = results.get("bootstrap")
    if bootstrap:
        body += (f"<p class='note'>Brackets: 95 % bootstrap intervals over prompts ({fmt(bootstrap['resamples'])} "
                 f"seeded resamples). A model's cell is green (better) or red (worse) only when its difference from "
                 f"base, computed on the same resampled prompts, has an interval that excludes zero; every other "
                 f"difference is within noise and is not coloured.</p>")

    sets = results.get("sets") or {}
    groups = [g for kind in kinds for g in [kind, *(s for s in sets if s.startswith(kind + "/"))]]
    if sets:
        body += ("<p class='note'>Several prompt sources per kind: each kind's table is followed by one per source "
                 "(KIND/NAME). Attack success: the share of red-team answers that do not refuse (HarmBench's "
                 "string-matching baseline); over-refusal: the share of helpful (or safe-but-unsafe-looking) "
                 "prompts refused. Few-shot span: answers repeating 6 words in a row of the constitution's "
                 "critique examples.</p>")
    for kind in groups:
        judged = (results.get("judge_principles") or {}).get(kind)
        title = KIND_TITLES.get(kind) or f"{KIND_TITLES.get(kind.split('/')[0], '')}: {kind}"
        body += f"<h3>{esc(title)}</h3>"
        if judged:
            body += (f"<p class='note'>Judged under {esc(judged['set'])} principles ({esc(judged['from'])}: "
                     f"{esc(', '.join(judged['ids']))}).</p>")
        body += kind_table(kind, names, per_model, paired)
    plot = tradeoff_chart(names, per_model)
    if plot:
        body += ("<h3>Harmlessness vs helpfulness</h3><p class='note'>As in the paper's figures: each model's Elo "
                 "on helpful prompts (helpfulness principles) against its Elo on red-team prompts (harmlessness "
                 "principles); up and to the right is better. The bars are 95 % intervals; base is the anchor "
                 "(1000 by definition), so the other models' bars measure them against it.</p>"
                 + "".join(f"<p class='note'>Rounds: the line traces {esc(' → '.join(trace))} "
                           f"(rl@K, dpo@K: round K's model).</p>" for trace in round_traces(names))
                 + f"<div class='charts tradeoff'>{plot}</div>")
    for kind in groups:
        for reference, rows_by_model in (paired.get(kind) or {}).items():
            if rows_by_model:
                body += (f"<h3>Compared with {esc(reference)}: {esc(KIND_NAMES.get(kind, kind))} prompts</h3>"
                         f"<p class='note'>Δ: the model's figure minus {esc(reference)}'s, on the same resampled "
                         f"prompts, with its 95 % interval. Beats {esc(reference)}: the judge's mean probability "
                         f"that the model's answer is the better one (0.5: no preference).</p>"
                         + paired_table(kind, reference, rows_by_model))
    methods = results.get("methods", {})
    body += "".join(f"<p class='note'><b>{esc(k.replace('_', ' ').capitalize())}</b>: {esc(v)}.</p>"
                    for k, v in methods.items())
    if results.get("reward_model") is None:
        body += "<p class='note'>No reward model in this run: reward scores are left out.</p>"
    if results.get("feedback_model"):
        body += f"<p class='note'>Judge (feedback model): {esc(results['feedback_model'])}.</p>"
    body += degraded_scoring_note(results.get("judge_scoring"))

    charts = []
    for kind in kinds:
        elo = {n: per_model[n][kind].get("elo") for n in names}
        if len(names) > 1 and all(isinstance(v, (int, float)) for v in elo.values()):
            charts.append(bar_chart(f"Elo ({KIND_NAMES.get(kind, kind)})", elo, "Elo", baseline=ANCHOR,
                                    intervals={n: (per_model[n][kind].get("ci") or {}).get("elo") for n in names}))
    for kind in kinds:
        rewards = {n: per_model[n][kind]["reward"] for n in names}
        if all(isinstance(v, (int, float)) for v in rewards.values()):
            charts.append(bar_chart(f"Mean reward ({KIND_NAMES.get(kind, kind)})", rewards, "reward-model score",
                                    intervals={n: (per_model[n][kind].get("ci") or {}).get("reward") for n in names}))
    if charts:
        body += f"<div class='charts'>{''.join(charts)}</div>"

    matrix = pairwise["all"]["win_rates"]
    if pairwise["all"]["pairs"]:
        rows = [[f"<td><b>{esc(a)}</b></td>"] + [td(matrix[a].get(b), percent=True) if a != b else "<td>·</td>"
                                                  for b in names] for a in names]
        body += ("<h3>Win rates</h3><p class='note'>Cell: how often the row model's answer to an evaluation "
                 "prompt was judged better than the column model's answer to the same prompt (all prompts).</p>"
                 + table(["row beats column"] + names, rows, "winrates"))
        by_kind = {k: {(p["first"], p["second"]): p for p in pairwise[k]["pairs"]} for k in kinds}
        rows = [[f"<td>{esc(p['first'])} vs {esc(p['second'])}</td>", td(p["n"]),
                 td(p["win_rate_first"], percent=True)]
                + [td(by_kind[k].get((p["first"], p["second"]), {}).get("win_rate_first"), percent=True)
                   for k in kinds]
                + [td(p["p_order_ab"]), td(p["p_order_ba"]), td(p["orders_disagree"], percent=True)]
                for p in pairwise["all"]["pairs"]]
        body += ("<h3>Judging detail</h3><p class='note'>Each comparison is scored with the answers in both "
                 "option orders: p (order A/B) is the probability that the first model wins when its answer is "
                 "shown as (A), p (order B/A) when it is shown as (B). Orders disagree: the judge picked the "
                 "same slot both times, i.e. it followed position rather than content.</p>"
                 + table(["Pair", "Prompts", "First wins"] + [f"First wins ({KIND_NAMES.get(k, k)})" for k in kinds]
                         + ["p (order A/B)", "p (order B/A)", "Orders disagree"], rows))
    detail = ["Model", "Prompts", "Kind", "Reward", "Win rate", "Elo", "Refusal", "Partial refusal", "Evasive",
              "Tokens", "Words", "Finished"]
    rows = [[f"<td>{esc(n)}</td>", td(m["n"]), f"<td>{esc(KIND_NAMES.get(k, k))}</td>"]
            + [td_interval(m.get(f), (m.get("ci") or {}).get(f), f in ("win_rate", "refusal", "partial_refusal",
                                                                        "evasive", "finished"))
               for f in ("reward", "win_rate", "elo", "refusal", "partial_refusal", "evasive", "tokens", "words",
                         "finished")]
            for n in names for k in kinds + ["all"] for m in [per_model[n][k]]]
    body += ("<h3>By prompt kind</h3><p class='note'>All figures with their 95 % intervals. Refusal on helpful "
             "prompts is the over-refusal rate. Partial refusal: a refusal that then helps all the same. Finished: "
             "share of answers that ended before the token limit.</p>" + table(detail, rows))
    body += principle_section(results.get("principles"))
    return body


def answers_section(run_dir: Path, results: dict | None) -> str:
    generations = read_jsonl(run_dir / "evaluate" / "generations.jsonl")
    if not generations:
        return missing("No held-out answers yet (the evaluate stage has not run).")
    names = results["models"] if results else list(dict.fromkeys(r["model"] for r in generations))
    rewards = {(r["model"], r["id"]): r["reward"] for r in read_jsonl(run_dir / "evaluate" / "rewards.jsonl")}
    answer = {(r["model"], r["id"]): r for r in generations}
    body = "<p class='note'>The first held-out prompts of each kind, answered by every model.</p>"
    for kind in ("red_team", "helpful"):
        prompts = list(dict.fromkeys((r["id"], r["prompt"]) for r in generations if r["kind"] == kind))
        if not prompts:
            continue
        rows = []
        for prompt_id, prompt in prompts[:SAMPLE_PROMPTS]:
            cells = [f"<td><b>{text_block(prompt)}</b></td>"]
            for name in names:
                row = answer.get((name, prompt_id))
                score = rewards.get((name, prompt_id))
                extra = f"<span class='score'>reward {fmt(score)}</span>" if score is not None else ""
                cells.append(f"<td>{text_block(row['response']) if row else '–'}{extra}</td>")
            rows.append(cells)
        body += f"<h3>{esc(KIND_NAMES[kind].capitalize())} prompts</h3>" + table(["Prompt"] + names, rows, "side")
    return body


def critique_section(run_dir: Path) -> str:
    records = read_jsonl(run_dir / "critique" / "records.jsonl")
    if not records:
        return missing("The critique stage has not run.")
    kept = [r for r in records if not r.get("dropped") and r.get("rounds")]
    dropped = sum(1 for r in records if r.get("dropped"))
    rounds = [x for r in records for x in r.get("rounds", [])]
    reasons = Counter(x.get("dropped") or "reason not recorded" for x in rounds if not x.get("kept"))
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    body = (f"<p>{len(records)} red-team prompts, {len(rounds)} critique rounds "
            f"({sum(reasons.values())} not kept{': ' + why if why else ''}), "
            f"{dropped} prompts dropped for a degenerate first answer.</p>")
    manifest = read_json(run_dir / "critique" / "manifest.json") or {}
    leakage = (manifest.get("counts") or {}).get("few_shot_leakage")
    if leakage:
        shares = [f"{part['leaked']} of {part['n']} {what}" for key, what in
                  (("sft_targets", "SFT targets"), ("chosen", "chosen answers")) if (part := leakage.get(key))]
        body += (f"<p class='note'>Few-shot leakage: {esc(', '.join(shares))} repeat {esc(leakage['span_words'])} "
                 f"words in a row of a critique example's answer, critique or revision (a revision that does is "
                 f"not kept: 'leaked').</p>")
    body += "<p>A sample:</p>"
    for record in kept[:SAMPLE_CHAINS]:
        chain = (f"<div class='chain'><h4>Prompt</h4>{text_block(record['prompt'])}"
                 f"<h4>Initial answer</h4>{text_block(record['initial_response'])}")
        for step in record["rounds"]:
            state = "" if step.get("kept") else " dropped"
            reason = f": {esc(step['dropped'])}" if step.get("dropped") else ""
            tag = "" if step.get("kept") else f"<span class='tag warn'>dropped{reason}</span>"
            critique = (f"<p class='note'>{esc(step['critique_request'])}</p>"
                        f"<h4>Critique</h4>{text_block(step.get('critique'))}" if step.get("critique_request") else "")
            chain += (f"<div class='round{state}'><h4>Round {esc(step.get('round', ''))} "
                      f"<span class='tag'>{esc(step.get('principle', ''))}</span>{tag}</h4>{critique}"
                      f"<h4>Revision</h4>{text_block(step.get('revision'))}</div>")
        chain += f"<h4>Final revision (the SFT target)</h4>{text_block(record['final_revision'])}</div>"
        body += chain
    return body


def flatten(prefix: str, value) -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in flatten(f"{prefix}.{k}" if prefix else str(k), v)]
    return [(prefix, value)]


def reward_section(run_dir: Path) -> str:
    metrics = read_json(run_dir / "reward" / "metrics.json")
    if metrics is None:
        return missing("The reward stage has not run (no reward/metrics.json).")
    body = ""
    before, after = metrics.get("before"), metrics.get("after")
    if isinstance(before, dict) and isinstance(after, dict):  # preference accuracy before and after training
        rows = []
        for split in sorted(set(before) | set(after), key=lambda s: (s != "held_out", s)):
            b, a = before.get(split) or {}, after.get(split) or {}
            if not isinstance(b, dict) or not isinstance(a, dict) or not (a or b):
                continue
            rows.append([f"<td>{esc(split.replace('_', '-'))}</td>", td(a.get("pairs", b.get("pairs"))),
                         td(b.get("accuracy"), percent=True), td(a.get("accuracy"), percent=True),
                         td(b.get("margin")), td(a.get("margin")), td(b.get("loss")), td(a.get("loss"))])
        if rows:
            body += ("<p class='note'>Accuracy: share of preference pairs where the preferred answer scores "
                     "higher. Margin: mean score difference, preferred minus other.</p>"
                     + table(["Pairs", "Count", "Accuracy before", "Accuracy after", "Margin before",
                              "Margin after", "Loss before", "Loss after"], rows))
    rest = [(k, v) for k, v in flatten("", {k: v for k, v in metrics.items() if k not in ("before", "after")})
            if not isinstance(v, list)]
    rows = [[f"<td>{esc(k)}</td>", td(v) if v is None or isinstance(v, (int, float)) else f"<td>{esc(v)}</td>"]
            for k, v in rest]
    return body + (table(["Setting", "Value"], rows) if rows else "")


def label_section(run_dir: Path) -> str:
    prefs = read_jsonl(run_dir / "label" / "prefs.jsonl")
    if not prefs:
        return missing("The label stage has not run (no label/prefs.jsonl).")
    soft = [r["p_chosen"] for r in prefs if isinstance(r.get("p_chosen"), (int, float))]

    def disagree(row) -> bool | None:
        if "orders_disagree" in row:
            return bool(row["orders_disagree"])
        ab, ba = row.get("p_order_ab"), row.get("p_order_ba")
        if not isinstance(ab, (int, float)) or not isinstance(ba, (int, float)):
            return None
        return (ab - 0.5) * (ba - 0.5) < 0

    flags = [d for d in map(disagree, prefs) if d is not None]
    facts = [("Preference pairs", len(prefs)), ("Mean p_chosen", sum(soft) / len(soft) if soft else None),
             ("Share with p_chosen ≥ 0.6", sum(p >= 0.6 for p in soft) / len(soft) if soft else None),
             ("Orders disagree", sum(flags) / len(flags) if flags else None)]
    modes = sorted({str(r["mode"]) for r in prefs if r.get("mode")})
    judges = sorted({str(r["feedback_model"]) for r in prefs if r.get("feedback_model")})
    rows = [[f"<td>{esc(k)}</td>", td(v, percent=k.startswith(("Share", "Orders")))] for k, v in facts]
    body = table(["Soft labels", "Value"], rows)
    if modes or judges:
        body += (f"<p class='note'>Feedback model: {esc(', '.join(judges) or '?')}; "
                 f"mode: {esc(', '.join(modes) or '?')}.</p>")
    manifest = read_json(run_dir / "label" / "manifest.json") or {}
    body += degraded_scoring_note((manifest.get("counts") or {}).get("judge_scoring"))
    body += ("<p class='note'>p_chosen is the judge's probability that the chosen answer is better, both orders "
             "averaged; near 0.5 means the judge could hardly tell the answers apart. Orders disagree: the judge "
             "preferred different answers depending on which came first.</p>")
    if soft:
        def draw(figure):
            axes = figure.add_subplot()
            axes.hist(soft, bins=20, range=(0.5, 1.0), color="#4c78a8", edgecolor="white")
            axes.set_title("Soft labels (p_chosen)", fontsize=11)
            axes.set_xlabel("p_chosen")
            axes.set_ylabel("pairs")
            axes.grid(axis="y", alpha=.3)
        body += chart(draw, "p_chosen histogram", width=5.0, height=3.0)
    return body


def write_report(run_dir) -> Path:
    """Write RUN_DIR/report/index.html and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file, not a run folder" if run_dir.exists() else "no such folder"
        raise ValidationError([Problem(str(run_dir), None, f"{what} (cai report RUN_DIR: the run_dir of a config)")])
    if not any((run_dir / stage).is_dir() for stage in ORDER):  # refused before report/ is made
        raise ValidationError([Problem(str(run_dir), None, f"not a run folder: it holds no stage folder "
                                                           f"({', '.join(ORDER)}); cai report RUN_DIR takes the "
                                                           f"run_dir of a config that has run")])
    problems: list[Problem] = []

    def read(path: Path):
        try:
            return read_json(path)
        except ValidationError as err:
            problems.extend(err.problems)

    manifests = {s: read(run_dir / step_folder(s) / "manifest.json") for s in run_steps(run_dir)}
    manifests = {s: m for s, m in manifests.items() if m}
    results = read(run_dir / "evaluate" / "results.json")
    if problems:
        raise ValidationError(problems)
    builders = [
        ("summary", "Run", "*/manifest.json", lambda: summary_section(run_dir, manifests)),
        ("evaluation", "Evaluation on held-out prompts", "evaluate/results.json", lambda: evaluation_section(results)),
        ("answers", "Answers side by side", "evaluate/*.jsonl", lambda: answers_section(run_dir, results)),
        ("training", "Training curves", "*/log_history.json", lambda: training_section(run_dir)),
        ("critique", "Critique and revision chains", "critique/records.jsonl", lambda: critique_section(run_dir)),
        ("reward", "Reward model", "reward/metrics.json", lambda: reward_section(run_dir)),
        ("label", "AI feedback labels", "label/prefs.jsonl", lambda: label_section(run_dir)),
    ]
    sections = []
    for anchor, title, files, build in builders:
        # A run file with valid JSON but not the shape cai writes: name it, not a traceback.
        try:
            sections.append((anchor, title, build()))
        except ValidationError as err:
            problems.extend(err.problems)
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as err:
            problems.append(Problem(str(run_dir / files), None, f"not what cai writes ({type(err).__name__}: "
                                                                f"{str(err)[:200]}); the report cannot show it"))
    if problems:
        raise ValidationError(problems)
    nav = "".join(f"<a href='#{anchor}'>{esc(title)}</a>" for anchor, title, _ in sections)
    title = f"cai run report: {run_dir.resolve().name}"
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body><main><h1>{esc(title)}</h1>"
            f"<p class='subtitle'>Constitutional AI: critique and revision, AI feedback, reward model and "
            f"policy optimisation, each stage's model compared on held-out prompts.</p><nav>{nav}</nav>"
            + "".join(section(anchor, title, body) for anchor, title, body in sections)
            + "</main></body></html>\n")
    target = run_dir / "report" / "index.html"
    atomic_write_text(target, page)
    return target
