"""`moeforge prepare`'s work: each source tokenized once into token shards with a manifest.

    {root}/{source}-{key}/        key: the source's identity, the tokenizer, the holdout fraction
        manifest.json             written last: input and tokenizer fingerprints, per-unit counts
        unit-{u:05d}.json         a finished unit (written after its shard files)
        {split}-{u:05d}.bin / .docs.npy   see system.data.shards

Idempotent by stat (a manifest that matches its input means no content is read), resumable and
atomic (temporary names renamed; a unit is finished only when its marker and files check out), and
the holdout split decided here by a hash of each document, as `system.data.dataset.split_holdout`.
`run_units` runs the units' tasks: serially here, or in parallel Ray Data tasks (`jobs.prepare`).
The layout and the rules in full: docs/data.md#prepared-token-shards-moeforge-prepare.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from system.data.config import SourceConfig
from system.data.shards import SPLITS, TokenChunks, docs_name, file_crc32, shard_name, token_dtype
from system.data.tokenizer import BPETokenizer, ByteTokenizer, HFTokenizer, Tokenizer, atomic_write_bytes
from system.data.units import UNIT_BYTES, input_files, plan_units, unit_documents

FORMAT = "moeforge-shards-v1"
BATCH_DOCS = 512  # documents per encode_batch call
RunUnits = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


def unit_score(data: bytes) -> float:
    """A stable pseudo-random number in [0, 1) from a document's bytes."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") / 2.0 ** 64


