"""Asynchronous checkpoint writes: the step waits only for a copy of this rank's state in host
memory; one background thread per rank serialises it, fsyncs it, and (rank 0) commits.

`CheckpointManager(async_save=True)` (`system/checkpoint.py`) uses this module so:
  * DeepSpeed's files go through `SnapshotEngine`, a DeepSpeed `CheckpointEngine` installed on
    the engine for the duration of `save_checkpoint`: its `save(state_dict, path)` copies every
    tensor's storage into a host buffer (pinned for CUDA tensors; buffers are reused from one
    checkpoint to the next) and queues the write. The files are DeepSpeed's own serialisation
    of those copies (`torch.save`), so they hold what the synchronous ones hold; written through
    a file object, a zip file's inner folder is named "archive" (torch.load reads either).
  * our RNG file and the strategy's expert files (`system.expert_files.deferred_writes`: their
    host copies are taken on the step) are queued the same way; anything else a strategy writes
    itself is written on the step into the page cache and only its fsync is queued.
  * after its last file and fsync, each rank's writer drops a marker `done-R` (or `failed-R`
    with the error) in `.tmp-step_N.status/`, holding the size and CRC-32 of each file it wrote
    (computed from the bytes as they were written); rank 0's writer waits for every rank's
    marker, then commits (the manifest with those records, CRC-32s read back only for files
    written on the step, rename, `latest`, prune). No collective ever runs off
    the main thread.
At most one checkpoint is in flight: the next save, the end of the stage and a preemption first
`settle` the previous one (collectively, from the main thread), which raises on every rank when
any rank's write or the commit failed.

Fault injection for tests: MOEFORGE_FAULT_KILL_IN_CHECKPOINT=STEP SIGKILLs rank
MOEFORGE_FAULT_KILL_IN_CHECKPOINT_RANK (default 1) after its first file of that step's
checkpoint is on disk, before any manifest.
"""
from __future__ import annotations

import copy
import functools
import io
import json
import os
import queue
import signal
import threading
import time
import traceback
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

import torch


class CheckpointWriteFailed(RuntimeError):
    """A background checkpoint write or its commit failed; the checkpoint was not committed."""


# -- snapshots ----------------------------------------------------------------------------------
class HostBuffers:
    """Host storages for snapshots, kept for the next checkpoint (the same state has the same
    sizes each time, so after the first checkpoint a snapshot allocates nothing)."""

    def __init__(self):
        self._free: dict[tuple[int, bool], list] = {}
        self._used: list[tuple[tuple[int, bool], Any]] = []

    def take(self, nbytes: int, pinned: bool):
        key = (nbytes, pinned)
        free = self._free.get(key)
        if free:
            buf = free.pop()
        elif pinned:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).untyped_storage()
        else:
            buf = torch.UntypedStorage(nbytes)
        self._used.append((key, buf))
        return buf

    def recycle(self) -> None:
        """Every buffer handed out is free again (call only when no write still reads them)."""
        for key, buf in self._used:
            self._free.setdefault(key, []).append(buf)
        self._used = []


