"""Token shards on disk and the chunk arrays training reads from them by memory map.

A prepared source holds, per split ("train", "holdout"), its token stream cut into consecutive
shard files, one per work unit:

    {split}-{unit:05d}.bin       tokens, documents in order, each followed by eos (uint16/uint32)
    {split}-{unit:05d}.docs.npy  int64 end offset of every document in that file (eos included)

Chunk i of a split is tokens [i * W, (i + 1) * W) of its stream, W = seq_len + 1: the chunks
`system.data.dataset.pack` cuts in memory, found by index arithmetic over the shards' token counts
(never by concatenating them), so the same shards serve any seq_len. More: docs/data.md.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

SPLITS = ("train", "holdout")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocabulary <= 65536), else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_name(split: str, unit: int) -> str:
    return f"{split}-{unit:05d}.bin"


def docs_name(split: str, unit: int) -> str:
    return f"{split}-{unit:05d}.docs.npy"


def file_crc32(path: Path, block: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(block)
            if not b:
                return crc
            crc = zlib.crc32(b, crc)


class TokenChunks:
    """Chunks of width W over token shard files, read through memory maps: indexed like an
    (n, W) integer array (an int, a slice or an integer array of chunk ids) and returning int64
    rows. Nothing is read until a chunk is asked for; the pages are the files' (shared, not
    private memory)."""

    def __init__(self, files: Sequence[Path], tokens: Sequence[int], dtype: np.dtype, width: int):
        if width < 2:
            raise ValueError(f"chunk width {width} must be >= 2")
        if len(files) != len(tokens):
            raise ValueError("one token count per shard file is needed")
        self.dtype = np.dtype(dtype)
        self.width = int(width)
        self._maps = []
        for f, n in zip(files, tokens):
            size = os.path.getsize(f)
            if size != int(n) * self.dtype.itemsize:
                raise ValueError(f"{f}: {size} bytes, expected {n} tokens of {self.dtype} "
                                 f"({int(n) * self.dtype.itemsize} bytes): re-run moeforge prepare")
            # An empty file cannot be mapped; it holds no token anyway.
            self._maps.append(np.memmap(f, dtype=self.dtype, mode="r") if n else np.zeros(0, self.dtype))
        self._starts = np.concatenate([[0], np.cumsum(np.asarray(tokens, dtype=np.int64))])
        self.total_tokens = int(self._starts[-1])
        self.n = self.total_tokens // self.width

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.width)

    def _row(self, i: int, out: np.ndarray) -> None:
        lo = i * self.width
        hi = lo + self.width
        s = int(np.searchsorted(self._starts, lo, side="right")) - 1
        at = 0
        while lo < hi:  # a chunk may span shard files
            m = self._maps[s]
            a = lo - int(self._starts[s])
            take = min(hi - lo, len(m) - a)
            out[at:at + take] = m[a:a + take]
            at, lo, s = at + take, lo + take, s + 1

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            i = int(idx) + (self.n if idx < 0 else 0)
            if not 0 <= i < self.n:
                raise IndexError(f"chunk {idx} out of range [0, {self.n})")
            out = np.empty(self.width, dtype=np.int64)
            self._row(i, out)
            return out
        if isinstance(idx, slice):
            ids = np.arange(*idx.indices(self.n), dtype=np.int64)
        else:
            ids = np.asarray(idx)
            if ids.dtype == bool:
                ids = np.flatnonzero(ids)
            ids = ids.astype(np.int64, copy=False)
            if ids.ndim != 1:
                raise IndexError("chunk ids must be one-dimensional")
            ids = np.where(ids < 0, ids + self.n, ids)
            if len(ids) and (ids.min() < 0 or ids.max() >= self.n):
                raise IndexError(f"chunk ids out of range [0, {self.n})")
        out = np.empty((len(ids), self.width), dtype=np.int64)
        for r, i in enumerate(ids):
            self._row(int(i), out[r])
        return out

    def __array__(self, dtype=None, copy=None):
        arr = self[:]
        return arr if dtype is None else arr.astype(dtype)
