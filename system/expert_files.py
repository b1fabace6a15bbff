"""The on-disk format of sharded experts: `experts/rankNNNNN.pt` beside DeepSpeed's files.

Each rank of an ep/fssdp run writes the experts it owns (weights and Adam moments) with the
ownership it had; readers take every rank's file, whatever the world size that wrote them.
Single-process code (upcycling, teachers, export) reads full expert weights from here.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

EXPERT_DIR = "experts"


_DEFERRED: list[Callable[[Path, dict], None]] = []  # the innermost `deferred_writes` queue


@contextmanager
def deferred_writes(queue: Callable[[Path, dict], None]) -> Iterator[None]:
    """Inside it, `write_expert_file` hands (path, state) to `queue` instead of writing: an
    asynchronous checkpoint's writer writes the file later (the state is already a host copy)."""
    _DEFERRED.append(queue)
    try:
        yield
    finally:
        _DEFERRED.pop()


def write_expert_file(ckpt_dir: Path, rank: int, state: dict) -> None:
    """This rank's experts, written under a temporary name and renamed into place (or queued,
    inside `deferred_writes`: the checkpoint's own directory is then the temporary one)."""
    d = Path(ckpt_dir) / EXPERT_DIR
    d.mkdir(parents=True, exist_ok=True)
    if _DEFERRED:
        _DEFERRED[-1](d / f"rank{rank:05d}.pt", state)
        return
    tmp = d / f".rank{rank:05d}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, d / f"rank{rank:05d}.pt")


def read_expert_files(ckpt_dir: Path, mmap: bool = False) -> tuple[dict, Mapping]:
    """(the first file's header, {"layer.expert": record} over every rank's file), checked complete.
    `mmap`: the tensors are mapped from the files, so only the records a caller reads are read.
    Files written with expert sharding (format 2) hold pieces: a record joins its pieces on
    access, so a reader sees whole tensors whatever layout wrote them."""
    files = sorted((Path(ckpt_dir) / EXPERT_DIR).glob("rank*.pt"))
    if not files:
        raise ValueError(f"checkpoint {ckpt_dir} has no {EXPERT_DIR}/rank*.pt files (not an ep/fssdp checkpoint)")
    from system.safe_load import load_tensors

    parts = [load_tensors(f, mmap=mmap) for f in files]
    head = parts[0]
    members = int(head.get("edp_size") or 1)
    if len(parts) != head["world"] * members:
        raise ValueError(f"checkpoint {ckpt_dir}: {len(parts)} expert files, written by "
                         f"{head['world'] * members} ranks")
    if members > 1:
        allx = _PieceRecords(head, parts)
    else:
        allx = {}
        for p in parts:
            allx.update(p["experts"])
    if len(allx) != head["num_layers"] * head["num_experts"]:
        raise ValueError(f"checkpoint {ckpt_dir}: {len(allx)} experts on disk, expected "
                         f"{head['num_layers'] * head['num_experts']}")
    return head, allx


class _PieceRecords(Mapping):
    """{"layer.expert": record} over format-2 files: member m's file of a place holds piece m of
    each tensor (flat); a record is the members' pieces joined, in the weight's shape."""

    def __init__(self, head: dict, parts: list):
        self.G, D, F = int(head["edp_size"]), head["d_model"], head["d_expert"]
        self.shapes = {"w1": (D, F), "w3": (D, F), "w2": (F, D)}
        self.where: dict = {}  # key -> [each member's record]
        for p in parts:
            for k, rec in p["experts"].items():
                self.where.setdefault(k, [None] * self.G)[int(p["member"])] = rec
        for k, recs in self.where.items():
            if any(r is None for r in recs):
                raise ValueError(f"expert {k}: pieces missing from the expert files")

    def __getitem__(self, key: str) -> dict:
        recs = self.where[key]
        return {f: torch.cat([r[f].reshape(-1) for r in recs]).view(self.shapes[f.split(".")[-1]])
                for f in recs[0]}

    def __iter__(self):
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def full_expert_weights(ckpt_dir: Path) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every MoE layer's stacked (E, ...) expert weights from an ep/fssdp checkpoint (any world)."""
    head, allx = read_expert_files(ckpt_dir)
    out = {}
    for l in range(head["num_layers"]):
        out[l] = tuple(torch.stack([allx[f"{l}.{e}"][n] for e in range(head["num_experts"])])
                       for n in ("w1", "w3", "w2"))
    return out
