"""Checkpoint integrity: sizes and CRC-32s in the manifest; a truncated, corrupted or missing
file makes the newest checkpoint fall back to the previous intact one with a one-line warning,
for replicated and fssdp checkpoints; resuming from the fallback continues the run exactly."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from parallel.testing import run_distributed
from system.checkpoint import MANIFEST, CheckpointCorrupt, file_checksum, valid_checkpoint, verify_checkpoint
from tests.helpers import tiny_spec


def _train(rank, world, spec):
    from jobs.stage_runner import run_stage

    run_stage(spec, 0)


def _run(tmp: Path, strategy: str, world: int) -> dict:
    spec = tiny_spec(tmp, run={"name": strategy}, parallel={"world_size": world, "expert_strategy": strategy},
                     stages=[{"name": "pretrain", "steps": 4, "micro_batch_size": 2, "checkpoint_every": 2}])
    run_distributed(_train, world, spec, timeout_s=240)
    return spec


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    out = {}
    for strategy, world in (("replicated", 1), ("fssdp", 2)):
        tmp = tmp_path_factory.mktemp(strategy)
        out[strategy] = (_run(tmp, strategy, world), tmp / "runs" / strategy)
    return out


def _victim(ck: Path, strategy: str) -> Path:
    return ck / ("experts/rank00001.pt" if strategy == "fssdp" else "mp_rank_00_model_states.pt")


def _truncate(f: Path):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(f: Path):
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x01
    f.write_bytes(bytes(b))


@pytest.mark.procs
@pytest.mark.parametrize("strategy", ["replicated", "fssdp"])
def test_the_manifest_records_every_file(runs, strategy):
    ck = runs[strategy][1] / "stages" / "pretrain" / "checkpoints" / "step_00000004"
    files = json.loads((ck / MANIFEST).read_text())["files"]
    on_disk = sorted(str(f.relative_to(ck)) for f in ck.rglob("*") if f.is_file() and f.name != MANIFEST)
    assert sorted(files) == on_disk and len(files) >= 2
    for rel, rec in files.items():
        assert rec == {"size": (ck / rel).stat().st_size, "crc32": file_checksum(ck / rel)}
    assert verify_checkpoint(ck) is None


@pytest.mark.procs
@pytest.mark.parametrize("strategy", ["replicated", "fssdp"])
@pytest.mark.parametrize("damage,words", [(_truncate, "truncated"), (_flip, "corrupted"),
                                          (lambda f: f.unlink(), "missing")])
def test_a_damaged_newest_checkpoint_falls_back(runs, strategy, damage, words, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(runs[strategy][1] / "stages" / "pretrain" / "checkpoints", root)
    victim = _victim(root / "step_00000004", strategy)
    damage(victim)
    said = []
    assert valid_checkpoint(root, warn=said.append).name == "step_00000002"
    assert len(said) == 1 and str(victim) in said[0] and words in said[0] and "using step_00000002" in said[0]
    # both damaged: the error names each
    damage(_victim(root / "step_00000002", strategy))
    with pytest.raises(CheckpointCorrupt) as ei:
        valid_checkpoint(root)
    assert "step_00000004" in str(ei.value) and "step_00000002" in str(ei.value)


@pytest.mark.procs
def test_a_missing_manifest_is_an_incomplete_checkpoint(runs, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(runs["replicated"][1] / "stages" / "pretrain" / "checkpoints", root)
    (root / "step_00000004" / MANIFEST).unlink()
    said = []
    assert valid_checkpoint(root, warn=said.append).name == "step_00000002" and said == []
    assert "no moeforge.json" in verify_checkpoint(root / "step_00000004")


@pytest.mark.slow
@pytest.mark.parametrize("strategy,world", [("replicated", 1), ("fssdp", 2)])
def test_resume_from_the_fallback_continues_exactly(runs, strategy, world, tmp_path):
    """The 'Measured now' case: the newest checkpoint's model file truncated (a full disk). The
    next run resumes from step 2, says so once, and steps 3-4 repeat the original losses."""
    from system.metrics import read_jsonl

    spec, run_dir = runs[strategy]
    new_root = tmp_path / "runs"
    shutil.copytree(run_dir, new_root / strategy)
    spec = {**spec, "run": {**spec["run"], "output_dir": str(new_root)}}
    ck = new_root / strategy / "stages" / "pretrain" / "checkpoints"
    _truncate(_victim(ck / "step_00000004", strategy))
    (ck / "latest").write_text("step_00000004")
    before = [r for r in read_jsonl(new_root / strategy / "metrics.jsonl") if "loss" in r]
    run_distributed(_train, world, spec, timeout_s=240)
    full = [r for r in read_jsonl(new_root / strategy / "metrics.jsonl") if "loss" in r]
    # the records of steps 3-4 are superseded by the re-run's: each step once
    assert [r["step"] for r in full] == [1, 2, 3, 4] and full[:2] == before[:2]
    after = full[2:]
    assert after != before[2:]  # new records (their wall-clock fields differ)
    for r in after:
        orig = next(b for b in before if b["step"] == r["step"])
        assert r["loss"] == orig["loss"], (strategy, r["step"])
    assert verify_checkpoint(ck / "step_00000004") is None  # rewritten intact


@pytest.mark.procs
def test_moeforge_run_stops_at_once_when_no_checkpoint_is_intact(runs, tmp_path, capsys):
    """Before Ray starts: exit 2 with the damaged files named, no restart spent."""
    import yaml

    from jobs.cli import main

    spec, run_dir = runs["replicated"]
    shutil.copytree(run_dir, tmp_path / "runs" / "replicated")
    ck = tmp_path / "runs" / "replicated" / "stages" / "pretrain" / "checkpoints"
    for step in ("step_00000002", "step_00000004"):
        _flip(_victim(ck / step, "replicated"))
    (tmp_path / "runs" / "replicated" / "stages" / "pretrain" / "DONE.json").unlink(missing_ok=True)
    spec = {**spec, "run": {**spec["run"], "output_dir": str(tmp_path / "runs")}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and "step_00000004" in err and "step_00000002" in err