def snapshot(obj: Any, buffers: HostBuffers, memo: Optional[dict] = None) -> Any:
    """A copy of `obj` whose tensors live in host buffers and share storage as the originals do
    (one copy per storage, views kept as views): `torch.save` of the copy writes the same
    tensors, with the same sharing, as `torch.save` of `obj` would. Containers are rebuilt, other
    objects deep-copied, so later changes to the live state never reach the copy."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        key = (st.data_ptr(), st.nbytes(), str(st.device))
        buf = memo.get(key)
        if buf is None:
            buf = buffers.take(st.nbytes(), pinned=st.device.type == "cuda")
            buf.copy_(st, non_blocking=st.device.type == "cuda")
            memo[key] = buf
        out = torch.empty(0, dtype=obj.dtype).set_(buf, obj.storage_offset(), obj.size(), obj.stride())
        if isinstance(obj, torch.nn.Parameter):
            out = torch.nn.Parameter(out, requires_grad=obj.requires_grad)
        return out
    if type(obj) in (dict, OrderedDict):
        return type(obj)((k, snapshot(v, buffers, memo)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(snapshot(v, buffers, memo) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.dtype, torch.device)):
        return obj
    return copy.deepcopy(obj)


def _device_sync() -> None:
    """CUDA copies into pinned buffers were queued non-blocking: wait for them once."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def fsync_path(path: Path) -> None:
    """fsync a file or directory; one that has gone (renamed by its writer) is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Writes:
    """A file that torch.save writes through `write` calls rather than its descriptor: a raw
    file's write releases the GIL during the system call, so the training thread runs on while
    the writer thread writes (torch.save to a path holds the GIL for the whole file)."""

    def __init__(self, raw):
        self._raw, self.size, self.crc = raw, 0, 0

    def write(self, b) -> int:
        mv, n = memoryview(b).cast("B"), 0
        self.crc = zlib.crc32(mv, self.crc)  # the manifest's CRC-32, without reading the file back
        while n < len(mv):
            n += self._raw.write(mv[n:])  # a raw write may write less than asked
        self.size += n
        return n

    def flush(self) -> None:
        pass


_CHUNK = 16 << 20


def write_releasing_gil(raw, obj: Any, save: Callable[[Any, Any], None], zipfile: bool) -> dict[str, Any]:
    """`save(obj, ...)` into the raw file `raw` without holding the GIL during the writes. The zip
    format streams through `_Writes` (its archive's inner folder is then named "archive", not
    after the file: torch.load reads either); the legacy format, which holds the GIL writing
    to any file object, is serialised into memory first and written in chunks. Returns the
    file's record for the manifest: {"size", "crc32"}."""
    out = _Writes(raw)
    if zipfile:
        save(obj, out)
    else:
        buf = io.BytesIO()
        save(obj, buf)
        view = buf.getbuffer()
        for i in range(0, len(view), _CHUNK):
            out.write(view[i:i + _CHUNK])
        del view
    return {"size": out.size, "crc32": f"{out.crc:08x}"}


# -- DeepSpeed's checkpoint engine ----------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _snapshot_engine_class():
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class SnapshotEngine(CheckpointEngine):
        """DeepSpeed's `CheckpointEngine` for an asynchronous save: `save` = snapshot + queue;
        the write itself is the engine DeepSpeed had (`inner`), run by the background writer."""

        def __init__(self, inner, write: "CheckpointWrite"):
            super().__init__(None)
            self.name, self.inner, self.write = "MoeforgeSnapshotEngine", inner, write

        def create(self, info):
            return None

        def save(self, state_dict, path: str):
            self.write.queue_file(Path(path), state_dict, self.inner.save,
                                  zipfile=getattr(self.inner, "zipfile_serialization", True))

        def makedirs(self, path, exist_ok=False):
            self.inner.makedirs(path, exist_ok=exist_ok)

        def load(self, path: str, map_location=None):
            return self.inner.load(path, map_location=map_location)

        def commit(self, info):
            return True  # our commit happens when every rank's writes are on disk

        def preserves_storage_sharing(self):
            return self.inner.preserves_storage_sharing()  # DeepSpeed clones where it would

    return SnapshotEngine


def snapshot_engine(inner, write: "CheckpointWrite"):
    """Our `CheckpointEngine` over DeepSpeed's own (`inner`), queueing into `write`."""
    return _snapshot_engine_class()(inner, write)


# -- one checkpoint's background write -------------------------------------------------------------
def status_dir(root: Path, tmp_tag: str) -> Path:
    return root / f"{tmp_tag}.status"


# rank 0 on an error path: how long the peers' checkpoint files may stay unchanged before the
# commit is given up (a killed peer writes nothing more; the previous checkpoint stays latest)
ABORT_GRACE_S = 10.0
_POLL_S = 0.02


