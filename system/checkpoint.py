"""Atomic checkpoints of a training stage.

Layout of a stage's checkpoint root:
    step_00000050/          one complete checkpoint (DeepSpeed shards + our state)
        moeforge.json       manifest, written last: a directory without it is incomplete; it
                            records every other file's size and CRC-32 (`verify_checkpoint`)
        rng_rank{r}.pt      per-rank RNG states
    latest                  the tag of the newest complete checkpoint (replaced atomically)

A checkpoint is first written under `.tmp-step_...`, then renamed into place once every rank
has finished, and only then does `latest` move. A crash at any point leaves the previous
checkpoint as the latest; stray `.tmp-*` directories are removed by the next save. Before a
checkpoint is resumed from, `valid_checkpoint` verifies it and falls back to the previous intact
one (a truncated file after a full disk, a flipped byte, a lost file), saying so in one line.
With `async_save` the same files are written by a background thread from a host copy of the
state, and the commit (manifest, rename, `latest`) waits for every rank's writes
(`system/async_checkpoint.py`).
"""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

MANIFEST = "moeforge.json"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    """A directory's entries made durable where the filesystem allows it (errors ignored)."""
    from system.async_checkpoint import fsync_path

    try:
        fsync_path(d)
    except OSError:
        pass


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, numbers and tuples only (loadable with the restricted
    unpickler: `system.safe_load`)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"python": random.getstate(),
          "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    kind, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def is_complete(ckpt_dir: Path) -> bool:
    return (ckpt_dir / MANIFEST).is_file()


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {ckpt_dir} has no readable {MANIFEST}: {e}") from None


_CHUNK = 8 << 20


class CheckpointCorrupt(ValueError):
    """Checkpoints exist but none is intact: a restart cannot fix this."""


def file_checksum(path: Path) -> str:
    """CRC-32 of a file's bytes (zlib, streamed): cheap next to writing the file
    (`python bench/checkpoint_checksum.py` measures it)."""
    crc = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                return f"{crc:08x}"
            crc = zlib.crc32(b, crc)


