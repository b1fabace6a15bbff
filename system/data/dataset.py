"""The packed corpus: every source tokenized, split by document into train/holdout and cut
into fixed-length chunks, cached on disk as .npy arrays.

A chunk holds `seq_len + 1` tokens so that inputs (`[:-1]`) and labels (`[1:]`) both have
length `seq_len`. Documents are joined with an eos token after each one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from system.data.config import DataConfig, SourceConfig
from system.data.corpus import load_documents
from system.data.tokenizer import Tokenizer, atomic_write_bytes, build_tokenizer

FORMAT_VERSION = 1  # bump when packing changes, so stale caches are not reused


@dataclass
class PackedCorpus:
    """Token chunks per source: `train[name]` and `holdout[name]` are int32 (chunks, seq_len+1)."""

    tokenizer: Tokenizer
    domains: list[str]  # source names, in spec order
    train: dict[str, np.ndarray]
    holdout: dict[str, np.ndarray]
    seq_len: int

    @classmethod
    def build(cls, cfg: DataConfig, cache_dir: Optional[Path] = None) -> "PackedCorpus":
        """Load, tokenize and pack every source of `cfg`, reusing cached arrays when valid."""
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(cfg)
        names = [s.name for s in cfg.sources]
        if not names:
            raise ValueError("data.sources: at least one data source is required")
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources: source names must be unique, got {names}")

        docs = {s.name: load_documents(s) for s in cfg.sources}
        # A content hash, not file stamps: edited files or a different Python version
        # must never silently reuse another corpus's tokens.
        content = {n: _content_hash(d) for n, d in docs.items()}
        splits = {n: split_holdout(d, cfg.holdout_fraction) for n, d in docs.items()}

        def training_texts():
            # The tokenizer learns from train documents only, never the holdout.
            for n in names:
                yield from splits[n][0]

        corpus_key = _hash(json.dumps([[n, content[n]] for n in names]), cfg.holdout_fraction)
        tok = build_tokenizer(cfg.tokenizer, training_texts, cache, corpus_key=corpus_key)

        train, holdout = {}, {}
        for src in cfg.sources:
            key = _hash(FORMAT_VERSION, _source_identity(src), content[src.name],
                        tok.fingerprint, cfg.seq_len, cfg.holdout_fraction)
            train[src.name], holdout[src.name] = _packed_source(
                src.name, splits[src.name], tok, cfg.seq_len, cache, key)
        return cls(tokenizer=tok, domains=names, train=train, holdout=holdout,
                   seq_len=cfg.seq_len)


def default_cache_dir(cfg: DataConfig) -> Path:
    """cfg.cache_dir, else $MOEFORGE_CACHE, else ~/.cache/moeforge."""
    raw = cfg.cache_dir or os.environ.get("MOEFORGE_CACHE") or "~/.cache/moeforge"
    return Path(raw).expanduser()


def split_holdout(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, holdout) documents, each in the original order, split by a hash of the text.

    A document's side depends only on its text, so it stays put when others are added.
    With two or more documents each side gets at least one: the lowest-scoring document
    moves to holdout (or the highest to train) if the hash left a side empty.
    """
    scores = [_unit_score(d) for d in docs]
    in_holdout = [s < fraction for s in scores]
    if len(docs) >= 2 and not any(in_holdout):
        in_holdout[int(np.argmin(scores))] = True
    if len(docs) >= 2 and all(in_holdout):
        in_holdout[int(np.argmax(scores))] = False
    train = [d for d, h in zip(docs, in_holdout) if not h]
    held = [d for d, h in zip(docs, in_holdout) if h]
    return train, held


def pack(token_docs: list[np.ndarray], eos_id: int, seq_len: int) -> np.ndarray:
    """Documents joined with eos after each, cut into (n, seq_len+1) int32 chunks; tail dropped."""
    eos = np.array([eos_id], dtype=np.int32)
    parts = [p for ids in token_docs for p in (ids.astype(np.int32, copy=False), eos)]
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    width = seq_len + 1
    n = len(stream) // width
    return np.ascontiguousarray(stream[: n * width].reshape(n, width))


def _packed_source(name: str, split: tuple[list[str], list[str]], tok: Tokenizer,
                   seq_len: int, cache: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    paths = {part: cache / f"packed-{_safe(name)}-{key}.{part}.npy"
             for part in ("train", "holdout")}
    if all(p.is_file() for p in paths.values()):
        try:
            # Memory-mapped: large corpora are paged in on demand and shared between processes.
            return tuple(np.load(paths[p], mmap_mode="r") for p in ("train", "holdout"))
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt below
    arrays = {}
    for part, docs in zip(("train", "holdout"), split):
        arrays[part] = pack(tok.encode_batch(docs), tok.eos_id, seq_len)
        if len(arrays[part]) < 1:
            n_tok = sum(len(d) for d in docs)
            raise ValueError(
                f"source {name!r}: its {part} split ({len(docs)} documents, about {n_tok}"
                f" characters) yields no chunk of seq_len+1 = {seq_len + 1} tokens;"
                " use a shorter seq_len, more documents (max_documents) or a larger"
                " holdout_fraction")
    for part, arr in arrays.items():
        buf = io.BytesIO()
        np.save(buf, arr)
        atomic_write_bytes(paths[part], buf.getvalue())
    return arrays["train"], arrays["holdout"]


def _source_identity(src: SourceConfig) -> str:
    # The weight only affects sampling, so changing it must not invalidate the tokens.
    fields = dataclasses.asdict(src)
    fields.pop("weight", None)
    return json.dumps(fields, sort_keys=True)


def _content_hash(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8", errors="surrogatepass")
        h.update(len(b).to_bytes(8, "little"))  # length-prefixed: boundaries matter
        h.update(b)
    return h.hexdigest()


def _unit_score(text: str) -> float:
    """A stable pseudo-random number in [0, 1) derived from the text."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def _hash(*parts) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:20]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64]
