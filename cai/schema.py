"""Settings: how a config dataclass declares its fields (help text, range, whether it
names a model) and the one checker of values against them. A leaf: it imports only
`cai.yamlio`, so config, models, servers, constitutions and stages all build on it.

`setting(default, help, ge=..., lt=...)` puts the help and the range in the field's
metadata, where `parse_dataclass` (loading a config) and `settings_help` (`cai STAGE
--help`) read them.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from typing import Any

from cai.yamlio import LocatedYaml, Problem, describe


def setting(default: Any = dataclasses.MISSING, help: str = "", *,  # noqa: A002 - argparse's word
            default_factory: Any = dataclasses.MISSING,
            model_reference: bool = False, only_if: tuple | None = None, **bounds: float) -> Any:
    """A Config field with its help text and range (`ge`, `gt`, `le`, `lt`), which
    `parse_dataclass` checks when the config is loaded: `setting(8, "prompts per batch", ge=1)`.
    A null value (for an `int | None` field) is never out of range. A `model_reference`
    field names models (a stage, `base`, a model spec or `server:NAME`): `validate` checks
    that each one exists before any work. `only_if=(FIELD, test, "FIELD: value")`: the key
    does nothing unless `test(FIELD's value)`; setting it without that is refused."""
    metadata = {"help": help, **bounds, **({"model_reference": True} if model_reference else {}),
                **({"only_if": only_if} if only_if else {})}
    return field(default=default, default_factory=default_factory, metadata=metadata)


def only_if_rule(obj: Any, f: dataclasses.Field) -> tuple | None:
    """The field's `setting(only_if=...)` rule, else its class's `ONLY_IF[name]`: the rule
    of a field inherited from a base several stages share (the judge's keys), which each
    stage's section gates on its own key."""
    return f.metadata.get("only_if") or getattr(type(obj), "ONLY_IF", {}).get(f.name)


def applies(obj: Any, f: dataclasses.Field) -> bool:
    """Whether field `f` of a parsed config has any effect (`only_if_rule`)."""
    rule = only_if_rule(obj, f)
    return rule is None or bool(rule[1](getattr(obj, rule[0])))


def inert_keys(obj: Any, given) -> dict[str, str]:
    """{key: what it needs} for the keys in `given` set to something other than their
    default that does nothing in `obj` (a parsed config), because the key they depend on
    (`only_if_rule`) does not allow it. A default value written out changes nothing either
    way, so it passes (recipes spell defaults out)."""
    inert = {}
    for f in dataclasses.fields(obj):
        if f.name in given and (rule := only_if_rule(obj, f)):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if getattr(obj, f.name) != default and not applies(obj, f):
                inert[f.name] = rule[2]
    return inert


def inert_message(name: str, key: str, words: str) -> str:
    return f"'{name}' does nothing without {words}: set that too, or remove {key}"


TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
              list: "a list", dict: "a mapping"}


