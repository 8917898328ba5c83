"""Data stages against real OpenAI-compatible servers on 127.0.0.1: the same judge
probabilities and greedy answers as in-process, retries and clear errors on faults,
resume after a server dies, and `cai run` with critique and evaluate on a server."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import CONVERSATIONS, FIRST, ROOT, SECOND, SMOKE
from servers import start_test_server, start_transformers_serve

from cai.cli import main
from cai.config import load_config
from cai.constitution import load_constitution
from cai.engines import EngineError, Sampling
from cai.engines.hf import TransformersEngine
from cai.engines.openai import OpenAIEngine, ServerConfig
from cai.judge.judge import Judge
from cai.rundir import read_jsonl


@pytest.fixture(scope="module")
def lively_model(tmp_path_factory):
    """builtin:tiny with large random weights: its greedy answers are long and varied
    (the plain tiny model answers with newlines), so equal answers mean something."""
    from cai import models

    folder = tmp_path_factory.mktemp("lively") / "model"
    model = models.load_causal_lm(models.TINY, "cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5, generator=generator)
    model.save_pretrained(folder)
    models.load_tokenizer(models.TINY).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(lively_model):
    with start_test_server(lively_model, "lively") as running:
        yield running


@pytest.fixture(autouse=True)
def _no_faults_left(request):
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").control(clear=True)


def engine_for(server, **settings) -> OpenAIEngine:
    return OpenAIEngine(ServerConfig(base_url=server.base_url, model=server.model, **settings), "server:test")


@pytest.fixture(scope="module")
def constitution():
    return load_constitution(ROOT / "constitutions" / "harmless.yaml")


def test_the_judge_over_a_server_gives_the_in_process_probabilities(judge_model, constitution):
    local = Judge(TransformersEngine.from_spec(str(judge_model), "cpu", batch_size=4), few_shot=1)
    with start_test_server(judge_model, "judge") as server:
        remote = Judge(engine_for(server), few_shot=1)
        there = remote.compare(constitution, CONVERSATIONS, FIRST, SECOND, seed=0, principles_per_comparison=2)
    here = local.compare(constitution, CONVERSATIONS, FIRST, SECOND, seed=0, principles_per_comparison=2)
    assert [c.principles for c in here] == [c.principles for c in there]
    for a, b in zip(here, there):
        assert b.p_order_ab == pytest.approx(a.p_order_ab, abs=1e-4)  # (first) shown as (A)
        assert b.p_order_ba == pytest.approx(a.p_order_ba, abs=1e-4)  # (first) shown as (B)
        assert b.p_first == pytest.approx(a.p_first, abs=1e-4)
    slots = [p for c in here for p in (c.p_order_ab, c.p_order_ba)]
    assert all(0.01 < p < 0.99 and abs(p - 0.5) > 0.01 for p in slots)  # real probabilities, not 0, 1 or a tie
    assert remote.engine.options_missing == 0


def test_greedy_answers_over_a_server_equal_the_in_process_ones(server, lively_model):
    local = TransformersEngine.from_spec(str(lively_model), "cpu", batch_size=2)
    remote = engine_for(server, max_concurrency=3)
    greedy = Sampling(max_new_tokens=12, temperature=0.0)
    here = [c.text for c in local.generate(CONVERSATIONS, greedy, seed=0)]
    there = [c.text for c in remote.generate(CONVERSATIONS, greedy, seed=0)]
    assert there == here and all(len(text) > 5 for text in here)
    sampled = Sampling(max_new_tokens=12, temperature=1.0)  # seeded per request: the same twice
    assert ([c.text for c in remote.generate(CONVERSATIONS, sampled, seed=4)]
            == [c.text for c in remote.generate(CONVERSATIONS, sampled, seed=4)])


def test_429_and_5xx_bursts_timeouts_and_malformed_answers_are_retried(server):
    engine = engine_for(server, max_concurrency=1, retry_backoff=0.01, timeout=1.0, max_retries=4)
    greedy = Sampling(max_new_tokens=4, temperature=0.0)
    expected = [c.text for c in engine.generate(CONVERSATIONS[:1], greedy, seed=0)]
    for faults in ([{"status": 429, "retry_after": 0}] * 3, [{"status": 500}, {"status": 503}, {"status": 502}],
                   [{"delay": 1.5}], [{"malformed": True}, {"status": 500}]):
        server.control(faults=faults)
        retries = engine.retries
        assert [c.text for c in engine.generate(CONVERSATIONS[:1], greedy, seed=0)] == expected
        assert engine.retries - retries == len(faults)


def test_a_request_that_keeps_failing_is_a_clear_error_naming_the_url(server):
    engine = engine_for(server, retry_backoff=0.01, max_retries=2)
    server.control(faults=[{"status": 500}] * 3)
    with pytest.raises(EngineError, match=rf"{server.base_url}/chat/completions: HTTP 500.*3 attempts"):
        engine.generate(CONVERSATIONS[:1], Sampling(4, 0.0), seed=0)
    server.control(faults=[{"status": 400}])  # a client error is not retried
    with pytest.raises(EngineError, match="HTTP 400"):
        engine.generate(CONVERSATIONS[:1], Sampling(4, 0.0), seed=0)
    assert server.stats()["faults_pending"] == 0


def test_missing_logprobs_are_an_error_not_a_guess(server, constitution):
    judge = Judge(engine_for(server), few_shot=1)
    server.control(faults=[{"drop_logprobs": True}])
    with pytest.raises(EngineError, match="no token log-probabilities.*option_scoring: letter"):
        judge.compare(constitution, CONVERSATIONS[:1], FIRST[:1], SECOND[:1], seed=0)


def test_letter_mode_parses_a_generated_letter_into_a_hard_label(server, constitution):
    judge = Judge(engine_for(server, option_scoring="letter"), few_shot=1)
    [comparison] = judge.compare(constitution, CONVERSATIONS[:1], FIRST[:1], SECOND[:1], seed=0)
    for p in (comparison.p_order_ab, comparison.p_order_ba):
        assert p in (0.0, 0.5, 1.0)


# ---------------------------------------------------------------- stages and the run


def server_run(run_dir, server, *overrides: str):
    return ["--config", str(SMOKE), "--set", f"run_dir={run_dir}",
            "--set", f"servers={{gen: {{base_url: '{server.base_url}', model: '{server.model}', "
                     f"retry_backoff: 0.01, max_retries: 1}}}}", *[a for o in overrides for a in ("--set", o)]]


def test_an_unreachable_server_or_unknown_model_stops_the_run_before_any_work(tmp_path, server, capsys):
    from servers import free_port

    run_dir = tmp_path / "run"
    down = f"http://127.0.0.1:{free_port()}/v1"
    argv = ["run", "--config", str(SMOKE), "--set", f"run_dir={run_dir}", "--set", "critique.model=server:gen",
            "--set", f"servers={{gen: {{base_url: '{down}', model: x, max_retries: 0}}}}"]
    assert main(argv) == 2  # a refusal of input, like every other
    err = capsys.readouterr().err
    assert f"{down}/chat/completions: cannot connect" in err and "Traceback" not in err
    assert not run_dir.exists()

    assert main(["critique"] + server_run(run_dir, server, "critique.model=server:gen",
                                         "servers.gen.model=no-such-model")) == 2
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "no-such-model" in err and not run_dir.exists()

    assert main(["run"] + server_run(run_dir, server, "critique.model=server:nope")) == 2
    assert "names no server under 'servers:'" in capsys.readouterr().err


def test_a_server_that_dies_mid_chunk_is_resumed_without_loss_or_duplicates(tmp_path, lively_model, capsys):
    overrides = ("critique.model=server:gen", "critique.num_revisions=1", "servers.gen.max_concurrency=2")
    with start_test_server(lively_model, "lively") as reference_server:
        assert main(["critique"] + server_run(tmp_path / "reference", reference_server, *overrides)) == 0
    reference = read_jsonl(tmp_path / "reference" / "critique" / "records.jsonl")

    run_dir = tmp_path / "run"
    with start_test_server(lively_model, "lively") as dying:
        # 8 prompts in chunks of 4, 3 requests per prompt: the 17th request is in the second chunk.
        dying.control(faults=[{"delay": 0}] * 16 + [{"die": True}])
        assert main(["critique"] + server_run(run_dir, dying, *overrides)) == 1
        assert dying.process.wait(timeout=10) == 3
    err = capsys.readouterr().err
    assert "cannot connect" in err and "rerun the same command to resume" in err and "Traceback" not in err
    assert len(read_jsonl(run_dir / "critique" / "records.jsonl")) == 4  # the first chunk was kept

    with start_test_server(lively_model, "lively", dying.port) as restarted:
        assert main(["critique"] + server_run(run_dir, restarted, *overrides)) == 0
        assert restarted.stats()["chat_requests"] == 1 + 4 * 3  # the start-up probe, then the unfinished chunk
    assert read_jsonl(run_dir / "critique" / "records.jsonl") == reference


def test_cai_run_with_critique_and_evaluate_on_transformers_serve(tmp_path, lively_model, capsys):
    """The smoke pipeline with its data generated by a real `transformers serve`, then
    a second run that skips every stage."""
    with start_transformers_serve(lively_model, tmp_path / "hub-cache") as serve:
        run_dir = tmp_path / "run"
        argv = ["run"] + server_run(run_dir, serve, "critique.model=server:gen",
                                    "evaluate.models=[server:gen, sft, dpo]", "servers.gen.max_retries=2")
        assert main(argv) == 0
        records = read_jsonl(run_dir / "critique" / "records.jsonl")
        assert len(records) == 8 and {r["model"] for r in records} == {"server:gen"}
        assert sum(not r.get("dropped") for r in records) >= 2  # answers the server generated, kept
        generations = read_jsonl(run_dir / "evaluate" / "generations.jsonl")
        assert {r["model"] for r in generations} == {"server:gen", "sft", "dpo"}
        manifest = json.loads((run_dir / "critique" / "manifest.json").read_text())
        assert manifest["engines"][0]["base_url"] == serve.base_url and manifest["engines"][0]["requests"] >= 8
        capsys.readouterr()
        assert main(argv) == 0
        out = capsys.readouterr().out
        stages = ["critique", "sft", "label", "reward", "rl", "dpo", "evaluate"]
        assert all(f"[cai] {s}: already complete" in out for s in stages), out

        # transformers serve returns no log-probabilities: as a judge it is refused up front,
        # with advice that works: it also refuses the open answer turn vLLM continues (HTTP 422).
        judged = tmp_path / "judged"
        shutil.copytree(run_dir, judged)
        # the config the folder was built with (critique on the server, so evaluate reads what it
        # describes); the judge is the same server under its own entry, whose judge settings
        # change below (critique's server entry, part of critique's fingerprint, stays as built)
        judge = ("critique.model=server:gen", "evaluate.feedback_model=server:judge",
                 "evaluate.models=[server:gen, sft, dpo]",
                 f"servers.judge={{base_url: '{serve.base_url}', model: '{serve.model}', retry_backoff: 0.01, "
                 f"max_retries: 1}}")
        assert main(["evaluate"] + server_run(judged, serve, *judge)) == 2
        err = capsys.readouterr().err
        assert "no token log-probabilities" in err
        assert "set option_scoring: letter AND assistant_prefill: none on this server" in err
        # letter scoring alone is not enough: the open answer turn is still refused, and said so
        assert main(["evaluate"] + server_run(judged, serve, *judge, "servers.judge.option_scoring=letter")) == 2
        assert "set assistant_prefill: none on this server" in capsys.readouterr().err
        # following the advice, the judge works
        assert main(["evaluate", "--force"] + server_run(judged, serve, *judge, "servers.judge.option_scoring=letter",
                                                         "servers.judge.assistant_prefill=none")) == 0
        results = json.loads((judged / "evaluate" / "results.json").read_text())
        assert results["judge_scoring"].startswith("letter") and results["pairwise"]["all"]["pairs"]


def test_an_api_key_comes_from_the_environment_and_is_never_written(tmp_path, lively_model, monkeypatch, capsys):
    secret = "sk-test-0123456789"
    with start_test_server(lively_model, "lively", 0, "--api-key", secret) as guarded:
        argv = ["critique"] + server_run(tmp_path / "run", guarded, "critique.model=server:gen",
                                         "critique.num_revisions=1", "servers.gen.api_key_env=CAI_TEST_KEY")
        monkeypatch.delenv("CAI_TEST_KEY", raising=False)
        assert main(argv) == 2
        assert "CAI_TEST_KEY" in capsys.readouterr().err and not (tmp_path / "run").exists()
        monkeypatch.setenv("CAI_TEST_KEY", "wrong")
        assert main(argv) == 2
        assert "HTTP 401" in capsys.readouterr().err
        monkeypatch.setenv("CAI_TEST_KEY", secret)
        assert main(argv) == 0
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert written and not any(secret in p.read_text(errors="replace") for p in written)


def test_server_settings_are_checked_when_the_config_is_loaded(tmp_path):
    from cai.yamlio import ValidationError

    for override, message in (("servers={gen: {model: x}}", "missing required key 'base_url'"),
                              ("servers={gen: {base_url: 'localhost:8000', model: x}}", "http:// or https://"),
                              ("servers={gen: {base_url: 'http://h/v1', model: x, max_concurrency: 0}}",
                               "max_concurrency' must be at least 1"),
                              ("servers={gen: {base_url: 'http://h/v1', model: x, option_scoring: guess}}",
                               "option_scoring"),
                              ("model=server:gen", "must be weights")):
        with pytest.raises(ValidationError, match=message):
            load_config(SMOKE, [f"run_dir={tmp_path}", override])
    run = load_config(SMOKE, [f"run_dir={tmp_path}", "servers={gen: {base_url: 'http://h/v1', model: x}}",
                              "sft.model=server:gen"])
    from cai.plan.sections import parse_section

    with pytest.raises(ValidationError, match="sft trains weights"):
        parse_section(run, "sft")


@pytest.fixture(scope="module")
def judge_model(tmp_path_factory, constitution):
    """builtin:tiny taught, in a few steps, that "A" or "B" follows "(" (their odds left
    to the model), as a real judge has the letters among its top tokens."""
    from cai import models

    engine = TransformersEngine.from_spec(models.TINY, "cpu", batch_size=8)
    model, tokenizer = engine.model.train(), engine.tokenizer
    judge = Judge(engine, few_shot=1)
    rows = [engine.render(q[:-1], prefill=q[-1]["content"]) for principle in constitution.feedback[:6]
            for c, a, b in zip(CONVERSATIONS, FIRST, SECOND)
            for q in (judge.prompts.question(constitution, principle, c, a, b),)]
    letters = engine.option_token_ids("(", ("A", "B"))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(10):
        for row in rows:
            logp = torch.log_softmax(model(input_ids=torch.tensor([row])).logits[0, -1], dim=-1)
            loss = -logp[letters].logsumexp(0)  # "A or B", whichever: their ratio stays the model's own
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    folder = tmp_path_factory.mktemp("judge") / "model"
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_letter_judge_says_its_labels_are_degraded_in_the_manifest_and_the_report(sft_run, server, capsys):
    from cai.report import write_report

    argv = ["label"] + server_run(sft_run, server, "label.feedback_model=server:gen", "label.max_prompts=4",
                                  "servers.gen.option_scoring=letter")
    assert main(argv) == 0
    counts = json.loads((sft_run / "label" / "manifest.json").read_text())["counts"]
    assert counts["judge_scoring"].startswith("letter (degraded: hard labels")
    assert all(row["p_order_ab"] in (0.0, 0.5, 1.0) for row in read_jsonl(sft_run / "label" / "prefs.jsonl"))
    assert "Degraded judge" in write_report(sft_run).read_text()


def test_the_rl_judge_reward_over_a_server_gives_the_in_process_probabilities(judge_model, constitution):
    from cai.judge.judge import comparison_key, draw_principles

    principles = [draw_principles(constitution, 0, comparison_key(c), 2) for c in CONVERSATIONS]
    local = Judge(TransformersEngine.from_spec(str(judge_model), "cpu", batch_size=4), few_shot=1)
    with start_test_server(judge_model, "judge") as server:
        remote = Judge(engine_for(server), few_shot=1)
        there = remote.score_single(constitution, CONVERSATIONS, FIRST, principles)
    here = local.score_single(constitution, CONVERSATIONS, FIRST, principles)
    assert there == pytest.approx(here, abs=1e-4)
    assert all(0.01 < p < 0.99 for p in here)


def test_rl_with_a_judge_server_as_reward(sft_run, server, capsys):
    """The judge is the one model role of a training stage that may be a server: it only scores."""
    from cai.plan.sections import parse_section
    from cai.yamlio import ValidationError

    argv = server_run(sft_run, server, "rl.algorithm=grpo", "rl.reward=judge", "rl.feedback_model=server:gen",
                      "rl.max_prompts=4", "rl.max_new_tokens=8", "rl.per_device_train_batch_size=4",
                      "rl.num_generations=2", "rl.max_steps=1")
    assert main(["rl"] + argv) == 0
    counts = json.loads((sft_run / "rl" / "manifest.json").read_text())["counts"]
    assert counts["reward"] == "judge" and counts["feedback_model"] == "server:gen"
    assert counts["judge_scoring"] == "probabilities" and counts["judged_answers_this_session"] == 4
    with pytest.raises(ValidationError, match="rl trains weights"):
        parse_section(load_config(SMOKE, [f"run_dir={sft_run}", f"servers={{gen: {{base_url: '{server.base_url}', "
                                                              f"model: x}}}}", "rl.policy=server:gen"]), "rl")
