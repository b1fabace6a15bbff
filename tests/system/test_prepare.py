"""Prepared token shards (`system.data.prepare`, `system.data.shards`): every input format on a
small file the test writes, chunks equal to packing the documents in memory (whatever the shard
size), idempotence checked by stat, resumption after a crash, staleness, pre-tokenized input."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from system.data import DataConfig, PackedCorpus, SourceConfig, TokenizerConfig
from system.data import prepare as prep
from system.data import units as units_mod
from system.data.dataset import pack, split_holdout
from system.data.shards import TokenChunks, token_dtype
from system.data.tokenizer import ByteTokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def _docs(n: int = 80) -> list[str]:
    return [f"doc {i}: " + " ".join(WORDS[(i + j) % 8] for j in range(5 + 7 * (i % 9))) for i in range(n)]


def _reference(docs: list[str], seq_len: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The chunks packing the documents in memory gives (the path before prepared shards)."""
    tok = ByteTokenizer()
    train, held = split_holdout(docs, fraction)
    return pack(tok.encode_batch(train), tok.eos_id, seq_len), pack(tok.encode_batch(held), tok.eos_id, seq_len)


def _cfg(src: SourceConfig, tmp: Path, **kw) -> DataConfig:
    return DataConfig(sources=[src], seq_len=kw.pop("seq_len", 24), holdout_fraction=0.2,
                      cache_dir=str(tmp / "cache"), **kw)


def _assert_chunks(corpus: PackedCorpus, name: str, docs: list[str], seq_len: int = 24) -> None:
    want_train, want_held = _reference(docs, seq_len, 0.2)
    np.testing.assert_array_equal(np.asarray(corpus.train[name]), want_train)
    np.testing.assert_array_equal(np.asarray(corpus.holdout[name]), want_held)


def _jsonl(path: Path, docs: list[str], opener=open) -> Path:
    with opener(path, "wt") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "id": len(d)}) + "\n")
    return path


@pytest.mark.parametrize("shard_mb", [64, 0.0005])  # one unit, or many units (~500 bytes each)
def test_jsonl_chunks_equal_in_memory_packing_for_any_shard_size(tmp_path, shard_mb):
    docs = _docs()
    src = SourceConfig(name="j", kind="jsonl", paths=[str(_jsonl(tmp_path / "d.jsonl", docs))])
    corpus = PackedCorpus.build(_cfg(src, tmp_path, shard_mb=shard_mb))
    _assert_chunks(corpus, "j", docs)
    m = corpus.manifests["j"]
    assert m["documents"] == len(docs) and m["dtype"] == "<u2"
    assert (len(m["units"]) == 1) == (shard_mb == 64)
    if shard_mb != 64:
        assert len(m["units"]) > 10  # chunks cross shard files, and still equal the reference


def test_every_text_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _docs(60)
    _jsonl(tmp_path / "d.jsonl.gz", docs, gzip.open)
    import zstandard

    with open(tmp_path / "d.jsonl.zst", "wb") as raw:
        with zstandard.ZstdCompressor().stream_writer(raw) as w:
            w.write("".join(json.dumps({"body": d}) + "\n" for d in docs).encode())
    table = pa.table({"text": docs, "n": list(range(len(docs)))})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=7)
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i:03d}.txt").write_text(d)
    import datasets

    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "hf"), num_shards=3)
    sources = [SourceConfig(name="gz", kind="jsonl", paths=[str(tmp_path / "d.jsonl.gz")]),
               SourceConfig(name="zst", kind="jsonl", paths=[str(tmp_path / "d.jsonl.zst")], text_field="body"),
               SourceConfig(name="pq", kind="parquet", paths=[str(tmp_path / "d.parquet")]),
               SourceConfig(name="txt", kind="text", paths=[str(tmp_path / "txt")]),
               SourceConfig(name="hf", kind="hf_dataset", paths=[str(tmp_path / "hf")])]
    cfg = DataConfig(sources=sources, seq_len=24, holdout_fraction=0.2, cache_dir=str(tmp_path / "cache"),
                     shard_mb=0.0002)  # parquet: a unit per row group or two
    corpus = PackedCorpus.build(cfg)
    for s in sources:
        _assert_chunks(corpus, s.name, docs)
    assert len(corpus.manifests["pq"]["units"]) > 1 and len(corpus.manifests["hf"]["units"]) == 3
    with pytest.raises(ValueError, match="no column 'body'"):
        PackedCorpus.build(DataConfig(sources=[SourceConfig(name="p", kind="parquet", text_field="body",
                                                            paths=[str(tmp_path / "d.parquet")])],
                                      seq_len=24, cache_dir=str(tmp_path / "c2")))