class CheckpointWrite:
    """One checkpoint's writes on this rank, run by `Writer`'s thread in the order queued."""

    def __init__(self, writer: "Writer", root: Path, tmp_tag: str, step: int, rank: int, world: int,
                 commit: Callable[[dict], None]):
        self.writer, self.root, self.tmp_dir, self.step = writer, root, root / tmp_tag, step
        self.rank, self.world, self.commit_fn = rank, world, commit
        self.status = status_dir(root, tmp_tag)
        self.own_done = threading.Event()  # this rank's files on disk (or failed)
        self.committed = threading.Event()  # rank 0: committed, or given up
        self.error: Optional[str] = None
        self._files = 0
        self.records: dict[str, dict] = {}  # this rank's files written here: {"size", "crc32"}
        self._give_up_after: Optional[float] = None  # rank 0 aborting: progress grace
        self._kill = _kill_fault(step, rank)

    # main thread ---------------------------------------------------------------------------
    def queue_file(self, path: Path, obj: Any, save: Callable[[Any, Any], None], zipfile: bool = True) -> None:
        """Snapshot `obj` now; the writer calls `save(snapshot, file)` (torch.save's signature) and
        fsyncs. `zipfile`: `save` writes torch's zip format (else the legacy one)."""
        snap = snapshot(obj, self.writer.buffers)
        _device_sync()  # the writer reads the pinned copies as soon as it gets the job
        self.writer.submit(lambda: self._write(path, snap, save, zipfile))

    def queue_fsync(self, paths: list[Path]) -> None:
        self.writer.submit(lambda: [fsync_path(p) for p in paths])

    def interrupt(self, message: str) -> None:
        """The save itself failed on the main thread: once the queued writes end, this
        checkpoint fails (it is never committed, and waiting for it returns)."""
        self.writer.submit(lambda: self.fail(message))

    def close(self) -> None:
        """Every file is queued: then the directories' fsync, the marker and (rank 0) the commit."""
        self.writer.submit(self._finish)

    # writer thread ------------------------------------------------------------------------
    def _write(self, path: Path, snap: Any, save: Callable[[Any, Any], None], zipfile: bool) -> None:
        with open(path, "wb", buffering=0) as f:
            self.records[str(path.relative_to(self.tmp_dir))] = write_releasing_gil(f, snap, save, zipfile)
            os.fsync(f.fileno())
        self._files += 1
        if self._kill and self._files == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    def _finish(self) -> None:
        for d in sorted({p for p in self.tmp_dir.rglob("*") if p.is_dir()} | {self.tmp_dir}):
            fsync_path(d)
        tmp = self.status / f".done-{self.rank}.tmp"  # the records, then the marker's name
        tmp.write_text(json.dumps(self.records))
        os.replace(tmp, self.status / f"done-{self.rank}")
        self.own_done.set()
        if self.rank == 0:
            self._commit_when_all_done()
        self.committed.set()

    def _commit_when_all_done(self) -> None:
        last_seen, changed_at = None, time.monotonic()
        while True:
            names = {p.name for p in self.status.iterdir()}
            failed = sorted(n for n in names if n.startswith("failed-"))
            if failed:
                self.error = self._failures(failed)
                return
            if sum(n.startswith("done-") for n in names) >= self.world:
                break
            if self._give_up_after is not None:  # aborting: wait only while peers make progress
                seen = (len(names), _tree_bytes(self.tmp_dir))
                if seen != last_seen:
                    last_seen, changed_at = seen, time.monotonic()
                elif time.monotonic() - changed_at > self._give_up_after:
                    self.error = f"checkpoint {self.tmp_dir.name}: not every rank finished writing; not committed"
                    return
            time.sleep(_POLL_S)
        try:
            known: dict[str, dict] = {}
            for n in sorted(names):
                if n.startswith("done-"):
                    known.update(json.loads((self.status / n).read_text()))
            self.commit_fn(known)
        except BaseException:
            self.error = f"checkpoint {self.tmp_dir.name}: the commit failed:\n{traceback.format_exc()}"
            _write_marker(self.status / "failed-commit", self.error)

    def fail(self, message: str) -> None:
        """The writer thread's failure: recorded here and for every rank in a marker."""
        self.error = message
        _write_marker(self.status / f"failed-{self.rank}", message)
        self.own_done.set()
        self.committed.set()

    def _failures(self, names: list[str]) -> str:
        return "; ".join(f"{n}: {(self.status / n).read_text(errors='replace').strip()}" for n in names)

    # main thread: waiting ---------------------------------------------------------------------
    def settle(self, barrier: Callable[[], None]) -> None:
        """Collective: wait until every rank's write has ended and rank 0 has committed; raise
        CheckpointWriteFailed on every rank if any of it failed."""
        self.own_done.wait()
        barrier()  # every rank's files (or failure markers) are on disk
        if self.rank == 0:
            self.committed.wait()
        barrier()  # committed, or a failed-* marker says why not
        failed = sorted(p.name for p in self.status.glob("failed-*")) if self.status.is_dir() else []
        if failed or self.error:
            raise CheckpointWriteFailed(f"checkpoint {self.tmp_dir.name} (step {self.step}) was not written: "
                                        + (self._failures(failed) if failed else self.error))

    def abort(self) -> Optional[str]:
        """Error path (no collective): wait for this rank's own writes; rank 0 commits if every
        rank finishes, giving up once the checkpoint stops changing for ABORT_GRACE_S."""
        self._give_up_after = float(os.environ.get("MOEFORGE_CHECKPOINT_ABORT_GRACE_S", ABORT_GRACE_S))
        self.own_done.wait()
        if self.rank == 0:
            self.committed.wait()
        return self.error


