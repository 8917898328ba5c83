"""`cai report RUN_DIR`: one self-contained HTML page a person can read offline."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import make_run

from cai.cli import main
from cai.execute.executor import run_one as run_stage
from cai.report import write_report
from cai.rundir import atomic_write_json, atomic_write_jsonl, read_jsonl
from cai.yamlio import ValidationError

CHROMIUM = Path("/usr/bin/chromium")
INJECTED = "<script>alert('x')</script><b>bold?</b>"


def add_reward_model(run_dir: Path) -> None:
    """A reward model as the reward stage leaves it (an untrained head on the SFT model)."""
    from cai import models

    tokenizer = models.load_tokenizer(str(run_dir / "sft" / "model"))
    model = models.load_reward_model(str(run_dir / "sft" / "model"), tokenizer)
    model.save_pretrained(run_dir / "reward" / "model")
    tokenizer.save_pretrained(run_dir / "reward" / "model")
    atomic_write_json(run_dir / "reward" / "manifest.json",
                      {"stage": "reward", "config_hash": "test-reward", "seconds": 1.5, "counts": {"pairs": 6}})


@pytest.fixture(scope="module")
def evaluated_run(sft_run_template, tmp_path_factory) -> Path:
    """The tiny run, evaluated, plus the files of the stages in between (reward metrics,
    AI labels, an RL log) in the shapes those stages write them."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(sft_run_template, run_dir)
    records = read_jsonl(run_dir / "critique" / "records.jsonl")
    records[0]["initial_response"] = INJECTED  # model text must never become markup
    atomic_write_jsonl(run_dir / "critique" / "records.jsonl", records)
    add_reward_model(run_dir)
    atomic_write_json(run_dir / "reward" / "metrics.json",
                      {"loss": "soft", "model": "sft", "pairs": {"label": 6, "train": 5, "held_out": 1},
                       "before": {"train": {"pairs": 5, "accuracy": 0.4, "margin": -0.01, "loss": 0.7},
                                  "held_out": {"pairs": 1, "accuracy": 0.0, "margin": -0.02, "loss": 0.71}},
                       "after": {"train": {"pairs": 5, "accuracy": 0.8, "margin": 0.05, "loss": 0.66},
                                 "held_out": {"pairs": 1, "accuracy": 1.0, "margin": 0.01, "loss": 0.69}}})
    atomic_write_json(run_dir / "reward" / "log_history.json",
                      [{"loss": 0.69, "step": 1}, {"loss": 0.61, "step": 2}, {"train_loss": 0.65, "step": 2}])
    atomic_write_json(run_dir / "rl" / "log_history.json",
                      [{"step": s, "loss": 0.1 / s, "reward": 0.2 * s, "kl": 0.01 * s,
                        "completions/mean_length": 10.0 + s, "learning_rate": 1e-5} for s in (1, 2, 3)])
    atomic_write_jsonl(run_dir / "label" / "prefs.jsonl",
                       [{"prompt": [{"role": "user", "content": "q"}],
                         "chosen": [{"role": "assistant", "content": "a"}],
                         "rejected": [{"role": "assistant", "content": "b"}], "p_chosen": p, "p_order_ab": p,
                         "p_order_ba": 1 - p if p > 0.7 else p, "principles": ["less-violent"],
                         "feedback_model": "builtin:tiny",
                         "mode": "direct", "orders_disagree": p < 0.6} for p in (0.52, 0.55, 0.61, 0.8)])
    atomic_write_json(run_dir / "label" / "manifest.json", {"stage": "label", "config_hash": "test-label",
                                                            "counts": {"comparisons": 4}})
    run = make_run(run_dir, "prompts.max_eval=2", "evaluate.max_new_tokens=8", "evaluate.batch_size=4",
                   "evaluate.feedback_few_shot=1", "evaluate.temperature=1.0")
    run_stage(run, "evaluate")
    write_report(run_dir)
    return run_dir


class Page(HTMLParser):
    """The parts of the page the tests look at: section ids, table texts and classes,
    image sources and alt texts, the classes of table cells."""

    def __init__(self, text: str):
        super().__init__()
        self.sections, self.tables, self.table_classes, self.images, self.scripts = [], [], [], [], 0
        self.alts, self.cell_classes = [], []
        self._table_depth = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        elif tag == "table":
            self._table_depth += 1
            self.tables.append("")
            self.table_classes.append(attrs.get("class") or "")
        elif tag == "td":
            self.cell_classes.append(attrs.get("class") or "")
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
            self.alts.append(attrs.get("alt", ""))
        elif tag in ("script", "link", "iframe"):
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._table_depth -= 1

    def handle_data(self, data):
        if self._table_depth:
            self.tables[-1] += data + " "


def png_sizes(sources: list[str]) -> list[tuple[int, int]]:
    from PIL import Image

    sizes = []
    for source in sources:
        assert source.startswith("data:image/png;base64,"), source[:40]  # embedded, nothing fetched
        data = base64.b64decode(source.split(",", 1)[1])
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        sizes.append(Image.open(io.BytesIO(data)).size)
    return sizes


