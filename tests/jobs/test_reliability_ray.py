"""Real failures through the real `moeforge run` (Ray, Ray Train, 2 DeepSpeed workers):
SIGKILL of a Ray Train worker process twice in one run, SIGTERM preemption and its resumption,
and an error no restart can fix ending the run at once. Every step's loss is compared with an
uninterrupted run of the same spec. The runs are drivers of the session's Ray cluster
(tests/ray_cluster.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from parallel.testing import run_distributed
from system.metrics import read_jsonl
from tests.helpers import tiny_spec, write_spec
from tests.jobs.cli_driver import ROOT, driver_env, on_cluster
from tests.waiting import exited, wait_until

pytestmark = pytest.mark.slow
STEPS = 120  # kills near steps 25 and 50, SIGTERM near 60-70: the run must still be going then


def _spec(tmp: Path, name: str, max_failures: int, **stage) -> Path:
    spec = tiny_spec(tmp, run={"name": name}, parallel={"world_size": 2},
                     stages=[{"name": "pretrain", "steps": STEPS, "micro_batch_size": 4, "checkpoint_every": 20,
                              **stage}],
                     ray={"failure_config": {"max_failures": max_failures}})
    return write_spec(tmp / f"{name}.yaml", spec)


def _losses(run_dir: Path) -> dict[int, float]:
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), "a step was recorded twice"
    return {r["step"]: r["loss"] for r in recs}


def _stage(rank: int, world: int, spec: dict) -> None:
    from jobs.stage_runner import run_stage

    run_stage(spec, 0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run: the stage runner every Ray Train worker runs, on 2 gloo ranks (the
    same losses as `moeforge run`, bit for bit: tests/golden/test_golden.py)."""
    tmp = tmp_path_factory.mktemp("ref")
    run_distributed(_stage, 2, yaml.safe_load(_spec(tmp, "ref", 0).read_text()))
    got = _losses(tmp / "runs" / "ref")
    assert sorted(got) == list(range(1, STEPS + 1))
    return got


