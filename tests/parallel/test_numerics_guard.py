"""The numerics guard: an Inf injected into one rank's loss skips the step's update on every rank
(no weight, no optimizer moment changes; counted in the metrics) and training goes on; after
`max_bad_steps` bad steps in a row the stage stops naming the steps and the last good checkpoint.
fp32: replicated (ZeRO 0 and 2) and fssdp (ZeRO 1); bf16 (DeepSpeed's CPU accelerator runs it):
every strategy x ZeRO 0/1/2. 2 gloo ranks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from parallel.testing import run_distributed
from system.safe_load import checkpoint_tensors
from tests.helpers import tiny_spec


def _train(rank, world, spec):
    from jobs.stage_runner import run_stage

    run_stage(spec, 0)


def _spec(tmp: Path, strategy: str, zero: int, **stage) -> dict:
    return tiny_spec(tmp, run={"name": "guard"},
                     parallel={"world_size": 2, "expert_strategy": strategy, "zero_stage": zero},
                     stages=[{"name": "pretrain", "steps": 5, "micro_batch_size": 2, "grad_accum_steps": 2,
                              "checkpoint_every": 1, **stage}])


def _records(run: Path) -> dict[int, dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if "loss" in r}


BF16 = {"bf16": {"enabled": True}}
GRID = [(s, z, None, 0) for s, z in (("replicated", 0), ("replicated", 2), ("fssdp", 1))] + \
    [(s, z, "bf16", 0) for s in ("replicated", "ep", "fssdp", "deepspeed_moe") for z in (0, 1, 2)] + \
    [("ep", 1, "bf16", 1), ("fssdp", 2, "bf16", 2)]  # expert state sharded over the 2 ranks (P = 1)


@pytest.mark.procs
@pytest.mark.parametrize("strategy,zero,dtype,sharding", GRID)
def test_an_inf_loss_skips_the_update_everywhere(tmp_path, monkeypatch, strategy, zero, dtype, sharding):
    monkeypatch.setenv("MOEFORGE_FAULT_NONFINITE", "3")
    monkeypatch.setenv("MOEFORGE_FAULT_NONFINITE_RANK", "1")  # one rank only: the skip is agreed
    spec = _spec(tmp_path, strategy, zero)
    if sharding:
        spec["parallel"].update(expert_parallel_size=1, expert_sharding=sharding)
    if dtype == "bf16":
        spec["deepspeed"] = BF16
    run_distributed(_train, 2, spec, timeout_s=300)
    run = tmp_path / "runs" / "guard"
    recs = _records(run)
    assert [recs[s]["step_skipped"] for s in range(1, 6)] == [0, 0, 1, 0, 0]
    assert [recs[s]["skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert math.isnan(recs[3]["grad_norm"]) and not math.isfinite(recs[3]["loss"])
    assert all(math.isfinite(recs[s]["loss"]) and math.isfinite(recs[s]["grad_norm"]) for s in (4, 5))
    ckpts = run / "stages" / "pretrain" / "checkpoints"
    before, after, next_ = (checkpoint_tensors(ckpts / f"step_{s:08d}") for s in (2, 3, 4))
    assert before.keys() == after.keys() and len(before) > 10
    if sharding:  # each rank's pieces: masters and moments of half the rows
        assert sum(k.startswith("experts/") and "/exp_avg." in k for k in before) > 0, sorted(before)[-3:]
        assert len(list((ckpts / "step_00000002" / "experts").glob("rank*.pt"))) == 2
    same = [k for k in before if torch.equal(before[k], after[k])]
    changed = [k for k in before if not torch.equal(before[k], next_[k])]
    assert len(same) == len(before), sorted(set(before) - set(same))[:5]  # step 3 changed nothing
    assert len(changed) > len(before) // 2  # step 4 did update (so the comparison can fail)
    # the LR schedule moved on at the skipped step, as on a good one
    assert recs[3]["lr"] != recs[2]["lr"] or recs[4]["lr"] != recs[3]["lr"]


@pytest.mark.procs
def test_k_bad_steps_in_a_row_stop_the_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFORGE_FAULT_NONFINITE", "3,4")
    spec = _spec(tmp_path, "replicated", 0, max_bad_steps=2)
    with pytest.raises(RuntimeError) as ei:
        run_distributed(_train, 2, spec, timeout_s=300)
    msg = str(ei.value)
    assert "TrainingDiverged" in msg and "2 steps in a row (steps 3-4)" in msg
    assert "weights are those of step 2" in msg and "step_00000003" in msg  # the skip was checkpointed
    recs = _records(tmp_path / "runs" / "guard")
    assert max(recs) == 4 and recs[4]["skipped_steps"] == 2
