"""The README's cluster walkthrough, command for command, against a real token-authenticated Ray
head on 127.0.0.1 (its own HOME: the token file is the one `ray get-auth-token --generate` made):
submit from a directory the spec's relative paths start from, status, logs, `ray job stop`
(the job checkpoints), the same submit again (it resumes), and the cluster cells of the
one-line-error table: token authentication, unknown job, a job that fails on arrival."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from system.metrics import read_jsonl
from tests.helpers import tiny_spec, write_spec
from tests.ray_cluster import private_ports, stop_cluster
from tests.waiting import wait_until

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow
STEPS = 200


class Head:
    def __init__(self, url: str, gcs: str, env: dict[str, str]):
        self.url, self.gcs, self.env = url, gcs, env


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MOEFORGE_FAULT")) and k not in ("PYTHONPATH", "HOME")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HOME=str(home))
    return env


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = _base_env(home)
    gen = subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert gen.returncode == 0, gen.stderr
    token = gen.stdout.strip().splitlines()[-1]
    assert (home / ".ray" / "auth_token").read_text().strip() == token
    ports = private_ports()
    from parallel.testing import free_port

    port = free_port()
    temp = tempfile.mkdtemp(prefix="mf-walk-", dir="/tmp")  # short: Ray's socket paths live under it
    start = subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                            "--dashboard-host", "127.0.0.1", *ports, "--temp-dir", temp, "--num-cpus", "3",
                            "--disable-usage-stats", "--include-dashboard", "true"],
                           env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        dash = ports[ports.index("--dashboard-port") + 1]
        yield Head(f"http://127.0.0.1:{dash}", f"127.0.0.1:{port}",
                   {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    finally:
        stop_cluster(temp, port)  # this cluster only: `ray stop` would stop the session's too
        shutil.rmtree(temp, ignore_errors=True)


def sh(head: Head, cwd: Path, *argv: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=cwd, env=env or head.env, capture_output=True, text=True, timeout=timeout)


def one_error(res: subprocess.CompletedProcess) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    return lines[0]


def _job_dir(tmp_path: Path) -> Path:
    """A user's directory: the spec and a JSON-lines corpus, both named by relative paths."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    words = "the expert router sends every token to two of the experts and the load stays balanced".split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(40)) + f" doc {i}" for i in range(200)]
    (work / "data" / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    spec = tiny_spec(tmp_path, run={"name": "walk", "output_dir": "runs"},
                     data={"sources": [{"name": "mine", "kind": "jsonl", "paths": ["data/docs.jsonl"]}]},
                     stages=[{"name": "pretrain", "steps": STEPS, "micro_batch_size": 4, "checkpoint_every": 100}],
                     metrics={"progress_bar": False})
    spec["data"]["sources"] = [{"name": "mine", "kind": "jsonl", "paths": ["data/docs.jsonl"]}]
    write_spec(work / "job.yaml", spec)
    return work


def test_readme_cluster_walkthrough(tmp_path, head):
    from jobs.heartbeat import read_events, run_liveness

    work = _job_dir(tmp_path)
    moeforge = str(BIN / "moeforge")
    at = ["--address", head.url]

    # moeforge submit job.yaml --output-dir DIR: prints the id once the job's driver is up, exit 0
    out_dir = ["--output-dir", "shared/runs"]  # relative, like the spec's data path: resolved here
    first = sh(head, work, moeforge, "submit", "job.yaml", *at, *out_dir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    job = first.stdout.split()[0]
    assert job.startswith("raysubmit_") and "Traceback" not in first.stderr
    status = sh(head, work, moeforge, "status", job, *at)
    assert status.returncode == 0 and f"{job}: RUNNING" in status.stdout, status.stdout + status.stderr

    # the run directory is where the user ran submit, never in Ray's temporary folder
    run_dir = work / "shared" / "runs" / "walk"
    wait_until(lambda: (run_dir / "metrics.jsonl").is_file() and read_jsonl(run_dir / "metrics.jsonl"),
               timeout=180, what="the job's first metrics under the submit directory")
    assert run_liveness(run_dir) == "running"
    recorded = (run_dir / "spec.yaml").read_text()
    assert str(work / "data" / "docs.jsonl") in recorded and f"output_dir: {work / 'shared' / 'runs'}" in recorded

    # ray job stop: SIGTERM to the driver, which checkpoints at the next step and stops
    stop = sh(head, work, str(BIN / "ray"), "job", "stop", job, *at)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    wait_until(lambda: f"{job}: STOPPED" in sh(head, work, moeforge, "status", job, *at).stdout,
               timeout=120, every=1.0, what="the stopped job")
    logs = sh(head, work, moeforge, "logs", job, *at)
    assert run_liveness(run_dir) == "interrupted", logs.stdout[-3000:]
    stopped_at = [e for e in read_events(run_dir) if e["kind"] == "preempted"]
    assert len(stopped_at) == 1 and 0 < stopped_at[0]["step"] < STEPS, logs.stdout[-3000:]
    ckpt = run_dir / "stages" / "pretrain" / "checkpoints"
    assert (ckpt / "latest").read_text() == f"step_{stopped_at[0]['step']:08d}"
    assert "SIGTERM: checkpointing at the next step" in logs.stdout + logs.stderr
    assert f"checkpointed at step {stopped_at[0]['step']}" in logs.stdout + logs.stderr

    # the same submit again resumes there and finishes; --wait follows it to the end
    again = sh(head, work, moeforge, "submit", "job.yaml", *at, *out_dir, "--wait", timeout=420)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {stopped_at[0]['checkpoint']} at step {stopped_at[0]['step']}" in again.stdout
    assert f"stage pretrain: done at step {STEPS}" in again.stdout and "SUCCEEDED" in again.stdout
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, STEPS + 1))  # each step once: the stopped tail was superseded
    assert [e["kind"] for e in read_events(run_dir)] == ["started", "preempted", "started", "resumed", "finished"]
    assert run_liveness(run_dir) == "finished"


