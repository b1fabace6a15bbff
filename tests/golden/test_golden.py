"""A short golden run reproduced exactly: the fssdp curve recorded before the architecture
refactor (tests/golden/fssdp.json, a `moeforge run` on Ray) equals, number for number, the same
stage run here on 2 gloo ranks through the stage runner. The other recorded curves are checked
with `python tests/golden/record.py --check` (they take minutes)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from parallel.testing import run_distributed

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import record  # noqa: E402


def _stage(rank: int, world: int, spec: dict) -> None:
    from jobs.stage_runner import run_stage

    run_stage(spec, 0)


@pytest.mark.slow
def test_fssdp_golden_curve_is_reproduced_exactly(tmp_path):
    spec = record.golden_specs(tmp_path)["fssdp"]
    run_distributed(_stage, spec["parallel"]["world_size"], spec, timeout_s=300)
    lines = (tmp_path / spec["run"]["name"] / "metrics.jsonl").read_text().splitlines()
    got = [{k: v for k, v in json.loads(line).items() if k not in record.WALL_CLOCK} for line in lines]
    where, exact = record.golden_dir()  # curves recorded on this CPU's capability: exact
    want = json.loads((where / "fssdp.json").read_text())
    bad = record.compare("fssdp", want, got, exact)
    assert not bad, "\n".join(bad[:20])
