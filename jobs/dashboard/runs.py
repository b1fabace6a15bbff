"""What the run dashboard reads: the runs under its directories, each run's metrics.jsonl read
incrementally (only the bytes appended since the last look), each stage's state, whether the
driver is alive (RUN/heartbeat.json) and the run's stage events (RUN/events.jsonl, `jobs.heartbeat`).

A metrics file is only ever appended to, except when a resumed stage drops its superseded records
(`system.metrics.supersede_stage_records`), which replaces the file (a new inode): the reader
then starts over and bumps its generation, so a client knows to drop what it had.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from jobs.heartbeat import liveness, read_events
from jobs.layout import RunLayout

# Per-record lists the page draws (the expert-load heatmap); every other list (per-domain
# evaluation fractions, micro-batch fractions) stays in the file.
KEPT_LISTS = re.compile(r"^moe/\d+/tokens_per_expert$")
MIN_POLL_S = 0.2  # a file is looked at no more often than this, however many clients ask


def compact(record: dict[str, Any]) -> dict[str, Any]:
    """The fields of a metrics record the page uses: stage, step, time, every number, and the
    per-layer token counts."""
    out: dict[str, Any] = {}
    for k, v in record.items():
        if k in ("stage", "step", "time"):
            out[k] = v
        elif isinstance(v, bool):
            out[k] = int(v)
        elif isinstance(v, (int, float)):
            out[k] = v if v == v and abs(v) != float("inf") else None  # JSON has no NaN/Inf
        elif isinstance(v, list) and KEPT_LISTS.match(k):
            out[k] = v
    return out


class MetricsTail:
    """Incremental reader of one metrics.jsonl: complete lines only (a line being written is
    left for the next look), restarting when the file is replaced."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.generation = 0
        self.records: list[dict[str, Any]] = []
        self._ident: Optional[tuple[int, int]] = None
        self._offset = 0
        self._looked = 0.0

    def poll(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._looked < MIN_POLL_S:
            return
        self._looked = now
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._ident is not None:
                self._restart(None)
            return
        ident = (st.st_dev, st.st_ino)
        if ident != self._ident or st.st_size < self._offset:
            self._restart(ident)
        if st.st_size == self._offset:
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(st.st_size - self._offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        for line in chunk[:end].split(b"\n"):
            try:
                rec = json.loads(line)
            except ValueError:  # a torn line from a crash: skipped, as system.metrics.read_jsonl does
                continue
            if isinstance(rec, dict) and "stage" in rec and "step" in rec:
                self.records.append(compact(rec))
        self._offset += end + 1

    def _restart(self, ident: Optional[tuple[int, int]]) -> None:
        if self._ident is not None or self.records:
            self.generation += 1
        self._ident, self._offset, self.records = ident, 0, []


@dataclass
class Run:
    """One run directory the dashboard shows."""

    id: str
    root: Path
    tail: MetricsTail = field(init=False)

    _events: tuple[Any, list[dict[str, Any]]] = field(init=False, default=(None, []))

    def __post_init__(self):
        self.tail = MetricsTail(RunLayout(self.root).metrics_file)

    def events(self) -> list[dict[str, Any]]:
        """RUN/events.jsonl, read again only when the file changed."""
        try:
            st = RunLayout(self.root).events_file.stat()
            ident = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            ident = None
        if ident != self._events[0]:
            self._events = (ident, read_events(self.root) if ident else [])
        return self._events[1]

    def status(self) -> dict[str, Any]:
        """The planned stages (from the run's spec.yaml) and each one's state, the driver's
        liveness and the stage events."""
        layout = RunLayout(self.root)
        now = time.time()
        live = liveness(self.root, now)
        planned: list[dict[str, Any]] = []
        try:
            spec = yaml.safe_load(layout.spec_file.read_text()) or {}
            for i, s in enumerate(spec.get("stages") or []):
                planned.append({"name": str(s.get("name") or f"stage{i}"), "kind": s.get("kind", "pretrain"),
                                "steps": s.get("steps")})
        except (OSError, yaml.YAMLError, AttributeError):
            pass
        seen = {r["stage"] for r in self.tail.records}
        names = [p["name"] for p in planned]
        planned += [{"name": s, "kind": None, "steps": None} for s in sorted(seen) if s not in names]
        for p in planned:
            p.update(_stage_state(layout, p["name"], p["name"] in seen))
            if p["state"] == "running" and live["state"] in STOPPED_DRIVER:
                p.update(state=live["state"], detail=_stopped_detail(live))
        try:
            mtime = layout.metrics_file.stat().st_mtime
        except OSError:
            mtime = None
        return {"id": self.id, "path": str(self.root), "stages": planned, "metrics_mtime": mtime,
                "liveness": live, "events": self.events(), "now": now}


# A stage with metrics but no DONE / PREEMPTED / FATAL record is running only while its driver
# is: after these driver states it is shown as dead, failed or interrupted instead.
STOPPED_DRIVER = ("dead", "failed", "interrupted")


def _stopped_detail(live: dict[str, Any]) -> str:
    where = f"{live.get('host')} (pid {live.get('pid')})"
    if live["state"] == "dead":
        return f"the driver on {where} stopped its heartbeat {live['age_s']:.0f} s ago without a word"
    if live["state"] == "failed":
        return f"the driver on {where} failed: {live.get('error') or 'error'}"
    return f"the driver on {where} was interrupted"


def _stage_state(layout: RunLayout, stage: str, has_records: bool) -> dict[str, Any]:
    for state, path in (("failed", layout.fatal_file(stage)), ("preempted", layout.preempted_file(stage)),
                        ("done", layout.done_file(stage))):
        if path.is_file():
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                info = {}
            if state == "failed":
                detail = f"{info.get('type', 'error')}: {info.get('message', '')}"
            elif state == "preempted":
                detail = f"preempted at step {info.get('step')}"
            else:
                detail = f"done at step {info.get('step')}"
            return {"state": state, "detail": detail}
    return {"state": "running" if has_records else "pending", "detail": ""}


def is_run_dir(path: Path) -> bool:
    layout = RunLayout(path)
    return layout.metrics_file.is_file() or layout.spec_file.is_file()


class RunIndex:
    """The runs under the dashboard's paths: a path that is a run directory is shown itself; any
    other directory shows the runs directly inside it, looked up again on every listing, so a run
    started later appears."""

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p).absolute() for p in paths]
        missing = [str(p) for p in self.paths if not p.is_dir()]
        if missing:
            raise FileNotFoundError(f"not a directory: {', '.join(missing)}")
        self._runs: dict[str, Run] = {}
        self._by_root: dict[Path, str] = {}

    def refresh(self) -> list[Run]:
        found: list[Path] = []
        for p in self.paths:
            if is_run_dir(p):
                found.append(p)
            else:
                found.extend(sorted(c for c in p.iterdir() if c.is_dir() and is_run_dir(c)))
        for root in found:
            if root not in self._by_root:
                rid = _slug(root.name)
                n = 2
                while rid in self._runs:
                    rid, n = f"{_slug(root.name)}-{n}", n + 1
                self._runs[rid] = Run(rid, root)
                self._by_root[root] = rid
        return [self._runs[self._by_root[r]] for r in found]

    def get(self, rid: str) -> Optional[Run]:
        if rid not in self._runs:
            self.refresh()
        return self._runs.get(rid)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
