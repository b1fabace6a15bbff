"""Elastic stages on a real two-node Ray cluster (two raylets on 127.0.0.1, 2 CPUs each): a node
is lost mid-stage and the job goes on at 2 workers without a person; the node comes back and the
next stage grows to 4 at the next monitor interval, without a step trained twice.

One job, `parallel.elastic.sizes: [2, 4]`, P = 2 within a node, a checkpoint every 4 steps:
* stage `pretrain` (ep, 4 workers): the raylet of the second node is SIGKILLed (with its workers)
  after step 6; the stage restarts from the last periodic checkpoint at 2 workers (steps trained
  again <= checkpoint_every) and finishes there; its steps at 2 equal a 2-rank run resumed from
  the same checkpoint to 1e-5.
* stage `grow` (fssdp, expert state sharded over the EDP groups): starts at the 2 workers the
  live nodes allow; a new node joins and Ray Train's elastic monitor restarts the group at 4
  after a checkpoint it asks for (`jobs.elastic_ray.CheckpointBeforeGrow`): no step is trained
  again, and the grown group does not checkpoint for that request a second time. Then that node
  is drained (`ray drain-node`, a preemption with a 10 s deadline): every rank checkpoints at the
  next step (`jobs.elastic_ray.DrainNotice`), the node is killed, and the stage goes on at 2 from
  that checkpoint: again no step trained twice; its steps at 2 equal a 2-rank run resumed from
  the drain's checkpoint to 1e-5.
Every step is recorded once, with the world size it ran at. The seconds from the loss to the
first step after it are printed.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from parallel import dist as pdist
from parallel.testing import run_distributed
from system.metrics import read_jsonl
from tests.helpers import tiny_spec, write_spec
from tests.jobs.test_multinode_ray import _env
from tests.ray_cluster import NO_LOG_MONITOR, kill_marked, private_ports, stop_cluster
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
SLOW = Path(tempfile.gettempdir()) / f"mf-elastic-slow-{os.getpid()}"
pytestmark = pytest.mark.slow
STEPS_A, STEPS_B, EVERY = 16, 40, 4


def _cluster_env(slow: Path) -> dict:
    # a lost raylet is declared dead after ~3 missed 1 s health checks instead of ~30 s
    # and a worker group that cannot be placed (the lost node still counted) is given up after 4 s
    return {**_env(), "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_initial_delay_ms": "1000", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "4",
            # the drain notice is looked for every second instead of every 5 s
            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
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
           "--node-manager-port", str(port), "--disable-usage-stats", *NO_LOG_MONITOR, *private_ports(head=False))
    return port


def _live_nodes(address: str) -> int:
    probe = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(1 for n in ray.nodes() if n['Alive']))")
    out = subprocess.run([sys.executable, "-c", probe, address], env=_cluster_env(SLOW), capture_output=True, text=True,
                         timeout=60)
    return int(out.stdout.strip() or 0)


def _node_id(address: str, port: int) -> str:
    probe = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print([n['NodeID'] for n in ray.nodes() if n['Alive'] and n['NodeManagerPort'] == int(sys.argv[2])][0])")
    out = subprocess.run([sys.executable, "-c", probe, address, str(port)], env=_cluster_env(SLOW), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def _spec(tmp: Path) -> dict:
    stage = {"steps": 0, "micro_batch_size": 2, "grad_accum_steps": 1, "checkpoint_every": EVERY,
             "optimizer": {"lr": 3e-3}, "lr_schedule": {"kind": "cosine", "warmup_steps": 2}}
    return tiny_spec(tmp, run={"name": "elastic"},
                     experts={"balancing": {"lbl": "global_batch", "global_accumulation": "exact", "lbl_coeff": 0.05}},
                     parallel={"world_size": 4, "expert_strategy": "ep", "fssdp": {"ranks_per_node": 2},
                               "elastic": {"sizes": [2, 4], "monitor_interval_s": 2}},
                     ray={"failure_config": {"max_failures": 3}},
                     stages=[{**stage, "name": "pretrain", "steps": STEPS_A},
                             {**stage, "name": "grow", "steps": STEPS_B,
                              "parallel": {"expert_strategy": "fssdp", "expert_sharding": 1}}])


def _steps(run: Path, stage: str) -> list[dict]:
    f = run / "metrics.jsonl"
    return [r for r in read_jsonl(f) if "loss" in r and r["stage"] == stage] if f.is_file() else []


def _events(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]


def _run_stage(rank: int, world: int, spec: dict, index: int) -> None:
    from jobs.stage_runner import run_stage

    run_stage(spec, index)


def _reference_from(run: Path, spec: dict, out: Path, stage: str, index: int, step: int) -> dict[int, float]:
    """Losses of `stage` on 2 gloo ranks resumed from its checkpoint of `step`, in a copy of the
    run (later checkpoints, DONE and the consumed-data record removed)."""
    ref = copy.deepcopy(spec)
    ref["run"]["output_dir"] = str(out)
    shutil.copytree(run, out / run.name)
    st = out / run.name / "stages" / stage
    for d in (st / "checkpoints").glob("step_*"):
        if int(d.name[5:]) > step:
            shutil.rmtree(d)
    (st / "checkpoints" / "latest").write_text(f"step_{step:08d}")
    for f in ("DONE.json", "consumed.json", "consumed.npz"):
        (st / f).unlink(missing_ok=True)
    run_distributed(_run_stage, 2, ref, index, timeout_s=300)
    return {r["step"]: r["loss"] for r in _steps(out / run.name, stage)}


def test_node_loss_and_return(tmp_path):
    temp = tempfile.mkdtemp(prefix="mf-el-", dir="/tmp")  # Ray's socket paths must stay short
    port = pdist.free_port()
    _start("start", "--head", "--port", str(port), "--temp-dir", temp, "--include-dashboard", "false",
           "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats", *NO_LOG_MONITOR, *private_ports())
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
        out: list[str] = []  # the driver's console, read as it comes (the workers' lines too)
        reader = threading.Thread(target=lambda: out.extend(iter(job.stdout.readline, "")), daemon=True)
        reader.start()
        try:
            wait_until(lambda: len(_steps(run, "pretrain")) >= 6 or job.poll() is not None, 240,
                       "6 steps at 4 workers", every=0.2)
            done_before = max(r["step"] for r in _steps(run, "pretrain"))
            assert kill_marked([f"node_manager_port={second}".encode()]) > 0
            lost_at = time.monotonic()
            wait_until(lambda: any(r["world_size"] == 2 for r in _steps(run, "pretrain")) or job.poll() is not None,
                       240, "a step at 2 workers", every=0.2)
            recovery_s = time.monotonic() - lost_at
            print(f"node lost after step {done_before}: first step at 2 workers {recovery_s:.1f} s later")
            SLOW.unlink(missing_ok=True)  # the rest of this stage at full speed; slow again for the next
            wait_until(lambda: any(e["kind"] == "finished" for e in _events(run)) or job.poll() is not None, 240,
                       "the first stage's end", every=0.2)
            SLOW.write_text("1.0")
            # the next stage starts at the 2 workers there is room for; then the node comes back
            wait_until(lambda: len(_steps(run, "grow")) >= 1 or job.poll() is not None, 240,
                       "the second stage's first step", every=0.2)
            back_at = time.monotonic()
            third = _add_node(address)
            seen2 = [0]  # the last step the second stage trained at 2 workers before growing

            def grown() -> bool:
                recs = _steps(run, "grow")
                seen2[0] = max([seen2[0]] + [r["step"] for r in recs if r["world_size"] == 2])
                return any(r["world_size"] == 4 and r["step"] > seen2[0] > 0 for r in recs) or job.poll() is not None
            wait_until(grown, 240, "a step at 4 workers again", every=0.1)
            print(f"node back at step {seen2[0]} of the second stage: first step at 4 workers "
                  f"{time.monotonic() - back_at:.1f} s after `ray start`")
            # a drain of that node (a spot reclaim with a 10 s notice): every rank checkpoints at
            # the next step, rank 0 holds; the node goes (as the cloud takes it); the stage
            # goes on at 2 from that checkpoint
            drain_at = time.monotonic()
            _start("drain-node", "--address", address, "--node-id", _node_id(address, third), "--reason",
                   "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
                   "--deadline-remaining-seconds", "10")
            drained = wait_until(lambda: re.search(r"checkpoint of step (\d+) taken for a drain", "".join(out))
                                 or job.poll() is not None, 120, "the drain's checkpoint", every=0.2)
            assert isinstance(drained, re.Match), "".join(out)[-5000:]
            assert kill_marked([f"node_manager_port={third}".encode()]) > 0
            drain_step = int(drained.group(1))
            wait_until(lambda: any(r["world_size"] == 2 and r["step"] > drain_step for r in _steps(run, "grow"))
                       or job.poll() is not None, 240, "a step at 2 workers after the drain", every=0.2)
            print(f"drain notice -> checkpoint of step {drain_step} -> first step at 2 workers "
                  f"{time.monotonic() - drain_at:.1f} s after `ray drain-node`")
            SLOW.unlink(missing_ok=True)  # the rest at full speed
            job.wait(timeout=400)
            reader.join(timeout=30)
        finally:
            if job.poll() is None:
                job.kill()
        log = "".join(out)
        assert job.returncode == 0, log[-5000:]
    finally:
        stop_cluster(temp, port)
        SLOW.unlink(missing_ok=True)
    a, b = _steps(run, "pretrain"), _steps(run, "grow")
    assert [r["step"] for r in a] == list(range(1, STEPS_A + 1)), log[-3000:]  # each step once
    assert [r["step"] for r in b] == list(range(1, STEPS_B + 1)), log[-3000:]
    sizes_a, sizes_b = [r["world_size"] for r in a], [r["world_size"] for r in b]
    print("world size by step:", [(k, len(list(g))) for k, g in itertools.groupby(sizes_a)],
          [(k, len(list(g))) for k, g in itertools.groupby(sizes_b)])
    first2 = sizes_a.index(2)
    assert set(sizes_a[:first2]) == {4} and set(sizes_a[first2:]) == {2}, sizes_a
    last2, after = sizes_b.index(4) - 1, drain_step  # b[after] is the first step after the drain
    assert last2 >= 0 and set(sizes_b[:last2 + 1]) == {2} and set(sizes_b[last2 + 1:after]) == {4}, sizes_b
    assert set(sizes_b[after:]) == {2}, sizes_b  # the drain's checkpoint is where the 2 workers resumed
    assert all(r["requested_world_size"] == 4 for r in a + b)
    resumed = a[first2]["step"] - 1  # the periodic checkpoint the smaller group resumed from
    assert resumed % EVERY == 0 and done_before - resumed <= EVERY
    events = [(e["kind"], e["stage"], e.get("step")) for e in _events(run)]
    print("events:", events)
    assert [e[:2] for e in events] == [("started", "pretrain"), ("resumed", "pretrain"), ("resized", "pretrain"),
                                       ("finished", "pretrain"), ("started", "grow"), ("resumed", "grow"),
                                       ("resized", "grow"), ("resumed", "grow"), ("resized", "grow"),
                                       ("finished", "grow")], events
    assert events[1][2] == events[2][2] == resumed
    assert events[7][2] == events[8][2] == drain_step  # no step after the drain's checkpoint trained twice
    assert [(e["from_world_size"], e["world_size"], e["requested_world_size"]) for e in _events(run)
            if e["kind"] == "resized"] == [(4, 2, 4), (2, 4, 4), (4, 2, 4)]
    # the grow: the group checkpointed at its step boundary first, so it resumed where it was,
    # and the grown group did not take the same request again (a checkpoint and a hold)
    assert events[5][2] == events[6][2] == seen2[0] == b[last2]["step"], (events[5], seen2)
    assert log.count("taken for a grow") == 1, log[-3000:]
    # the steps at 2 workers after each loss of a node equal a 2-rank run resumed from the same
    # checkpoint: the first stage's (ep) after the SIGKILL, the second's (fssdp, expert state
    # sharded) after the drain
    want = _reference_from(run, spec, tmp_path / "ref", "pretrain", 0, resumed)
    for r in a[first2:]:
        assert r["loss"] == pytest.approx(want[r["step"]], rel=1e-5, abs=0), r["step"]
    want = _reference_from(run, spec, tmp_path / "ref2", "grow", 1, drain_step)
    for r in b[after:]:
        assert r["loss"] == pytest.approx(want[r["step"]], rel=1e-5, abs=0), r["step"]