def type_ok(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a type hint: `int | None`, `list[str]`, `Literal[...]`, a
    plain type (an int is a float; a bool is neither an int nor a float)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (inner,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def hint_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def out_of_range(value: Any, bounds: dict, hint: Any = None) -> str | None:
    """What a value of the right type was expected to be, if it is outside `bounds` (a
    field's `ge`/`gt`/`le`/`lt` metadata), else None. Floats must be finite."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    ok = (math.isfinite(value)
          and (low is None or (value >= low[1] if low[0] == "[" else value > low[1]))
          and (high is None or (value <= high[1] if high[0] == "]" else value < high[1])))
    if ok:
        return None
    if low and high:
        expected = f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    elif low:
        expected = f"at least {low[1]}" if low[0] == "[" else f"more than {low[1]}"
    elif high:
        expected = f"at most {high[1]}" if high[0] == "]" else f"less than {high[1]}"
    else:
        expected = "a finite number"
    return expected + (" (or null)" if type_ok(None, hint) else "")


def parse_dataclass(cls: type, raw: Any, doc: LocatedYaml, path: tuple, extra: set[str] | None = None,
                    extra_name: str = "", suggest: tuple = (), inert: bool = True,
                    elsewhere=None) -> tuple[Any, dict, list[Problem]]:
    """Build `cls` from a mapping. Keys in `extra` (a TRL config's fields) are returned
    apart; any other unknown key (with the closest known one, from the fields, `extra`
    and `suggest`, and `elsewhere(key, value)`: where the key belongs, when that is
    known), a wrong type, a missing required field or (with `inert`) a key that does
    nothing without another (`inert_keys`) is a problem."""
    where = ".".join(str(p) for p in path) or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        return None, {}, [doc.problem(path, f"'{where}' must be a mapping, got {describe(raw)}")]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in ("trl",)}
    problems, values, passthrough = [], {}, {}
    for key, value in raw.items():
        name = ".".join(str(p) for p in path + (key,))
        if key in fields:
            if not type_ok(value, hints[key]):
                problems.append(doc.problem(path + (key,), f"'{name}' must be {hint_name(hints[key])}, "
                                                           f"got {describe(value)}"))
            elif (expected := out_of_range(value, fields[key].metadata, hints[key])) is not None:
                problems.append(doc.problem(path + (key,), f"'{name}' must be {expected}, got {value}"))
            else:
                values[key] = value
        elif extra is not None and key in extra:
            passthrough[key] = value
        else:
            message = unknown_key(key, where, [*fields, *(extra or ()), *suggest], extra_name)
            problems.append(doc.problem(path + (key,), message + (elsewhere(key, value) if elsewhere else "")))
    for name, f in fields.items():
        if (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                and name not in raw):
            problems.append(doc.problem(path, f"missing required key '{name}' in {where}"))
    if problems:
        return None, passthrough, problems
    obj = cls(**values)
    if inert:
        for key, words in inert_keys(obj, raw).items():
            name = ".".join(str(p) for p in path + (key,))
            problems.append(doc.problem(path + (key,), inert_message(name, key, words)))
    return (None if problems else obj), passthrough, problems


def unknown_key(key: Any, where: str, known, library: str = "") -> str:
    """The message for an unknown key: the closest known key, if one is close, and
    where the keys come from, in the user's words (never an internal class name)."""
    import difflib

    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.75)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    section = "a top-level key" if where == "the config" else f"a key of the '{where}' section"
    origin = f" (neither one of cai's keys nor a field of {library})" if library else f" (not {section})"
    return f"unknown key '{key}' in {where}{hint}{origin}"


# ---------------------------------------------------------------- help


def type_text(hint: Any) -> str:
    """A type hint as `--help` shows it: `int | None`, `'ppo' or 'rloo' or 'grpo'`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(type_text(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return hint_name(hint)


def default_text(f: dataclasses.Field) -> str:
    """A field's default as YAML would write it; `required` when it has none."""
    if f.default is not dataclasses.MISSING:
        return yaml_text(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return yaml_text(f.default_factory())
    return "required"


def yaml_text(value: Any) -> str:
    """A value as YAML would write it: null, true, 0.1, [a, b]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_text(v)}" for k, v in value.items()) + "}"
    return repr(value) if isinstance(value, str) and not value else str(value)


def range_text(metadata) -> str:
    """`>= 1`, `in [0, 1)`, ... from a field's `ge`/`gt`/`le`/`lt`, or ""."""
    parts = [f"{word} {metadata[key]}" for key, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
             if key in metadata]
    return ", ".join(parts)


def settings_help(cls: type, skip: tuple[str, ...] = ()) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) of every init field of a config dataclass, for `--help`."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        text = f.metadata.get("help", "")
        bounds = range_text(f.metadata)
        rows.append((f.name, type_text(hints[f.name]), default_text(f), text + (f" ({bounds})" if bounds else "")))
    return rows
