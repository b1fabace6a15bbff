"""Replay of earlier stages' data in a continual stage.

Every stage records, at its end, the chunks its stream actually drew (`consumed.npz`: per
source, the sorted unique chunk ids of the packed corpus). A continual stage with replay
fraction r adds one *replay pool* per earlier source, `replay/<source>`, holding exactly those
chunks, to its mixture: the new sources keep their relative weights scaled by (1 - r), the pools
share r in proportion to their sizes (each consumed sample equally likely). The mixture sampler
makes the proportions exact over every block of positions, so the replayed share is r in
expectation and over each window of `BLOCK` draws up to the rounding of each pool's count (exact with one pool).
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

REPLAY_PREFIX = "replay/"


class ChunkView:
    """The rows `ids` of a packed chunk array, indexed like an array of their own (no copy)."""

    def __init__(self, base: np.ndarray, ids: np.ndarray, base_name: str):
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or (len(ids) and (ids.min() < 0 or ids.max() >= len(base))):
            raise ValueError(f"replay pool of {base_name!r}: chunk ids out of range [0, {len(base)})")
        self.base, self.ids, self.base_name = base, ids, base_name

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.ids),) + tuple(self.base.shape[1:])

    def __getitem__(self, idx) -> np.ndarray:
        return self.base[self.ids[idx]]


def replay_weights(new_weights: Mapping[str, float], pool_sizes: Mapping[str, int],
                   fraction: float) -> dict[str, float]:
    """Mixture weights (summing to 1): new sources x (1 - r), pools r in proportion to their size."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"replay fraction {fraction} must be in [0, 1)")
    total_new = sum(new_weights.values())
    if total_new <= 0:
        raise ValueError("replay: the new sources' weights must not all be zero")
    out = {d: (1.0 - fraction) * w / total_new for d, w in new_weights.items()}
    total_pool = sum(pool_sizes.values())
    if fraction > 0:
        if total_pool <= 0:
            raise ValueError("replay: the earlier stages consumed no samples to replay")
        for name, n in pool_sizes.items():
            out[name] = fraction * n / total_pool
    return out


def base_chunks(names: list[str], views: Mapping[str, object], doms: np.ndarray,
                idxs: np.ndarray) -> dict[str, np.ndarray]:
    """Per base source, the sorted unique chunk ids behind (domain id, chunk index) draws.

    `names[d]` is the sampler's d-th domain; a replay pool's index maps through its ids.
    """
    parts: dict[str, list[np.ndarray]] = {}
    for d in np.unique(doms):
        name = names[int(d)]
        sel = idxs[doms == d]
        view = views.get(name)
        if isinstance(view, ChunkView):
            parts.setdefault(view.base_name, []).append(view.ids[sel])
        else:
            parts.setdefault(name, []).append(sel)
    return {k: np.unique(np.concatenate(v)) for k, v in parts.items()}


def merge_consumed(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: np.asarray(v, dtype=np.int64) for k, v in a.items()}
    for k, v in b.items():
        out[k] = np.union1d(out[k], v) if k in out else np.asarray(v, dtype=np.int64)
    return out


def save_consumed(path: Path, chunks: Mapping[str, np.ndarray], meta: dict) -> None:
    """Write the consumed-chunk record atomically (npz: one array per source + a JSON header)."""
    from system.data.tokenizer import atomic_write_bytes

    buf = io.BytesIO()
    arrays = {f"chunks/{k}": np.asarray(v, dtype=np.int64) for k, v in chunks.items()}
    np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_consumed(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no consumed-sample record (the stage did not finish, or was run by a "
                         "version that did not record its samples); it cannot be replayed")
    with np.load(p) as z:
        meta = json.loads(bytes(z["__meta__"]).decode())
        chunks = {k[len("chunks/"):]: z[k] for k in z.files if k.startswith("chunks/")}
    return chunks, meta


def replay_pools(records: list[tuple[str, Path]], train: Mapping[str, np.ndarray], tokenizer_fp: str,
                 seq_len: int, only: Optional[set[str]] = None) -> dict[str, ChunkView]:
    """The replay pools `replay/<source>` from the consumed records of earlier stages.

    `records` are (stage name, consumed.npz path); `train` the packed train chunks per source.
    The records must come from the same tokenizer and sequence length as this stage.
    """
    union: dict[str, np.ndarray] = {}
    for stage, path in records:
        chunks, meta = load_consumed(path)
        if meta.get("tokenizer") != tokenizer_fp:
            raise ValueError(f"replay from stage {stage!r}: its samples were tokenized by "
                             f"{meta.get('tokenizer')!r}, this stage uses {tokenizer_fp!r}")
        if meta.get("seq_len") != seq_len:
            raise ValueError(f"replay from stage {stage!r}: seq_len {meta.get('seq_len')} != {seq_len}")
        for src, ids in chunks.items():
            if src not in train:
                raise ValueError(f"replay from stage {stage!r}: source {src!r} is not in this job's corpus")
            if len(train[src]) != int(meta.get("sizes", {}).get(src, len(train[src]))):
                raise ValueError(f"replay from stage {stage!r}: source {src!r} had "
                                 f"{meta['sizes'][src]} chunks then, {len(train[src])} now (its data changed)")
        if not any(len(v) for v in chunks.values()):
            raise ValueError(f"replay from stage {stage!r}: it consumed no samples ({path})")
        union = merge_consumed(union, chunks)
    return {REPLAY_PREFIX + src: ChunkView(train[src], ids, src) for src, ids in union.items()
            if len(ids) and (only is None or src in only)}


def source_pools(names, train: Mapping[str, np.ndarray]) -> dict[str, ChunkView]:
    """Replay pools `replay/<source>` holding every train chunk of the named corpus sources
    (data from before the job, e.g. a proxy of an imported model's pretraining mix)."""
    out = {}
    for src in names:
        if src not in train:
            raise ValueError(f"replay.sources: {src!r} is not in this job's corpus")
        out[REPLAY_PREFIX + src] = ChunkView(train[src], np.arange(len(train[src]), dtype=np.int64), src)
    return out
