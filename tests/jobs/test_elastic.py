"""Elastic stages (`parallel.elastic`, `jobs.elastic`) without Ray: the size a worker count runs
at, the plan at each size, the validation of every size, and a restart at a smaller size.

The restart: an fssdp stage (ZeRO 1, P = 2, expert state sharded over the EDP group at 4 ranks)
asks for 4 workers with sizes [2, 4]; it checkpoints at step 4 on 4 ranks, then 3 workers come
back (a node lost): the stage runs at 2 of them (the third leaves the process group), with twice
the gradient accumulation, resumes from step 4 and the losses of steps 5-6 equal the
uninterrupted 4-rank run's to 1e-5; every step is recorded once, with its world size.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from jobs.elastic import run_size, stage_at
from jobs.plan import plan_job
from jobs.spec import SpecError, parse_spec
from parallel.testing import run_distributed
from system.metrics import read_jsonl
from tests.helpers import tiny_spec
from tests.parallel.test_resume_world_size import _keep_up_to, _train


def _spec(tmp: Path, **par) -> dict:
    return tiny_spec(tmp, run={"name": "elastic"},
                     experts={"balancing": {"lbl": "global_batch", "global_accumulation": "exact", "lbl_coeff": 0.05}},
                     parallel={"world_size": 4, "expert_strategy": "fssdp", "zero_stage": 1,
                               "expert_parallel_size": 2, "expert_sharding": 1, "elastic": {"sizes": [2, 4]}, **par},
                     ray={"failure_config": {"max_failures": 2}},
                     stages=[{"name": "pretrain", "steps": 6, "micro_batch_size": 2, "grad_accum_steps": 1,
                              "checkpoint_every": 2, "optimizer": {"lr": 3e-3},
                              "lr_schedule": {"kind": "cosine", "warmup_steps": 2}}])


def test_run_size_and_the_plan_at_each_size(tmp_path):
    assert run_size([2, 4], 3) == 2 and run_size([2, 4], 4) == 4 and run_size([2, 4, 8], 7) == 4
    with pytest.raises(ValueError, match="fewer than the smallest size"):
        run_size([2, 4], 1)
    stage = plan_job(parse_spec(_spec(tmp_path))).stages[0]
    at2 = stage_at(stage, 2)
    assert (stage.world_size, stage.grad_accum_steps, stage.ep_size) == (4, 1, 2)
    assert (at2.world_size, at2.grad_accum_steps, at2.ep_size, at2.global_batch_size) == (2, 2, 2, 8)
    assert at2.parallel.world_size == 2 and stage_at(stage, 4) is stage
    # the default rule: expert-parallel within a node (gcd with ranks_per_node), or the world
    node = plan_job(parse_spec(_spec(tmp_path, expert_parallel_size=None, expert_sharding=0,
                                     fssdp={"ranks_per_node": 2}))).stages[0]
    assert node.ep_size == 2 and stage_at(node, 2).ep_size == 2
    world = plan_job(parse_spec(_spec(tmp_path, expert_parallel_size=None, expert_sharding=0,
                                      elastic={"sizes": [2, 4], "expert_parallel": "world"}))).stages[0]
    assert world.ep_size == 4 and stage_at(world, 2).ep_size == 2


def _problems(spec: dict) -> str:
    try:
        parse_spec(spec)
    except SpecError as e:
        return str(e)
    return ""


def test_every_size_is_validated(tmp_path):
    assert _problems(_spec(tmp_path)) == ""
    s = _spec(tmp_path)
    s["ray"]["failure_config"]["max_failures"] = 0
    assert "ray.failure_config.max_failures: 0: an elastic stage resizes" in _problems(s)
    s = _spec(tmp_path, elastic={"sizes": [3, 4]}, expert_parallel_size=1)
    assert "size 3: the global batch of 8 sequences" in _problems(s)
    assert "the largest must be the world size asked for (4)" in _problems(_spec(tmp_path, elastic={"sizes": [2, 8]}))
    assert "must be distinct and ascending" in _problems(_spec(tmp_path, elastic={"sizes": [4, 2]}))
    s = _spec(tmp_path, elastic={"sizes": [3, 4]})
    s["stages"][0]["micro_batch_size"] = 1
    s["stages"][0]["grad_accum_steps"] = 3  # 12 sequences: 3 ranks take them, P = 2 does not
    assert "expert_parallel_size: 2 does not divide elastic size 3" in _problems(s)


def _elastic_worker(rank: int, world: int, spec: dict, sizes: list) -> dict:
    """What an elastic Ray worker does (`jobs.orchestrate._join_elastic_world`), on gloo ranks."""
    from parallel import dist as pdist

    size = run_size(sizes, world)
    if not pdist.narrow_world(size):
        return {"trained": False}
    _train(pdist.rank(), size, spec)
    return {"trained": True, "world": pdist.world_size()}


def _losses(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}


@pytest.mark.procs
def test_a_restart_with_fewer_workers_runs_at_an_allowed_size_and_continues_the_loss(tmp_path, monkeypatch):
    ref = _spec(tmp_path / "ref")
    run_distributed(_train, 4, ref, timeout_s=300)
    want = _losses(Path(ref["run"]["output_dir"]) / "elastic")
    assert sorted(want) == [1, 2, 3, 4, 5, 6] and all(r["world_size"] == 4 for r in want.values())
    spec = copy.deepcopy(ref)
    spec["run"]["output_dir"] = str(tmp_path / "runs")
    run = tmp_path / "runs" / "elastic"
    shutil.copytree(Path(ref["run"]["output_dir"]) / "elastic", run)
    _keep_up_to(run, 4)  # the node was lost after step 4's checkpoint
    assert len(list((run / "stages/pretrain/checkpoints/step_00000004/experts").glob("rank*.pt"))) == 4  # sharded
    res = run_distributed(_elastic_worker, 3, spec, [2, 4], timeout_s=300, reuse=False)
    assert [r["trained"] for r in res] == [True, True, False] and res[0]["world"] == 2
    got = _losses(run)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # each step once: 5 and 6 trained again at 2 ranks
    for s in (5, 6):
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-5, abs=0), s
        assert got[s]["world_size"] == 2 and got[s]["requested_world_size"] == 4
    man = json.loads((run / "stages/pretrain/checkpoints/step_00000006/moeforge.json").read_text())
    assert man["world_size"] == 2
    assert len(list((run / "stages/pretrain/checkpoints/step_00000006/experts").glob("rank*.pt"))) == 2


def test_a_grow_checkpoint_request_is_handed_out_until_taken_only():
    """The progress actor's rule: rank 0 of a group sees a grow's checkpoint request until one
    rank 0 took it; the group restarted after the grow (a fresh reporter, nothing acted on) sees
    none, so it does not checkpoint and hold again at its first step."""
    from jobs.progress import ProgressState

    p = ProgressState()
    assert p.update({"step": 1}) == (False, 0)
    assert p.request_checkpoint() == 1
    assert p.update({"step": 2}) == (False, 1) and p.stop_flag() == (False, 1) and p.taken(1) is None
    p.checkpoint_taken(1, 2)
    assert p.taken(1) == 2 and p.update({"step": 3}) == (False, 0)  # the restarted group: nothing open
    assert p.request_checkpoint() == 2 and p.stop_flag() == (False, 2)  # a later grow: a new number
    p.request_stop()
    assert p.stop_flag() == (True, 2)