def test_pretokenized_sources_are_used_as_they_are(tmp_path):
    docs = _docs(50)
    tok = ByteTokenizer()
    ids = [tok.encode_batch([d])[0] for d in docs]
    stream = np.concatenate([np.append(x, tok.eos_id) for x in ids]).astype(np.uint16)
    stream.tofile(tmp_path / "t.bin")  # raw uint16, documents end at each eos
    no_eos = np.concatenate(ids).astype(np.int32)  # .npy with document end offsets, no eos
    np.save(tmp_path / "t.npy", no_eos)
    np.save(tmp_path / "t.offsets.npy", np.cumsum([len(x) for x in ids]))
    sources = [SourceConfig(name="bin", kind="tokens", paths=[str(tmp_path / "t.bin")], token_dtype="uint16"),
               SourceConfig(name="npy", kind="tokens", paths=[str(tmp_path / "t.npy")],
                            doc_offsets=[str(tmp_path / "t.offsets.npy")])]
    corpus = PackedCorpus.build(DataConfig(sources=sources, seq_len=24, holdout_fraction=0.2,
                                           cache_dir=str(tmp_path / "cache")))
    for name in ("bin", "npy"):
        # same documents, split by a hash of their token ids: both give the same chunks
        np.testing.assert_array_equal(np.asarray(corpus.train[name]), np.asarray(corpus.train["bin"]))
        assert corpus.manifests[name]["documents"] == 50
    all_chunks = np.concatenate([np.asarray(corpus.train["bin"]), np.asarray(corpus.holdout["bin"])])
    assert set(np.unique(all_chunks)) <= set(np.unique(stream))
    np.save(tmp_path / "bad.npy", np.array([1, 2, 300], dtype=np.int32))
    with pytest.raises(ValueError, match=r"bad.npy: token ids in \[1, 300\], outside .* \[0, 257\)"):
        PackedCorpus.build(DataConfig(sources=[SourceConfig(name="b", kind="tokens", paths=[str(tmp_path / "bad.npy")])],
                                      seq_len=8, cache_dir=str(tmp_path / "c2")))


def _files(d: Path) -> dict[str, int]:
    return {f.name: f.stat().st_mtime_ns for f in sorted(d.iterdir())}


def test_idempotent_by_stat_resumable_after_a_crash_and_stale_on_change(tmp_path, monkeypatch):
    docs = _docs(120)
    path = _jsonl(tmp_path / "d.jsonl", docs)
    src = SourceConfig(name="j", kind="jsonl", paths=[str(path)])
    cfg = _cfg(src, tmp_path, shard_mb=0.002)
    real = units_mod.unit_documents
    calls = {"n": 0}

    def crash_in_unit_3(s, unit):
        calls["n"] += 1
        if unit.get("start") and unit["start"] >= 3 * 2097 and not calls.get("crashed"):
            calls["crashed"] = True
            yield next(iter(real(s, unit)))
            raise RuntimeError("killed mid-unit")
        yield from real(s, unit)

    monkeypatch.setattr(prep, "unit_documents", crash_in_unit_3)
    with pytest.raises(RuntimeError, match="killed mid-unit"):
        PackedCorpus.build(cfg)
    (d,) = [p for p in (tmp_path / "cache" / "prepared").iterdir() if p.is_dir()]
    names = {f.name for f in d.iterdir()}
    assert "manifest.json" not in names and not any(n.endswith(".tmp") for n in names)
    done_before = {n for n in names if n.startswith("unit-")}
    assert done_before and "unit-00003.json" not in done_before  # the crashed unit left no marker
    stamps = {n: (d / n).stat().st_mtime_ns for n in done_before}
    corpus = PackedCorpus.build(cfg)  # resumes: the finished units are not redone
    assert {n: (d / n).stat().st_mtime_ns for n in done_before} == stamps
    _assert_chunks(corpus, "j", docs)

    # a matching manifest is trusted by stat: no document is read again
    monkeypatch.setattr(prep, "unit_documents", lambda s, u: (_ for _ in ()).throw(AssertionError("read")))
    before = _files(d)
    PackedCorpus.build(cfg)
    assert _files(d) == before
    # an input whose mtime or size changed is prepared again (and gives the new documents)
    monkeypatch.setattr(prep, "unit_documents", real)
    docs2 = docs + _docs(130)[120:]
    _jsonl(path, docs2)
    with pytest.raises(AssertionError):
        _assert_chunks(corpus, "j", docs2)
    _assert_chunks(PackedCorpus.build(cfg), "j", docs2)
    # a shard whose size no longer matches its manifest is not trusted either
    (d / "train-00000.bin").write_bytes(b"xx")
    _assert_chunks(PackedCorpus.build(cfg), "j", docs2)