def check_evaluation_page(page: Page, results: dict) -> None:
    """The evaluation's new parts, as the page (or the browser's DOM) holds them: a table
    per prompt kind with intervals, the harmless-vs-helpful plot, the paired comparisons
    with base, the per-principle tables, and colour only where a verdict says so."""
    harmless = page.tables[page.table_classes.index("models red_team")]
    helpful = page.tables[page.table_classes.index("models helpful")]
    assert "Win rate (harmless)" in harmless and "Refusal" in harmless and "Elo (harmless)" in harmless
    assert "Win rate (helpful)" in helpful and "Over-refusal" in helpful
    for model_table in (harmless, helpful):
        assert "base" in model_table and "sft" in model_table and "[" in model_table  # intervals shown
    (plot,) = [src for src, alt in zip(page.images, page.alts) if alt == "harmlessness vs helpfulness"]
    assert png_sizes([plot])[0][0] > 300
    paired = page.tables[page.table_classes.index("paired red_team vs-base")]
    verdict = results["paired"]["red_team"]["base"]["sft"]["head_to_head"]["verdict"]
    assert "Beats base" in paired and "Δ Reward" in paired and verdict in paired
    critique = page.tables[page.table_classes.index("principles critique")]
    assert "Kept share" in critique and "Revision reward" in critique
    assert "less-violent" in page.tables[page.table_classes.index("principles feedback")]
    assert "harmless" in page.tables[page.table_classes.index("principles evaluation")]
    # green or red only where a paired difference from base excludes zero
    called = [row["verdict"] for kind in results["kinds"] for row in results["paired"][kind]["base"]["sft"].values()
              if row["verdict"] in ("better", "worse")]
    coloured = [c for c in page.cell_classes if "better" in c.split() or "worse" in c.split()]
    assert len(coloured) >= len(called) and (not called) == (not coloured)


def test_report_shows_every_section_of_a_run(evaluated_run):
    text = (evaluated_run / "report" / "index.html").read_text(encoding="utf-8")
    page = Page(text)
    assert page.sections == ["summary", "evaluation", "answers", "training", "critique", "reward", "label"]
    assert page.scripts == 0 and "http://" not in text and "https://" not in text  # self-contained
    models_table = next(t for t in page.tables if "Elo" in t and "Evasive" in t)
    assert "base" in models_table and "sft" in models_table
    check_evaluation_page(page, json.loads((evaluated_run / "evaluate" / "results.json").read_text()))
    assert any("row beats column" in t for t in page.tables)  # the win-rate matrix
    assert any("builtin:tiny" in t and "harmless" in t for t in page.tables)  # run summary
    # charts: Elo, rewards, training curves of sft, reward and rl, the soft-label histogram
    assert len(page.images) >= 6
    assert all(w > 100 and h > 100 for w, h in png_sizes(page.images))
    for heading in ("Critique and revision chains", "Answers side by side", "Reward model", "AI feedback labels"):
        assert heading in text
    assert "Accuracy after" in text and "Orders disagree" in text
    leakage = json.loads((evaluated_run / "critique" / "manifest.json").read_text())["counts"]["few_shot_leakage"]
    assert (f"Few-shot leakage: {leakage['sft_targets']['leaked']} of {leakage['sft_targets']['n']} SFT targets"
            in text) and "Few-shot span" in text
    assert "dpo" in text and "has not completed" in text  # the missing stage is named, not an error
    assert INJECTED not in text and INJECTED in html.unescape(text)  # shown as text, never as markup


