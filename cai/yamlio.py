"""YAML loading that remembers where every key came from, so errors name the line.

Only `yaml.safe_load`-equivalent loading is used: no Python objects are ever built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

KeyPath = tuple  # a path into the document: ("critique_revision", 3, "id")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a file, at a line a user can jump to."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class ValidationError(ValueError):
    """Raised with every problem found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class LocatedYaml:
    """A parsed YAML document plus the line of each key path."""

    def __init__(self, data: Any, lines: dict[KeyPath, int], file: str):
        self.data = data
        self.lines = lines
        self.file = file

    def line(self, path: KeyPath) -> int:
        """The line of `path`, or of its nearest ancestor that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)

    def problem(self, path: KeyPath, message: str) -> Problem:
        return Problem(self.file, self.line(path), message)


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


def parse_yaml(text: str, file: str) -> LocatedYaml:
    """Parse `text`; a syntax error becomes a ValidationError naming file and line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        reason = getattr(err, "problem", None) or str(err)
        raise ValidationError([Problem(file, line, f"YAML syntax error: {reason}")]) from None
    lines: dict[KeyPath, int] = {(): 1}
    if node is not None:
        _walk(node, (), lines)
    return LocatedYaml(data, lines, file)


def load_yaml(path: str | Path) -> LocatedYaml:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValidationError([Problem(str(path), 1, "file not found")]) from None
    except UnicodeDecodeError as err:
        raise ValidationError([Problem(str(path), 1, f"not UTF-8 text: {err}")]) from None
    return parse_yaml(text, str(path))


TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
              list: "a list", dict: "a mapping"}


def type_ok(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"[:80]
