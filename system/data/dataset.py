"""The packed corpus: every source prepared once into token shards (`system.data.prepare`:
tokenized, split by document into train/holdout) and read back as fixed-length chunks through
memory maps (`system.data.shards.TokenChunks`).

A chunk holds `seq_len + 1` tokens so that inputs (`[:-1]`) and labels (`[1:]`) both have
length `seq_len`. Documents are joined with an eos token after each one; the chunks are those
`pack` cuts from the same documents.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from system.data.config import DataConfig
from system.data.prepare import (RunUnits, documents_sample, fingerprint, locked, open_split, prepare_source,
                                 source_identity, text_bytes, unit_score)
from system.data.shards import TokenChunks
from system.data.tokenizer import Tokenizer, build_tokenizer


@dataclass
class PackedCorpus:
    """Token chunks per source: `train[name]` and `holdout[name]` index like (chunks, seq_len+1)
    integer arrays (memory-mapped token shards)."""

    tokenizer: Tokenizer
    domains: list[str]  # source names, in spec order
    train: dict[str, TokenChunks]
    holdout: dict[str, TokenChunks]
    seq_len: int
    manifests: Optional[dict[str, dict]] = None  # per source, its prepared shards' manifest

    @classmethod
    def build(cls, cfg: DataConfig, cache_dir: Optional[Path] = None, run_units: Optional[RunUnits] = None,
              log: Callable[[str], None] = lambda m: None) -> "PackedCorpus":
        """Every source of `cfg`, prepared where its shards are missing or stale (`run_units`
        runs the work: serially by default, Ray Data tasks from `jobs.prepare`), then opened."""
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(cfg)
        names = [s.name for s in cfg.sources]
        if not names:
            raise ValueError("data.sources: at least one data source is required")
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources: source names must be unique, got {names}")
        tok = corpus_tokenizer(cfg, cache)
        train, holdout, manifests = {}, {}, {}
        for src in cfg.sources:
            d, m = prepare_source(src, tok, cfg.holdout_fraction, prepared_root(cache), run_units,
                                  unit_bytes=max(1, int(cfg.shard_mb * 2 ** 20)), log=log)
            manifests[src.name] = m
            for part, out in (("train", train), ("holdout", holdout)):
                out[src.name] = chunks = open_split(d, m, part, cfg.seq_len + 1)
                if len(chunks) < 1:
                    raise ValueError(
                        f"source {src.name!r}: its {part} split ({m[part + '_documents']} documents, "
                        f"{m[part + '_tokens']} tokens) yields no chunk of seq_len+1 = {cfg.seq_len + 1} tokens;"
                        " use a shorter seq_len, more documents (max_documents) or a larger"
                        " holdout_fraction")
        return cls(tokenizer=tok, domains=names, train=train, holdout=holdout, seq_len=cfg.seq_len,
                   manifests=manifests)


def prepared_root(cache: Path) -> Path:
    return Path(cache) / "prepared"


def corpus_tokenizer(cfg: DataConfig, cache_dir: Optional[Path] = None) -> Tokenizer:
    """The corpus's tokenizer. A BPE model is trained once on a bounded sample of the training
    documents (`tokenizer.train_sample_bytes`) and cached by the sample's identity (the sources'
    identities and input fingerprints by stat, the holdout fraction, the sample size)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(cfg)
    t = cfg.tokenizer
    if t.kind != "bpe":
        return build_tokenizer(t, lambda: iter(()), cache)
    texts = [s for s in cfg.sources if s.kind != "tokens"]
    if not texts:
        raise ValueError("data.tokenizer: a BPE tokenizer needs at least one text source to learn from")
    key = _hash(json.dumps([[source_identity(s), fingerprint(s)] for s in texts], sort_keys=True),
                cfg.holdout_fraction, t.train_sample_bytes)
    with locked(cache / "tokenizer-bpe"):  # one rank trains, the others then load it
        return build_tokenizer(t, lambda: documents_sample(texts, cfg.holdout_fraction, t.train_sample_bytes),
                               cache, corpus_key=key)


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


def _unit_score(text: str) -> float:
    """A stable pseudo-random number in [0, 1) derived from the text (as prepare decides)."""
    return unit_score(text_bytes(text))


def _hash(*parts) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:20]
