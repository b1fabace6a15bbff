"""Build typed config dataclasses from plain YAML data, with dotted-path errors.

Configs are plain `@dataclass`es (defined next to the code that uses them). This module turns
nested dicts/lists into them, rejecting unknown keys and wrong types, then runs each dataclass's
optional `check()`; every error names the dotted path of the bad value (`stages[1].optimizer.lr`).

Numbers are typed as YAML 1.2 / JSON types them (PyYAML's YAML 1.1 leaves `3e-4` a string), an int
only when integral; `coerce_numbers` does the same for plain data. A value that failed becomes
`INVALID`, whose use raises `InvalidValueUsed`, which `unless_invalid` turns into "skip this rule":
one error per mistake. The rules in full: docs/observability.md#spec-errors-one-per-mistake.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from typing import Any, Iterable, Iterator, Literal, Union, get_args, get_origin


class SpecError(ValueError):
    """One or more problems in a job spec; `problems` holds (dotted path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "spec"):
        self.problems = problems
        self.source = source
        lines = [f"{path}: {msg}" if path else msg for path, msg in problems]
        super().__init__(f"invalid {source}:\n  " + "\n  ".join(lines))


class InvalidValueUsed(Exception):
    """A rule read a value that already failed its own check; the rule is skipped."""


class _Invalid:
    """The stand-in for a value that failed: every operation on it raises InvalidValueUsed."""

    __slots__ = ()

    def _used(self, *args: Any, **kwargs: Any) -> Any:
        raise InvalidValueUsed

    def __deepcopy__(self, memo: dict) -> "_Invalid":
        return self

    def __copy__(self) -> "_Invalid":
        return self


for _name in ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__bool__",
              "__len__", "__iter__", "__contains__", "__getitem__", "__getattr__", "__index__",
              "__int__", "__float__", "__str__", "__repr__", "__format__", "__neg__", "__pos__",
              "__abs__", *(f"__{r}{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod",
                                                    "pow", "and", "or") for r in ("", "r"))):
    setattr(_Invalid, _name, _Invalid._used)
INVALID = _Invalid()


def unless_invalid(problems: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """A rule's problems, stopping quietly where the rule reads an INVALID value."""
    try:
        yield from problems
    except InvalidValueUsed:
        return


# A YAML 1.2 core-schema / JSON number (without YAML's .inf/.nan, which PyYAML already reads).
_NUMBER = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def as_number(tp: type, value: Any) -> Any:
    """`value` as `tp` (int or float) where it is a number string or an integral float for an
    int field; anything else unchanged, for `build` to accept or report."""
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        number = float(value)
        if tp is float:
            return number
        if "." not in value and "e" not in value.lower():
            return int(value)  # exact, whatever its size
        return int(number) if number.is_integer() else value
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def coerce_numbers(tp: Any, value: Any) -> Any:
    """Plain data with number strings made numbers wherever type `tp` expects an int or float.

    For free mappings that are later laid over a typed section (a stage's `model` override):
    their values then compare and merge as numbers. Unknown keys and wrong shapes are left for
    `build` to report; a string where a str alternative exists (`moe_layers`) stays a string."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if isinstance(value, str) and any(a is str or get_origin(a) is Literal for a in args):
            return value
        for arg in args:
            out = coerce_numbers(arg, value)
            if out is not value:
                return out
        return value
    if origin is list and isinstance(value, list):
        return [coerce_numbers(get_args(tp)[0], v) for v in value]
    if origin is dict and isinstance(value, dict):
        return {k: coerce_numbers(get_args(tp)[1], v) for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        return {k: coerce_numbers(hints[k], v) if k in hints else v for k, v in value.items()}
    if tp in (int, float) and not isinstance(value, bool):
        return as_number(tp, value)
    return value


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
    """Convert `value` to type `tp`, appending problems instead of raising; a value that fails
    becomes INVALID (and an INVALID one, already reported, stays so without a new problem)."""
    origin = get_origin(tp)
    if tp is Any or value is INVALID:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        tried = []
        for arg in (a for a in args if a is not type(None)):
            sub: list[tuple[str, str]] = []
            out = build(arg, value, path, sub)
            if not sub:
                return out
            tried.append((out, sub))
        # If exactly one alternative is structurally a match (e.g. a mapping), report its errors.
        for out, sub in tried:
            if any(p != path for p, _ in sub):
                problems.extend(sub)
                return out
        return _refuse(problems, path, f"{_short(value)} is not {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            return _refuse(problems, path, f"{_short(value)} is not one of {list(get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            return _refuse(problems, path, f"{_short(value)} is not a list")
        (item_tp,) = get_args(tp)
        return [build(item_tp, v, _join(path, i), problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            return _refuse(problems, path, f"{_short(value)} is not a mapping")
        _, val_tp = get_args(tp)
        return {k: build(val_tp, v, _join(path, str(k)), problems) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path, problems)
    if tp is bool:
        if not isinstance(value, bool):
            return _refuse(problems, path, f"{_short(value)} is not a boolean (true/false)")
        return value
    if tp is int:
        value = as_number(int, value)
        if isinstance(value, bool) or not isinstance(value, int):
            return _refuse(problems, path, f"{_short(value)} is not an integer")
        return value
    if tp is float:
        value = as_number(float, value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _refuse(problems, path, f"{_short(value)} is not a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            return _refuse(problems, path, f"{_short(value)} is not a string")
        return value
    raise TypeError(f"configtree cannot build type {tp!r} at {path}")  # a bug in a config class


def _refuse(problems: list[tuple[str, str]], path: str, message: str) -> _Invalid:
    problems.append((path, message))
    return INVALID


def build_dataclass(cls: type, value: Any, path: str, problems: list[tuple[str, str]]) -> Any:
    """Build `cls` from a mapping, then run its `check()`.

    A field whose value failed, or that an unknown key probably meant (the key's near miss, or
    else every field left at its default), holds INVALID, so no rule uses a stand-in default."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        return _refuse(problems, path, f"{_short(value)} is not a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    suspects: set[str] = set()
    for key in value:
        if key not in fields:
            close = [k for k in fields if k.replace("_", "") == str(key).replace("_", "").lower()]
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {sorted(fields)}"
            problems.append((_join(path, str(key)), f"unknown key{hint}"))
            suspects.update(k for k in (close[:1] or fields) if k not in value)
    kwargs, missing = {}, False
    for name, f in fields.items():
        if name in value:
            kwargs[name] = build(hints[name], value[name], _join(path, name), problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append((_join(path, name), "required key is missing"))
            missing = True
    if missing:
        return INVALID
    obj = cls(**kwargs)
    for name in suspects:
        object.__setattr__(obj, name, INVALID)
    if hasattr(obj, "check"):
        # The checks run even when a sibling section had errors, so that one pass reports them
        # all; a value a check refuses becomes INVALID at once, so a later rule of the same
        # check that reads it stops there rather than report it a second time.
        for key, msg in unless_invalid(obj.check()):
            problems.append((_join(path, key), msg))
            _invalidate(obj, key)
    return obj


def _invalidate(obj: Any, dotted: str) -> None:
    """Set the field a check() named (`fssdp.window` inside a nested section) to INVALID."""
    *parents, leaf = dotted.split(".")
    for name in parents:
        obj = None if obj is INVALID else getattr(obj, name, None)
    if dataclasses.is_dataclass(obj) and leaf in {f.name for f in dataclasses.fields(obj)}:
        object.__setattr__(obj, leaf, INVALID)


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