def _train_workers() -> list[int]:
    """PIDs of the Ray Train worker processes on this machine (their process title)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                    out.append(int(p.name))
            except OSError:
                continue
    return sorted(out)


def _rank0_pid(run_dir: Path) -> int:
    """The pid of the current attempt's rank 0 (its rendezvous line in the run's log)."""
    lines = [l for l in (run_dir / "logs" / "pretrain" / "rank0.log").read_text().splitlines() if "rendezvous" in l]
    return int(lines[-1].split("(pid ")[1].split(")")[0])


def _last_step(run_dir: Path) -> int:
    f = run_dir / "metrics.jsonl"
    recs = read_jsonl(f) if f.is_file() else []
    return max((r["step"] for r in recs if "loss" in r), default=0)


def _wait(cond, proc: subprocess.Popen, timeout: float, what: str) -> None:
    wait_until(cond, timeout, what, every=0.2, abort=exited(proc))


def _launch(spec: Path, log: Path, cluster) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(spec), "--address", cluster.ensure()],
                            cwd=ROOT, env=driver_env(**cluster.client_env()), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def drill(tmp_path_factory, shared_ray) -> dict:
    """One real run through a node's worst day: SIGKILL of rank 0 past a checkpoint, SIGKILL of the
    other rank past the next one (max_failures 2: Ray Train restarts the group each time), then
    SIGTERM of rank 0 (preemption: exit 3); then the same command again, which finishes the stage.
    What each step showed is kept for the tests below, one property each."""
    tmp = tmp_path_factory.mktemp("drill")
    spec = _spec(tmp, "drill", max_failures=2)
    run_dir, log = tmp / "runs" / "drill", tmp / "drill.log"
    out: dict = {"run_dir": run_dir, "kills": []}
    proc = _launch(spec, log, shared_ray)
    try:
        kills = out["kills"]
        for round_ in range(2):
            # past a checkpoint in this attempt: 25 steps after the first (or resumed) step
            start = 0 if round_ == 0 else kills[-1][1]
            _wait(lambda: _last_step(run_dir) >= start + 25 and len(_train_workers()) == 2, proc, 240,
                  f"step {start + 25} with two workers")
            rank0 = _rank0_pid(run_dir)
            others = [p for p in _train_workers() if p != rank0]
            victim = rank0 if round_ == 0 else others[0]  # rank 0 first, then another rank
            kills.append((victim, _last_step(run_dir)))
            os.kill(victim, signal.SIGKILL)
            _wait(lambda: victim not in _train_workers(), proc, 60, "the killed worker to go")
        # preemption in the third attempt, once it has trained again
        term_from = kills[-1][1]
        # ... at a step well inside a checkpoint interval, so the step the SIGTERM lands at is not
        # also a scheduled checkpoint (which would hide an off-schedule one)
        _wait(lambda: (_last_step(run_dir) >= term_from + 10 and 3 <= _last_step(run_dir) % 20 <= 12
                       and len(_train_workers()) == 2), proc, 240,
              f"a step past {term_from + 10}, 3-12 into a checkpoint interval, with two workers")
        out["term_at"] = _last_step(run_dir)
        rank0 = _rank0_pid(run_dir)
        out["rank0_alive"] = rank0 in _train_workers()
        os.kill(rank0, signal.SIGTERM)  # the rank that also forwards the console and writes metrics
        out["rc"] = _finish(proc, 300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out["text"] = log.read_text()
    out["stopped"] = _last_step(run_dir)
    ckpts = run_dir / "stages" / "pretrain" / "checkpoints"
    out["latest"] = (ckpts / "latest").read_text() if (ckpts / "latest").is_file() else None
    out["done_before_rerun"] = (run_dir / "stages" / "pretrain" / "DONE.json").exists()
    out["again"] = on_cluster(shared_ray, "run", str(spec))
    return out


def test_sigkill_of_a_worker_twice_loses_nothing(drill, reference):
    text = drill["text"]
    assert len(drill["kills"]) == 2 and drill["kills"][0][0] != drill["kills"][1][0]
    assert text.count("resumed from") >= 2, text[-4000:]  # both restarts resumed from a checkpoint
    assert drill["kills"][1][1] > drill["kills"][0][1]  # the second attempt trained past the first kill
    got = _losses(drill["run_dir"])  # each step once, whatever was replayed
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == reference  # every step's loss, bit for bit


def test_sigterm_checkpoints_at_the_next_step_and_the_rerun_resumes(drill, reference):
    text, stopped = drill["text"], drill["stopped"]
    assert drill["rank0_alive"]
    assert drill["rc"] == 3, text[-4000:]
    assert "SIGTERM: checkpointing at the next step boundary" in text
    assert drill["term_at"] <= stopped < STEPS and stopped % 20 != 0  # an off-schedule checkpoint, right after it
    assert drill["latest"] == f"step_{stopped:08d}"
    assert f"checkpointed at step {stopped}" in text and not drill["done_before_rerun"]
    again = drill["again"]
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"at step {stopped}" in again.stdout  # resumed exactly where it stopped: no lost step
    assert _losses(drill["run_dir"]) == reference


def test_an_error_no_restart_can_fix_ends_the_run_at_once(tmp_path, shared_ray):
    """Three bad steps in a row with max_failures 3: one attempt, exit 2, the message names the
    steps and the last good checkpoint."""
    spec = _spec(tmp_path, "diverged", max_failures=3, max_bad_steps=3)
    res = on_cluster(shared_ray, "run", str(spec), MOEFORGE_FAULT_NONFINITE="22,23,24")
    text = res.stdout + res.stderr
    assert res.returncode == 2, text[-4000:]
    assert "TrainingDiverged" in text and "steps 22-24" in text and "step_00000020" in text
    assert "not retried" in text
    # no restart was spent on it: one worker group, whose rank 0 said so once
    assert text.count("rendezvous at") == 1
    log = (tmp_path / "runs" / "diverged" / "logs" / "pretrain" / "rank0.log").read_text()
    assert log.count("rendezvous at") == 1
