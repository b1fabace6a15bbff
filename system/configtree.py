"""Build typed config dataclasses from plain YAML data, with dotted-path errors.

Configs are plain `@dataclass`es (defined next to the code that uses them). This module
turns nested dicts/lists into them, rejecting unknown keys and wrong types, then runs each
dataclass's optional `check()` (yielding `(field, message)` for out-of-range values).
Every error names the dotted path of the bad value, e.g. `stages[1].optimizer.lr`.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class SpecError(ValueError):
    """One or more problems in a job spec; `problems` holds (dotted path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "spec"):
        self.problems = problems
        self.source = source
        lines = [f"{path}: {msg}" if path else msg for path, msg in problems]
        super().__init__(f"invalid {source}:\n  " + "\n  ".join(lines))


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if get_origin(tp) is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _short(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def build(tp: Any, value: Any, path: str, problems: list[tuple[str, str]]) -> Any:
    """Convert `value` to type `tp`, appending problems instead of raising."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors_by_arg = []
        for arg in (a for a in args if a is not type(None)):
            sub: list[tuple[str, str]] = []
            out = build(arg, value, path, sub)
            if not sub:
                return out
            errors_by_arg.append(sub)
        # If exactly one alternative is structurally a match (e.g. a mapping), report its errors.
        for sub in errors_by_arg:
            if any(p != path for p, _ in sub):
                problems.extend(sub)
                return None
        problems.append((path, f"{_short(value)} is not {_type_name(tp)}"))
        return None
    if origin is Literal:
        if value not in get_args(tp):
            problems.append((path, f"{_short(value)} is not one of {list(get_args(tp))}"))
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append((path, f"{_short(value)} is not a list"))
            return []
        (item_tp,) = get_args(tp)
        return [build(item_tp, v, _join(path, i), problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append((path, f"{_short(value)} is not a mapping"))
            return {}
        _, val_tp = get_args(tp)
        return {k: build(val_tp, v, _join(path, str(k)), problems) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path, problems)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append((path, f"{_short(value)} is not a boolean (true/false)"))
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append((path, f"{_short(value)} is not an integer"))
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append((path, f"{_short(value)} is not a number"))
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append((path, f"{_short(value)} is not a string"))
        return value
    raise TypeError(f"configtree cannot build type {tp!r} at {path}")  # a bug in a config class


def build_dataclass(cls: type, value: Any, path: str, problems: list[tuple[str, str]]) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append((path, f"{_short(value)} is not a mapping"))
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in value:
        if key not in fields:
            close = [k for k in fields if k.replace("_", "") == str(key).replace("_", "").lower()]
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {sorted(fields)}"
            problems.append((_join(path, str(key)), f"unknown key{hint}"))
    n_before = len(problems)
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = build(hints[name], value[name], _join(path, name), problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append((_join(path, name), "required key is missing"))
    try:
        obj = cls(**kwargs)
    except TypeError:
        return None  # missing required keys, already reported
    if hasattr(obj, "check"):
        # Range and cross-field checks run even when a sibling section had errors, so that one
        # pass reports them all; a check tripping over an already-reported bad value stops quietly.
        try:
            for key, msg in obj.check():
                problems.append((_join(path, key), msg))
        except (TypeError, AttributeError, ValueError, ArithmeticError):
            if len(problems) == n_before:
                raise
    return obj


def deep_merge(base: Any, override: Any) -> Any:
    """`override` laid over `base`: mappings merge key by key, anything else replaces (copied)."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = deep_merge(base.get(k), v)
        return out
    return copy.deepcopy(override)


def to_dict(obj: Any) -> Any:
    """The inverse of `build`: plain data ready for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
