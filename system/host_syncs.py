"""Count the operations that make the host wait for the device (host syncs), by kind and by origin.

`HostSyncCounter` (a context manager) counts, under a TorchDispatchMode, the ops that read a
device value on the host or size their output from device data: `_local_scalar_dense`
(`.item()`, `bool()`, `int()`, `float()`), `nonzero`, `repeat_interleave` without
`output_size`, `bincount`, `unique`, `masked_select`, boolean-mask indexing, `equal`, copies from
a device to the host (none on a CPU-only run) and pageable host-to-device copies; plus calls of
`Tensor.tolist` / `Tensor.numpy` (patched while counting; the copy inside them is not counted
twice). On CPU nothing really waits, so a CPU test counts what would sync on a GPU. Each count
remembers where it came from (the first frame outside torch), so DeepSpeed's own syncs can be
told from ours. `count_cuda_syncs` counts what `torch.cuda.set_sync_debug_mode("warn")` reports.
"""
from __future__ import annotations

import sys
import warnings
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ALWAYS = {"_local_scalar_dense": "item", "nonzero": "nonzero", "bincount": "bincount", "equal": "equal",
           "masked_select": "masked_select", "_unique2": "unique", "unique_dim": "unique",
           "unique_consecutive": "unique"}
_HERE = __file__
_TORCH_DIR = torch.__file__.rsplit("/", 1)[0]


def _origin() -> str:
    """'deepspeed' or 'file:line' of the first caller frame outside torch and this module."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name != _HERE and not name.startswith(_TORCH_DIR) and "/contextlib.py" not in name:
            if "/deepspeed/" in name:
                return f"deepspeed/{name.rsplit('/deepspeed/', 1)[1]}:{f.f_lineno}"
            return f"{name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}:{f.f_lineno}"
        f = f.f_back
    return "?"


def _optimizer_step_count(t) -> bool:
    """A torch.optim step counter read: a host tensor on GPU runs too (not capturable/fused)."""
    if t.device.type != "cpu" or t.dim() != 0:
        return False
    f = sys._getframe(3)
    while f is not None and f.f_code.co_filename.startswith(_TORCH_DIR):
        if "/optim/" in f.f_code.co_filename:
            return True
        f = f.f_back
    return False


def _on_device(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta")


def _kind(func, args, kwargs) -> str | None:
    """The sync kind of one aten call, or None when it does not make the host wait."""
    name = func._schema.name.split("::")[-1]
    if name in _ALWAYS:
        return _ALWAYS[name]
    if name == "repeat_interleave":
        tensor_repeats = func._overloadname in ("Tensor", "self_Tensor")
        return "repeat_interleave" if tensor_repeats and kwargs.get("output_size") is None else None
    if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
        return "bool_mask_index"
    if name == "_to_copy" and _on_device(args[0]):
        dev = kwargs.get("device")
        return "d2h_copy" if dev is not None and torch.device(dev).type == "cpu" else None
    if name == "_to_copy" and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu":
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda" and not kwargs.get("non_blocking", False):
            return "h2d_pageable"
    if name == "copy_" and len(args) >= 2 and isinstance(args[1], torch.Tensor):
        dst, src = args[0], args[1]
        if dst.device.type == "cpu" and _on_device(src):
            return "d2h_copy"
        if _on_device(dst) and src.device.type == "cpu" and not (src.is_pinned() and
                                                                 (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))):
            return "h2d_pageable"
    return None


class HostSyncCounter(TorchDispatchMode):
    """`with HostSyncCounter() as c: ...`; then `c.total`, `c.by_kind`, `c.by_origin`, `c.report()`.

    `c.counts` is a Counter of (kind, origin), origin "dir/file.py:line" or "deepspeed/...";
    `c.excluding("deepspeed/")` counts our code's syncs alone."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self._inside = 0  # > 0 inside a patched tolist/numpy: its own copy is not counted again
        self._saved = {}

    def _add(self, kind: str) -> None:
        self.counts[(kind, _origin())] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._inside:
            kind = _kind(func, args, kwargs)
            if kind is not None and not (kind == "item" and _optimizer_step_count(args[0])):
                self._add(kind)
        return func(*args, **kwargs)

    def _patch(self, name: str):
        orig = getattr(torch.Tensor, name)
        counter = self

        def wrapped(t, *a, **k):
            if not counter._inside:
                counter._add(name)
            counter._inside += 1
            try:
                return orig(t, *a, **k)
            finally:
                counter._inside -= 1
        self._saved[name] = orig
        setattr(torch.Tensor, name, wrapped)

    def __enter__(self):
        for name in ("tolist", "numpy"):
            self._patch(name)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, orig in self._saved.items():
                setattr(torch.Tensor, name, orig)
            self._saved.clear()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def by_kind(self) -> Counter:
        out: Counter = Counter()
        for (kind, _), n in self.counts.items():
            out[kind] += n
        return out

    @property
    def by_origin(self) -> Counter:
        out: Counter = Counter()
        for (_, where), n in self.counts.items():
            out[where] += n
        return out

    def excluding(self, prefix: str) -> int:
        """Syncs whose origin does not start with `prefix` (e.g. "deepspeed/": ours alone)."""
        return sum(n for (_, where), n in self.counts.items() if not where.startswith(prefix))

    def report(self) -> str:
        rows = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return f"{self.total} host syncs: " + ", ".join(f"{k}@{w} x{n}" for (k, w), n in rows)


@contextmanager
def count_cuda_syncs() -> Iterator[list]:
    """CUDA only: the synchronizing calls `torch.cuda.set_sync_debug_mode("warn")` reports while
    the block runs, as a list of warning messages (its length is the count)."""
    seen: list = []
    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode(prev)
            seen.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))
