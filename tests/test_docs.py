"""The README and docs/ tell the truth a user can check: the quick start, read top to
bottom, runs and writes the report it names; every relative link lands on a file and,
with an #anchor, on a heading there; the README stays short."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200
QUICK_START = "<!-- quick-start"

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks (a `# comment` in a bash block is no heading,
    a `[x](y)` in a YAML block no link)."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings: lower case, punctuation dropped,
    spaces to hyphens, a repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(page: Path) -> list[str]:
    """Each relative link of `page` whose file, or whose #anchor in that file, is missing."""
    problems = []
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.name}:{number}: ({target})"
            if not resolved.exists():
                problems.append(f"{where}: no file {resolved}")
            elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
                problems.append(f"{where}: no heading #{anchor} in {resolved.name}")
    return problems


def test_every_relative_link_in_the_readme_and_docs_resolves():
    assert len(PAGES) > 5, "docs/ has its pages"
    problems = [p for page in PAGES for p in broken_links(page)]
    assert not problems, "\n".join(problems)


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Title\n\n## Model options: dtype, LoRA / QLoRA\n")
    page.write_text("[a](other.md#model-options-dtype-lora--qlora) [b](missing.md) [c](other.md#nowhere)\n"
                    "```\n[not a link](nowhere.md)\n```\n")
    problems = broken_links(page)
    assert len(problems) == 2
    assert "no file" in problems[0] and "missing.md" in problems[0]
    assert "no heading #nowhere" in problems[1]


def test_the_readme_is_at_most_200_lines():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move the detail to docs/"


def quick_start(readme: str) -> str:
    """The code block after the README's quick-start marker."""
    assert QUICK_START in readme, "README.md marks its quick start with " + QUICK_START
    block = re.search(r"```\w*\n(.*?)```", readme.split(QUICK_START, 1)[1], re.S)
    assert block, "a code block follows the quick-start marker"
    return block.group(1)


def repository_copy(target: Path) -> Path:
    """What a clone holds: the tracked files, and new ones git does not ignore."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, text=True, check=True)
    for name in filter(None, listed.stdout.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not there
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_the_readme_quick_start_runs_top_to_bottom_and_writes_the_report_it_names(tmp_path):
    """Each command of the quick start runs in a fresh copy of the repository, in order.
    `make` is told that this environment is installed (`-o install`, VENV=this venv), so
    the test does not reinstall; the rest of each target runs as a user's would. The report
    path the README says to open must then exist in the copy, written by those commands."""
    block = quick_start(README.read_text(encoding="utf-8"))
    venv = Path(sys.executable).parent.parent
    assert (venv / "bin" / "cai").exists(), f"the tests run in an installed venv ({venv}/bin/cai)"
    assert shutil.which("make"), "make is installed"
    clone = repository_copy(tmp_path / "clone")
    assert not (clone / "runs").exists()

    commands = [line.split(" #")[0].strip() for line in block.splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert commands, "the quick start has commands"
    output = ""
    for command in commands:
        words = command.split()
        assert words[0] == "make", f"the quick start's {command!r}: this test knows how to run make targets only"
        done = subprocess.run(["make", "-o", "install", f"VENV={venv}", *words[1:]], cwd=clone,
                              capture_output=True, text=True, timeout=600)
        output += done.stdout + done.stderr
        assert done.returncode == 0, f"{command!r} failed (exit {done.returncode}):\n{output[-3000:]}"

    report = re.search(r"\bopen (\S+\.html)", block)
    assert report, "the quick start says which page to open"
    assert (clone / report.group(1)).is_file(), f"{report.group(1)} was not written:\n{output[-3000:]}"
    assert report.group(1) in output, "the run's console names the report it wrote"
