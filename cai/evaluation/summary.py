"""The evaluation in a few console lines: each figure with its interval, then each model
against base (what is better or worse, and what is within noise). A group of fewer than
`MIN_PROMPTS` prompts gets its figures alone: with no verdict to give, its intervals and
comparisons are left to the report. Names and units come from `cai.evaluation.figures`,
as the report's do.
"""

from __future__ import annotations

from cai.evaluation.figures import BY_KEY, KIND_NAMES, MEASURES, SHOWN
from cai.registry import PROMPTED_BASE
from cai.stats import MIN_PROMPTS, TOO_FEW


def show(value, figure: str) -> str:
    """A figure's value, terse: a share in percent, Elo in whole points, others to 2 decimals."""
    if value is None:
        return "-"
    if BY_KEY[figure].percent:
        return f"{100 * value:.0f}%"
    return f"{value:.0f}" if figure == "elo" else f"{value:.2f}"


def show_difference(value: float, figure: str) -> str:
    """A difference of a figure: of a share in percentage points."""
    if BY_KEY[figure].percent:
        return f"{100 * value:+.0f}pt"
    return f"{value:+.0f}" if figure == "elo" else f"{value:+.2f}"


def format_summary(results: dict) -> str:
    """`results.json` in a few lines, group by group (each kind, then its prompt sets)."""
    lines = []
    width = max(8, *(len(name) for name in results["models"]))
    groups = [g for kind in results["kinds"] for g in [kind, *(s for s in results.get("sets", {})
                                                               if s.startswith(kind + "/"))]]
    for group in groups:
        kind = group.split("/")[0]
        title = f"{MEASURES[kind]}, {KIND_NAMES[kind]} prompts"
        title = f"{title}: {group}" if group != kind else title
        n = results["prompts"][group]
        few = n < MIN_PROMPTS
        lines.append(f"{title} ({n}), {TOO_FEW}: verdicts need at least {MIN_PROMPTS} prompts (intervals and "
                     f"comparisons: see the report):" if few else f"{title} ({n}), 95% intervals:")
        for name in results["models"]:
            figures = results["per_model"][name][group]
            shown = []
            for figure in SHOWN[kind]:
                if figures.get(figure) is None:
                    continue
                low, high = figures["ci"].get(figure, (None, None))
                interval = f" [{show(low, figure)}, {show(high, figure)}]" if low is not None and not few else ""
                shown.append(f"{BY_KEY[figure].console(group)} {show(figures[figure], figure)}{interval}")
            lines.append(f"  {name:<{width}} " + "; ".join(shown))
        # against base, and against the prompted baseline: did training beat prompting?
        against = [(reference, name, rows) for reference in ("base", PROMPTED_BASE)
                   for name, rows in results["paired"][group].get(reference, {}).items()
                   if reference == "base" or name != "base"] if not few else []
        for reference, name, rows in against:
            calls = []
            for figure in ("head_to_head",) + SHOWN[kind]:
                if figure in rows:
                    row = rows[figure]
                    shown = [show(row[key], figure) if figure == "head_to_head" else show_difference(row[key], figure)
                             for key in ("value", "low", "high")]
                    calls.append(f"{BY_KEY[figure].console(group)} {shown[0]} [{shown[1]}, {shown[2]}] "
                                 f"{row['verdict']}")
            if calls:
                lines.append(f"  {name} vs {reference}: " + "; ".join(calls))
    return "\n".join(lines)
