"""The report page: each section's facts read from the run directory, then rendered by its
template (`templates/SECTION.html`, autoescaped: model text never becomes markup) into
`templates/page.html` with `style.css` inline."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from importlib import resources
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined, UndefinedError, select_autoescape
from markupsafe import Markup

from cai.evaluation.figures import BY_KEY, DETAIL, KIND_NAMES, MEASURES, PRINCIPLE_SETS, SHOWN
from cai.registry import ORDER, TRAINING_STAGES, step_folder
from cai.report.charts import bar_chart, curves_chart, histogram, round_traces, tradeoff_chart
from cai.rundir import atomic_write_text, folder_steps, read_jsonl, step_state
from cai.stats import ANCHOR_ELO, MIN_PROMPTS, TOO_FEW
from cai.work import stage_rows
from cai.yamlio import Problem, ValidationError

CURVE_WORDS = ("loss", "reward", "score", "kl", "length")  # log-history keys worth a curve
MAX_CURVES = 9  # panels per stage
SAMPLE_PROMPTS = 3  # held-out prompts per kind shown side by side
SAMPLE_CHAINS = 3  # critique chains shown
MAX_CHARS = 1500  # longer model text is cut, with a mark
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # invalid in HTML; tiny models emit them
KIND_TITLES = {kind: f"{measure.capitalize()} on {KIND_NAMES[kind]} prompts" for kind, measure in MEASURES.items()}
# A verdict colours a cell only when the interval excludes no difference (cai.stats).
RUN_SUBTITLE = ("Constitutional AI: critique and revision, AI feedback, reward model and policy optimisation, each "
                "stage's model compared on held-out prompts.")
VERDICT_CLASS = {"better": "better", "worse": "worse", "within noise": "noise"}


# ---------------------------------------------------------------- formatting (plain text: templates escape it)


def fmt(value, percent: bool = False, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if percent:
            text = f"{100 * value:.1f} %"
        elif isinstance(value, int):
            text = f"{value:,}"
        else:
            text = f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
        return f"+{text}" if signed and value > 0 else text
    return str(value)


def model_text(value: str | None) -> str:
    """Model text as it can stand in HTML: control characters replaced (escaping is the template's)."""
    return CONTROL.sub("\ufffd", value or "")


def kind_columns(group: str) -> list[tuple[str, str, bool]]:
    """(figure, column title, percent) of the figures a group's table shows."""
    return [(key, title(key, group), BY_KEY[key].percent) for key in SHOWN[group.split("/")[0]]]


def title(key: str, group: str) -> str:
    """A figure's column title on a group: a judged figure names the principles it was judged under."""
    figure, kind = BY_KEY[key], group.split("/")[0]
    if figure.judged and kind in PRINCIPLE_SETS:
        return f"{figure.label(group)} ({PRINCIPLE_SETS[kind]})"
    return figure.label(group)


ENVIRONMENT = Environment(loader=PackageLoader("cai.report", "templates"), autoescape=select_autoescape(["html"]),
                          undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
ENVIRONMENT.filters.update(
    fmt=fmt, model_text=model_text, figure_label=lambda key: BY_KEY[key].label(),
    paired_title=lambda column: column[1] if column[0] == "head_to_head" else f"Δ {column[1]}",
    first_wins_title=lambda kind: f"First wins ({KIND_NAMES.get(kind, kind)})")
ENVIRONMENT.globals.update(MIN_PROMPTS=MIN_PROMPTS, TOO_FEW=TOO_FEW,
                           MAX_CHARS=MAX_CHARS, VERDICT_CLASS=VERDICT_CLASS, KIND_NAMES=KIND_NAMES,
                           KIND_TITLES=KIND_TITLES, FIGURE=BY_KEY, DETAIL=DETAIL, kind_columns=kind_columns)


def render(template: str, **facts) -> Markup:
    return Markup(ENVIRONMENT.get_template(template).render(**facts))


def macro(template: str, name: str):
    """A template's macro as a Python function returning HTML (the tests render one table)."""
    return getattr(ENVIRONMENT.get_template(template).module, name)


# ---------------------------------------------------------------- reading the run


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


# ---------------------------------------------------------------- sections


def summary_section(run_dir: Path, manifests: dict) -> Markup:
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
    stages, work = [], {row["step"]: row for row in stage_rows(manifests)}
    for name in folder_steps(run_dir):
        manifest = manifests.get(name)
        if manifest:
            counts = [(k, v) for k, v in (manifest.get("counts") or {}).items() if not isinstance(v, (dict, list))]
            state, redone = step_state(run_dir, name)
            status = f"stale: {', '.join(redone)} redone after it" if redone else state
            stages.append({"name": name, "status": status, "started": manifest.get("started", ""),
                           "seconds": manifest.get("seconds"), "counts": counts, **work[name]})
        elif step_state(run_dir, name)[0] == "partial":
            stages.append({"name": name, "status": "interrupted / running", "started": "", "seconds": None,
                           "counts": [], "threads": None, "tflop": None, "share_of_peak": None,
                           "padding_share": None})
    absent = [s for s in folder_steps(run_dir) if step_state(run_dir, s)[0] == "pending"]
    return render("summary.html", facts=[(k, v) for k, v in facts if v not in (None, "")], stages=stages,
                  total=sum(m.get("seconds") or 0 for m in manifests.values() if m), completed=len(manifests),
                  absent=absent)


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


def training_section(run_dir: Path) -> Markup:
    stages, not_run = [], []
    for stage in folder_steps(run_dir, TRAINING_STAGES):
        history = read_json(run_dir / step_folder(stage) / "log_history.json", list)
        if not history:
            not_run.append(stage)
            continue
        keys = curve_keys(history)
        steps_done = max((e.get("step") for e in history if isinstance(e.get("step"), (int, float))), default=0)
        stages.append({"name": stage, "entries": len(history), "steps": steps_done,
                       "chart": curves_chart(history, keys) if keys else None})
    return render("training.html", stages=stages, not_run=not_run)


def evaluation_section(results: dict | None) -> Markup:
    if not results:
        return render("evaluation.html", results=None)
    names, per_model = results["models"], results["per_model"]
    kinds = results.get("kinds", [])
    sets = results.get("sets") or {}
    elo_charts, reward_charts = [], []
    for kind in kinds:
        intervals = {figure: {n: (per_model[n][kind].get("ci") or {}).get(figure) for n in names}
                     for figure in ("elo", "reward")}
        elo = {n: per_model[n][kind].get("elo") for n in names}
        if len(names) > 1 and all(isinstance(v, (int, float)) for v in elo.values()):
            title_ = f"{BY_KEY['elo'].label()} ({KIND_NAMES.get(kind, kind)})"
            elo_charts.append((title_, bar_chart(title_, elo, BY_KEY["elo"].unit, baseline=ANCHOR_ELO,
                                                        intervals=intervals["elo"])))
        rewards = {n: per_model[n][kind]["reward"] for n in names}
        if all(isinstance(v, (int, float)) for v in rewards.values()):
            title_ = f"Mean reward ({KIND_NAMES.get(kind, kind)})"
            reward_charts.append((title_, bar_chart(title_, rewards, BY_KEY["reward"].unit,
                                                           intervals=intervals["reward"])))
    pairwise = results["pairwise"]
    by_kind = {k: {(p["first"], p["second"]): p for p in pairwise[k]["pairs"]} for k in kinds}
    tradeoff, tradeoff_missing = tradeoff_chart(names, per_model)
    return render("evaluation.html", results=results, names=names, per_model=per_model, kinds=kinds,
                  paired=results.get("paired") or {}, pairwise=pairwise, by_kind=by_kind,
                  groups=[g for kind in kinds for g in [kind, *(s for s in sets if s.startswith(kind + "/"))]],
                  overlap={k: n for k, n in (results.get("prompts_in_training") or {}).items() if n},
                  tradeoff=tradeoff, tradeoff_missing=tradeoff_missing, traces=round_traces(names),
                  charts=elo_charts + reward_charts)


def answers_section(run_dir: Path, results: dict | None) -> Markup:
    generations = read_jsonl(run_dir / "evaluate" / "generations.jsonl")
    if not generations:
        return render("answers.html", kinds=None)
    names = results["models"] if results else list(dict.fromkeys(r["model"] for r in generations))
    rewards = {(r["model"], r["id"]): r["reward"] for r in read_jsonl(run_dir / "evaluate" / "rewards.jsonl")}
    answer = {(r["model"], r["id"]): r for r in generations}
    kinds = []
    for kind in ("red_team", "helpful"):
        prompts = list(dict.fromkeys((r["id"], r["prompt"]) for r in generations if r["kind"] == kind))
        if prompts:
            rows = [{"prompt": prompt, "answers": [{"response": (answer.get((name, prompt_id)) or {}).get("response"),
                                                    "reward": rewards.get((name, prompt_id))} for name in names]}
                    for prompt_id, prompt in prompts[:SAMPLE_PROMPTS]]
            kinds.append({"title": f"{KIND_NAMES[kind].capitalize()} prompts", "rows": rows})
    return render("answers.html", kinds=kinds, names=names)


def critique_section(run_dir: Path) -> Markup:
    records = read_jsonl(run_dir / "critique" / "records.jsonl")
    if not records:
        return render("critique.html", records=None)
    rounds = [x for r in records for x in r.get("rounds", [])]
    reasons = Counter(x.get("dropped") or "reason not recorded" for x in rounds if not x.get("kept"))
    manifest = read_json(run_dir / "critique" / "manifest.json") or {}
    leakage = (manifest.get("counts") or {}).get("few_shot_leakage")
    shares = [f"{part['leaked']} of {part['n']} {what}" for key, what in
              (("sft_targets", "SFT targets"), ("chosen", "chosen answers")) if (part := (leakage or {}).get(key))]
    return render("critique.html", records=records, rounds=rounds, not_kept=sum(reasons.values()),
                  why=", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())),
                  dropped=sum(1 for r in records if r.get("dropped")), leakage=leakage, shares=shares,
                  chains=[r for r in records if not r.get("dropped") and r.get("rounds")][:SAMPLE_CHAINS])


def flatten(prefix: str, value) -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in flatten(f"{prefix}.{k}" if prefix else str(k), v)]
    return [(prefix, value)]


def reward_section(run_dir: Path) -> Markup:
    metrics = read_json(run_dir / "reward" / "metrics.json")
    if metrics is None:
        return render("reward.html", metrics=None)
    splits = []
    before, after = metrics.get("before"), metrics.get("after")
    if isinstance(before, dict) and isinstance(after, dict):  # preference accuracy before and after training
        for split in sorted(set(before) | set(after), key=lambda s: (s != "held_out", s)):
            b, a = before.get(split) or {}, after.get(split) or {}
            if isinstance(b, dict) and isinstance(a, dict) and (a or b):
                splits.append({"name": split.replace("_", "-"), "before": b, "after": a,
                               "pairs": a.get("pairs", b.get("pairs"))})
    rest = [(k, v) for k, v in flatten("", {k: v for k, v in metrics.items() if k not in ("before", "after")})
            if not isinstance(v, list)]
    return render("reward.html", metrics=metrics, splits=splits, rest=rest)


def label_section(run_dir: Path) -> Markup:
    prefs = read_jsonl(run_dir / "label" / "prefs.jsonl")
    if not prefs:
        return render("label.html", prefs=None)
    soft = [r["p_chosen"] for r in prefs if isinstance(r.get("p_chosen"), (int, float))]

    def disagree(row) -> bool | None:
        if "orders_disagree" in row:
            return bool(row["orders_disagree"])
        ab, ba = row.get("p_order_ab"), row.get("p_order_ba")
        if not isinstance(ab, (int, float)) or not isinstance(ba, (int, float)):
            return None
        return (ab - 0.5) * (ba - 0.5) < 0

    flags = [d for d in map(disagree, prefs) if d is not None]
    facts = [("Preference pairs", len(prefs), False), ("Mean p_chosen", sum(soft) / len(soft) if soft else None, False),
             ("Share with p_chosen ≥ 0.6", sum(p >= 0.6 for p in soft) / len(soft) if soft else None, True),
             ("Orders disagree", sum(flags) / len(flags) if flags else None, True)]
    manifest = read_json(run_dir / "label" / "manifest.json") or {}
    return render("label.html", prefs=prefs, facts=facts,
                  modes=sorted({str(r["mode"]) for r in prefs if r.get("mode")}),
                  judges=sorted({str(r["feedback_model"]) for r in prefs if r.get("feedback_model")}),
                  scoring=(manifest.get("counts") or {}).get("judge_scoring"),
                  histogram=histogram(soft, "Soft labels (p_chosen)", "p_chosen", "pairs", (0.5, 1.0))
                  if soft else None)


SECTIONS = (  # (anchor, title, the files it reads: named when they are not what cai writes)
    ("summary", "Run", "*/manifest.json"),
    ("evaluation", "Evaluation on held-out prompts", "evaluate/results.json"),
    ("answers", "Answers side by side", "evaluate/*.jsonl"),
    ("training", "Training curves", "*/log_history.json"),
    ("critique", "Critique and revision chains", "critique/records.jsonl"),
    ("reward", "Reward model", "reward/metrics.json"),
    ("label", "AI feedback labels", "label/prefs.jsonl"),
)


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

    manifests = {s: read(run_dir / step_folder(s) / "manifest.json") for s in folder_steps(run_dir)}
    manifests = {s: m for s, m in manifests.items() if m}
    results = read(run_dir / "evaluate" / "results.json")
    if problems:
        raise ValidationError(problems)
    builders = {"summary": lambda: summary_section(run_dir, manifests),
                "evaluation": lambda: evaluation_section(results),
                "answers": lambda: answers_section(run_dir, results),
                "training": lambda: training_section(run_dir),
                "critique": lambda: critique_section(run_dir),
                "reward": lambda: reward_section(run_dir),
                "label": lambda: label_section(run_dir)}
    sections = []
    for anchor, title_, files in SECTIONS:
        # A run file with valid JSON but not the shape cai writes: name it, not a traceback.
        try:
            sections.append({"anchor": anchor, "title": title_, "body": builders[anchor]()})
        except ValidationError as err:
            problems.extend(err.problems)
        except (KeyError, TypeError, AttributeError, IndexError, ValueError, UndefinedError) as err:
            problems.append(Problem(str(run_dir / files), None, f"not what cai writes ({type(err).__name__}: "
                                                                f"{str(err)[:200]}); the report cannot show it"))
    if problems:
        raise ValidationError(problems)
    style = resources.files("cai.report").joinpath("style.css").read_text(encoding="utf-8")
    page = ENVIRONMENT.get_template("page.html").render(title=f"cai run report: {run_dir.resolve().name}",
                                                        sections=sections, style=Markup(style), subtitle=RUN_SUBTITLE)
    target = run_dir / "report" / "index.html"
    atomic_write_text(target, page)
    return target


# ---------------------------------------------------------------- cai compare


def figure_columns(group: str, pairs: dict) -> list[tuple[str, str, bool]]:
    """(figure, title, percent) of the figures any model has in a comparison's group: the
    judge's verdict against base first, then the figures the group's table shows."""
    present = {figure for rows in pairs.values() for figure in rows}
    keys = ["head_to_head"] + [k for k in SHOWN[group.split("/")[0]] if k != "head_to_head"] + ["tokens"]
    return [(key, "Beats base (judge)" if key == "head_to_head" else title(key, group), BY_KEY[key].percent)
            for key in dict.fromkeys(keys) if key in present]


def write_comparison(out_dir, result: dict) -> Path:
    """Write OUT_DIR/index.html: `cai compare`'s page, in the report's style."""
    style = resources.files("cai.report").joinpath("style.css").read_text(encoding="utf-8")
    names = ", ".join(run["name"] for run in result["runs"])
    body = render("compare.html", result=result, figure_columns=figure_columns)
    page = ENVIRONMENT.get_template("page.html").render(
        title=f"cai compare: {names}", sections=[{"anchor": "compare", "title": "Runs compared", "body": body}],
        style=Markup(style), subtitle="Runs compared on the prompts they share: what else differs, what the "
                                      "constitution changes, and every figure as a paired difference.")
    target = Path(out_dir) / "index.html"
    atomic_write_text(target, page)
    return target
