"""A user's session with one run directory, on the session's Ray cluster: Ctrl-C to the driver's
process group (as a terminal sends it) checkpoints and exits 3; a changed training setting of the
checkpointed stage is refused and leaves spec.yaml alone; Ctrl-C twice exits 130 at once;
`--retrain-from` trains the stage again with the new setting, keeping the old files; that run
crashes (an injected fault, no restarts allowed) and the rerun resumes from its checkpoint and
replays the lost step exactly; a change to the finished stage is then refused too, a change of how
it runs is not, and a finished job starts no Ray. Two workers throughout."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.heartbeat import read_events, run_liveness
from system.metrics import read_jsonl
from tests.helpers import tiny_spec, write_spec
from tests.jobs.cli_driver import ROOT, driver_env, moeforge
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


def _spec(tmp_path: Path, lr: float, steps: int = 2000, **stage) -> Path:
    spec = tiny_spec(tmp_path, run={"name": "rec"}, metrics={"progress_bar": False}, parallel={"world_size": 2},
                     ray={"failure_config": {"max_failures": 0}},
                     stages=[{"name": "pretrain", "steps": steps, "micro_batch_size": 4, "checkpoint_every": 1000,
                              "optimizer": {"lr": lr}, **stage}])
    return write_spec(tmp_path / "rec.yaml", spec)


def _start(cluster, spec: Path, logs: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(spec), "--address", cluster.ensure()],
                            cwd=ROOT, env=driver_env(**cluster.client_env()), stdout=open(logs / "out", "w"),
                            stderr=open(logs / "err", "w"), start_new_session=True)


def _ctrl_c(proc: subprocess.Popen, logs: Path, until, times: int = 1) -> tuple[int, str, str]:
    """Wait for `until`, then SIGINT the driver's process group `times` times, as a terminal does
    (the second once the driver has said it heard the first)."""
    wait_until(until, timeout=240, what="the stage to train", abort=lambda: proc.poll() is not None and "exited")
    os.killpg(proc.pid, signal.SIGINT)
    if times == 2:
        wait_until(lambda: "Ctrl-C: checkpointing" in (logs / "err").read_text(), timeout=30, what="the first Ctrl-C")
        os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    return proc.returncode, (logs / "out").read_text(), (logs / "err").read_text()


def test_ctrl_c_and_the_record_of_what_was_trained(tmp_path, shared_ray):
    run_dir = tmp_path / "runs" / "rec"
    spec = _spec(tmp_path, lr=3e-3)

    # Ctrl-C: every rank checkpoints at the next step; one message; exit 3
    proc = _start(shared_ray, spec, tmp_path)
    rc, out, err = _ctrl_c(proc, tmp_path, lambda: (run_dir / "metrics.jsonl").is_file() and read_jsonl(run_dir / "metrics.jsonl")
                           and run_liveness(run_dir) == "running")
    assert rc == 3, out[-3000:] + err[-3000:]
    assert err.count("Ctrl-C: checkpointing at the next step") == 1 and "Traceback" not in err
    stopped = json.loads((run_dir / "stages" / "pretrain" / "PREEMPTED.json").read_text())
    assert f"stage pretrain stopped (Ctrl-C or SIGTERM at the driver): checkpointed at step {stopped['step']}" in err
    ckpts = run_dir / "stages" / "pretrain" / "checkpoints"
    assert (ckpts / "latest").read_text() == f"step_{stopped['step']:08d}"
    assert run_liveness(run_dir) == "interrupted"
    assert [e["kind"] for e in read_events(run_dir)] == ["started", "preempted"]

    # a changed lr for the checkpointed stage: refused in one line naming both values; the record stays
    recorded = (run_dir / "spec.yaml").read_text()
    changed = moeforge("run", str(_spec(tmp_path, lr=1e-3)), "--address", shared_ray.ensure(), **shared_ray.client_env())
    lines = changed.stderr.strip().splitlines()
    assert changed.returncode == 2 and len(lines) == 1, changed.stderr
    assert "stages.pretrain: optimizer.lr was 0.003 when this stage was trained (checkpointed)" in lines[0]
    assert "now says 0.001" in lines[0] and "--retrain-from pretrain" in lines[0]
    assert (run_dir / "spec.yaml").read_text() == recorded

    # the same spec resumes; Ctrl-C twice stops at once: exit 130
    proc = _start(shared_ray, _spec(tmp_path, lr=3e-3), tmp_path)
    rc, out, err = _ctrl_c(proc, tmp_path, lambda: "resumed" in [e["kind"] for e in read_events(run_dir)], times=2)
    assert rc == 130, out[-3000:] + err[-3000:]
    assert "stopped at once (second Ctrl-C)" in err and "Traceback" not in err
    # the first Ctrl-C's checkpoint may land before the second arrives: latest is that one or the old one
    assert int((ckpts / "latest").read_text().removeprefix("step_")) >= stopped["step"]
    assert not (run_dir / "stages" / "pretrain" / "DONE.json").exists()

    # --retrain-from: the stage trains again from scratch with the new lr; the old files are kept.
    # It crashes after step 3 (the last checkpoint is step 2) and no restart is allowed.
    new = _spec(tmp_path, lr=1e-3, steps=6, checkpoint_every=2, lr_schedule={"kind": "cosine", "warmup_steps": 1})
    at = ("--address", shared_ray.ensure())
    first = moeforge("run", str(new), "--retrain-from", "pretrain", *at, **shared_ray.client_env(),
                     MOEFORGE_FAULT_AT_STEP="3")
    assert first.returncode != 0, first.stdout[-3000:]
    assert "injected fault after step 3" in first.stdout + first.stderr
    [old] = list((run_dir / "superseded").iterdir())
    kept = old / "pretrain" / "checkpoints"
    assert (kept / (kept / "latest").read_text()).is_dir()  # the old stage's checkpoints moved whole
    assert [r["step"] for r in read_jsonl(old / "metrics.jsonl")][0] == 1
    assert (ckpts / "latest").read_text() == "step_00000002"
    assert not (run_dir / "stages" / "pretrain" / "DONE.json").exists()
    before = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in before] == [1, 2, 3]
    assert "lr: 0.001" in (run_dir / "spec.yaml").read_text()

    # the rerun resumes at step 2; step 3, logged before the crash, is superseded by its replay
    second = moeforge("run", str(new), *at, **shared_ray.client_env())
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("resumed from") == 1 and "at step 2" in second.stdout
    full = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
    assert full[:2] == before[:2]
    # same data position, RNG, weights and optimizer state: step 3 is replayed exactly
    assert full[2]["loss"] == pytest.approx(before[2]["loss"], rel=1e-6)
    assert full[2]["tokens"] == before[2]["tokens"]
    assert full[2]["lr"] == pytest.approx(before[2]["lr"], rel=1e-9)
    assert 0 < max(r["lr"] for r in full) <= 1e-3 * (1 + 1e-9)
    done = json.loads((run_dir / "stages" / "pretrain" / "DONE.json").read_text())
    assert done["step"] == 6 and done["checkpoint"].endswith("step_00000006")
    consumed = json.loads((run_dir / "stages" / "pretrain" / "consumed.json").read_text())
    assert consumed["positions"] == [0, 6 * 8]  # 6 steps x global batch 8, nothing repeated

    # the quiet console: Ray's and the workers' chatter is in the run's log files, not on screen;
    # moeforge's own lines from the workers are (forwarded once)
    for res in (first, second):
        shown = res.stdout + res.stderr
        assert not [l for l in shown.splitlines() if l.lstrip().startswith(("(RayTrainWorker", "(TrainController"))]
        assert "FutureWarning" not in shown and "Setting up process group" not in shown
    logs = run_dir / "logs" / "pretrain"  # the old stage's logs went with it to superseded/
    assert sorted(p.name for p in logs.iterdir()) == ["rank0.log", "rank1.log"]
    rank0 = (logs / "rank0.log").read_text()
    assert rank0.count("rendezvous at") == 2 and "resumed from" in rank0  # both attempts appended

    # now finished: another lr is refused; a change of how it runs is not a training change
    refused = moeforge("run", str(_spec(tmp_path, lr=2e-3, steps=6)))
    assert refused.returncode == 2 and "(finished)" in refused.stderr and "now says 0.002" in refused.stderr
    same = moeforge("run", str(_spec(tmp_path, lr=1e-3, steps=6, micro_batch_size=2, grad_accum_steps=2,
                                     checkpoint_every=2, lr_schedule={"kind": "cosine", "warmup_steps": 1})),
                    "--output-dir", str(tmp_path / "runs"))  # no --address, and no Ray at all
    assert same.returncode == 0 and "already finished, skipping" in same.stdout, same.stderr
    assert "Ray started" not in same.stdout
