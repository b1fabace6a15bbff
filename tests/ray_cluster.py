"""One real Ray cluster for the end-to-end tests of a pytest session (`shared_ray` fixture in
tests/conftest.py): `ray start --head` on 127.0.0.1, its own temp dir and token, torn down at the
end. A `moeforge run --address` against it skips the start and stop of an embedded Ray, and its
raylet keeps idle worker processes that the next job's Ray Train workers start from.

A test that needs a cluster of its own (two nodes, a token-authenticated head with the Jobs API)
keeps one; their `ray stop --force` stops every Ray on the machine, this one included, so the
fixture checks the head is alive before each test and starts it again when it is not.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

BIN = Path(sys.executable).parent
NUM_CPUS = 8  # the largest job of a test (4 workers) and its Ray Train controller, with room


# Ray's log monitor globs and tails every log file of its node every 0.1 s (3-5% of a core on the
# session's cluster, growing with its log files) to stream workers' output to drivers; moeforge's
# drivers run with log_to_driver off (jobs.console forwards their lines), so a test cluster runs
# without it. The README walkthrough's head keeps the default.
NO_LOG_MONITOR = ["--include-log-monitor", "false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def private_ports(head: bool = True) -> list[str]:
    """`ray start` flags that put a node's fixed-default ports (dashboard 8265, client server 10001,
    dashboard agent 52365, ...) on free ones: several clusters (this one, a test's own, an
    embedded Ray) then run side by side without one's agent failing to bind."""
    flags = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
             "--runtime-env-agent-port"] + (["--dashboard-port", "--ray-client-server-port"] if head else [])
    return [x for f in flags for x in (f, str(_free_port()))]


class SharedRay:
    def __init__(self):
        self.token = secrets.token_hex(32)
        self.port: Optional[int] = None
        self.temp_dir: Optional[str] = None
        self.starts = 0

    def client_env(self) -> dict[str, str]:
        """What a driver (or `ray` command) needs to reach this cluster."""
        # Ray 2.5x turns token authentication on for a head when ~/.ray/auth_token exists: state
        # the mode and this cluster's token to every process instead of depending on that file.
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    @property
    def address(self) -> str:
        assert self.port is not None
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.port is not None and _listening(self.port)

    def ensure(self) -> str:
        """The head's address, starting it first if it is not running."""
        if not self.alive():
            self.start()
        return self.address

    def start(self) -> None:
        self.stop()
        # A short path of its own: Ray's socket paths live under it (Unix sockets allow ~107 bytes).
        self.temp_dir = tempfile.mkdtemp(prefix="mf-ray-", dir="/tmp")
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(self.client_env())
        res = subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
                              "--port", str(self.port), "--num-cpus", str(NUM_CPUS), "--temp-dir", self.temp_dir,
                              "--include-dashboard", "false", "--disable-usage-stats", *NO_LOG_MONITOR, *private_ports()],
                             env=env, capture_output=True, text=True, timeout=180)
        if res.returncode != 0:
            raise RuntimeError(f"ray start failed: {res.stdout[-2000:]}{res.stderr[-2000:]}")
        self.starts += 1

    def stop(self) -> None:
        if self.temp_dir is not None:
            stop_cluster(self.temp_dir, self.port)
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.temp_dir = self.port = None


def _processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, command line) of every process."""
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                out[int(p.name)] = (ppid, (p / "cmdline").read_bytes())
            except (OSError, ValueError, IndexError):
                continue
    return out


def stop_cluster(temp_dir: str, port: Optional[int]) -> int:
    """SIGKILL one Ray cluster of this machine, not the others (`ray stop` stops them all): the
    processes whose command line names its temp dir or its GCS port, and their descendants
    (workers and agents, whose titles name neither). Returns how many were killed."""
    marks = [temp_dir.encode()] + ([f":{port} ".encode(), f":{port}\0".encode()] if port else [])
    return kill_marked(marks)


def kill_marked(marks: list[bytes]) -> int:
    """SIGKILL every process whose command line contains one of `marks`, and its descendants;
    returns how many were killed (a Ray node: its raylet's flags, e.g. its node manager port)."""
    procs = _processes()
    doomed = {pid for pid, (_, cmd) in procs.items() if pid != os.getpid() and any(m in cmd + b" " for m in marks)}
    grew = True
    while grew:
        kids = {pid for pid, (ppid, _) in procs.items() if ppid in doomed and pid not in doomed}
        doomed |= kids
        grew = bool(kids)
    for pid in doomed:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    return len(doomed)