def file_records(ckpt_dir: Path, known: Optional[Mapping[str, dict]] = None) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "crc32"}} of every file of a checkpoint but its manifest. `known`:
    records taken as they are (CRC-32s computed while writing) where the size still matches."""
    d, known = Path(ckpt_dir), known or {}
    out = {}
    for f in sorted(d.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            rel, size = str(f.relative_to(d)), f.stat().st_size
            rec = known.get(rel)
            out[rel] = dict(rec) if rec is not None and rec.get("size") == size else \
                {"size": size, "crc32": file_checksum(f)}
    return out


def verify_checkpoint(ckpt_dir: Path, checksums: bool = True) -> Optional[str]:
    """None when the checkpoint is intact, else one line saying which file and what is wrong.

    Checks the manifest is readable and every file it records exists with the recorded size
    and (with `checksums`) CRC-32. Checkpoints from before the manifest recorded files pass
    on the manifest alone."""
    d = Path(ckpt_dir)
    if not (d / MANIFEST).is_file():
        return f"{d}: no {MANIFEST} (an incomplete write)"
    try:
        man = json.loads((d / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"{d / MANIFEST}: unreadable ({e})"
    files = man.get("files") if isinstance(man, dict) else None
    if not isinstance(files, dict):
        return None
    for rel, rec in files.items():
        f = d / rel
        if not f.is_file():
            return f"{f}: missing"
        size = f.stat().st_size
        if size != rec.get("size"):
            return f"{f}: {size} bytes, the manifest recorded {rec.get('size')} (truncated or overwritten)"
    if checksums:
        for rel, rec in files.items():
            got = file_checksum(d / rel)
            if got != rec.get("crc32"):
                return f"{d / rel}: CRC-32 {got} != recorded {rec.get('crc32')} (corrupted)"
    return None


def valid_checkpoint(root: Path, warn: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """The newest intact checkpoint under `root` (None when there is none at all).

    A damaged newer one is reported through `warn` in one line and skipped; when checkpoints
    exist but none is intact, ValueError names each one's problem."""
    root = Path(root)
    if not root.is_dir():
        return None
    cands = sorted((p for p in root.glob("step_*") if p.is_dir() and is_complete(p)), reverse=True)
    problems = []
    for c in cands:
        bad = verify_checkpoint(c)
        if bad is None:
            if problems and warn is not None:
                warn(f"checkpoint {problems[0]}; using {c.name}" + (f" (skipped {len(problems)} damaged)"
                                                                    if len(problems) > 1 else ""))
            return c
        problems.append(bad)
    if problems:
        raise CheckpointCorrupt(f"no intact checkpoint under {root}: " + "; ".join(problems))
    return None


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under `root`, or None.

    Trusts `latest` when it names a complete checkpoint; otherwise falls back to the
    highest-numbered complete `step_*` directory (e.g. `latest` lost in a crash).
    """
    root = Path(root)
    if not root.is_dir():
        return None
    latest = root / LATEST
    if latest.is_file():
        cand = root / latest.read_text().strip()
        if cand.name.startswith("step_") and is_complete(cand):
            return cand
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))
    return done[-1] if done else None


def require_intact(ckpt: Path) -> Path:
    """`ckpt` itself, verified (sizes and CRC-32s); CheckpointCorrupt naming the damaged file."""
    bad = verify_checkpoint(ckpt)
    if bad is not None:
        raise CheckpointCorrupt(f"checkpoint {ckpt} is damaged: {bad}")
    return Path(ckpt)


def resolve_checkpoint(path: str | Path, warn: Optional[Callable[[str], None]] = None) -> Path:
    """A verified checkpoint directory from a user path: a checkpoint itself (which must be
    intact) or a root holding them (its newest intact one; a damaged newer one goes to `warn`)."""
    p = Path(path)
    if is_complete(p):
        return require_intact(p)
    for root in (p, p / "checkpoints"):
        if latest_checkpoint(root) is not None:
            return valid_checkpoint(root, warn=warn)
    raise ValueError(f"{str(p)!r} holds no complete checkpoint (no {MANIFEST} in it or under it)")


class CheckpointManager:
    """Saves and finds a stage's checkpoints; every rank calls `save`, rank 0 commits.

    `async_save`: `save` returns once this rank's state is copied into host memory; a background
    writer writes and commits it (`system/async_checkpoint.py`). Every rank must then call
    `finish()` at the stage's end or stop (collective: waits for the commit, raises if a write
    failed) or `abort()` on an error path (no collective)."""

    def __init__(self, root: Path, rank: int, barrier: Callable[[], None], num_to_keep: Optional[int] = None,
                 async_save: bool = False, world: Optional[int] = None):
        self.root, self.rank, self.barrier, self.num_to_keep = Path(root), rank, barrier, num_to_keep
        self.async_save, self.world = async_save, world
        self._writer = None  # async_checkpoint.Writer, started at the first asynchronous save
        self._inflight = None  # async_checkpoint.CheckpointWrite not yet settled
        self.on_commit: Optional[Callable[[int], None]] = None  # rank 0, main thread: a step's checkpoint committed

    def save(self, engine, step: int, client_state: dict[str, Any], manifest: dict[str, Any],
             extra: Optional[Callable[[Path], None]] = None) -> Path:
        """`extra(dir)` writes more of this rank's state into the checkpoint (sharded experts)."""
        if self.async_save:
            return self._save_async(engine, step, client_state, manifest, extra)
        self.settle()  # an asynchronous one before it (the mode switched) is committed first
        tag = tag_for(step)
        tmp_tag = f".tmp-{tag}"
        final = self.root / tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        self.barrier()
        engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), self.root / tmp_tag / f"rng_rank{self.rank}.pt")
        if extra is not None:
            extra(self.root / tmp_tag)
        self.barrier()  # every rank's shards are on disk
        if self.rank == 0:
            self._commit(tmp_tag, tag, manifest)  # every rank's files are complete
        self.barrier()
        if self.rank == 0 and self.on_commit is not None:
            self.on_commit(step)
        return final

    def _commit(self, tmp_tag: str, tag: str, manifest: dict[str, Any],
                known: Optional[Mapping[str, dict]] = None) -> None:
        """Rank 0, once every rank's files are complete: record their sizes and checksums in the
        manifest, rename the checkpoint into place, move `latest`, prune."""
        final = self.root / tag
        manifest = {**manifest, "files": file_records(self.root / tmp_tag, known)}
        atomic_write_text(self.root / tmp_tag / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        if final.exists():  # a re-run of the same step after a crash past the rename
            shutil.rmtree(final)
        os.rename(self.root / tmp_tag, final)
        _fsync_dir(self.root)
        atomic_write_text(self.root / LATEST, tag)
        self._prune()

    def _save_async(self, engine, step: int, client_state: dict[str, Any], manifest: dict[str, Any],
                    extra: Optional[Callable[[Path], None]]) -> Path:
        from system.async_checkpoint import CheckpointWrite, Writer, status_dir

        tag = tag_for(step)
        tmp_tag = f".tmp-{tag}"
        self.settle()  # at most one checkpoint in flight
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):  # partial checkpoints and their status
                shutil.rmtree(stale, ignore_errors=True)
            status_dir(self.root, tmp_tag).mkdir()
        self.barrier()
        world = self.world or manifest.get("world_size")
        if not world:
            raise ValueError("an asynchronous checkpoint needs the world size (CheckpointManager(world=...))")
        manifest = copy.deepcopy(manifest)

        def commit(known: dict[str, dict]) -> None:
            self._commit(tmp_tag, tag, manifest, known)
            shutil.rmtree(status_dir(self.root, tmp_tag), ignore_errors=True)

        if self._writer is None:
            self._writer = Writer()
        write = self._inflight = CheckpointWrite(self._writer, self.root, tmp_tag, step, self.rank, int(world), commit)
        self._writer.begin(write)
        tmp = self.root / tmp_tag
        try:
            inner = getattr(engine, "checkpoint_engine", None)
            if getattr(inner, "name", None) == "TorchCheckpointEngine":  # DeepSpeed's files: snapshot + queue
                from system.async_checkpoint import snapshot_engine

                engine.checkpoint_engine = snapshot_engine(inner, write)
                try:
                    engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state=client_state, save_latest=False)
                finally:
                    engine.checkpoint_engine = inner
            else:  # another checkpoint engine (or none) writes now; its files are fsynced in the background
                self._written_now(write, lambda: engine.save_checkpoint(str(self.root), tag=tmp_tag,
                                                                        client_state=client_state, save_latest=False))
            write.queue_file(tmp / f"rng_rank{self.rank}.pt", rng_state(), torch.save)
            if extra is not None:  # the strategy's expert files: host copies taken now, queued like
                from system.expert_files import deferred_writes  # DeepSpeed's (anything else it writes

                with deferred_writes(lambda path, state: write.queue_file(path, state, torch.save)):
                    self._written_now(write, lambda: extra(tmp))  # now is fsynced in the background)
        except BaseException as e:
            write.interrupt(f"rank {self.rank}: the save was interrupted: {e!r}")
            raise
        write.close()
        return self.root / tag

    def _written_now(self, write, fn: Callable[[], None]) -> None:
        tmp = write.tmp_dir
        before = set(tmp.rglob("*")) if tmp.is_dir() else set()
        fn()
        write.queue_fsync(sorted(p for p in set(tmp.rglob("*")) - before if p.is_file()))

    def settle(self) -> None:
        """Collective, every rank: the checkpoint in flight (if any) is written and committed;
        raises CheckpointWriteFailed on every rank if not. The writer stays for the next save."""
        write, self._inflight = self._inflight, None
        if write is None:
            return
        try:
            write.settle(self.barrier)
        except BaseException:
            write.abort()  # e.g. a peer died: rank 0's writer stops waiting for its marker
            raise
        if self.rank == 0 and self.on_commit is not None:
            self.on_commit(write.step)

    def finish(self) -> None:
        """Collective, every rank: the checkpoint in flight is written and committed (raises
        CheckpointWriteFailed on every rank if not); the background writer stops."""
        try:
            self.settle()
        finally:
            self._stop_writer()

    def abort(self) -> None:
        """An error path (no collective): wait for this rank's writes (rank 0: and the commit,
        while the other ranks' files still change); a write failure is printed, not raised."""
        write, self._inflight = self._inflight, None
        try:
            err = write.abort() if write is not None else None
            if err:
                print(f"[moeforge] warning: checkpoint at step {write.step} not committed: {err.splitlines()[0]}",
                      flush=True)
        finally:
            self._stop_writer()

    def _stop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()

    def _prune(self) -> None:
        if not self.num_to_keep:
            return
        done = sorted(p for p in self.root.glob("step_*") if is_complete(p))
        for old in done[:-self.num_to_keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, engine, ckpt: Path, load_optimizer_states: bool = True) -> dict[str, Any]:
        """Restore engine (model, optimizer, scheduler) and this rank's RNG; return client state.

        Every file is first screened with the restricted unpickler (`system.safe_load`): DeepSpeed
        unpickles its own files fully, so one naming a foreign global is refused before that."""
        from system.safe_load import load_tensors, screen_checkpoint

        screen_checkpoint(ckpt)
        _, client_state = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name,
                                                 load_optimizer_states=load_optimizer_states)
        if client_state is None:
            raise ValueError(f"DeepSpeed could not load checkpoint {ckpt}")
        rng_file = ckpt / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            set_rng_state(load_tensors(rng_file))
        return client_state


