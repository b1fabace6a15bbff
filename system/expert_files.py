"""The on-disk format of sharded experts: `experts/rankNNNNN.pt` beside DeepSpeed's files.

Each rank of an ep/fssdp run writes the experts it owns (weights and Adam moments) with the
ownership it had; readers take every rank's file, whatever the world size that wrote them.
Single-process code (upcycling, teachers, export) reads full expert weights from here.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

EXPERT_DIR = "experts"


def write_expert_file(ckpt_dir: Path, rank: int, state: dict) -> None:
    """This rank's experts, written under a temporary name and renamed into place."""
    d = Path(ckpt_dir) / EXPERT_DIR
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".rank{rank:05d}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, d / f"rank{rank:05d}.pt")


def read_expert_files(ckpt_dir: Path, mmap: bool = False) -> tuple[dict, dict]:
    """(the first file's header, {"layer.expert": record} over every rank's file), checked complete.
    `mmap`: the tensors are mapped from the files, so only the records a caller copies are read."""
    files = sorted((Path(ckpt_dir) / EXPERT_DIR).glob("rank*.pt"))
    if not files:
        raise ValueError(f"checkpoint {ckpt_dir} has no {EXPERT_DIR}/rank*.pt files (not an ep/fssdp checkpoint)")
    from system.safe_load import load_tensors

    parts = [load_tensors(f, mmap=mmap) for f in files]
    head = parts[0]
    if len(parts) != head["world"]:
        raise ValueError(f"checkpoint {ckpt_dir}: {len(parts)} expert files, written by {head['world']} ranks")
    allx = {}
    for p in parts:
        allx.update(p["experts"])
    if len(allx) != head["num_layers"] * head["num_experts"]:
        raise ValueError(f"checkpoint {ckpt_dir}: {len(allx)} experts on disk, expected "
                         f"{head['num_layers'] * head['num_experts']}")
    return head, allx


def full_expert_weights(ckpt_dir: Path) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every MoE layer's stacked (E, ...) expert weights from an ep/fssdp checkpoint (any world)."""
    head, allx = read_expert_files(ckpt_dir)
    out = {}
    for l in range(head["num_layers"]):
        out[l] = tuple(torch.stack([allx[f"{l}.{e}"][n] for e in range(head["num_experts"])])
                       for n in ("w1", "w3", "w2"))
    return out
