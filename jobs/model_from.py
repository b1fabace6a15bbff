"""`model: {from: init_from}`: take a model's shape from a Hugging Face directory's config.json.

In the top-level `model` section, `from: init_from` names the first stage's `init_from` that is
a directory (or `from: PATH` a directory directly); in `stages[i].model`, that stage's
`init_from`. Every shape field (and, for MoE families, the router's `score` / `normalize_topk`
/ grouping in the matching `experts.router`) is filled in from config.json; a field the spec
states as well is checked against it and a disagreement is reported with both values. The
result is a plain spec without `from`, so workers and checkpoint manifests see concrete values.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

from system.hf.families import HF_NAMES, HFConfigError, read_family, same_value, show

FROM = "from"


def resolve_model_from(data: dict[str, Any], problems: list[tuple[str, str]]) -> dict[str, Any]:
    """A copy of spec data with every `model.from` replaced by the fields it names."""
    stages = data.get("stages") if isinstance(data.get("stages"), list) else []
    top = data.get("model")
    stage_models = [(i, st) for i, st in enumerate(stages)
                    if isinstance(st, dict) and isinstance(st.get("model"), dict) and FROM in st["model"]]
    if not (isinstance(top, dict) and FROM in top) and not stage_models:
        return data
    data = copy.deepcopy(data)
    stages = data.get("stages") if isinstance(data.get("stages"), list) else []
    names = {st.get("name") for st in stages if isinstance(st, dict)}
    if isinstance(data.get("model"), dict) and FROM in data["model"]:
        ref = data["model"][FROM]
        if ref == "init_from":
            dirs = [st.get("init_from") for st in stages if isinstance(st, dict)
                    and st.get("init_from") and st.get("init_from") not in names]
            if not dirs:
                problems.append(("model.from", "init_from, but no stage's init_from names a directory "
                                               "(a Hugging Face model to take the shape from)"))
                data["model"].pop(FROM)
                return data
            ref = dirs[0]
        data.setdefault("experts", {})
        _fill(data, "model", data.get("experts"), "experts", ref, problems)
    for i, st in enumerate(stages):
        if isinstance(st, dict) and isinstance(st.get("model"), dict) and FROM in st["model"]:
            ref = st["model"][FROM]
            if ref == "init_from":
                ref = st.get("init_from")
                if not ref or ref in names:
                    problems.append((f"stages[{i}].model.from", "init_from, but this stage's init_from is "
                                     f"{'not set' if not ref else 'a stage'}, not a Hugging Face directory"))
                    st["model"].pop(FROM)
                    continue
            if not isinstance(st.get("experts"), dict):
                st["experts"] = {}
            _fill(st, "model", st["experts"], f"stages[{i}].experts", ref, problems, f"stages[{i}].model")
    return data


def _fill(holder: dict, key: str, experts: Optional[dict], experts_path: str, ref: Any,
          problems: list[tuple[str, str]], model_path: str = "model") -> None:
    section = holder[key]
    section.pop(FROM)
    where = f"{model_path}.from"
    if not isinstance(ref, str) or not Path(ref).is_dir():
        problems.append((where, f"{ref!r} is not a directory (a local Hugging Face model)"))
        return
    try:
        fam = read_family(ref)
    except HFConfigError as e:
        problems.append((where, str(e)))
        return
    for name, theirs in fam.model.items():
        if name in section:
            if not same_value(_norm(name, section[name], section), _norm(name, theirs, fam.model)):
                problems.append((f"{model_path}.{name}", f"{show(section[name])} but {ref}/config.json has "
                                 f"{HF_NAMES.get(name, name)} {show(theirs)}"))
        else:
            section[name] = theirs
    if fam.is_moe and experts is not None:
        router = experts.setdefault("router", {})
        if not isinstance(router, dict):
            return
        for name, theirs in fam.router.items():
            if name in router and not same_value(router[name], theirs):
                problems.append((f"{experts_path}.router.{name}", f"{show(router[name])} but the {fam.model_type} "
                                 f"model at {ref} routes with {name} {show(theirs)}"))
            router.setdefault(name, theirs)


def _norm(name: str, v: Any, section: dict) -> Any:
    if name == "moe_layers" and isinstance(v, list):
        n = section.get("n_layers")
        return "all" if n is not None and sorted(v) == list(range(n)) else sorted(v)
    return v
