"""End to end through the real `moeforge` command: embedded Ray, Ray Train, DeepSpeed workers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from system.metrics import read_jsonl
from tests.helpers import tiny_spec, write_spec

from tests.waiting import exited, wait_until

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MOEFORGE_FAULT_AT_STEP",
                                                             "MOEFORGE_FAULT_ONCE")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def moeforge(*args, timeout=420, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def _two_worker_spec(tmp_path: Path, name: str, max_failures: int) -> Path:
    spec = tiny_spec(tmp_path, run={"name": name}, parallel={"world_size": 2},
                     stages=[{"name": "pretrain", "steps": 6, "micro_batch_size": 4, "checkpoint_every": 2,
                              "optimizer": {"lr": 3e-3}, "lr_schedule": {"kind": "cosine", "warmup_steps": 1}}],
                     ray={"failure_config": {"max_failures": max_failures}})
    return write_spec(tmp_path / f"{name}.yaml", spec)


def on_cluster(cluster, *args, **env) -> subprocess.CompletedProcess:
    """`moeforge run ...` as a driver of the session's Ray cluster (tests/ray_cluster.py)."""
    return moeforge(*args, "--address", cluster.ensure(), **cluster.client_env(), **env)


def test_run_crash_then_resume_continues_exactly(tmp_path, shared_ray):
    spec = _two_worker_spec(tmp_path, "resume", max_failures=0)
    run_dir = tmp_path / "runs" / "resume"
    first = on_cluster(shared_ray, "run", str(spec), MOEFORGE_FAULT_AT_STEP="3")
    assert first.returncode != 0, first.stdout[-3000:]
    assert "injected fault after step 3" in first.stdout + first.stderr
    ckpts = run_dir / "stages" / "pretrain" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000002"
    assert not (run_dir / "stages" / "pretrain" / "DONE.json").exists()
    before = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in before] == [1, 2, 3]

    second = on_cluster(shared_ray, "run", str(spec))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout and "at step 2" in second.stdout
    full = read_jsonl(run_dir / "metrics.jsonl")
    # Step 3, logged before the crash, is superseded by its replay: readers see each step once.
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
    assert full[:2] == before[:2]
    after = full[2:]  # step count continues from the checkpoint
    # Same data position, same RNG, same weights and optimizer state: step 3 is replayed exactly.
    assert after[0]["loss"] == pytest.approx(before[2]["loss"], rel=1e-6)
    assert after[0]["tokens"] == before[2]["tokens"]
    assert after[0]["lr"] == pytest.approx(before[2]["lr"], rel=1e-9)
    done = json.loads((run_dir / "stages" / "pretrain" / "DONE.json").read_text())
    assert done["step"] == 6 and done["checkpoint"].endswith("step_00000006")
    consumed = json.loads((run_dir / "stages" / "pretrain" / "consumed.json").read_text())
    assert consumed["positions"] == [0, 6 * 8]  # 6 steps x global batch 8, nothing repeated

    third = moeforge("run", str(spec))  # no Ray at all: every stage is done
    assert third.returncode == 0
    assert "already finished, skipping" in third.stdout and "Ray started" not in third.stdout

    # The quiet console: Ray's and the workers' chatter is in the run's log files, not on screen;
    # moeforge's own lines from the workers are (forwarded once).
    for out in (first, second):
        shown = out.stdout + out.stderr
        assert not [l for l in shown.splitlines() if l.lstrip().startswith(("(RayTrainWorker", "(TrainController"))]
        assert "FutureWarning" not in shown and "Setting up process group" not in shown
    assert second.stdout.count("resumed from") == 1
    logs = run_dir / "logs" / "pretrain"
    assert sorted(p.name for p in logs.iterdir()) == ["rank0.log", "rank1.log"]
    rank0 = (logs / "rank0.log").read_text()
    assert rank0.count("rendezvous at") == 2 and "resumed from" in rank0  # both attempts appended


def _scrape_moeforge_series(timeout: float, proc: subprocess.Popen) -> dict[str, str]:
    """Poll the Ray metrics agents listed in Ray's Prometheus service-discovery file until every
    WANTED series of the run is seen (or the run ends, or `timeout`); the series found."""
    import urllib.request

    sd = Path("/tmp/ray/prom_metrics_service_discovery.json")
    found: dict[str, str] = {}

    def scrape() -> bool:
        try:
            targets = [t for group in json.loads(sd.read_text()) for t in group["targets"]]
        except (OSError, ValueError):
            return False
        for t in targets:
            if not t.startswith("127.0.0.1:"):
                continue
            try:
                body = urllib.request.urlopen(f"http://{t}/metrics", timeout=5).read().decode()
            except OSError:
                continue
            for line in body.splitlines():
                if line.startswith("ray_moeforge_") and 'run="metrics"' in line:
                    found.setdefault(line.split("{", 1)[0], line)
        return WANTED <= found.keys()

    try:
        wait_until(scrape, timeout, "the run's series on Ray's metrics agents", every=2, abort=exited(proc))
    except AssertionError:
        pass  # the caller reports which series are missing
    return found


WANTED = {"ray_moeforge_step", "ray_moeforge_loss", "ray_moeforge_expert_tokens", "ray_moeforge_expert_parallel"}


def test_ray_metrics_are_exported_for_prometheus(tmp_path):
    # fssdp through Ray Train, so its per-step figures reach Prometheus too
    spec = tiny_spec(tmp_path, run={"name": "metrics"}, parallel={"world_size": 2, "expert_strategy": "fssdp"},
                     metrics={"ray_metrics": True},
                     stages=[{"name": "pretrain", "steps": 400, "micro_batch_size": 2, "checkpoint_every": 400}])
    path = write_spec(tmp_path / "metrics.yaml", spec)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(path)], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        found = _scrape_moeforge_series(180, proc)
    finally:
        proc.send_signal(signal.SIGINT)  # lets the driver shut its embedded Ray down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert WANTED <= found.keys(), found
    assert 'stat="' in found["ray_moeforge_expert_parallel"]
    assert 'stage="pretrain"' in found["ray_moeforge_step"]
    assert 'expert="' in found["ray_moeforge_expert_tokens"] and 'layer="' in found["ray_moeforge_expert_tokens"]
