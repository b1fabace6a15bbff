"""Tests of `MixtureSampler(group_size=G)`: runs of G positions drawn from one domain,
and `DataStream` micro-batches that each hold a single domain (micro_batch_size == G)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from system.data import BLOCK, DataConfig, DataStream, MixtureSampler

SIZES = {"a": 50, "b": 7, "c": 300, "z": 10}
WEIGHTS = {"a": 0.5, "b": 0.2, "c": 0.3, "z": 0.0}
# A domain much larger than one block's draws, so whole-block spans are not whole epochs.
BIG_SIZES = {"small": 13, "big": 100_000}
BIG_WEIGHTS = {"small": 0.3, "big": 0.7}
SEQ = 6


def _groups(dom: np.ndarray, G: int) -> np.ndarray:
    assert len(dom) % G == 0
    return dom.reshape(-1, G)


@pytest.mark.parametrize("G", [3, 8])
def test_groups_single_domain_and_exact_proportions(G):
    s = MixtureSampler(SIZES, WEIGHTS, seed=3, group_size=G)
    assert s.group_size == G
    dom, _ = s.lookup_range(0, 3 * BLOCK * G)
    per_group = _groups(dom, G)
    assert (per_group == per_group[:, :1]).all()  # every group is one domain
    labels = per_group[:, 0]
    for block in range(3):  # exact proportions over every block of 1024 groups
        counts = np.bincount(labels[block * BLOCK:(block + 1) * BLOCK], minlength=4)
        assert list(counts) == list(s.counts) == [512, 205, 307, 0]
    # The group labels are the per-position labels of the ungrouped sampler.
    plain_dom, _ = MixtureSampler(SIZES, WEIGHTS, seed=3).lookup_range(0, 3 * BLOCK)
    np.testing.assert_array_equal(labels, plain_dom)


@pytest.mark.parametrize("G", [4, 5])
def test_groups_walk_epoch_permutations(G):
    s = MixtureSampler(SIZES, WEIGHTS, seed=7, group_size=G)
    dom, idx = s.lookup_range(0, 2 * BLOCK * G)
    plain_dom, plain_idx = MixtureSampler(SIZES, WEIGHTS, seed=7).lookup_range(0, 8 * BLOCK)
    for d, name in enumerate(s.domains):
        drawn = idx[dom == d]
        n = SIZES[name]
        if WEIGHTS[name] == 0:
            assert len(drawn) == 0
            continue
        epochs = [drawn[i:i + n] for i in range(0, len(drawn) - n + 1, n)]
        assert len(epochs) >= 5
        for e in epochs:
            assert sorted(e) == list(range(n))  # each chunk once per epoch
        assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])  # reshuffled
        # Draw j of domain d is the same chunk with or without grouping (same permutations).
        plain = plain_idx[plain_dom == d]
        k = min(len(drawn), len(plain))
        assert k > 4 * n
        np.testing.assert_array_equal(drawn[:k], plain[:k])


def test_group_size_one_is_the_old_mapping():
    old = MixtureSampler(SIZES, WEIGHTS, seed=11)
    new = MixtureSampler(SIZES, WEIGHTS, seed=11, group_size=1)
    assert old.group_size == new.group_size == 1
    for start, stop in [(0, 3000), (1000, 1100), (5_000_000, 5_000_050)]:
        a, b = old.lookup_range(start, stop), new.lookup_range(start, stop)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    for start, stop in [(0, 10), (700, 5000)]:
        ca, cb = old.consumed(start, stop), new.consumed(start, stop)
        assert all(np.array_equal(ca[d], cb[d]) for d in SIZES)


@pytest.mark.parametrize("G", [4, 7])
def test_lookup_matches_lookup_range(G):
    s = MixtureSampler(SIZES, WEIGHTS, seed=5, group_size=G)
    fresh = MixtureSampler(SIZES, WEIGHTS, seed=5, group_size=G)  # nothing cached
    span = BLOCK * G
    for start, stop in [(span - 50, span + 50), (3, 60), (7 * span - 9, 7 * span + 2)]:
        dom, idx = s.lookup_range(start, stop)
        singles = [fresh.lookup(p) for p in range(start, stop)]
        assert singles == [(s.domains[d], int(i)) for d, i in zip(dom, idx)]
        # Any sub-range gives the same answers as the larger range.
        sub_dom, sub_idx = fresh.lookup_range(start + 1, stop - 1)
        np.testing.assert_array_equal(sub_dom, dom[1:-1])
        np.testing.assert_array_equal(sub_idx, idx[1:-1])
    assert fresh.lookup(5_000_003) == s.lookup(5_000_003)


@pytest.mark.parametrize("sizes, weights, G", [(SIZES, WEIGHTS, 4), (BIG_SIZES, BIG_WEIGHTS, 4),
                                               (BIG_SIZES, BIG_WEIGHTS, 3)])
def test_consumed_matches_brute_force(sizes, weights, G):
    s = MixtureSampler(sizes, weights, seed=9, group_size=G)
    span = BLOCK * G
    rng = np.random.default_rng(0)
    ranges = [(0, 10), (0, span), (span - 1, span + 1), (0, 3 * span), (5, 3 * span + 17),
              (span + 100, 4 * span - 3), (2 * span, 2 * span)]
    ranges += [tuple(sorted(rng.integers(0, 5 * span, size=2))) for _ in range(6)]
    dom, idx = s.lookup_range(0, 5 * span)
    for start, stop in ranges:
        got = s.consumed(int(start), int(stop))
        d_r, i_r = dom[start:stop], idx[start:stop]
        for d, name in enumerate(s.domains):
            np.testing.assert_array_equal(got[name], np.unique(i_r[d_r == d]), err_msg=str((start, stop)))
    if "big" in sizes:  # whole blocks were not a whole epoch of the big domain
        assert 0 < len(s.consumed(0, 3 * span)["big"]) < sizes["big"]


def test_sampler_rejects_bad_group_size():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="group_size"):
            MixtureSampler(SIZES, WEIGHTS, seed=0, group_size=bad)


# ---------------------------------------------------------------- data stream

def _fake_corpus() -> dict[str, np.ndarray]:
    out = {}
    for d, (name, n) in enumerate(SIZES.items()):
        base = (d * 1000 + np.arange(n))[:, None] * 100
        out[name] = (base + np.arange(SEQ + 1)[None, :]).astype(np.int32)
    return out


def _stream(G, dp_rank=0, dp_size=1, B=None, seed=1, start=0) -> DataStream:
    sampler = MixtureSampler(SIZES, WEIGHTS, seed, group_size=G)
    return DataStream(_fake_corpus(), sampler, dp_rank, dp_size, G if B is None else B,
                      start_position=start)


def _same(x, y):
    return all(torch.equal(x[k], y[k]) for k in ("input_ids", "labels", "domain"))


def test_stream_single_domain_microbatches_and_resume():
    G = 4
    ranks = [_stream(G, dp_rank=r, dp_size=2) for r in range(2)]
    whole = _stream(G, B=2 * G)  # one rank taking both ranks' positions
    seen = []
    for _ in range(BLOCK // 2):  # one block of groups: 1024 micro-batches
        batches = [r.next_microbatch() for r in ranks]
        for b in batches:
            dom = b["domain"]
            assert (dom == dom[0]).all()  # one domain per micro-batch
            assert ((b["input_ids"][:, 0] // 100) // 1000 == dom).all()  # tokens from that domain
            seen.append(int(dom[0]))
        both = whole.next_microbatch()
        assert _same(both, {k: torch.cat([b[k] for b in batches]) for k in both})
    # Micro-batch domains follow the mixture exactly over a block of groups.
    assert list(np.bincount(seen, minlength=4)) == list(ranks[0].sampler.counts)

    state = ranks[1].state_dict()
    assert state["group_size"] == G and state["position"] == BLOCK * G
    expected = [[r.next_microbatch() for r in ranks] for _ in range(20)]
    resumed = [_stream(G, dp_rank=r, dp_size=2) for r in range(2)]
    for r in resumed:
        r.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    for exp in expected:
        assert all(_same(r.next_microbatch(), e) for r, e in zip(resumed, exp))


def test_stream_group_mismatches_error():
    with pytest.raises(ValueError, match=r"micro_batch_size 6.*group_size 4"):
        _stream(4, B=6)
    with pytest.raises(ValueError, match="start_position.*group_size"):
        _stream(4, start=2)
    _stream(4, B=8)  # a multiple of the group size is fine
    _stream(1, B=6)  # group_size 1 never constrains the micro-batch size

    st = _stream(4)
    with pytest.raises(ValueError, match="group_size"):
        st.load_state_dict({"position": 8, "seed": 1, "weights": WEIGHTS, "group_size": 1})
    legacy = {"position": 8, "seed": 1, "weights": WEIGHTS}  # saved before group sizes: means 1
    with pytest.raises(ValueError, match="group_size"):
        st.load_state_dict(legacy)
    with pytest.raises(ValueError, match="position 6.*group_size"):
        st.load_state_dict({"position": 6, "seed": 1, "weights": WEIGHTS, "group_size": 4})
    assert st.position == 0

    plain = _stream(1, B=8)
    plain.load_state_dict(legacy)
    assert plain.position == 8
    with pytest.raises(ValueError, match="group_size"):
        plain.load_state_dict(legacy | {"group_size": 8})


def test_data_config_microbatch_domains_default():
    assert DataConfig().microbatch_domains == "mixed"
    assert DataConfig(microbatch_domains="single").microbatch_domains == "single"