def test_verify_finds_a_flipped_byte(tmp_path):
    src = SourceConfig(name="j", kind="jsonl", paths=[str(_jsonl(tmp_path / "d.jsonl", _docs()))])
    corpus = PackedCorpus.build(_cfg(src, tmp_path))
    (d,) = [p for p in (tmp_path / "cache" / "prepared").iterdir() if p.is_dir()]
    assert prep.verify(d, corpus.manifests["j"]) == []
    f = d / "train-00000.bin"
    b = bytearray(f.read_bytes())
    b[10] ^= 1
    f.write_bytes(bytes(b))
    assert prep.verify(d, corpus.manifests["j"]) == [str(f)]


def test_token_chunks_uint32_and_indexing(tmp_path):
    assert token_dtype(65536) == np.dtype("<u2") and token_dtype(65537) == np.dtype("<u4")
    a = np.arange(100_000, 100_050, dtype="<u4")
    a[:20].tofile(tmp_path / "a.bin")
    a[20:].tofile(tmp_path / "b.bin")
    c = TokenChunks([tmp_path / "a.bin", tmp_path / "b.bin"], [20, 30], np.dtype("<u4"), 7)
    ref = a[:49].astype(np.int64).reshape(7, 7)
    assert len(c) == 7 and c.shape == (7, 7)
    np.testing.assert_array_equal(c[:], ref)
    np.testing.assert_array_equal(c[np.array([6, 2, 2])], ref[[6, 2, 2]])  # chunk 2 spans both files
    np.testing.assert_array_equal(c[-1], ref[-1])
    np.testing.assert_array_equal(c[1:5:2], ref[1:5:2])
    with pytest.raises(IndexError):
        c[np.array([7])]
    with pytest.raises(ValueError, match="expected 31 tokens"):
        TokenChunks([tmp_path / "a.bin", tmp_path / "b.bin"], [20, 31], np.dtype("<u4"), 7)


def test_bpe_is_trained_once_on_a_bounded_sample(tmp_path):
    docs = _docs(200)
    src = SourceConfig(name="j", kind="jsonl", paths=[str(_jsonl(tmp_path / "d.jsonl", docs))])
    small = _cfg(src, tmp_path, tokenizer=TokenizerConfig(kind="bpe", vocab_size=300, train_sample_bytes=2000))
    whole = _cfg(src, tmp_path, tokenizer=TokenizerConfig(kind="bpe", vocab_size=300))
    seen = list(prep.documents_sample([src], 0.2, 2000))
    assert 2000 <= sum(len(d) for d in seen) < 2000 + max(len(d) for d in docs)
    a, b = PackedCorpus.build(small), PackedCorpus.build(whole)
    assert a.tokenizer.fingerprint != b.tokenizer.fingerprint  # learnt from different texts
    assert len(list((tmp_path / "cache").glob("tokenizer-bpe-*.json"))) == 2
    # the cached model is reused: same fingerprint, no new file
    assert PackedCorpus.build(small).tokenizer.fingerprint == a.tokenizer.fingerprint
    assert len(list((tmp_path / "cache").glob("tokenizer-bpe-*.json"))) == 2

