"""Asynchronous checkpoints (`system/async_checkpoint.py`) on 2 gloo ranks (ep, ZeRO 1: DeepSpeed's
model and optimizer files, expert files and RNG files all take the asynchronous path).

Fast, in process: a snapshot keeps views and shared storage and ignores later changes; a save
returns before the write, and what lands on disk is the state at the save; a failed background
write raises on `finish` and leaves `latest` where it was.

A run whose rank 1 is SIGKILLed by its checkpoint writer after its first file of step 4 (before
any manifest) leaves `.tmp-step_00000004` partial and `latest` at step 2; resumed from there, its
losses equal the uninterrupted run's. The asynchronous checkpoints hold the same tensors, file by
file, as the synchronous ones of the same run, and verify."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from parallel.testing import run_distributed
import torch

from system.async_checkpoint import CheckpointWriteFailed, HostBuffers, snapshot
from system.checkpoint import CheckpointManager, latest_checkpoint, verify_checkpoint
from system.metrics import read_jsonl
from system.safe_load import checkpoint_tensors, load_tensors
from tests.helpers import tiny_spec


def test_a_snapshot_keeps_sharing_and_ignores_later_changes():
    flat = torch.arange(12.0)
    state = {"a": flat[:4], "b": flat[4:].view(2, 4), "tied": [flat[:4]], "n": 3, "s": "x"}
    snap = snapshot(state, HostBuffers())
    flat.add_(100)
    assert snap["a"].tolist() == [0, 1, 2, 3] and snap["b"][1].tolist() == [8, 9, 10, 11]
    assert snap["a"].untyped_storage().data_ptr() == snap["b"].untyped_storage().data_ptr()  # one copy
    assert snap["tied"][0].storage_offset() == 0 and snap["n"] == 3 and snap["s"] == "x"


class _Engine:
    """What CheckpointManager needs of DeepSpeed's engine: its checkpoint engine and a save."""

    def __init__(self):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        self.checkpoint_engine = TorchCheckpointEngine()
        self.w = torch.zeros(1000)

    def save_checkpoint(self, root, tag, client_state, save_latest):
        self.checkpoint_engine.makedirs(f"{root}/{tag}", exist_ok=True)
        self.checkpoint_engine.save({"module": {"w": self.w}, **client_state}, f"{root}/{tag}/mp_rank_00_model_states.pt")


def test_an_async_save_writes_the_state_at_the_save_and_a_failed_write_raises(tmp_path, monkeypatch):
    eng, mgr = _Engine(), CheckpointManager(tmp_path, 0, lambda: None, async_save=True, world=1)
    for step in (1, 2):
        eng.w.fill_(step)
        mgr.save(eng, step, {"moeforge": {"step": step}}, {"step": step})
        eng.w.fill_(-1)  # the next step's update, before the write
    mgr.finish()
    ck = latest_checkpoint(tmp_path)
    assert ck.name == "step_00000002" and verify_checkpoint(ck) is None
    assert checkpoint_tensors(ck)["mp_rank_00_model_states.pt/module/w"].eq(2).all()
    assert not list(tmp_path.glob(".tmp-*"))

    import system.async_checkpoint as ac

    def full_disk(raw, obj, save, zipfile):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ac, "write_releasing_gil", full_disk)
    mgr.save(eng, 3, {"moeforge": {"step": 3}}, {"step": 3})
    with pytest.raises(CheckpointWriteFailed, match="No space left on device"):
        mgr.finish()
    assert latest_checkpoint(tmp_path).name == "step_00000002"


def _train(rank, world, spec, async_save):
    """One stage of `spec` on this rank, its checkpoints asynchronous or not
    (`ray.checkpoint_config.async_save`, which the stage runner hands to its CheckpointManager)."""
    from jobs.stage_runner import run_stage

    spec = copy.deepcopy(spec)
    spec.setdefault("ray", {}).setdefault("checkpoint_config", {})["async_save"] = async_save
    run_stage(spec, 0)


def _spec(tmp: Path, name: str) -> dict:
    return tiny_spec(tmp, run={"name": name}, parallel={"world_size": 2, "expert_strategy": "ep", "zero_stage": 1},
                     stages=[{"name": "pretrain", "steps": 6, "micro_batch_size": 2, "checkpoint_every": 2}])


def _ckpts(spec: dict) -> Path:
    return Path(spec["run"]["output_dir"]) / spec["run"]["name"] / "stages" / "pretrain" / "checkpoints"


def _losses(spec: dict) -> dict[int, float]:
    run = Path(spec["run"]["output_dir"]) / spec["run"]["name"]
    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}


def _same_tensors(a: Path, b: Path) -> None:
    assert verify_checkpoint(a) is None and verify_checkpoint(b) is None
    assert sorted(p.relative_to(a) for p in a.rglob("*.pt")) == sorted(p.relative_to(b) for p in b.rglob("*.pt"))
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and ta[k].equal(tb[k]), k
    for f in sorted(a.glob("rng_rank*.pt")):  # torch's RNG (python's and numpy's are per process)
        assert load_tensors(f)["torch"].equal(load_tensors(b / f.name)["torch"]), f.name


@pytest.mark.procs
def test_a_crash_during_an_async_write_keeps_the_previous_checkpoint_and_resumes_exactly(tmp_path, monkeypatch):
    ref = _spec(tmp_path, "ref")
    run_distributed(_train, 2, ref, False, timeout_s=300)  # synchronous, uninterrupted
    want = _losses(ref)
    assert sorted(want) == [1, 2, 3, 4, 5, 6]

    crash = _spec(tmp_path, "crash")
    monkeypatch.setenv("MOEFORGE_FAULT_KILL_IN_CHECKPOINT", "4")  # rank 1, after its first file of step 4
    monkeypatch.setenv("MOEFORGE_CHECKPOINT_ABORT_GRACE_S", "0.5")  # rank 0 stops waiting for the dead rank
    monkeypatch.setattr("parallel.testing.FAILURE_GRACE_S", 0.5)  # rank 1 never answers
    with pytest.raises(RuntimeError, match="rank 0"):  # rank 0 fails at its next collective
        run_distributed(_train, 2, crash, True, timeout_s=300, reuse=False)  # the kept ranks stay fit
    monkeypatch.delenv("MOEFORGE_FAULT_KILL_IN_CHECKPOINT")
    root = _ckpts(crash)
    partial = root / ".tmp-step_00000004"
    assert partial.is_dir() and any(partial.rglob("*.pt")) and not (partial / "moeforge.json").exists()
    assert not (root / "step_00000004").exists()
    assert (root / "latest").read_text() == "step_00000002"
    _same_tensors(_ckpts(ref) / "step_00000002", root / "step_00000002")  # async == sync, file by file

    run_distributed(_train, 2, copy.deepcopy(crash), True, timeout_s=300)  # resumes at step 2
    got = _losses(crash)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert got == want  # bit for bit
    assert not partial.exists()  # the next save removed the partial checkpoint
    assert (root / "latest").read_text() == "step_00000006"
    _same_tensors(_ckpts(ref) / "step_00000006", root / "step_00000006")
