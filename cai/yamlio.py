"""YAML loading that remembers where every key came from, so errors name the line.

Only `yaml.safe_load`-equivalent construction is used: no Python objects are ever built.
The text is parsed once, by a composer that refuses what would cost a user memory or a
traceback before anything is built: a key given twice in one mapping (YAML says keys are
unique; PyYAML keeps the last one silently), alias expansion past `MAX_NODES` ("billion
laughs": nine aliases of nine aliases ... is a kilobyte of text and 10^9 nodes once
expanded) and nesting past `MAX_DEPTH` (the composer recurses once per level).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

KeyPath = tuple  # a path into the document: ("critique_revision", 3, "id")

MAX_NODES = 100_000  # nodes of the document with every alias expanded
MAX_DEPTH = 100  # nested mappings and sequences, aliases expanded


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a file, at a line a user can jump to (or with a command-line
    argument, `line` None: `--set sft.learning_rate=abc: ...`)."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}: {self.message}"


def problem(source: LocatedYaml | None, path: KeyPath, message: str) -> Problem:
    """A problem at the line of `path` in the config, or naming the config alone when it
    was built without a file (a test's, a script's)."""
    return source.problem(path, message) if source is not None else Problem("config", None, message)


class ValidationError(ValueError):
    """Raised with every problem found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class LocatedYaml:
    """A parsed YAML document plus the line of each key path. Values a `--set` argument
    replaced are located by that argument instead (`overrides`)."""

    def __init__(self, data: Any, lines: dict[KeyPath, int], file: str):
        self.data = data
        self.lines = lines
        self.file = file
        self.overrides: dict[KeyPath, str] = {}

    def override(self, path: KeyPath, argument: str) -> None:
        """`path` now holds a value from the command line: lines under it are stale."""
        self.lines = {p: n for p, n in self.lines.items() if p[:len(path)] != path}
        self.overrides[path] = argument

    def where(self, path: KeyPath) -> tuple[str, int | None]:
        """The file and line of `path`, or of its nearest ancestor that has one."""
        while path:
            if path in self.overrides:
                return self.overrides[path], None
            if path in self.lines:
                return self.file, self.lines[path]
            path = path[:-1]
        return self.file, self.lines.get((), 1)

    def line(self, path: KeyPath) -> int:
        return self.where(path)[1] or 1

    def problem(self, path: KeyPath, message: str) -> Problem:
        return Problem(*self.where(path), message)


class _Refused(yaml.YAMLError):
    def __init__(self, mark, problem: str):
        self.problem_mark, self.problem = mark, problem


try:  # libyaml's parser streams events; PyYAML's scans a whole flow collection ahead,
    # quadratic in its depth (seconds for `[[[...]]]` 3,000 deep)
    from yaml._yaml import CParser as _Parser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser as _PyParser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, _PyParser):
        def __init__(self, text: str):
            Reader.__init__(self, text)
            Scanner.__init__(self)
            _PyParser.__init__(self)


class _Composer(Composer, SafeConstructor, Resolver, _Parser):
    """Safe loading, with a composer that measures each node as it is built (size and
    depth with aliases expanded, from its children's measures, so a bomb is caught at the
    first anchor that grows too big without expanding anything) and notes duplicate keys."""

    def __init__(self, text: str):
        _Parser.__init__(self, text)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.depth = 0
        self.expanded_nodes = 0
        self.measures: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, depth), aliases expanded
        self.duplicates: list[tuple[int, str, int]] = []  # (line, key, first line)

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None:
                if id(target) not in self.measures:  # PyYAML would build a self-containing value
                    raise _Refused(event.start_mark, f"alias *{event.anchor} refers to a value that contains it")
                nodes, depth = self.measures[id(target)]
                self._grow(nodes, self.depth + depth, event.start_mark)
            return super().compose_node(parent, index)
        self.depth += 1
        self._grow(1, self.depth, self.peek_event().start_mark)
        node = super().compose_node(parent, index)
        self.depth -= 1
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        measures = [self.measures[id(child)] for child in children]
        self.measures[id(node)] = (1 + sum(m[0] for m in measures), 1 + max((m[1] for m in measures), default=0))
        return node

    def _grow(self, nodes: int, depth: int, mark) -> None:
        self.expanded_nodes += nodes
        if depth > MAX_DEPTH:
            raise _Refused(mark, f"nested more than {MAX_DEPTH} levels deep (aliases expanded); "
                                 "a config or constitution never needs that")
        if self.expanded_nodes > MAX_NODES:
            raise _Refused(mark, f"more than {MAX_NODES:,} values once aliases are expanded "
                                 "(an alias bomb?); refused before expanding them")

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            try:
                key = (key_node.tag, self.construct_object(key_node))
                hash(key)
            except (yaml.YAMLError, TypeError, ValueError):
                continue  # an unconstructable key is reported when the document is built
            line = key_node.start_mark.line + 1
            if key in seen:
                self.duplicates.append((line, key_node.value, seen[key]))
            else:
                seen[key] = line
        return node


# YAML 1.1 (PyYAML) reads `1e-4` as a string: it wants a dot (`1.0e-4`). Learning rates are
# written like that, so floats also follow YAML 1.2 here.
_Composer.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_yaml(text: str, file: str) -> LocatedYaml:
    """Parse `text` once; any problem becomes a ValidationError naming file and line."""
    loader = _Composer(text)
    try:
        node = loader.get_single_node()
        if loader.duplicates:
            raise ValidationError([Problem(file, line, f"duplicate key '{key}' (first given at line {first}); "
                                                       "each key may appear once")
                                   for line, key, first in loader.duplicates])
        data = loader.construct_document(node) if node is not None else None
    except yaml.reader.ReaderError as err:  # a character YAML does not allow (NUL, other controls)
        line = text[:err.position].count("\n") + 1
        raise ValidationError([Problem(file, line, f"YAML syntax error: character #x{err.character:04x} "
                                                   f"is not allowed ({err.reason})")]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        reason = getattr(err, "problem", None) or str(err)
        if getattr(err, "context", None) and isinstance(err, yaml.MarkedYAMLError):
            reason = f"{err.context}, {reason}"
        if isinstance(err, yaml.constructor.ConstructorError):
            reason = f"unsupported YAML: {reason} (only plain YAML values are read)"
        elif not isinstance(err, _Refused):
            reason = f"YAML syntax error: {reason}"
        raise ValidationError([Problem(file, line, reason)]) from None
    finally:
        loader.dispose()
    lines: dict[KeyPath, int] = {(): 1}
    if node is not None:
        _walk(node, (), lines)
    return LocatedYaml(data, lines, file)


def _walk(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = path + (key_node.value,)
            lines[key_path] = key_node.start_mark.line + 1
            _walk(value_node, key_path, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _walk(item, path + (i,), lines)


def load_yaml(path: str | Path) -> LocatedYaml:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValidationError([Problem(str(path), 1, "no such file")]) from None
    except IsADirectoryError:
        raise ValidationError([Problem(str(path), 1, "is a folder, not a YAML file")]) from None
    except UnicodeDecodeError as err:
        raise ValidationError([Problem(str(path), 1, f"not UTF-8 text: {err}")]) from None
    except OSError as err:
        raise ValidationError([Problem(str(path), 1, f"cannot read: {err.strerror or err}")]) from None
    return parse_yaml(text, str(path))


def describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"[:80]
