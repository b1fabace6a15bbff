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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records of a metrics file (a torn last line from a crash is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
