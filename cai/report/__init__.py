"""`cai report RUN_DIR`: one self-contained HTML page about a run.

The page reads offline: the stylesheet (`style.css`) is inline and every chart
(`charts`) is a PNG drawn with matplotlib's Agg canvas and embedded as a base64 data
URI. It shows what the run directory holds: the run summary and stage timings, training
curves from each stage's log history, the evaluation tables, each stage's answers to the
same held-out prompts side by side, critique-and-revision chains, the reward model's
metrics and the AI labels. A stage that has not run is left out with a note. The page is
Jinja2 templates (`templates/`) with autoescape: all model text is HTML-escaped.
Figure names and units come from `cai.evaluation.figures`, as the console summary's do.
"""

from cai.report.page import write_report

__all__ = ["write_report"]
