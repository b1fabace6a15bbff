"""The job spec: parse a YAML file into the typed sections of `jobs.schema`, then validate it.

Validation is three passes, each reporting every problem with its dotted path: the schema
(unknown keys, types, field ranges: `system.configtree` + each section's `check()`), the pure
cross-field rules (`jobs.validate`) and, unless asked not to, the checks that read files
(`jobs.preflight`). `jobs.plan.plan_job` then resolves a valid spec into the job's plan.

Numbers are read as YAML 1.2 reads them (`lr: 3e-4` is a float), field by field from the schema,
stage overrides included (`jobs.spec_build.typed_numbers`). A value that failed its own check
is INVALID in the built spec, and the later passes skip every rule that reads it, so each
mistake gives one error.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Optional

import yaml

from jobs.preflight import preflight as run_preflight
from jobs.schema import JobSpec
from jobs.spec_build import build_spec
from system.configtree import SpecError, to_dict, unless_invalid


def parse_spec(data: Any, source: str = "spec", *, preflight: bool = True) -> JobSpec:
    """Build and validate a JobSpec from plain data; raises SpecError listing every problem.

    `preflight=False` skips the checks that read files (a worker re-reading a spec the driver
    already checked, or a checkpoint manifest's spec whose data may have moved since)."""
    spec, problems = build_spec(data, source)  # the schema and the pure rules (jobs.spec_build)
    if preflight:
        problems.extend(unless_invalid(run_preflight(spec)))  # stops at the first INVALID it reads
    if problems:
        raise SpecError(problems, source)
    return spec


def load_spec(path: str | os.PathLike) -> JobSpec:
    """Read a YAML job spec from disk and validate it (nothing is launched or written)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError([("", f"spec file {str(p)!r} does not exist")], str(p))
    return parse_spec_text(p.read_text(), str(p))


def parse_spec_text(text: str, source: str = "spec") -> JobSpec:
    """`parse_spec` of a YAML text; a syntax error is a SpecError too."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError([("", f"YAML syntax error: {e}")], source) from None
    return parse_spec(data, source)


def dump_spec(spec: JobSpec) -> str:
    """The spec as YAML, every field written out (the run's spec.yaml)."""
    return yaml.safe_dump(to_dict(spec), sort_keys=False)


def with_absolute_paths(spec: JobSpec, base: Optional[Path] = None) -> JobSpec:
    """A copy whose relative paths are resolved against `base` (default: the cwd).

    Workers run in directories of Ray's choosing, so the driver resolves every path once;
    on a multi-node cluster these must name shared storage.
    """
    base = Path(base or Path.cwd())
    out = copy.deepcopy(spec)

    def fix(p: Optional[str]) -> Optional[str]:
        return p if p is None or Path(p).is_absolute() else str(base / p)

    out.run.output_dir = fix(out.run.output_dir)
    out.data.cache_dir = fix(out.data.cache_dir)
    out.data.tokenizer.path = fix(out.data.tokenizer.path)
    out.ray.run_config.storage_path = fix(out.ray.run_config.storage_path)
    for srcs in [out.data.sources] + [st.data.sources for st in out.stages if st.data.sources]:
        for src in srcs:
            src.paths = [fix(p) for p in src.paths]
    names = {st.name for st in out.stages}
    for st in out.stages:
        if st.init_from is not None and st.init_from not in names:
            st.init_from = fix(st.init_from)
        if st.distill.teacher is not None and st.distill.teacher not in names:
            st.distill.teacher = fix(st.distill.teacher)
    return out
