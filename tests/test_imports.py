"""cai's modules form no import cycle, deferred imports included, and the leaves stay leaves.

Every `import` / `from ... import` statement of every module under cai/ counts: at module
level and inside functions (a deferred import only postpones a cycle; it does not remove
it). `importlib.import_module` calls (the runner loading a stage's recipe by name) are not
import statements and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the cai modules it imports anywhere in its file}."""
    files = {module_name(p): p for p in sorted((ROOT / "cai").rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets.add(base)
                targets |= {f"{base}.{alias.name}" for alias in node.names}  # `from cai import models`
        found = set()
        for target in targets:
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target not in (name, "cai"):
                found.add(target)
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_cai_modules():
    graph = import_graph()
    assert len(graph) > 20  # the walk found the package
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_leaves_import_nothing_above_them():
    graph = import_graph()
    assert graph["cai.registry"] == set()  # THE stage list
    assert graph["cai.yamlio"] == set()
    assert graph["cai.schema"] == {"cai.yamlio"}  # settings: help, ranges, the one type checker
    # the settings machinery is the schema's, not the run config's
    for name in ("cai.models", "cai.engines.openai", "cai.constitution"):
        assert "cai.schema" in graph[name] and "cai.config" not in graph[name], name


def test_stages_the_evaluation_and_the_report_never_import_the_runner():
    """Imports run one way: the runner (cai.pipeline, the plan, the executor, the CLI) imports
    the stages, never the other way round; a stage gets what it needs from its context."""
    graph = import_graph()
    runner = {name for name in graph if name in ("cai.pipeline", "cai.cli", "cai.__main__")
              or name.startswith(("cai.plan", "cai.execute"))}
    below = [name for name in graph if name.startswith(("cai.stages", "cai.evaluation", "cai.report"))]
    assert "cai.stages.evaluate" in below and "cai.evaluation.figures" in below and "cai.report.page" in below
    assert {name: sorted(graph[name] & runner) for name in below if graph[name] & runner} == {}


def test_imports_run_one_way_cli_then_plan_and_execute_then_the_rest():
    graph = import_graph()

    def under(name: str, *packages: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in packages)

    top = ("cai.cli", "cai.help", "cai.__main__")
    for name, targets in graph.items():
        if under(name, *top):
            continue
        above = {t for t in targets if under(t, *top)}
        if not under(name, "cai.plan", "cai.execute"):  # stages, judge, report, engines, ...: the runner is above
            above |= {t for t in targets if under(t, "cai.plan", "cai.execute")}
        if under(name, "cai.plan"):  # the plan is pure: it never reaches the executor
            above |= {t for t in targets if under(t, "cai.execute")}
        assert not above, (name, above)
    # hashes of meaning, settings diffs: nothing but the names of a constitution's parts, whose
    # module is itself near the leaves (the schema and the YAML reader)
    assert graph["cai.plan.fingerprint"] == {"cai.constitution"}
    assert graph["cai.constitution"] == {"cai.schema", "cai.yamlio"}


def test_the_stages_parts_import_no_stage():
    """The stages are recipes over shared parts (the evaluation's, the judge, training,
    the engines): a part that imported a stage would sit below the layer it reaches into
    (evaluate's reward scores once imported the reward stage's scorer)."""
    graph = import_graph()
    parts = [name for name in graph if name.startswith(("cai.evaluation", "cai.judge", "cai.training", "cai.engines"))]
    assert "cai.evaluation.answering" in parts and "cai.training.models" in parts
    assert {name: sorted(t for t in graph[name] if t.startswith("cai.stages")) for name in parts
            if any(t.startswith("cai.stages") for t in graph[name])} == {}
