"""Shared test set-up: CPU DeepSpeed, a private data cache, Ray pinned to loopback, kept rank
processes, time limits, and the fast suite's guard (`--fast`, `make test-fast`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
os.environ.setdefault("MOEFORGE_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "moeforge-test-cache"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# run_distributed keeps its rank processes between calls (parallel/testing.py): a test's ranks
# start in milliseconds instead of seconds, with the state of a new process.
os.environ.setdefault("MOEFORGE_REUSE_RANKS", "1")
# Ray Train's controller polls its workers every 2 s by default: a stage's end, a dead worker and a
# preemption notice are acted on up to that much later. Every Ray a test starts (the session's
# cluster, a test's own, an embedded one) inherits this: 2-3 s less per Ray Train run.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# Time limits (pytest-timeout, pyproject's `timeout`): every test has the default; an end-to-end
# test (marked slow) gets this one unless it names its own.
SLOW_TIMEOUT_S = 900


def pytest_addoption(parser):
    parser.addoption("--fast", action="store_true",
                     help="the fast suite (make test-fast): only tests marked neither slow nor procs, "
                          "and any of them that starts a process, a subprocess or Ray fails")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
    if config.getoption("--fast"):
        keep = [i for i in items if not (i.get_closest_marker("slow") or i.get_closest_marker("procs"))]
        dropped = [i for i in items if i not in set(keep)]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep


class StartedAProcess(AssertionError):
    """A test in the fast suite started a process: mark it `procs` (or `slow` if it starts Ray)."""


_CURRENT: list[str] = ["(collection)"]


def pytest_runtest_setup(item):
    _CURRENT[0] = item.nodeid


def pytest_configure(config):
    """In the fast suite, starting a subprocess, a multiprocessing process or Ray fails the test
    (in the test, or in any fixture it uses)."""
    if not config.getoption("--fast"):
        return
    import multiprocessing.process
    import subprocess

    def refuse(what):
        def _refused(*args, **kwargs):
            raise StartedAProcess(f"{_CURRENT[0]} started {what}; the fast suite runs in one process: "
                                  "mark the test `procs` (or `slow` when it starts Ray)")
        return _refused

    subprocess.Popen._execute_child = refuse("a subprocess")  # also every subprocess Ray would start
    multiprocessing.process.BaseProcess.start = refuse("a process")
    os.fork = refuse("a forked process")
    os.posix_spawn = refuse("a spawned process")


@pytest.fixture(scope="session")
def shared_ray():
    """The session's Ray cluster (tests/ray_cluster.py): `shared_ray.ensure()` gives its address
    (starting it when needed), `shared_ray.client_env()` what a driver needs to join it."""
    from tests.ray_cluster import SharedRay

    cluster = SharedRay()
    try:
        yield cluster
    finally:
        cluster.stop()


def _left_behind(before: dict[str, str]) -> dict[str, Optional[str]]:
    """Variables a test changed in this process's environment, other than what
    `parallel.dist.configure_accelerator` sets (the same values in every process)."""
    from parallel.dist import prebuilt_ops_dir

    bin_dir = os.path.dirname(sys.executable)
    allowed = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": prebuilt_ops_dir()}
    # set by torch's inductor (on import and when compiling), Ray and DeepSpeed when imported
    imported = ("TORCHINDUCTOR_", "_TORCHINDUCTOR_", "RAY_CLIENT_MODE", "PYTORCH_NVML_BASED_CUDA_CHECK")
    changed = {}
    for k in (set(before) | set(os.environ)) - {"PYTEST_CURRENT_TEST"}:
        old, new = before.get(k), os.environ.get(k)
        if old == new or (old is None and (allowed.get(k) == new or k.startswith(imported))):
            continue
        if k == "PATH" and new == bin_dir + (os.pathsep + old if old else ""):
            continue
        changed[k] = new
    return changed


@pytest.fixture(autouse=True)
def _environment_kept():
    """A test leaves os.environ as it found it: kept rank processes and Ray drivers take the
    caller's environment, so a leaked variable changes every later test (a leaked
    TORCH_EXTENSIONS_DIR made the next DeepSpeed rank rebuild its op: 45 s). Put back, and the
    test fails naming it; use monkeypatch."""
    before = dict(os.environ)
    yield
    changed = _left_behind(before)
    if changed:
        for k in changed:
            if k in before:
                os.environ[k] = before[k]
            else:
                os.environ.pop(k, None)
        pytest.fail(f"{_CURRENT[0]} left os.environ changed (use monkeypatch): "
                    + ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items())), pytrace=False)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests use tiny tensors: one intra-op thread is fastest, and spares a shared machine's cores.

    Multi-rank and Ray tests run their ranks in other processes, which set their own threads.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
