"""Checkpoint commit protocol: only complete checkpoints are ever 'latest'."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from parallel.testing import run_distributed
from system.checkpoint import (MANIFEST, latest_checkpoint, load_module_weights, read_manifest,
                               resolve_checkpoint)
from tests.helpers import tiny_spec


def _train(rank, world, spec):
    from jobs.stage_runner import run_stage
    run_stage(spec, 0)


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ck")
    spec = tiny_spec(tmp, run={"name": "ck"}, stages=[{"name": "pretrain", "steps": 4, "micro_batch_size": 2,
                                                       "checkpoint_every": 2}])
    run_distributed(_train, 1, spec)
    return tmp / "runs" / "ck" / "stages" / "pretrain" / "checkpoints"


@pytest.mark.procs
def test_layout_of_a_committed_checkpoint(ckpt_root):
    assert (ckpt_root / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in ckpt_root.glob("step_*")) == ["step_00000002", "step_00000004"]
    assert not list(ckpt_root.glob(".tmp-*"))
    m = read_manifest(ckpt_root / "step_00000004")
    assert m["step"] == 4 and m["final"] is True and m["data_position"] == 4 * 2
    assert (ckpt_root / "step_00000004" / "rng_rank0.pt").is_file()
    assert "embed.weight" in load_module_weights(ckpt_root / "step_00000004")


@pytest.mark.procs
def test_incomplete_checkpoints_are_never_latest(ckpt_root, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(ckpt_root, root)
    # A crash mid-write leaves a temporary directory, and could leave a step dir without manifest.
    shutil.copytree(root / "step_00000004", root / ".tmp-step_00000006")
    (root / ".tmp-step_00000006" / MANIFEST).unlink()
    shutil.copytree(root / "step_00000004", root / "step_00000008")
    (root / "step_00000008" / MANIFEST).unlink()
    assert latest_checkpoint(root).name == "step_00000004"
    # `latest` naming an incomplete checkpoint, or lost altogether: fall back to the newest complete one.
    (root / "latest").write_text("step_00000008")
    assert latest_checkpoint(root).name == "step_00000004"
    (root / "latest").unlink()
    assert latest_checkpoint(root).name == "step_00000004"
    assert resolve_checkpoint(root).name == "step_00000004"
    assert resolve_checkpoint(root / "step_00000002").name == "step_00000002"


def test_resolve_checkpoint_rejects_a_directory_without_one(tmp_path):
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        resolve_checkpoint(tmp_path)
