"""An elastic stage on a real two-node Ray cluster (two raylets on 127.0.0.1, 2 CPUs each): a node
is lost mid-run and the job goes on at 2 workers without a person; the node comes back and the
job grows to 4 again at the next monitor interval, without a step trained twice.

The stage: fssdp on 4 workers (P = 2 within a node, expert state sharded over the 2-rank EDP
groups), `parallel.elastic.sizes: [2, 4]`, a checkpoint every 4 steps. The raylet of the second
node is SIGKILLed (with its workers) after step 6; the run restarts from the last periodic
checkpoint at 2 workers (steps trained again <= checkpoint_every), then a new node joins and
Ray Train's elastic monitor restarts the group at 4 after a checkpoint it asks for
(`jobs.elastic_ray.CheckpointBeforeGrow`): no step is trained again. Every step is recorded once,
with the world size it ran at; the steps at 2 workers equal a 2-rank run resumed from the same
checkpoint to 1e-5. The seconds from the loss to the first step after it are printed.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from parallel import dist as pdist
from parallel.testing import run_distributed
from system.metrics import read_jsonl
from tests.helpers import tiny_spec, write_spec
from tests.jobs.test_multinode_ray import _env
from tests.parallel.test_resume_world_size import _keep_up_to, _train
from tests.ray_cluster import kill_marked, private_ports, stop_cluster
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
SLOW = Path(tempfile.gettempdir()) / f"mf-elastic-slow-{os.getpid()}"
pytestmark = pytest.mark.slow
STEPS, EVERY = 48, 4


def _cluster_env(slow: Path) -> dict:
    # a lost raylet is declared dead after ~3 missed 1 s health checks instead of ~30 s
    # and a worker group that cannot be placed (the lost node still counted) is given up after 15 s
    return {**_env(), "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_initial_delay_ms": "1000", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15",
            # steps slowed (by the seconds in `slow`) until the group has grown back, then full speed
            "MOEFORGE_FAULT_STEP_SLEEP_S": f"file:{slow}"}


def _start(*args) -> None:
    out = subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=_cluster_env(SLOW), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def _add_node(address: str) -> int:
    """A second raylet (2 CPUs); returns its node manager port, which names its processes."""
    port = pdist.free_port()
    _start("start", "--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
           "--node-manager-port", str(port), "--disable-usage-stats", *private_ports(head=False))
    return port


def _live_nodes(address: str) -> int:
    probe = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(1 for n in ray.nodes() if n['Alive']))")
    out = subprocess.run([sys.executable, "-c", probe, address], env=_cluster_env(SLOW), capture_output=True, text=True,
                         timeout=60)
    return int(out.stdout.strip() or 0)


def _spec(tmp: Path) -> dict:
    return tiny_spec(tmp, run={"name": "elastic"},
                     experts={"balancing": {"lbl": "global_batch", "global_accumulation": "exact", "lbl_coeff": 0.05}},
                     parallel={"world_size": 4, "expert_strategy": "fssdp", "expert_sharding": 1,
                               "fssdp": {"ranks_per_node": 2},
                               "elastic": {"sizes": [2, 4], "monitor_interval_s": 2}},
                     ray={"failure_config": {"max_failures": 3}},
                     stages=[{"name": "pretrain", "steps": STEPS, "micro_batch_size": 2, "grad_accum_steps": 1,
                              "checkpoint_every": EVERY, "optimizer": {"lr": 3e-3},
                              "lr_schedule": {"kind": "cosine", "warmup_steps": 2}}])


def _steps(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [r for r in read_jsonl(f) if "loss" in r] if f.is_file() else []


def test_node_loss_and_return(tmp_path):
    temp = tempfile.mkdtemp(prefix="mf-el-", dir="/tmp")  # Ray's socket paths must stay short
    port = pdist.free_port()
    _start("start", "--head", "--port", str(port), "--temp-dir", temp, "--include-dashboard", "false",
           "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats", *private_ports())
    address = f"127.0.0.1:{port}"
    try:
        second = _add_node(address)
        wait_until(lambda: _live_nodes(address) == 2, 60, "2 live Ray nodes", every=1)
        spec = _spec(tmp_path)
        run = tmp_path / "runs" / "elastic"
        SLOW.write_text("1.0")  # seconds more per step until the group has grown back
        job = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(write_spec(tmp_path / "job.yaml", spec)),
                                "--address", address], cwd=ROOT, env=_cluster_env(SLOW), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: len(_steps(run)) >= 6 or job.poll() is not None, 240, "6 steps at 4 workers", every=0.2)
            done_before = max(r["step"] for r in _steps(run))
            assert kill_marked([f"node_manager_port={second}".encode()]) > 0
            lost_at = time.monotonic()
            wait_until(lambda: any(r["world_size"] == 2 for r in _steps(run)) or job.poll() is not None, 240,
                       "a step at 2 workers", every=0.2)
            recovery_s = time.monotonic() - lost_at
            print(f"node lost after step {done_before}: first step at 2 workers {recovery_s:.1f} s later")
            _add_node(address)  # the node comes back
            wait_until(lambda: _live_nodes(address) == 2, 60, "the returned node registered", every=1)
            print(f"node back {time.monotonic() - lost_at:.1f} s after the loss, at step {max(r['step'] for r in _steps(run))}")
            seen2 = [0]  # the last step trained at 2 workers before the group grows

            def grown() -> bool:
                recs = _steps(run)
                seen2[0] = max([seen2[0]] + [r["step"] for r in recs if r["world_size"] == 2])
                return any(r["world_size"] == 4 and r["step"] > seen2[0] > 0 for r in recs) or job.poll() is not None
            wait_until(grown, 240, "a step at 4 workers again", every=0.1)
            SLOW.unlink(missing_ok=True)  # the rest at full speed
            log, _ = job.communicate(timeout=400)
        finally:
            if job.poll() is None:
                job.kill()
        assert job.returncode == 0, log[-5000:]
    finally:
        stop_cluster(temp, port)
        SLOW.unlink(missing_ok=True)
    recs = _steps(run)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1)), log[-3000:]  # each step once
    sizes = [r["world_size"] for r in recs]
    first2, last2 = sizes.index(2), len(sizes) - 1 - sizes[::-1].index(2)
    assert set(sizes[:first2]) == {4} and set(sizes[first2:last2 + 1]) == {2} and set(sizes[last2 + 1:]) == {4}, sizes
    resumed = recs[first2]["step"] - 1  # the periodic checkpoint the smaller group resumed from
    assert resumed % EVERY == 0 and done_before - resumed <= EVERY
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    print("world size by step:", [(k, len(list(g))) for k, g in itertools.groupby(sizes)], "events:",
          [(e["kind"], e.get("step")) for e in events])
    assert [e["kind"] for e in events] == ["started", "resumed", "resumed", "finished"], events
    assert events[1]["step"] == resumed
    # the grow: the group checkpointed at its step boundary first, so it resumed where it was
    assert events[2]["step"] == seen2[0] == recs[last2]["step"], (events[2], seen2)
    # the steps at 2 workers: a 2-rank run resumed from the same checkpoint
    ref = copy.deepcopy(spec)
    ref["run"]["output_dir"] = str(tmp_path / "ref")
    shutil.copytree(run, tmp_path / "ref" / "elastic")
    _keep_up_to(tmp_path / "ref" / "elastic", resumed)
    os.environ["MOEFORGE_FAULT_AT_STEP"] = str(seen2[0])  # the reference stops where the grow happened
    try:
        with pytest.raises(RuntimeError, match=f"injected fault after step {seen2[0]}"):
            run_distributed(_train, 2, ref, timeout_s=300)
    finally:
        del os.environ["MOEFORGE_FAULT_AT_STEP"]
    want = {r["step"]: r["loss"] for r in _steps(tmp_path / "ref" / "elastic")}
    for r in recs[first2:last2 + 1]:
        assert r["loss"] == pytest.approx(want[r["step"]], rel=1e-5, abs=0), r["step"]
