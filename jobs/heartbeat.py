"""Whether a run's driver is alive, and what happened to its stages: two small files of the run
directory that the dashboard reads.

RUN/heartbeat.json (`DriverHeartbeat`, around the driver's stage loop): {host, pid, started, time,
interval_s, state}, rewritten atomically at the start, every `interval_s` from a daemon thread and
once more at the end with the final state. A driver killed outright leaves "running" with a time
that stops advancing: `run_liveness` calls that "dead" once the time is older than
`stale_after_s`. Wall-clock times, not a PID: the dashboard may run on another host.
RUN/events.jsonl (`record_event`): an append-only line per stage event, the history that the
other records do not keep.

Details: docs/observability.md#the-drivers-heartbeat-and-the-stage-events.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

from jobs.layout import RunLayout

RUNNING = "running"
FINAL_STATES = ("finished", "preempted", "failed", "interrupted")
DEFAULT_INTERVAL_S = 10.0
# Besides three missed beats: a slow shared filesystem, and the clocks of the driver's host and
# the reader's host disagreeing by a few seconds.
STALE_SLACK_S = 30.0
EVENT_KINDS = ("started", "resumed", "resized", "preempted", "finished", "failed")
MAX_ERROR_CHARS = 500


def stale_after_s(interval_s: float) -> float:
    """Age beyond which a "running" heartbeat written every `interval_s` means a dead driver."""
    return 3 * interval_s + STALE_SLACK_S


class DriverHeartbeat:
    """`with DriverHeartbeat(run_dir) as hb:` around a run's stages in the job driver. Set
    `hb.state = "preempted"` before leaving on a preemption; otherwise the exit says "finished"
    (no exception), "interrupted" (KeyboardInterrupt, SystemExit) or "failed" (any other)."""

    def __init__(self, run_dir: str | Path, interval_s: float = DEFAULT_INTERVAL_S):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.path = RunLayout(Path(run_dir)).heartbeat_file
        self.interval_s = float(interval_s)
        self._state = RUNNING
        self._error: Optional[str] = None
        self._started = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the beat thread and the final write share one temp file
        self._thread: Optional[threading.Thread] = None
        self._warned = False

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        if value not in (RUNNING, *FINAL_STATES):
            raise ValueError(f"heartbeat state {value!r}: one of {(RUNNING, *FINAL_STATES)}")
        self._state = value

    def __enter__(self) -> "DriverHeartbeat":
        self._started = time.time()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write(RUNNING)  # an unwritable run directory fails here, before any stage starts
        self._thread = threading.Thread(target=self._beat, name="moeforge-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        final = self._state
        if final == RUNNING:
            if exc_type is None:
                final = "finished"
            elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
                final = "interrupted"
            else:
                final = "failed"
                self._error = f"{exc_type.__name__}: {exc}"[:MAX_ERROR_CHARS]
        try:
            self._write(final)
        except OSError as e:
            if exc_type is None:
                raise
            self._warn(e)  # the run's own error matters more than its heartbeat's
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._write(RUNNING)
            except OSError as e:  # a full disk or a storage hiccup must not stop the run
                self._warn(e)

    def _warn(self, err: OSError) -> None:
        if not self._warned:
            self._warned = True
            print(f"[moeforge] warning: cannot write the heartbeat {self.path}: {err}", flush=True)

    def _write(self, state: str) -> None:
        from system.checkpoint import atomic_write_text

        body: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "started": self._started,
                                "time": time.time(), "interval_s": self.interval_s, "state": state}
        if self._error and state == "failed":
            body["error"] = self._error
        with self._lock:
            atomic_write_text(self.path, json.dumps(body))


def read_heartbeat(run_dir: str | Path) -> Optional[dict[str, Any]]:
    """The heartbeat file's contents, or None when there is none (or it is not a heartbeat)."""
    try:
        hb = json.loads(RunLayout(Path(run_dir)).heartbeat_file.read_text())
    except (OSError, ValueError):
        return None
    return hb if isinstance(hb, dict) and isinstance(hb.get("time"), (int, float)) else None


def liveness(run_dir: str | Path, now: Optional[float] = None) -> dict[str, Any]:
    """{state, host, pid, time, age_s, stale_after_s, error}: `state` as `run_liveness` says."""
    hb = read_heartbeat(run_dir)
    if hb is None:
        return {"state": "unknown"}
    now = time.time() if now is None else now
    age = now - hb["time"]
    limit = stale_after_s(float(hb.get("interval_s") or DEFAULT_INTERVAL_S))
    state = hb.get("state")
    if state == RUNNING:
        state = RUNNING if age <= limit else "dead"
    elif state not in FINAL_STATES:
        state = "unknown"
    return {"state": state, "host": hb.get("host"), "pid": hb.get("pid"), "time": hb["time"],
            "age_s": age, "stale_after_s": limit, "error": hb.get("error")}


def run_liveness(run_dir: str | Path, now: Optional[float] = None) -> str:
    """"running" (a fresh heartbeat), "dead" (still "running" but stale: the driver died without
    a word), "finished", "preempted", "failed", "interrupted", or "unknown" (no heartbeat: a run
    from before heartbeats existed)."""
    return liveness(run_dir, now)["state"]


def record_event(run_dir: str | Path, kind: str, stage: Optional[str] = None, step: Optional[int] = None,
                 **extra: Any) -> None:
    """Append one event line to RUN/events.jsonl. A single write of a complete line to a file
    opened for appending, so concurrent writers (the driver, a worker) never interleave within
    a line on a local filesystem; after a line torn by a crash, the new one starts on its own."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"event kind {kind!r}: one of {EVENT_KINDS}")
    path = RunLayout(Path(run_dir)).events_file
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.time(), "kind": kind, "stage": stage, "step": step, **extra}, default=str)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.fstat(fd).st_size
        torn = end > 0 and os.pread(fd, 1, end - 1) != b"\n"
        os.write(fd, ("\n" if torn else "").encode() + (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete event line (a torn last line from a crash is skipped)."""
    try:
        text = RunLayout(Path(run_dir)).events_file.read_text()
    except OSError:
        return []
    out = []
    for line in text.split("\n")[:-1]:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and isinstance(ev.get("time"), (int, float)) and ev.get("kind") in EVENT_KINDS:
            out.append(ev)
    return out