def text_bytes(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogatepass")


# ---- tokenizers travel to tasks as descriptors --------------------------------------------------

def tokenizer_descriptor(tok: Tokenizer) -> dict[str, Any]:
    if isinstance(tok, ByteTokenizer):
        return {"kind": "byte", "fingerprint": tok.fingerprint}
    if isinstance(tok, BPETokenizer):
        return {"kind": "bpe", "json": tok.to_json(), "fingerprint": tok.fingerprint}
    if isinstance(tok, HFTokenizer):
        return {"kind": "hf", "path": tok.path, "fingerprint": tok.fingerprint}
    raise TypeError(f"cannot send a {type(tok).__name__} to prepare tasks")


_TOKENIZERS: dict[str, Tokenizer] = {}


def tokenizer_from(desc: dict[str, Any]) -> Tokenizer:
    hit = _TOKENIZERS.get(desc["fingerprint"])
    if hit is None:
        if desc["kind"] == "byte":
            hit = ByteTokenizer()
        elif desc["kind"] == "bpe":
            from tokenizers import Tokenizer as CoreTokenizer

            hit = BPETokenizer(CoreTokenizer.from_str(desc["json"]), desc["json"])
        else:
            from system.data.tokenizer import _hf

            hit = _hf(desc["path"])
        _TOKENIZERS[desc["fingerprint"]] = hit
    return hit


# ---- where and whether ----------------------------------------------------------------------------

def source_identity(src: SourceConfig) -> dict[str, Any]:
    # The weight only affects sampling: changing it must not invalidate the tokens.
    fields = dataclasses.asdict(src)
    fields.pop("weight", None)
    fields["paths"] = [str(Path(p).expanduser().absolute()) for p in src.paths]
    return fields


def fingerprint(src: SourceConfig) -> list[list]:
    """Each input file's path, size and mtime (ns), plus the Python version for the embedded
    domains (their documents are the interpreter's own files)."""
    out = [[str(p.absolute()), st.st_size, st.st_mtime_ns]
           for p in input_files(src) + [Path(q) for q in (src.doc_offsets or [])]
           for st in [os.stat(p)]]
    if src.kind == "embedded":
        out.append(["python", sys.version])
    return out


def _h(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def source_dir(root: Path, src: SourceConfig, tok: Tokenizer, holdout_fraction: float) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in src.name)[:64]
    return Path(root) / f"{safe}-{_h([FORMAT, source_identity(src), tok.fingerprint, holdout_fraction])}"


def _files_ok(d: Path, unit: dict[str, Any], itemsize: int) -> bool:
    for split in SPLITS:
        part = unit[split]
        for name, size in ((part["file"], part["tokens"] * itemsize), (part["docs_file"], None)):
            try:
                st = os.stat(d / name)
            except OSError:
                return False
            if size is not None and st.st_size != size:
                return False
    return True


def current_manifest(d: Path, fp_hash: str) -> Optional[dict[str, Any]]:
    """The manifest of `d` if it is complete and matches the input (by stat only), else None."""
    try:
        m = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if m.get("format") != FORMAT or m.get("fingerprint_hash") != fp_hash:
        return None
    item = np.dtype(m["dtype"]).itemsize
    return m if all(_files_ok(d, u, item) for u in m["units"]) else None


@contextlib.contextmanager
def locked(d: Path):
    """One preparer per source directory at a time (ranks of a job, or two jobs sharing a cache)."""
    import fcntl

    d.parent.mkdir(parents=True, exist_ok=True)
    with open(d.parent / f".{d.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- one unit -------------------------------------------------------------------------------------

def _documents(task: dict[str, Any], src: SourceConfig, tok: Tokenizer) -> Iterator[tuple[list[bytes], list[np.ndarray]]]:
    """Batches of (hash bytes, token ids) of the unit's documents."""
    unit = task["unit"]
    if unit["read"] == "tokens":
        for ids in _token_documents(unit, tok):
            yield [ids.astype("<u4").tobytes()], [ids]
        return
    batch: list[str] = []
    for doc in unit_documents(src, unit):
        batch.append(doc)
        if len(batch) >= BATCH_DOCS:
            yield [text_bytes(t) for t in batch], tok.encode_batch(batch)
            batch = []
    if batch:
        yield [text_bytes(t) for t in batch], tok.encode_batch(batch)


def _token_documents(unit: dict[str, Any], tok: Tokenizer) -> Iterator[np.ndarray]:
    """A pre-tokenized file's documents: by its document end offsets, else split after each eos."""
    path = Path(unit["file"])
    if path.suffix == ".npy":
        ids = np.load(path, mmap_mode="r")
    else:
        ids = np.memmap(path, dtype=np.dtype(unit["dtype"]), mode="r") if path.stat().st_size else np.zeros(0, np.int64)
    if ids.ndim != 1:
        raise ValueError(f"{path}: token ids must be one-dimensional, got shape {ids.shape}")
    if len(ids):
        hi, lo = int(ids.max()), int(ids.min())
        if lo < 0 or hi >= tok.vocab_size:
            raise ValueError(f"{path}: token ids in [{lo}, {hi}], outside the tokenizer's vocabulary "
                             f"[0, {tok.vocab_size})")
    if unit.get("offsets"):
        ends = np.load(unit["offsets"]).astype(np.int64)
        if ends.ndim != 1 or (len(ends) and (np.any(np.diff(ends) < 0) or ends[0] < 0 or ends[-1] != len(ids))):
            raise ValueError(f"{unit['offsets']}: document end offsets must be non-decreasing and end at "
                             f"{len(ids)}, the number of tokens in {path}")
    else:
        ends = np.flatnonzero(np.asarray(ids) == tok.eos_id) + 1
        if not len(ends) or ends[-1] != len(ids):
            ends = np.append(ends, len(ids))
    start = 0
    for end in ends:
        doc = np.asarray(ids[start:end], dtype=np.int64)
        if len(doc) and doc[-1] == tok.eos_id:
            doc = doc[:-1]  # the packer adds the eos back
        if len(doc):
            yield doc
        start = int(end)


def run_unit(task: dict[str, Any]) -> dict[str, Any]:
    """Tokenize one unit into its train and holdout shards (or reuse them if already finished)."""
    d, u = Path(task["dir"]), task["index"]
    if task.get("threads"):
        # One CPU per task: the Rust tokenizers' thread pool (created on first use) takes one
        # thread instead of one per core, so parallel tasks do not oversubscribe the machine.
        os.environ.setdefault("RAYON_NUM_THREADS", str(task["threads"]))
    marker = d / f"unit-{u:05d}.json"
    tok = tokenizer_from(task["tokenizer"])
    dtype = token_dtype(tok.vocab_size)
    try:
        done = json.loads(marker.read_text())
        if done.get("key") == task["key"] and _files_ok(d, done, dtype.itemsize):
            return {**done, "reused": True}
    except (OSError, ValueError):
        pass
    src = SourceConfig(**task["source"])
    eos = np.array([tok.eos_id], dtype=dtype)
    force = task.get("force") or {}
    tmp = {s: Path(tempfile.mkstemp(dir=d, prefix=f".{shard_name(s, u)}.", suffix=".tmp")[1]) for s in SPLITS}
    files = {s: open(tmp[s], "wb") for s in SPLITS}
    ends: dict[str, list[int]] = {s: [] for s in SPLITS}
    count = {s: 0 for s in SPLITS}
    lo_score, hi_score = (2.0, -1), (-1.0, -1)
    n = n_bytes = 0
    try:
        for hashed, ids_list in _documents(task, src, tok):
            for data, ids in zip(hashed, ids_list):
                score = unit_score(data)
                lo_score, hi_score = min(lo_score, (score, n)), max(hi_score, (score, n))
                split = "holdout" if score < task["holdout_fraction"] else "train"
                if n == force.get("holdout"):
                    split = "holdout"
                elif n == force.get("train"):
                    split = "train"
                if len(ids) and int(np.max(ids)) > np.iinfo(dtype).max:
                    raise ValueError(f"token id {int(np.max(ids))} does not fit {dtype}")
                files[split].write(np.asarray(ids, dtype=dtype).tobytes())
                files[split].write(eos.tobytes())
                count[split] += len(ids) + 1
                ends[split].append(count[split])
                n += 1
                n_bytes += len(data)
        for f in files.values():
            f.close()
        out: dict[str, Any] = {"index": u, "key": task["key"], "documents": n, "input_bytes": n_bytes,
                               "min_score": list(lo_score), "max_score": list(hi_score)}
        for s in SPLITS:
            docs_tmp = tmp[s].with_suffix(".docs")
            with open(docs_tmp, "wb") as f:
                np.save(f, np.asarray(ends[s], dtype=np.int64))
            os.replace(docs_tmp, d / docs_name(s, u))
            os.replace(tmp[s], d / shard_name(s, u))
            out[s] = {"file": shard_name(s, u), "docs_file": docs_name(s, u), "tokens": count[s],
                      "documents": len(ends[s]), "crc32": file_crc32(d / shard_name(s, u))}
    except BaseException:
        for s in SPLITS:
            files[s].close()
            tmp[s].unlink(missing_ok=True)
            tmp[s].with_suffix(".docs").unlink(missing_ok=True)
        raise
    atomic_write_bytes(marker, json.dumps(out).encode())
    return {**out, "reused": False}


def serial_units(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [run_unit(t) for t in tasks]


# ---- one source -----------------------------------------------------------------------------------

def _tasks(src: SourceConfig, d: Path, tok: Tokenizer, fraction: float, key: str,
           unit_bytes: int) -> list[dict[str, Any]]:
    if src.kind == "tokens":
        offsets = src.doc_offsets or [None] * len(src.paths)
        units = [{"read": "tokens", "file": str(Path(p).expanduser().absolute()), "dtype": src.token_dtype,
                  "offsets": o} for p, o in zip(input_files(src), offsets)]
    else:
        units = plan_units(src, unit_bytes)
    desc = tokenizer_descriptor(tok)
    return [{"dir": str(d), "index": i, "unit": unit, "source": dataclasses.asdict(src), "tokenizer": desc,
             "holdout_fraction": fraction, "key": key} for i, unit in enumerate(units)]


def prepare_source(src: SourceConfig, tok: Tokenizer, holdout_fraction: float, root: Path,
                   run_units: Optional[RunUnits] = None, unit_bytes: int = UNIT_BYTES,
                   log: Callable[[str], None] = lambda m: None) -> tuple[Path, dict[str, Any]]:
    """(directory, manifest) of `src`'s prepared shards, preparing what is missing or stale."""
    d = source_dir(root, src, tok, holdout_fraction)
    fp = fingerprint(src)
    fp_hash = _h(fp)
    m = current_manifest(d, fp_hash)
    if m is not None:
        return d, m
    with locked(d):
        m = current_manifest(d, fp_hash)  # another process may have finished it meanwhile
        if m is not None:
            return d, m
        if (d / "manifest.json").is_file():  # stale: the input or its files changed
            log(f"source {src.name}: input changed since it was prepared; preparing again")
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        tasks = _tasks(src, d, tok, holdout_fraction, fp_hash, unit_bytes)
        results = sorted((run_units or serial_units)(tasks), key=lambda r: r["index"])
        n = sum(r["documents"] for r in results)
        if n == 0:
            raise ValueError(f"source {src.name!r} yielded no non-empty documents")
        held = sum(r["holdout"]["documents"] for r in results)
        # Each side gets at least one document when there are two (split_holdout's rule).
        for side, want, pick in (("holdout", held == 0, min), ("train", held == n, max)):
            if n >= 2 and want:
                best = pick(results, key=lambda r: tuple(r["min_score" if side == "holdout" else "max_score"]))
                i = best["index"]
                local = best["min_score" if side == "holdout" else "max_score"][1]
                task = {**tasks[i], "force": {side: local}, "key": f"{fp_hash}/{side}{local}"}
                results[i] = run_unit(task)
        itemsize = token_dtype(tok.vocab_size).itemsize
        manifest = {
            "format": FORMAT, "source": src.name, "identity": source_identity(src), "fingerprint": fp,
            "fingerprint_hash": fp_hash, "tokenizer": tok.fingerprint, "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id, "dtype": token_dtype(tok.vocab_size).str, "holdout_fraction": holdout_fraction,
            "units": [{k: r[k] for k in ("index", "documents", "input_bytes", "train", "holdout")} for r in results],
            "documents": n, "input_bytes": sum(r["input_bytes"] for r in results),
            **{f"{s}_tokens": sum(r[s]["tokens"] for r in results) for s in SPLITS},
            **{f"{s}_documents": sum(r[s]["documents"] for r in results) for s in SPLITS},
        }
        assert all(_files_ok(d, u, itemsize) for u in manifest["units"])
        atomic_write_bytes(d / "manifest.json", json.dumps(manifest, indent=1).encode())
        reused = sum(1 for r in results if r.get("reused"))
        log(f"source {src.name}: {n} documents -> {manifest['train_tokens']} + {manifest['holdout_tokens']} "
            f"tokens (train + holdout) in {len(results)} units" + (f", {reused} already done" if reused else ""))
        return d, manifest


def open_split(d: Path, manifest: dict[str, Any], split: str, width: int) -> TokenChunks:
    units = manifest["units"]
    return TokenChunks([Path(d) / u[split]["file"] for u in units], [u[split]["tokens"] for u in units],
                       np.dtype(manifest["dtype"]), width)


def verify(d: Path, manifest: dict[str, Any]) -> list[str]:
    """Shard files whose CRC-32 differs from the manifest's (a full read; `moeforge prepare --verify`)."""
    bad = []
    for u in manifest["units"]:
        for s in SPLITS:
            if file_crc32(Path(d) / u[s]["file"]) != u[s]["crc32"]:
                bad.append(str(Path(d) / u[s]["file"]))
    return bad


def documents_sample(sources: Sequence[SourceConfig], fraction: float, limit_bytes: int) -> Iterator[str]:
    """Training documents (holdout excluded by the same hash) of the sources in order, up to
    `limit_bytes` of text in all: what a BPE tokenizer is trained on."""
    seen = 0
    for src in sources:
        if src.kind == "tokens":
            continue
        for unit in plan_units(src):
            for doc in unit_documents(src, unit):
                b = text_bytes(doc)
                if unit_score(b) < fraction:
                    continue
                yield doc
                seen += len(b)
                if seen >= limit_bytes:
                    return
