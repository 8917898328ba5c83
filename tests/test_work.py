"""Utilisation per stage: the work a stage's models do, counted where they do it (the
engine, the trainers), as a rate and a share of the machine's matmul peak, with the
share of padding, in each manifest, the step's last line, the report and a bench."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import CONVERSATIONS, ROOT, make_run

from cai import models
from cai.engines import Sampling
from cai.engines.hf import TransformersEngine
from cai.execute.measure import utilisation_words
from cai.work import Work, matmul_parameters, stage_rows, training_flop_per_token


def tiny_engine(batch_size: int = 2) -> TransformersEngine:
    engine = TransformersEngine.from_spec(models.TINY, "cpu", batch_size)
    engine.work = Work()
    return engine


def test_matmul_parameters_count_linear_weights_once_and_the_training_rule():
    engine = tiny_engine()
    model = engine.model
    linear = {id(p): p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
              for p in m.parameters(recurse=False)}
    assert matmul_parameters(model) == sum(linear.values()) < sum(p.numel() for p in model.parameters()) + 1
    n = matmul_parameters(model)
    assert training_flop_per_token(model, recomputed=False) == 6 * n  # every weight trains
    assert training_flop_per_token(model, recomputed=True) == 8 * n  # the x 4/3
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    assert training_flop_per_token(model, recomputed=False) == 4 * n  # an adapter's base: no weight gradients


def test_generation_counts_prompt_and_generated_tokens_and_the_padding():
    engine = tiny_engine(batch_size=2)
    prompts = [engine.render(c) for c in CONVERSATIONS]
    completions = engine.generate(CONVERSATIONS, Sampling(max_new_tokens=6, temperature=0.0), seed=0)
    kinds = engine.work.kinds
    shared = engine.shared_length(prompts)
    # every prompt token computed once: the shared prefix once, each row's rest in its batch
    assert kinds["prefill"]["tokens"] == sum(map(len, prompts)) - shared * (len(prompts) - 1)
    assert kinds["decode"]["tokens"] == sum(c.num_tokens + c.finished for c in completions)  # EOS included
    assert kinds["decode"]["tokens"] <= kinds["decode"]["positions"] <= len(prompts) * 6
    # three prompts of different lengths in batches of two: the first batch's shorter row is left-padded
    assert kinds["prefill"]["positions"] > kinds["prefill"]["tokens"]
    flop = 2 * matmul_parameters(engine.model)
    assert kinds["prefill"]["flop"] == kinds["prefill"]["tokens"] * flop
    record = engine.work.record(2.0, 1e9, "probe")
    tokens = sum(k["tokens"] for k in kinds.values())
    positions = sum(k["positions"] for k in kinds.values())
    assert record["flop"] == tokens * flop and record["flop_per_second"] == tokens * flop / 2.0
    assert record["share_of_peak"] == round(tokens * flop / 2.0 / 1e9, 4)
    assert record["padding_share"] == round(1 - tokens / positions, 4) and 0 < record["padding_share"] < 1


def test_option_scoring_counts_scored_tokens():
    engine = tiny_engine(batch_size=8)
    questions = [c + [{"role": "assistant", "content": "("}] for c in CONVERSATIONS]
    rows = [engine.render(q[:-1], prefill="(") for q in questions]
    engine.score_options(questions)
    shared = engine.shared_length(rows)
    assert set(engine.work.kinds) == {"score"}
    assert engine.work.kinds["score"]["tokens"] == sum(map(len, rows)) - shared * (len(rows) - 1)
    assert engine.work.kinds["score"]["positions"] == len(rows) * max(map(len, rows)) - shared * (len(rows) - 1)


def test_a_stage_without_model_work_records_none(tmp_path):
    from cai.execute.measure import Measurement

    record = Measurement(make_run(tmp_path / "run")).stop(Work())  # a stage whose models are servers
    assert "work" not in record and utilisation_words(record) == ""


def test_each_stage_records_its_work_and_the_report_and_bench_show_it(sft_run):
    critique = json.loads((sft_run / "critique" / "manifest.json").read_text())
    sft = json.loads((sft_run / "sft" / "manifest.json").read_text())
    assert {"prefill", "decode"} <= set(critique["work"]["by_kind"])
    for manifest in (critique, sft):
        work = manifest["work"]
        assert work["peak"] == "fp32 matmul probe, 1 thread" and work["peak_flop_per_second"] > 0
        assert 0 < work["share_of_peak"] == round(work["flop_per_second"] / work["peak_flop_per_second"], 4)
        assert 0 <= work["padding_share"] < 1
    train = sft["work"]["by_kind"]["train"]
    # the trained tokens are TRL's own count of them (SFTTrainer's num_tokens), each worth 6·N
    history = json.loads((sft_run / "sft" / "log_history.json").read_text())
    assert train["tokens"] == max(h["num_tokens"] for h in history if "num_tokens" in h)
    n = matmul_parameters(models.load_causal_lm(str(sft_run / "sft" / "model"), "cpu"))
    assert train["flop"] == 6 * n * train["tokens"] and train["positions"] >= train["tokens"]
    share = round(100 * sft["work"]["share_of_peak"])
    assert f"at {share} % of the matmul peak (1 thread), " in utilisation_words(sft)

    rows = stage_rows({"critique": critique, "sft": sft})
    assert [r["step"] for r in rows] == ["critique", "sft"] and rows[1]["threads"] == 1
    assert rows[1]["share_of_peak"] == sft["work"]["share_of_peak"]
    from cai.report import write_report

    page = write_report(sft_run).read_text()
    assert "Utilisation" in page and f"{100 * sft['work']['share_of_peak']:.1f} %" in page
    bench = subprocess.run([sys.executable, str(ROOT / "bench" / "utilisation.py"), str(sft_run)],
                           capture_output=True, text=True, check=True).stdout
    assert "critique" in bench and "sft" in bench and f"{100 * sft['work']['share_of_peak']:.1f} %" in bench
