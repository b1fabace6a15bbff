"""A JSON Schema (draft 2020-12) from the typed config dataclasses `configtree` builds.

The same classes define both, so the schema cannot drift from what the parser accepts: each
dataclass becomes an object with exactly its fields (`additionalProperties: false`), Literal
types become enums, Optional ones allow null, defaults are the dataclass defaults, and each
field's description is the comment the code gives it (on its line, or the comment lines right
above it); a class's docstring describes its section. Range checks (`check()`) and cross-field
rules stay in the parser; the schema is what editors complete and check as one types.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from system.configtree import to_dict

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def field_comments(cls: type) -> dict[str, str]:
    """{field: description} from the comments in the class's source."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    comments: dict[int, str] = {}  # 1-based line -> comment text
    try:
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        return {}
    cls_node = next((n for n in ast.parse(src).body if isinstance(n, ast.ClassDef)), None)
    out: dict[str, str] = {}
    for node in cls_node.body if cls_node else []:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, i = [], node.lineno - 1
        while i >= 1 and lines[i - 1].strip().startswith("#"):
            above.insert(0, comments.get(i, ""))
            i -= 1
        parts = [p for p in above + [comments.get(node.end_lineno, "")] if p]
        if parts:
            out[node.target.id] = " ".join(parts)
    return out


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(to_dict(value)))
    except (TypeError, ValueError):
        return None


def _default(f: dataclasses.Field) -> tuple[bool, Any]:
    if f.default is not dataclasses.MISSING:
        return True, _jsonable(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return True, _jsonable(f.default_factory())
    return False, None


class _Builder:
    def __init__(self):
        self.defs: dict[str, dict] = {}

    def type_schema(self, tp: Any) -> dict:
        origin = get_origin(tp)
        if tp is Any:
            return {}
        if origin in (Union, types.UnionType):
            args = get_args(tp)
            alts = [self.type_schema(a) for a in args if a is not type(None)]
            if type(None) in args:
                alts.append({"type": "null"})
            return alts[0] if len(alts) == 1 else {"anyOf": alts}
        if origin is Literal:
            return {"enum": list(get_args(tp))}
        if origin is list:
            return {"type": "array", "items": self.type_schema(get_args(tp)[0])}
        if origin is dict:
            return {"type": "object", "additionalProperties": self.type_schema(get_args(tp)[1])}
        if dataclasses.is_dataclass(tp):
            return self.dataclass_ref(tp)
        simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
        if tp in simple:
            return {"type": simple[tp]}
        raise TypeError(f"config_schema cannot describe type {tp!r}")

    def dataclass_ref(self, cls: type) -> dict:
        name = cls.__name__
        if name not in self.defs:
            self.defs[name] = {}  # placeholder: a recursive reference stops here
            self.defs[name] = self.dataclass_schema(cls)
        return {"$ref": f"#/$defs/{name}"}

    def dataclass_schema(self, cls: type) -> dict:
        hints = typing.get_type_hints(cls)
        notes = field_comments(cls)
        props, required = {}, []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            sch = dict(self.type_schema(hints[f.name]))
            has, value = _default(f)
            if has:
                sch["default"] = value
            else:
                required.append(f.name)
            if f.name in notes:
                sch["description"] = notes[f.name]
            props[f.name] = sch
        out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
        if required:
            out["required"] = required
        doc = inspect.getdoc(cls)
        if doc and not doc.startswith(f"{cls.__name__}("):  # not the dataclass's generated signature
            out["description"] = doc.split("\n\n")[0].replace("\n", " ")
        return out


def json_schema(cls: type, title: str, schema_id: str | None = None) -> dict:
    """The JSON Schema of config dataclass `cls` (its nested sections under `$defs`)."""
    b = _Builder()
    root = b.dataclass_schema(cls)
    out = {"$schema": DRAFT, **({"$id": schema_id} if schema_id else {}), "title": title, **root}
    if b.defs:
        out["$defs"] = dict(sorted(b.defs.items()))
    return out
