"""jobs.torchrun (a job on one node with torch's launcher, no Ray): the launch checks and the
one-line errors, in this process. Its training runs (1 rank, and 2 gloo ranks) are in
tests/test_gpu_suite.py's dry run, with Ray refused at import."""
from __future__ import annotations

import sys

import pytest

from jobs import torchrun
from jobs.plan import plan_job
from jobs.spec import parse_spec
from tests.helpers import tiny_spec, write_spec

ONE = {"launched": True, "rank": 0, "world": 1, "local_rank": 0, "local_world": 1}


def _plan(spec):
    js = parse_spec(spec, preflight=False)
    return js, plan_job(js)


def test_a_world_size_other_than_the_launch_names_the_field(tmp_path):
    js, plan = _plan(tiny_spec(tmp_path, parallel={"world_size": 2}))
    with pytest.raises(torchrun.TorchrunError) as ei:
        torchrun.check_launch(js, plan, list(plan.stages), ONE)
    msg = str(ei.value)
    assert "parallel.world_size is 2" in msg and "started 1 process" in msg and "--nproc-per-node 2" in msg

    spec = tiny_spec(tmp_path)
    spec["stages"][0]["world_size"] = 2
    js, plan = _plan(spec)
    with pytest.raises(torchrun.TorchrunError, match=r"stages\[0\]\.world_size is 2"):
        torchrun.check_launch(js, plan, list(plan.stages), ONE)
    assert torchrun.check_launch(js, plan, list(plan.stages), {**ONE, "world": 2, "local_world": 2}) == "gloo"


def test_stages_wanting_different_backends_are_refused(tmp_path):
    spec = tiny_spec(tmp_path)
    spec["stages"].append({**spec["stages"][0], "name": "second", "parallel": {"use_gpu": True, "backend": "nccl"}})
    js, plan = _plan(spec)
    with pytest.raises(torchrun.TorchrunError, match="different process-group backends"):
        torchrun.check_launch(js, plan, list(plan.stages), ONE)


def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    bad = tiny_spec(tmp_path)
    bad["stages"][0]["stepz"] = 3
    assert torchrun.main([str(write_spec(tmp_path / "bad.yaml", bad))]) == torchrun.EXIT_SPEC
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("error: ") for line in err) and "stepz" in err[0]

    good = write_spec(tmp_path / "good.yaml", tiny_spec(tmp_path))
    assert torchrun.main([str(good), "--stage", "nope"]) == torchrun.EXIT_SPEC
    err = capsys.readouterr().err
    assert "--stage nope: no stage ['nope'] (the spec has ['pretrain'])" in err


def test_a_rank_outside_ray_asks_nothing_of_ray(monkeypatch):
    from jobs import ray_nodes

    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert ray_nodes.this_node_id() is None and ray_nodes.rank_nodes() is None
    assert "ray" not in sys.modules  # not imported to find out


def test_the_first_sigterm_asks_for_a_checkpoint_the_second_exits():
    import os
    import signal

    calls = []
    old = signal.signal(signal.SIGTERM, lambda *a: calls.append("previous"))
    try:
        flag = torchrun._Sigterm()
        assert flag() is False
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag() is True and calls == []  # only a request: the trainer checkpoints at the step's end
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == ["previous"]  # the second goes through the handler that was there
    finally:
        signal.signal(signal.SIGTERM, old)
