"""Tests of the data pipeline: corpus loading, tokenizers, packing/caching, mixture sampling."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from system.data import (BLOCK, DataConfig, DataStream, MixtureSampler, PackedCorpus,
                         SourceConfig, TokenizerConfig, build_tokenizer, holdout_batches,
                         load_documents, split_holdout)
from system.data import corpus as corpus_mod
from system.data.shards import TokenChunks

DOMAINS = ("python_code", "english_docs", "legal", "c_headers")


def _no_training():
    raise AssertionError("training texts requested although the tokenizer should be cached")


# ---------------------------------------------------------------- corpus loading

@pytest.mark.parametrize("domain", DOMAINS)
def test_embedded_domain_loads_deterministically(domain):
    docs = load_documents(SourceConfig(name=domain, max_documents=6))
    again = load_documents(SourceConfig(name="other", domain=domain, max_documents=6))
    assert len(docs) == 6
    assert all(isinstance(d, str) and d.strip() for d in docs)
    assert docs == again


def test_embedded_domain_contents():
    code = load_documents(SourceConfig(name="python_code", max_documents=40))
    assert sum("import " in d or "def " in d for d in code) > 30
    files = corpus_mod._stdlib_files()
    assert files == sorted(files)
    banned = {"test", "tests", "site-packages", "idlelib", "lib2to3"}
    assert not any(banned & set(p.parts) for p in files)

    from pydoc_data.topics import topics
    prose = load_documents(SourceConfig(name="english_docs"))
    assert prose == [topics[k] for k in sorted(topics) if topics[k].strip()]

    legal = load_documents(SourceConfig(name="legal"))
    assert len(legal) >= 40  # grouping paragraphs gives enough documents to split
    assert max(len(d) for d in legal) <= 4096 + 2048
    assert any("GNU GENERAL PUBLIC LICENSE" in d for d in legal)

    headers = load_documents(SourceConfig(name="c_headers", max_documents=20))
    assert sum("#include" in h or "#define" in h for h in headers) >= 15


def test_embedded_domain_without_files_names_directory(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus_mod, "_LICENSE_DIR", tmp_path / "licenses")
    with pytest.raises(ValueError, match=r"legal.*licenses"):
        load_documents(SourceConfig(name="legal"))


def test_text_source_files_and_directories(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("bee")
    (tmp_path / "d" / "a.txt").write_text("ay")
    (tmp_path / "d" / ".hidden").write_text("secret")
    (tmp_path / "one.txt").write_text("first")
    src = SourceConfig(name="t", kind="text", paths=[str(tmp_path / "one.txt"), str(tmp_path / "d")])
    assert load_documents(src) == ["first", "ay", "bee"]
    src.max_documents = 2
    assert load_documents(src) == ["first", "ay"]


def test_text_source_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match="nope.txt"):
        load_documents(SourceConfig(name="t", kind="text", paths=[str(missing)]))


def test_jsonl_source(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two", "x": 1}) + "\n")
    assert load_documents(SourceConfig(name="j", kind="jsonl", paths=[str(f)],
                                       text_field="body")) == ["one", "two"]
    with pytest.raises(ValueError, match=r"docs.jsonl:1.*'text'"):
        load_documents(SourceConfig(name="j", kind="jsonl", paths=[str(f)]))


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_documents(SourceConfig(name="j", kind="jsonl", paths=[str(f)]))
    with pytest.raises(ValueError, match="missing.jsonl"):
        load_documents(SourceConfig(name="j", kind="jsonl", paths=[str(tmp_path / "missing.jsonl")]))


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip(tmp_path):
    tok = build_tokenizer(TokenizerConfig(kind="byte"), _no_training, tmp_path)
    text = "def f(x):\n    return x  # héllo ✓ 日本"
    ids = tok.encode(text)
    assert ids[:3] == [ord("d"), ord("e"), ord("f")]
    assert max(ids) < 256 and tok.eos_id == 256 and tok.vocab_size == 257
    assert tok.decode(ids + [tok.eos_id]) == text
    assert [list(a) for a in tok.encode_batch([text, "x"])] == [ids, [ord("x")]]


def test_bpe_trains_round_trips_and_caches(tmp_path):
    texts = load_documents(SourceConfig(name="english_docs", max_documents=15))
    cfg = TokenizerConfig(kind="bpe", vocab_size=400)
    tok = build_tokenizer(cfg, lambda: iter(texts), tmp_path, corpus_key="k1")
    assert tok.vocab_size == 400
    sample = "The return statement leaves a function — naïvely ✓.\n\tx = 1"
    assert tok.decode(tok.encode(sample)) == sample
    assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 1.5  # merges were learned
    # Documents that spell the special token must not fake a document boundary.
    assert tok.eos_id not in tok.encode("a <|eos|> b")
    assert tok.decode(tok.encode("a <|eos|> b")) == "a <|eos|> b"
    cached = list(tmp_path.glob("tokenizer-bpe-400-*.json"))
    assert len(cached) == 1

    again = build_tokenizer(cfg, _no_training, tmp_path, corpus_key="k1")
    assert again.fingerprint == tok.fingerprint
    assert again.eos_id == tok.eos_id
    assert again.encode(texts[1]) == tok.encode(texts[1])
    # Another corpus key is another tokenizer file.
    build_tokenizer(cfg, lambda: iter(texts[:5]), tmp_path, corpus_key="k2")
    assert len(list(tmp_path.glob("tokenizer-bpe-400-*.json"))) == 2


def test_hf_tokenizer_errors_and_local_load(tmp_path):
    with pytest.raises(ValueError, match="no_such_dir"):
        build_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path / "no_such_dir")),
                        _no_training, tmp_path)
    transformers = pytest.importorskip("transformers")
    texts = load_documents(SourceConfig(name="english_docs", max_documents=5))
    bpe = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), lambda: iter(texts),
                          tmp_path, corpus_key="hf")
    with_eos = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tok, eos_token="<|eos|>")
    with_eos.save_pretrained(tmp_path / "hf_ok")
    tok = build_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path / "hf_ok")),
                          _no_training, tmp_path)
    assert tok.eos_id == bpe.eos_id and tok.vocab_size == 300
    assert tok.encode("hello world") == bpe.encode("hello world")
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.eos_id not in tok.encode("x<|eos|>y")
    assert [list(a) for a in tok.encode_batch(["x<|eos|>y"])] == [tok.encode("x<|eos|>y")]
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tok).save_pretrained(tmp_path / "hf_no_eos")
    with pytest.raises(ValueError, match="eos"):
        build_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path / "hf_no_eos")),
                        _no_training, tmp_path)


# ---------------------------------------------------------------- packed corpus

def _tiny_cfg(**kw) -> DataConfig:
    sources = [SourceConfig(name="prose", domain="english_docs", max_documents=12),
               SourceConfig(name="legal", max_documents=12, weight=2.0)]
    return DataConfig(sources=sources, seq_len=32, holdout_fraction=0.25, **kw)


def _byte_stream(docs: list[str]) -> np.ndarray:
    return np.concatenate([np.append(np.frombuffer(d.encode(), np.uint8).astype(np.int32), 256)
                           for d in docs])


def test_packed_corpus_shapes_and_document_split(tmp_path):
    cfg = _tiny_cfg()
    corpus = PackedCorpus.build(cfg, cache_dir=tmp_path)
    assert corpus.domains == ["prose", "legal"]
    for src in cfg.sources:
        train, held = corpus.train[src.name], corpus.holdout[src.name]
        # stored as uint16 (the byte vocabulary fits), read as int64 rows
        assert train.dtype == np.uint16 and held.dtype == np.uint16 and train[0].dtype == np.int64
        assert len(train.shape) == 2 and train.shape[1] == 33 and held.shape[1] == 33
        assert len(train) >= 1 and len(held) >= 1
        docs = load_documents(src)
        train_docs, held_docs = split_holdout(docs, cfg.holdout_fraction)
        assert train_docs and held_docs and not set(train_docs) & set(held_docs)
        assert sorted(train_docs + held_docs) == sorted(docs)
        # Chunks are exactly the docs (eos after each) of their own side, tail dropped.
        for arr, side in ((train, train_docs), (held, held_docs)):
            arr = np.asarray(arr)
            stream = _byte_stream(side)
            assert len(stream) - arr.size < 33
            np.testing.assert_array_equal(arr.reshape(-1), stream[: arr.size])


def test_packed_corpus_cache_hit_and_invalidation(tmp_path):
    first = PackedCorpus.build(_tiny_cfg(), cache_dir=tmp_path)
    files = sorted(f for f in (tmp_path / "prepared").rglob("*") if f.is_file())
    assert len(list((tmp_path / "prepared").glob("*/manifest.json"))) == 2  # one per source
    stamps = {f: f.stat().st_mtime_ns for f in files}
    second = PackedCorpus.build(_tiny_cfg(), cache_dir=tmp_path)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # nothing rewritten
    assert isinstance(second.train["legal"], TokenChunks)  # memory-mapped shards
    for d in first.domains:
        np.testing.assert_array_equal(first.train[d], second.train[d])
        np.testing.assert_array_equal(first.holdout[d], second.holdout[d])
    # The shards serve any seq_len, and a different weight reuses them too: nothing is redone.
    cfg = _tiny_cfg()
    cfg.seq_len = 16
    assert PackedCorpus.build(cfg, cache_dir=tmp_path).train["legal"].shape[1] == 17
    cfg = _tiny_cfg()
    cfg.sources[1].weight = 5.0
    PackedCorpus.build(cfg, cache_dir=tmp_path)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert sorted(f for f in (tmp_path / "prepared").rglob("*") if f.is_file()) == files
    # A different holdout fraction is another preparation.
    cfg = _tiny_cfg()
    cfg.holdout_fraction = 0.3
    PackedCorpus.build(cfg, cache_dir=tmp_path)
    assert len(list((tmp_path / "prepared").glob("*/manifest.json"))) == 4


def test_packed_corpus_bpe_and_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFORGE_CACHE", str(tmp_path / "envcache"))
    cfg = _tiny_cfg(tokenizer=TokenizerConfig(kind="bpe", vocab_size=300))
    corpus = PackedCorpus.build(cfg)
    assert corpus.tokenizer.vocab_size == 300
    assert len(list((tmp_path / "envcache").glob("tokenizer-bpe-*.json"))) == 1
    assert len(list((tmp_path / "envcache" / "prepared").glob("*/manifest.json"))) == 2
    for d in corpus.domains:
        assert np.asarray(corpus.train[d]).max() < 300
        assert (np.asarray(corpus.train[d]) == corpus.tokenizer.eos_id).any()


def test_packed_corpus_too_little_data_names_source(tmp_path):
    cfg = DataConfig(sources=[SourceConfig(name="tiny_legal", domain="legal", max_documents=3)],
                     seq_len=4096, holdout_fraction=0.3)
    with pytest.raises(ValueError, match=r"tiny_legal.*seq_len"):
        PackedCorpus.build(cfg, cache_dir=tmp_path)


def test_text_and_jsonl_sources_pack(tmp_path):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    docs = [f"document {i}: " + " ".join(words[i % 6:] * 8) for i in range(30)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i:03d}.txt").write_text(d)
    cfg = DataConfig(sources=[SourceConfig(name="j", kind="jsonl", paths=[str(tmp_path / "data.jsonl")]),
                              SourceConfig(name="t", kind="text", paths=[str(tmp_path / "txt")])],
                     seq_len=32, holdout_fraction=0.2)
    corpus = PackedCorpus.build(cfg, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(corpus.train["j"], corpus.train["t"])
    np.testing.assert_array_equal(corpus.holdout["j"], corpus.holdout["t"])


# ---------------------------------------------------------------- mixture sampler

SIZES = {"a": 50, "b": 7, "c": 300, "z": 10}
WEIGHTS = {"a": 0.5, "b": 0.2, "c": 0.3, "z": 0.0}


def test_sampler_block_proportions_exact():
    s = MixtureSampler(SIZES, WEIGHTS, seed=3)
    # 512 + 204.8 + 307.2: the single leftover draw goes to the largest remainder (b).
    assert list(s.counts) == [512, 205, 307, 0]
    for block in range(4):
        dom, _ = s.lookup_range(block * BLOCK, (block + 1) * BLOCK)
        assert list(np.bincount(dom, minlength=4)) == [512, 205, 307, 0]


def test_sampler_deterministic_and_seeded():
    a = MixtureSampler(SIZES, WEIGHTS, seed=11).lookup_range(900, 3000)
    b = MixtureSampler(dict(SIZES), dict(WEIGHTS), seed=11).lookup_range(900, 3000)
    c = MixtureSampler(SIZES, WEIGHTS, seed=12).lookup_range(900, 3000)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_sampler_lookup_range_matches_lookup():
    s = MixtureSampler(SIZES, WEIGHTS, seed=5)
    fresh = MixtureSampler(SIZES, WEIGHTS, seed=5)  # no cached blocks or permutations
    dom, idx = s.lookup_range(1000, 1100)  # crosses a block boundary
    singles = [fresh.lookup(p) for p in range(1000, 1100)]
    assert singles == [(s.domains[d], int(i)) for d, i in zip(dom, idx)]
    assert fresh.lookup(5_000_000) == s.lookup(5_000_000)


def test_sampler_each_chunk_once_per_epoch():
    s = MixtureSampler(SIZES, WEIGHTS, seed=7)
    dom, idx = s.lookup_range(0, 4 * BLOCK)
    for d, name in enumerate(s.domains):
        drawn = idx[dom == d]
        n = SIZES[name]
        if WEIGHTS[name] == 0:
            assert len(drawn) == 0
            continue
        epochs = [drawn[i:i + n] for i in range(0, len(drawn) - n + 1, n)]
        assert len(epochs) >= 4
        for e in epochs:
            assert sorted(e) == list(range(n))
        assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])  # reshuffled


def test_sampler_rejects_bad_inputs():
    with pytest.raises(ValueError, match="weight"):
        MixtureSampler({"a": 3}, {"a": -1.0}, seed=0)
    with pytest.raises(ValueError, match="'a'.*no chunks"):
        MixtureSampler({"a": 0, "b": 3}, {"a": 1.0, "b": 1.0}, seed=0)
    with pytest.raises(ValueError, match="differ"):
        MixtureSampler({"a": 3}, {"b": 1.0}, seed=0)


def test_sampler_consumed_matches_lookup():
    s = MixtureSampler(SIZES, WEIGHTS, seed=9)
    for start, stop in [(0, 10), (100, 1500), (700, 5000), (2048, 4096)]:
        dom, idx = s.lookup_range(start, stop)
        got = s.consumed(start, stop)
        for d, name in enumerate(s.domains):
            np.testing.assert_array_equal(got[name], np.unique(idx[dom == d]))
    assert len(s.consumed(0, 5000)["a"]) == 50 and len(s.consumed(0, 5000)["z"]) == 0


# ---------------------------------------------------------------- data stream

SEQ = 6


def _fake_corpus() -> dict[str, np.ndarray]:
    # Every token encodes (domain, chunk, offset), so batches can be traced back.
    out = {}
    for d, (name, n) in enumerate(SIZES.items()):
        base = (d * 1000 + np.arange(n))[:, None] * 100
        out[name] = (base + np.arange(SEQ + 1)[None, :]).astype(np.int32)
    return out


def _stream(dp_rank=0, dp_size=1, B=8, seed=1, start=0) -> DataStream:
    return DataStream(_fake_corpus(), MixtureSampler(SIZES, WEIGHTS, seed), dp_rank, dp_size, B,
                      start_position=start)


def _cat(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _assert_same(x, y):
    for k in ("input_ids", "labels", "domain"):
        assert torch.equal(x[k], y[k]), k


def test_stream_batch_contents():
    st = _stream(B=5)
    batch = st.next_microbatch()
    assert batch["input_ids"].shape == (5, SEQ) and batch["input_ids"].dtype == torch.long
    assert batch["labels"].shape == (5, SEQ) and batch["domain"].shape == (5,)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    dom, idx = st.sampler.lookup_range(0, 5)
    assert batch["domain"].tolist() == dom.tolist()
    assert (batch["input_ids"][:, 0] // 100).tolist() == (dom * 1000 + idx).tolist()
    assert st.position == 5


def test_stream_ranks_cover_single_rank():
    single = _stream(B=8)
    ranks = [_stream(dp_rank=r, dp_size=2, B=4) for r in range(2)]
    for _ in range(300):  # spans several blocks of 1024 positions
        _assert_same(single.next_microbatch(), _cat([r.next_microbatch() for r in ranks]))
    assert single.position == ranks[0].position == ranks[1].position == 2400


def test_stream_resume_is_exact():
    whole = _stream(B=8)
    expected = [whole.next_microbatch() for _ in range(10)]
    first = _stream(B=8)
    for _ in range(4):
        first.next_microbatch()
    state = first.state_dict()
    assert state["position"] == 32
    resumed = _stream(B=8)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    for exp in expected[4:]:
        _assert_same(resumed.next_microbatch(), exp)


def test_stream_resume_with_different_dp_size():
    two = [_stream(dp_rank=r, dp_size=2, B=4) for r in range(2)]
    for _ in range(5):
        for r in two:
            r.next_microbatch()
    expected = [_cat([r.next_microbatch() for r in two]) for _ in range(5)]
    one = _stream(dp_size=1, B=8)
    one.load_state_dict(two[0].state_dict() | {"position": 40})
    four = [_stream(dp_rank=r, dp_size=4, B=2) for r in range(4)]
    for r in four:
        r.load_state_dict({"position": 40, "seed": 1, "weights": WEIGHTS})
    for exp in expected:
        _assert_same(one.next_microbatch(), exp)
        _assert_same(_cat([r.next_microbatch() for r in four]), exp)


def test_stream_rejects_mismatched_state():
    st = _stream()
    with pytest.raises(ValueError, match="seed"):
        st.load_state_dict({"position": 8, "seed": 2, "weights": WEIGHTS})
    with pytest.raises(ValueError, match="weights"):
        st.load_state_dict({"position": 8, "seed": 1, "weights": WEIGHTS | {"a": 0.4}})
    assert st.position == 0


def test_stream_consumed_matches_draws():
    ranks = [_stream(dp_rank=r, dp_size=2, B=16, start=64) for r in range(2)]
    drawn: dict[int, set] = {d: set() for d in range(4)}
    for _ in range(100):
        for r in ranks:
            b = r.next_microbatch()
            for d, first_token in zip(b["domain"].tolist(), b["input_ids"][:, 0].tolist()):
                drawn[d].add(first_token // 100 - d * 1000)
    got = ranks[1].consumed(64)
    assert ranks[1].position == 64 + 3200
    for d, name in enumerate(SIZES):
        assert got[name].tolist() == sorted(drawn[d])


def test_holdout_batches_fixed_order():
    held = {"x": np.arange(10 * 5, dtype=np.int32).reshape(10, 5)}
    batches = list(holdout_batches(held, "x", batch_size=4))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(torch.cat([b["input_ids"] for b in batches]).numpy(), held["x"][:, :-1])
    np.testing.assert_array_equal(torch.cat([b["labels"] for b in batches]).numpy(), held["x"][:, 1:])
    assert len(list(holdout_batches(held, "x", batch_size=4, max_batches=2))) == 2
    with pytest.raises(ValueError, match="'y'"):
        list(holdout_batches(held, "y", batch_size=4))


@pytest.mark.procs
def test_concurrent_builds_share_one_cache(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from system.data import DataConfig, PackedCorpus, SourceConfig;"
            "cfg = DataConfig(sources=[SourceConfig(name='legal', max_documents=30)], seq_len=64);"
            "c = PackedCorpus.build(cfg, cache_dir=Path(sys.argv[1]));"
            "import numpy as np; print(int(np.asarray(c.train['legal']).sum()))")
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert outs[0][0] == outs[1][0]
    (src,) = (tmp_path / "prepared").glob("*/manifest.json")  # prepared once, by one of them
    assert sorted(f.name for f in src.parent.iterdir()) == [
        "holdout-00000.bin", "holdout-00000.docs.npy", "manifest.json", "train-00000.bin", "train-00000.docs.npy",
        "unit-00000.json"]  # no temporary files left behind


def test_prefetching_stream_gives_the_same_batches_and_positions():
    corpus = {"a": np.arange(40 * 9).reshape(40, 9), "b": 1000 + np.arange(30 * 9).reshape(30, 9)}

    def stream(**kw):
        return DataStream(corpus, MixtureSampler({"a": 40, "b": 30}, {"a": 1.0, "b": 2.0}, seed=5), 1, 2, 3, **kw)

    plain, pre = stream(), stream(prefetch=True)
    for i in range(25):
        a, b = plain.next_microbatch(), pre.next_microbatch()
        assert plain.position == pre.position  # the position counts consumed batches, not prefetched ones
        for k in a:
            assert torch.equal(a[k], b[k]), (i, k)
        if i % 7 == 0:  # the trainer asks for consumed ranges while the next batch is gathered
            assert {k: v.tolist() for k, v in pre.consumed().items()} == \
                   {k: v.tolist() for k, v in plain.consumed().items()}
    # a resumed position discards the batch gathered ahead
    state = {**plain.state_dict(), "position": 12}
    plain.load_state_dict(state)
    pre.load_state_dict(state)
    for _ in range(3):
        a, b = plain.next_microbatch(), pre.next_microbatch()
        assert all(torch.equal(a[k], b[k]) for k in a)
    pre.close()
    a, b = plain.next_microbatch(), pre.next_microbatch()  # still works without the thread
    assert all(torch.equal(a[k], b[k]) for k in a)
