"""Where a command's job spec comes from: a YAML file, or (`env:NAME`) an environment variable.

`moeforge submit` (`jobs.jobs_api`) ships the spec to a Ray job in `SPEC_ENV`, with its label in
`SPEC_SOURCE_ENV`; the job's `moeforge run` (`jobs.cli`) reads it back here. Both commands use
this module, so neither imports the other for it.
"""
from __future__ import annotations

import os
from typing import Optional

SPEC_ENV = "MOEFORGE_SPEC_YAML"  # the resolved spec's text, for `run env:MOEFORGE_SPEC_YAML`
SPEC_SOURCE_ENV = "MOEFORGE_SPEC_SOURCE"  # where it came from, for the job's error messages


def load_job_spec(path: str, output_dir: Optional[str] = None):
    """A validated spec from a YAML file or, as `env:NAME`, from an environment variable (how
    `moeforge submit` ships the spec, its paths resolved where it was submitted)."""
    from jobs.spec import load_spec, parse_spec_text
    from system.configtree import SpecError

    if path.startswith("env:"):
        text = os.environ.get(path[4:])
        source = os.environ.get(SPEC_SOURCE_ENV, path)
        if text is None:
            raise SpecError([("", f"environment variable {path[4:]} is not set")], path)
        spec = parse_spec_text(text, source)
    else:
        spec = load_spec(path)
    if output_dir:
        spec.run.output_dir = output_dir
    return spec
