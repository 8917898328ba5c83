"""The report's charts: PNGs drawn with matplotlib's Agg canvas, returned as base64 data
URIs, so the page reads offline (the templates put each in an <img>)."""

from __future__ import annotations

import base64
import io
import math

from cai.evaluation.figures import KIND_NAMES
from cai.registry import POLICY_STAGES, ROUND_STAGES, split_step
from cai.stats import ANCHOR_ELO

COLOURS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d"]


def png(draw, width: float = 5.6, height: float = 3.2) -> str:
    """Draw on a fresh matplotlib Figure (Agg canvas) and return it as a data URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    draw(figure)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


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
        bars = axes.bar(names, [values[n] - bottom for n in names], bottom=bottom, color=COLOURS[0],
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
    return png(draw, width=3.6, height=2.8)


def curves_chart(history: list[dict], keys: list[str]) -> str:
    """One panel per log key over the training steps."""
    from matplotlib.ticker import MaxNLocator

    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)

    def draw(figure):
        for index, key in enumerate(keys):
            axes = figure.add_subplot(rows, columns, index + 1)
            points = [(entry.get("step", i), entry[key]) for i, entry in enumerate(history)
                      if isinstance(entry.get(key), (int, float))]
            xs, ys = zip(*points)
            axes.plot(xs, ys, marker="o" if len(points) < 20 else None, markersize=3, color=COLOURS[0])
            axes.set_title(key, fontsize=9)
            axes.tick_params(labelsize=8)
            axes.grid(alpha=.3)
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            if index >= len(keys) - columns:
                axes.set_xlabel("step", fontsize=8)
    return png(draw, width=3.8 * columns, height=2.6 * rows + 0.3)


def histogram(values: list[float], title: str, xlabel: str, ylabel: str, value_range: tuple[float, float]) -> str:
    def draw(figure):
        axes = figure.add_subplot()
        axes.hist(values, bins=20, range=value_range, color=COLOURS[0], edgecolor="white")
        axes.set_title(title, fontsize=11)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.grid(axis="y", alpha=.3)
    return png(draw, width=5.0, height=3.0)


def round_traces(names: list[str]) -> list[list[str]]:
    """With rounds, each optimiser's path through them: sft, rl@1, rl@2, ... (when evaluated)."""
    traces = []
    for stage in (s for s in POLICY_STAGES if s in ROUND_STAGES):
        rounds = sorted((split_step(n)[1], n) for n in names if split_step(n)[0] == stage and split_step(n)[1])
        if len(rounds) > 1:
            traces.append((["sft"] if "sft" in names else []) + [n for _, n in rounds])
    return traces


def tradeoff_chart(names: list[str], per_model: dict) -> tuple[str | None, str | None]:
    """The paper's picture (Bai et al. 2022, figures 2 and 8): harmlessness Elo on red-team
    prompts against helpfulness Elo on helpful prompts, with 95 % intervals on both axes;
    with rounds, a line traces each optimiser from sft through its rounds (the paper's
    curves over training). (the chart, None) or, when it cannot be drawn, (None, why):
    it needs both Elos for at least two models."""
    if len(names) < 2:
        return None, "it needs at least two evaluated models (each model's Elo is measured against the others)"
    without = [kind for kind in ("red_team", "helpful")
               if any(not isinstance(per_model[n].get(kind, {}).get("elo"), (int, float)) for n in names)]
    if without:
        words = " and ".join(f"all {KIND_NAMES[kind]} prompts" for kind in without)
        return None, (f"it plots each model's Elo on all red-team prompts against its Elo on all helpful prompts, and "
                      f"the judge did not compare the models on {words} (evaluate.win_rates: false, or "
                      f"evaluate.judge_prompts leaving some of them out; a judged set's Elo is in its table)")
    points = {}
    for name in names:
        x, y = per_model[name]["helpful"], per_model[name]["red_team"]
        points[name] = (x["elo"], (x.get("ci") or {}).get("elo"), y["elo"], (y.get("ci") or {}).get("elo"))

    def spread(value, interval):
        return [[max(value - interval[0], 0)], [max(interval[1] - value, 0)]] if interval else None

    def draw(figure):
        axes = figure.add_subplot()
        for k, (name, (x, x_ci, y, y_ci)) in enumerate(points.items()):
            colour = COLOURS[k % len(COLOURS)]
            axes.errorbar([x], [y], xerr=spread(x, x_ci), yerr=spread(y, y_ci), fmt="o", color=colour,
                          ecolor=colour, capsize=4, markersize=7, label=name)
            axes.annotate(name, (x, y), textcoords="offset points", xytext=(7, 6), fontsize=9)
        for trace in round_traces(list(points)):
            xs, ys = [points[n][0] for n in trace], [points[n][2] for n in trace]
            axes.plot(xs, ys, color="#555", linewidth=1, alpha=.7, zorder=0,
                      label=f"rounds of {split_step(trace[-1])[0]}")
        axes.axhline(ANCHOR_ELO, color="#888", linewidth=1, linestyle="--")
        axes.axvline(ANCHOR_ELO, color="#888", linewidth=1, linestyle="--")
        axes.set_xlabel("helpfulness Elo (helpful prompts)")
        axes.set_ylabel("harmlessness Elo (red-team prompts)")
        axes.set_title("Harmlessness vs helpfulness, 95 % intervals", fontsize=11)
        axes.grid(alpha=.3)
        axes.margins(0.2)
    return png(draw, width=5.6, height=4.4), None
