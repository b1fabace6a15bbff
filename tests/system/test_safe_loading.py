"""Safe loading: every checkpoint file is read with PyTorch's restricted unpickler (DeepSpeed's
engine files are screened with it before DeepSpeed unpickles them), so a file carrying a
malicious pickle is refused, naming the file, and its code never runs: on resume, on
init_from and on export. RNG states round-trip through the restricted format."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from parallel.testing import run_distributed
from system.checkpoint import MANIFEST, file_records, load_module_weights, rng_state, set_rng_state
from system.safe_load import UnsafeCheckpoint, load_tensors, screen_checkpoint
from tests.helpers import tiny_spec


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))  # runs at unpickling time under weights_only=False


def _poison(f: Path, marker: Path) -> None:
    """Replace a checkpoint file by a malicious pickle and rewrite the manifest's records, as an
    attacker who hands over a whole directory would (the checksums pass)."""
    torch.save({"state": _Evil(str(marker))}, f)
    ck = next(p for p in f.parents if (p / MANIFEST).is_file())
    man = json.loads((ck / MANIFEST).read_text())
    man["files"] = file_records(ck)
    (ck / MANIFEST).write_text(json.dumps(man))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pt"
    torch.save({"state": _Evil(str(marker))}, f)
    with pytest.raises(UnsafeCheckpoint) as ei:
        load_tensors(f)
    assert str(f) in str(ei.value) and "mkdir" in str(ei.value)
    with pytest.raises(UnsafeCheckpoint):
        load_tensors(f, allow_deepspeed=True, mmap=True)
    assert not marker.exists()
    # what torch.load(weights_only=False) would have done with it
    torch.load(f, weights_only=False)
    assert marker.exists()


def test_rng_states_round_trip_through_the_restricted_unpickler(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_tensors(tmp_path / "rng.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def _train(rank, world, spec):
    from jobs.stage_runner import run_stage

    run_stage(spec, 0)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("safe")
    spec = tiny_spec(tmp, run={"name": "safe"}, parallel={"world_size": 1},
                     stages=[{"name": "pretrain", "steps": 2, "micro_batch_size": 2, "checkpoint_every": 1}])
    run_distributed(_train, 1, spec, timeout_s=240)
    return spec, tmp / "runs" / "safe" / "stages" / "pretrain" / "checkpoints"


@pytest.mark.procs
@pytest.mark.parametrize("victim", ["rng_rank0.pt", "mp_rank_00_model_states.pt"])
def test_resume_refuses_a_poisoned_checkpoint(run, tmp_path, victim):
    import shutil

    spec, ckpts = run
    spec = json.loads(json.dumps(spec))
    spec["run"]["output_dir"] = str(tmp_path / "runs")
    spec["stages"][0]["steps"] = 3
    dst = tmp_path / "runs" / "safe" / "stages" / "pretrain" / "checkpoints"
    shutil.copytree(ckpts, dst)
    marker = tmp_path / "pwned"
    _poison(dst / "step_00000002" / victim, marker)
    with pytest.raises(RuntimeError) as ei:
        run_distributed(_train, 1, spec, timeout_s=240)
    assert "UnsafeCheckpoint" in str(ei.value) and victim in str(ei.value)
    assert not marker.exists()
    # the screen and the weight reader (init_from, teachers) refuse it too
    with pytest.raises(UnsafeCheckpoint):
        screen_checkpoint(dst / "step_00000002")
    if victim.startswith("mp_rank"):
        with pytest.raises(UnsafeCheckpoint):
            load_module_weights(dst / "step_00000002")
    assert not marker.exists()
    assert load_module_weights(dst / "step_00000001")  # an intact one loads


@pytest.mark.procs
def test_export_refuses_a_poisoned_checkpoint(run, tmp_path, capsys):
    import shutil

    from jobs.cli import main

    _, ckpts = run
    run_dir = tmp_path / "runs" / "safe"
    shutil.copytree(ckpts.parents[2], run_dir)
    marker = tmp_path / "pwned"
    _poison(run_dir / "stages" / "pretrain" / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt", marker)
    rc = main(["export", str(run_dir), "--to", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert rc == 2 and "refused to load" in err and "mp_rank_00_model_states.pt" in err and not marker.exists()
    assert not (tmp_path / "hf" / "config.json").exists()
