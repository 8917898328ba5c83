"""The command line itself: flags anywhere, what each command refuses, what it shows."""

from __future__ import annotations

import pytest
from conftest import ROOT

from cai.cli import main


@pytest.mark.parametrize("argv", [
    ["-v", "constitution", "check", "constitutions/harmless.yaml"],
    ["constitution", "-v", "check", "constitutions/harmless.yaml"],
    ["constitution", "check", "constitutions/harmless.yaml", "-v"],
    ["constitution", "check", "constitutions/harmless.yaml", "--verbose"],
])
def test_verbose_is_accepted_anywhere_on_the_command_line(argv, monkeypatch, capsys):
    import cai.cli

    seen = []
    monkeypatch.setattr(cai.cli, "cmd_constitution", lambda args: seen.append(args.verbose) or 0)
    monkeypatch.chdir(ROOT)
    assert main(argv) == 0
    assert seen == [True]


def test_without_verbose_the_flag_is_off(monkeypatch):
    import cai.cli

    seen = []
    monkeypatch.setattr(cai.cli, "cmd_constitution", lambda args: seen.append(args.verbose) or 0)
    assert main(["constitution", "check", str(ROOT / "constitutions" / "harmless.yaml")]) == 0
    assert seen == [False]


@pytest.mark.parametrize("setup", ["empty folder", "unrelated files"])
def test_report_on_a_folder_that_is_not_a_run_is_refused_and_writes_nothing(tmp_path, capsys, setup):
    folder = tmp_path / "notarun"
    folder.mkdir()
    if setup == "unrelated files":
        (folder / "notes.txt").write_text("hello\n")
        (folder / "data").mkdir()
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{folder}: not a run folder: it holds no stage folder" in err and "Traceback" not in err
    assert not (folder / "report").exists()


def test_constitution_show_shows_every_file(capsys):
    paths = [str(ROOT / "constitutions" / name) for name in ("harmless.yaml", "concise.yaml")]
    assert main(["constitution", "show", *paths]) == 0
    out = capsys.readouterr().out
    assert f"==> {paths[0]} <==" in out and f"==> {paths[1]} <==" in out
    assert out.index(paths[0]) < out.index(paths[1])
    from cai.constitution import format_constitution, load_constitution

    for path in paths:
        assert format_constitution(load_constitution(path)) in out


def test_constitution_show_of_one_file_has_no_header(capsys):
    path = str(ROOT / "constitutions" / "concise.yaml")
    assert main(["constitution", "show", path]) == 0
    assert "==>" not in capsys.readouterr().out


def test_constitution_show_with_a_bad_file_shows_the_good_one_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    good = str(ROOT / "constitutions" / "concise.yaml")
    assert main(["constitution", "show", good, str(bad)]) == 2
    out, err = capsys.readouterr()
    assert f"==> {good} <==" in out and str(bad) in err


def test_output_cut_short_by_the_reader_is_not_an_error():
    import subprocess
    import sys

    done = subprocess.run(f"{sys.executable} -m cai constitution show constitutions/harmless.yaml | head -1",
                          shell=True, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.strip() and "internal error" not in done.stderr and "Traceback" not in done.stderr


def test_version_prints_the_libraries_and_the_device_and_exits_0(capsys):
    import importlib.metadata as md
    import os

    import torch

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    first, device = capsys.readouterr().out.splitlines()
    assert first.startswith(f"cai {md.version('cai')} ")
    for package in ("torch", "transformers", "trl", "accelerate"):
        assert f"{package} {md.version(package)}" in first
    if torch.cuda.is_available():
        assert device == f"device: cuda: {torch.cuda.get_device_name(0)}" or device.startswith(
            f"device: cuda: {torch.cuda.get_device_name(0)} (and ")
    elif not torch.backends.mps.is_available():
        assert device == f"device: cpu, {os.cpu_count()} cores"


@pytest.mark.parametrize("argv, level", [(["-q"], "QUIET"), (["--quiet"], "QUIET"), ([], "DEFAULT"),
                                         (["-v"], "VERBOSE")])
def test_quiet_and_verbose_set_the_console(argv, level, monkeypatch):
    import cai.cli
    from cai import console

    seen = []
    monkeypatch.setattr(cai.cli, "cmd_constitution", lambda args: seen.append(console.verbosity) or 0)
    try:
        assert main([*argv, "constitution", "check", str(ROOT / "constitutions" / "harmless.yaml")]) == 0
    finally:
        console.setup(console.DEFAULT)
    assert seen == [getattr(console, level)]


def test_quiet_and_verbose_together_are_refused(capsys):
    assert main(["-q", "-v", "constitution", "check", str(ROOT / "constitutions" / "harmless.yaml")]) == 2
    assert "-q and -v exclude each other" in capsys.readouterr().err


def test_quiet_leaves_out_the_lines_a_person_may_skip(sft_run, capsys):
    """A step that is skipped says so at the default verbosity, not with -q."""
    from conftest import make_run

    from cai import console
    from cai.execute.executor import run_one

    run = make_run(sft_run)
    run_one(run, "sft")
    assert "[cai] sft: already complete" in capsys.readouterr().out
    console.setup(console.QUIET)
    try:
        run_one(run, "sft")
    finally:
        console.setup(console.DEFAULT)
    assert capsys.readouterr().out == ""
