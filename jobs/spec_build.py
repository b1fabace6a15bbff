"""A job spec built from plain data and checked without reading files: the schema pass and the
pure cross-field rules (`jobs.validate`).

`jobs.spec.parse_spec` adds the checks that read files (`jobs.preflight`), and `jobs.preflight`
builds a teacher checkpoint's own spec with `parse_offline`: both sit on this module, so neither
imports the other.
"""
from __future__ import annotations

from typing import Any

from jobs.model_from import resolve_model_from
from jobs.schema import STAGE_OVERRIDES, JobSpec
from jobs.validate import check_job
from system.configtree import SpecError, build_dataclass, coerce_numbers


def build_spec(data: Any, source: str = "spec") -> tuple[JobSpec, list[tuple[str, str]]]:
    """(spec, problems) after the schema pass and the pure rules; raises SpecError only when
    the top level is not a mapping. Every rule is skipped where it reads an INVALID value."""
    problems: list[tuple[str, str]] = []
    if not isinstance(data, dict):
        raise SpecError([("", f"the top level must be a mapping, got {type(data).__name__}")], source)
    data = resolve_model_from(typed_numbers(data), problems)
    spec = build_dataclass(JobSpec, data, "", problems)
    problems.extend(check_job(spec))
    return spec, problems


def parse_offline(data: Any, source: str = "spec") -> JobSpec:
    """A spec whose files are not checked (`jobs.spec.parse_spec(..., preflight=False)`)."""
    spec, problems = build_spec(data, source)
    if problems:
        raise SpecError(problems, source)
    return spec


def typed_numbers(data: dict[str, Any]) -> dict[str, Any]:
    """Spec data whose number strings (`3e-4`, which YAML 1.1 reads as a string) are numbers
    wherever the schema has a number: the typed sections and the stage-level overrides laid
    over them (so `jobs.plan` and `jobs.model_from` compare them as numbers too)."""
    data = coerce_numbers(JobSpec, data)
    if isinstance(data.get("stages"), list):
        data["stages"] = [{k: coerce_numbers(STAGE_OVERRIDES[k], v) if k in STAGE_OVERRIDES else v
                           for k, v in st.items()} if isinstance(st, dict) else st
                          for st in data["stages"]]
    return data