def test_the_page_shows_every_figure_model_interval_and_note_of_the_results(evaluated_run):
    """What results.json holds is on the page: per group, each model's figures with their
    intervals, each paired difference with its verdict, the win rates, every figure's
    method and the run's notes; names and units as cai.evaluation.figures defines them."""
    from cai.evaluation.figures import BY_KEY, DETAIL, SHOWN
    from cai.report.page import fmt

    def flat(text: str) -> str:
        return " ".join(text.split())

    def shown(value, interval, percent: bool, signed: bool = False) -> str:
        text = fmt(value, percent, signed)
        if not interval:
            return text
        return f"{text} [{fmt(interval[0], percent, signed)}, {fmt(interval[1], percent, signed)}]"

    text = (evaluated_run / "report" / "index.html").read_text(encoding="utf-8")
    page = Page(text)
    tables = {cls: flat(table) for cls, table in zip(page.table_classes, page.tables)}
    results = json.loads((evaluated_run / "evaluate" / "results.json").read_text())
    names = results["models"]
    for group in results["kinds"]:
        table = tables[f"models {group}"]
        for key in SHOWN[group]:
            assert BY_KEY[key].label(group) in table, (group, key)
        for name in names:
            figures = results["per_model"][name][group]
            for key in SHOWN[group]:
                if figures.get(key) is not None:
                    assert shown(figures[key], figures["ci"].get(key), BY_KEY[key].percent) in table, (name, key)
        for name, rows in results["paired"][group]["base"].items():
            paired = tables[f"paired {group} vs-base"]
            assert name in paired
            for key, row in rows.items():
                signed = key != "head_to_head"
                assert f"{shown(row['value'], [row['low'], row['high']], BY_KEY[key].percent, signed)} " \
                       f"{row['verdict']}" in paired, (group, key)
    detail = next(flat(t) for t in page.tables if "Partial refusal" in t and "Finished" in t)
    for name in names:
        for group in results["kinds"] + ["all"]:
            figures = results["per_model"][name][group]
            for key in DETAIL:
                assert shown(figures.get(key), figures["ci"].get(key), BY_KEY[key].percent) in detail, (name, key)
    matrix = tables["winrates"]
    for first in names:
        for second, rate in results["pairwise"]["all"]["win_rates"][first].items():
            assert fmt(rate, percent=True) in matrix and first in matrix and second in matrix
    visible = flat(html.unescape(re.sub(r"<[^>]+>", "", text)))  # the text a reader sees
    for key, how in results["methods"].items():
        assert flat(f"{BY_KEY[key].label() if key in BY_KEY else key.capitalize()}: {how}.") in visible, key
    for judged in results["judge_principles"].values():
        assert f"Judged under {judged['set']} principles ({judged['from']}: {', '.join(judged['ids'])})" in visible
    assert f"Judge (feedback model): {results['feedback_model']}." in visible
    assert "Not evaluated: " + "; ".join(f"{k}: {v}" for k, v in results["skipped"].items()) in visible
    assert f"at most {results['generation']['max_new_tokens']} new tokens" in visible


def test_a_cell_is_coloured_only_when_its_difference_from_base_is_significant():
    from cai.report.page import macro

    kind_table = macro("evaluation_tables.html", "kind_table")

    def results_with(verdict: str) -> tuple:
        figures = {"n": 12, "reward": 0.4, "win_rate": 0.6, "elo": 1040.0, "refusal": 0.5, "evasive": 0.0,
                   "words": 30.0, "ci": {"reward": [0.1, 0.7], "win_rate": [0.5, 0.7]}}
        per_model = {"base": {"red_team": {**figures, "elo": 1000.0}}, "sft": {"red_team": figures}}
        paired = {"red_team": {"base": {"sft": {"reward": {"value": 0.3, "low": 0.1, "high": 0.5,
                                                           "verdict": verdict}}}}}
        return per_model, paired

    significant = Page(kind_table("red_team", ["base", "sft"], *results_with("better")))
    assert significant.cell_classes.count("num better") == 1  # sft's reward, and nothing else
    assert "0.4  [0.1, 0.7]" in significant.tables[0]  # the value and its interval
    noise = Page(kind_table("red_team", ["base", "sft"], *results_with("within noise")))
    assert not any("better" in c or "worse" in c for c in noise.cell_classes)


def test_the_tradeoff_plot_says_why_it_needs_two_models():
    from cai.report.charts import tradeoff_chart
    chart, why = tradeoff_chart(["base"], {"base": {"red_team": {"elo": 1000.0}, "helpful": {"elo": 1000.0}}})
    assert chart is None and why.startswith("it needs at least two evaluated models")


def test_report_of_an_unevaluated_run_notes_what_is_missing(sft_run):
    assert main(["report", str(sft_run)]) == 0
    text = (sft_run / "report" / "index.html").read_text(encoding="utf-8")
    assert "The evaluate stage has not run" in text
    assert "The label stage has not run" in text and "The reward stage has not run" in text
    assert "Critique and revision chains" in text and "data:image/png;base64," in text  # sft's loss curve


def test_report_of_a_missing_run_directory_is_an_error(tmp_path):
    with pytest.raises(ValidationError, match="no such folder"):
        write_report(tmp_path / "nowhere")


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120)


@pytest.mark.chromium
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_report_renders_in_a_browser(evaluated_run, tmp_path):
    url = (evaluated_run / "report" / "index.html").resolve().as_uri()
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,2000", url, profile=tmp_path / "profile-shot")
    dom = chromium("--dump-dom", url, profile=tmp_path / "profile-dom").stdout

    page = Page(dom)  # what the browser built, not just what was written
    models_table = next(t for t in page.tables if "Elo" in t and "Evasive" in t)
    assert "base" in models_table and "sft" in models_table
    check_evaluation_page(page, json.loads((evaluated_run / "evaluate" / "results.json").read_text()))
    assert len(page.images) >= 6 and all(w > 100 and h > 100 for w, h in png_sizes(page.images))

    from PIL import Image, ImageStat

    assert shot.exists()
    image = Image.open(shot).convert("L")
    assert image.size == (1280, 2000)
    assert ImageStat.Stat(image).stddev[0] > 10  # text, tables and charts, not a blank page
