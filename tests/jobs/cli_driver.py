"""The real `moeforge` command as a test drives it: a subprocess with the project on its path and
no fault-injection or RAY_ADDRESS leaking in from the test's own environment."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def driver_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MOEFORGE_FAULT_AT_STEP",
                                                             "MOEFORGE_FAULT_ONCE")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def moeforge(*args, timeout=420, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=driver_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def on_cluster(cluster, *args, **env) -> subprocess.CompletedProcess:
    """`moeforge run ...` as a driver of the session's Ray cluster (tests/ray_cluster.py)."""
    return moeforge(*args, "--address", cluster.ensure(), **cluster.client_env(), **env)