def test_cluster_errors_are_one_line(tmp_path, head):
    """The cluster cells of the error table: unknown job, token authentication, failed on arrival."""
    work = _job_dir(tmp_path)
    moeforge = str(BIN / "moeforge")
    at = ["--address", head.url]
    for cmd in ("status", "logs"):
        line = one_error(sh(head, work, moeforge, cmd, "raysubmit_nosuchjob", *at))
        assert "no job raysubmit_nosuchjob" in line and "ray job list" in line

    # no token anywhere (a HOME without ~/.ray/auth_token): every command names the fix (the cells
    # run side by side: each is a process start and one refused request)
    bare = {**_base_env(tmp_path / "elsewhere"), "RAY_AUTH_MODE": "token"}
    cells = [("submit", "job.yaml", *at), ("status", "raysubmit_x", *at), ("logs", "raysubmit_x", *at),
             ("run", "job.yaml", "--address", head.gcs), ("prepare", "job.yaml", "--address", head.gcs)]
    procs = [subprocess.Popen([moeforge, *cell], cwd=work, env=bare, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for cell in cells]
    for cell, proc in zip(cells, procs):
        out, err = proc.communicate(timeout=240)
        line = one_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        assert "token" in line and "RAY_AUTH_TOKEN" in line and "get-auth-token" in line, (cell, line)
    # without RAY_AUTH_MODE at all (Ray's client default): the same line
    line = one_error(sh(head, work, moeforge, "status", "raysubmit_x", *at, env=_base_env(tmp_path / "elsewhere")))
    assert "requires token authentication" in line
    wrong = {**bare, "RAY_AUTH_TOKEN": "0" * 64}
    line = one_error(sh(head, work, moeforge, "status", "raysubmit_x", *at, env=wrong))
    assert "refused this authentication token" in line

    # a cluster whose `python` lacks the dependencies: submit reports the job's own line, exit 2
    venv = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    res = sh(head, work, moeforge, "submit", "job.yaml", *at, "--python", str(venv / "bin" / "python"))
    line = one_error(res)
    assert "failed on arrival" in line and "has no" in line and "torch" in line and "--python" in line
    assert res.stdout.split()[0].startswith("raysubmit_")  # the id was printed: the job is inspectable

    # plain `ray job submit` of the same spec: its relative output_dir would land in Ray's temporary
    # folder; the job's driver refuses it, naming the field and the fix
    res = sh(head, work, str(BIN / "ray"), "job", "submit", *at, "--working-dir", ".", "--",
             "python", "-m", "jobs.cli", "run", "job.yaml", timeout=300)
    out = res.stdout + res.stderr
    assert "error: job.yaml: run.output_dir: 'runs' is relative: inside a Ray job" in out, out[-3000:]
    assert "--output-dir" in out and not (work / "runs").exists()