def _tree_bytes(d: Path) -> int:
    total = 0
    for f in d.rglob("*"):
        try:
            total += f.stat().st_size if f.is_file() else 0
        except OSError:  # renamed or removed by its writer meanwhile
            pass
    return total


def _write_marker(path: Path, text: str) -> None:
    try:
        path.write_text(text[-4000:])
    except OSError:
        pass


def _kill_fault(step: int, rank: int) -> bool:
    at = os.environ.get("MOEFORGE_FAULT_KILL_IN_CHECKPOINT")
    return bool(at) and int(at) == step and rank == int(os.environ.get("MOEFORGE_FAULT_KILL_IN_CHECKPOINT_RANK", "1"))


# the writer thread's nice value: it writes with the CPU time training leaves (its commit waits)
WRITER_NICE = 19


class Writer:
    """This rank's background writer thread: runs queued jobs in order. A job that raises fails
    the checkpoint it belongs to; the jobs left of that checkpoint are skipped."""

    def __init__(self):
        self.buffers = HostBuffers()
        self._jobs: queue.Queue = queue.Queue()
        self._current: Optional[CheckpointWrite] = None
        self._thread = threading.Thread(target=self._run, name="moeforge-checkpoint-writer", daemon=True)
        self._thread.start()

    def begin(self, write: CheckpointWrite) -> None:
        self.buffers.recycle()  # the previous checkpoint has settled: nothing reads them now
        self._jobs.put(("begin", write))

    def submit(self, job: Callable[[], Any]) -> None:
        self._jobs.put(("job", job))

    def stop(self) -> None:
        self._jobs.put(("stop", None))
        self._thread.join()

    def _run(self) -> None:
        try:  # Linux: a thread's own nice value; training threads come first on a busy CPU
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        except (AttributeError, OSError):
            pass
        failed = False
        while True:
            kind, item = self._jobs.get()
            if kind == "stop":
                return
            if kind == "begin":
                self._current, failed = item, False
                continue
            if failed:
                continue
            try:
                item()
            except BaseException:
                failed = True
                self._current.fail(f"rank {self._current.rank}: {traceback.format_exc()}")
