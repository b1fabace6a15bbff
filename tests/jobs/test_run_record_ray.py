"""A user's session with one run directory, on the session's Ray cluster: Ctrl-C to the driver's
process group (as a terminal sends it) checkpoints and exits 3; a changed training setting of the
checkpointed stage is refused and leaves spec.yaml alone; Ctrl-C twice exits 130 at once;
`--retrain-from` trains the stage again with the new setting, keeping the old files; a change to
the finished stage is then refused too, a change of how it runs is not."""
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
from tests.jobs.test_e2e_ray import ROOT, _env, moeforge
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


def _spec(tmp_path: Path, lr: float, steps: int = 2000, **stage) -> Path:
    spec = tiny_spec(tmp_path, run={"name": "rec"}, metrics={"progress_bar": False},
                     stages=[{"name": "pretrain", "steps": steps, "micro_batch_size": 4, "checkpoint_every": 1000,
                              "optimizer": {"lr": lr}, **stage}])
    return write_spec(tmp_path / "rec.yaml", spec)


def _start(cluster, spec: Path, logs: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(spec), "--address", cluster.ensure()],
                            cwd=ROOT, env=_env(**cluster.client_env()), stdout=open(logs / "out", "w"),
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

    # --retrain-from: the stage trains again from scratch with the new lr; the old files are kept
    new = _spec(tmp_path, lr=1e-3, steps=4)
    res = moeforge("run", str(new), "--retrain-from", "pretrain", "--address", shared_ray.ensure(),
                   **shared_ray.client_env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    [old] = list((run_dir / "superseded").iterdir())
    kept = old / "pretrain" / "checkpoints"
    assert (kept / (kept / "latest").read_text()).is_dir()  # the old stage's checkpoints moved whole
    assert [r["step"] for r in read_jsonl(old / "metrics.jsonl")][0] == 1
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    assert 0 < max(r["lr"] for r in read_jsonl(run_dir / "metrics.jsonl")) <= 1e-3 * (1 + 1e-9)
    assert "lr: 0.001" in (run_dir / "spec.yaml").read_text()

    # now finished: another lr is refused; a change of how it runs is not a training change
    refused = moeforge("run", str(_spec(tmp_path, lr=2e-3, steps=4)))
    assert refused.returncode == 2 and "(finished)" in refused.stderr and "now says 0.002" in refused.stderr
    same = moeforge("run", str(_spec(tmp_path, lr=1e-3, steps=4, micro_batch_size=2, grad_accum_steps=2)),
                    "--output-dir", str(tmp_path / "runs"))
    assert same.returncode == 0 and "already finished, skipping" in same.stdout, same.stderr
