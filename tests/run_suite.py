"""`make test`: the whole suite as two pytest processes running side by side.

The end-to-end tests (marked `slow`: Ray, Chromium, Prometheus) leave about a fifth of both cores
idle (Ray's polling cadence, process start-ups, waits on a training run); the rest of the suite
(in-process and rank-process tests) is CPU work that can fill those gaps. So the slow tests run
at normal priority, output shown as it comes, and the rest runs beside them at the lowest
priority: in a session of its own whose autogroup gets nice 19 (with Linux's autogroups a nice
value only orders tasks of one session, so `nice` alone would share the cores half and half with
Ray's daemons) and with SCHED_IDLE for its processes. The slow tests then see nearly the machine
they would alone. The rest's output is printed when both are done, then one summary line.

    python tests/run_suite.py [pytest args...]     # e.g. -x, -k expr, --durations=N, paths

Each part's --basetemp is under $MOEFORGE_SUITE_TMP (default /tmp/mft-UID), emptied at its start.

Exit status: 0 when both parts pass (pytest's 5, "no tests collected", counts as a pass for a
part that a -k or a path left empty), else the first failing part's status.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_TESTS = 5  # pytest's exit code when nothing was selected


def _lowest_priority() -> None:
    """In the child before exec: a new session, its autogroup at nice 19, SCHED_IDLE, nice 19.
    Each step is best effort (a kernel without autogroups, a container that refuses)."""
    os.setsid()
    try:
        Path("/proc/self/autogroup").write_text("19")
    except OSError:
        pass
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        pass
    try:
        os.nice(19)
    except OSError:
        pass


def _command(marker: str, basetemp: Path, args: list[str]) -> list[str]:
    paths = [a for a in args if not a.startswith("-") and (ROOT / a.split("::")[0]).exists()]
    opts = [a for a in args if a not in paths]
    return [sys.executable, "-m", "pytest", "-q", "-m", marker, f"--basetemp={basetemp}", *opts, *(paths or ["tests"])]


def main(argv: list[str]) -> int:
    if any(a == "-m" or a.startswith("-m=") for a in argv):
        print("run_suite.py splits the suite by marker itself: run pytest directly to use -m", file=sys.stderr)
        return 2
    # short: Ray's socket paths live under a test's tmp_path (AF_UNIX paths are at most 107 bytes)
    base = Path(os.environ.get("MOEFORGE_SUITE_TMP") or Path(tempfile.gettempdir()) / f"mft-{os.getuid()}")
    base.mkdir(parents=True, exist_ok=True)
    log = base / "rest.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        rest = subprocess.Popen(_command("not slow", base / "rest", argv), cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=_lowest_priority)
    slow = subprocess.Popen(_command("slow", base / "slow", argv), cwd=ROOT)

    def _terminated(signum, frame):  # a CI's timeout or `kill`: neither part outlives the runner
        for proc in (slow, rest):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM) if proc is rest else proc.terminate()
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, _terminated)
    walls: dict[str, float] = {}
    try:
        for name, proc in (("slow", slow), ("rest", rest)):
            proc.wait()
            walls[name] = time.monotonic() - t0
    except KeyboardInterrupt:  # a terminal's Ctrl-C reached the slow part too; the rest has its own session
        if rest.poll() is None:
            os.killpg(rest.pid, signal.SIGINT)
        for proc in (slow, rest):
            proc.wait()
        raise
    print(f"\n---- the rest of the suite (not slow; beside the slow tests, lowest priority; {log}) ----", flush=True)
    sys.stdout.write(log.read_text())
    codes = {"slow": slow.returncode, "rest": rest.returncode}
    print(f"\nsuite: slow tests rc {codes['slow']} ({walls['slow']:.1f} s), the rest rc {codes['rest']} "
          f"({walls['rest']:.1f} s from the start); {time.monotonic() - t0:.1f} s in all", flush=True)
    failed = [c for c in codes.values() if c not in (0, NO_TESTS)]
    if failed:
        return failed[0]
    return NO_TESTS if all(c == NO_TESTS for c in codes.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
