"""Metric records and sinks. A record is a flat dict of JSON-serialisable values."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch


class MetricSink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON line per record and flushes, so a crash loses at most one line."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a")

    def log(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, default=_jsonable) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def supersede_stage_records(path: Path, stage: str, after_step: int | None) -> int:
    """Before a stage (re)starts: drop its records past the step it resumes from (all of them
    when it starts afresh), which the stage is about to log again, so every reader sees each
    step once. Other stages' records and the order of lines are kept; the file is replaced
    atomically. Returns the number of records dropped."""
    import os

    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1  # a torn line from a crash
            continue
        if rec.get("stage") == stage and (after_step is None or int(rec.get("step", 0)) > after_step):
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records of a metrics file (a torn last line from a crash is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