def load_module_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint, independent of world size and ZeRO stage."""
    files = sorted(Path(ckpt).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise ValueError(f"checkpoint {ckpt} has no model state file (mp_rank_*_model_states.pt)")
    from system.safe_load import load_tensors

    state = load_tensors(files[0], allow_deepspeed=True)
    module = dict(state["module"])
    if (Path(ckpt) / "experts").is_dir():  # ep/fssdp: experts live in their own files
        from system.expert_files import full_expert_weights

        moe_blocks = sorted({int(k.split(".")[1]) for k in module
                             if k.startswith("blocks.") and k.endswith(".ffn.router.weight")})
        for l, ws in full_expert_weights(Path(ckpt)).items():
            for name, w in zip(("w1", "w3", "w2"), ws):
                module[f"blocks.{moe_blocks[l]}.ffn.experts.{name}"] = w
    return module


class CheckpointTensors:
    """A checkpoint's model tensors in our naming, read lazily (memory-mapped files).

    Dense tensors come from DeepSpeed's model-state file; under ep/fssdp the experts of one
    MoE layer are stacked from every rank's expert file when asked for, so a reader (export)
    holds one layer's experts at a time, never the whole model twice."""

    def __init__(self, ckpt: Path):
        self.ckpt = Path(ckpt)
        files = sorted(self.ckpt.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ValueError(f"checkpoint {ckpt} has no model state file (mp_rank_*_model_states.pt)")
        from system.safe_load import load_tensors

        state = load_tensors(files[0], mmap=True, allow_deepspeed=True)
        self.module = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state["module"].items()}
        self.experts: Mapping = {}
        self.moe_blocks: list[int] = []
        if (self.ckpt / "experts").is_dir():
            from system.expert_files import read_expert_files

            head, self.experts = read_expert_files(self.ckpt, mmap=True)  # sharded pieces joined on access
            self.num_experts = head["num_experts"]
            self.moe_blocks = sorted({int(k.split(".")[1]) for k in self.module
                                      if k.startswith("blocks.") and k.endswith(".ffn.router.weight")})

    def keys(self) -> list[str]:
        out = list(self.module)
        for b in self.moe_blocks:
            out += [f"blocks.{b}.ffn.experts.{n}" for n in ("w1", "w3", "w2")]
        return out

    def get(self, key: str) -> torch.Tensor:
        if key in self.module:
            return self.module[key]
        parts = key.split(".")
        if self.experts and len(parts) == 5 and parts[2:4] == ["ffn", "experts"] and int(parts[1]) in self.moe_blocks:
            layer = self.moe_blocks.index(int(parts[1]))
            recs = [self.experts.get(f"{layer}.{e}") for e in range(self.num_experts)]
            if any(r is None for r in recs):
                raise ValueError(f"checkpoint {self.ckpt}: experts of MoE layer {layer} are missing from the expert files")
            return torch.stack([r[parts[4]] for r in recs])
        raise KeyError(f"checkpoint {self.ckpt} has no tensor {key!r}")
