"""Continual-pretraining pieces: replay pools and weights, the exact replay share of the sampler,
and the forgetting / adaptation / stability-gap metrics against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest

from system.continual import continual_metrics, stability_gap
from system.data.replay import (REPLAY_PREFIX, ChunkView, base_chunks, load_consumed, replay_pools,
                                replay_weights, save_consumed)
from system.data.sampler import BLOCK, MixtureSampler


def test_replay_weights_scale_new_data_by_one_minus_r():
    w = replay_weights({"code": 3.0, "docs": 1.0}, {"replay/a": 30, "replay/b": 10}, 0.2)
    assert w == pytest.approx({"code": 0.6, "docs": 0.2, "replay/a": 0.15, "replay/b": 0.05})
    assert replay_weights({"code": 2.0}, {}, 0.0) == {"code": 1.0}
    with pytest.raises(ValueError, match="consumed no samples"):
        replay_weights({"code": 1.0}, {}, 0.1)
    with pytest.raises(ValueError, match="fraction"):
        replay_weights({"code": 1.0}, {"replay/a": 1}, 1.0)


@pytest.mark.parametrize("r", [0.05, 0.25, 0.5])
def test_sampler_delivers_the_replay_share_exactly_over_every_block(r):
    w = replay_weights({"new": 1.0}, {"replay/old": 50}, r)
    s = MixtureSampler({"new": 200, "replay/old": 50}, w, seed=3)
    for block in range(3):
        doms, _ = s.lookup_range(block * BLOCK, (block + 1) * BLOCK)
        assert (doms == 1).sum() == round(r * BLOCK)


def test_chunk_view_indexes_the_consumed_rows_only():
    base = np.arange(40).reshape(10, 4)
    v = ChunkView(base, np.array([7, 2, 5]), "docs")
    assert len(v) == 3 and v.shape == (3, 4)
    assert (v[np.array([0, 2])] == base[[7, 5]]).all()
    with pytest.raises(ValueError, match="out of range"):
        ChunkView(base, np.array([10]), "docs")


def test_base_chunks_maps_replay_pools_back_to_their_source():
    views = {"code": np.zeros((5, 3)), "replay/docs": ChunkView(np.zeros((9, 3)), np.array([8, 1, 4]), "docs")}
    names = ["code", "replay/docs"]
    got = base_chunks(names, views, np.array([0, 1, 1, 0, 1]), np.array([3, 0, 2, 3, 0]))
    assert {k: v.tolist() for k, v in got.items()} == {"code": [3], "docs": [4, 8]}


def test_replay_pools_union_of_stages_and_checks_the_tokenizer(tmp_path):
    train = {"docs": np.zeros((10, 5)), "code": np.zeros((6, 5))}
    meta = {"tokenizer": "byte", "seq_len": 4, "sizes": {"docs": 10, "code": 6}}
    save_consumed(tmp_path / "a.npz", {"docs": np.array([1, 3])}, meta)
    save_consumed(tmp_path / "b.npz", {"docs": np.array([3, 9]), "code": np.array([0])}, meta)
    chunks, m = load_consumed(tmp_path / "a.npz")
    assert chunks["docs"].tolist() == [1, 3] and m["seq_len"] == 4
    pools = replay_pools([("a", tmp_path / "a.npz"), ("b", tmp_path / "b.npz")], train, "byte", 4)
    assert sorted(pools) == [REPLAY_PREFIX + "code", REPLAY_PREFIX + "docs"]
    assert pools["replay/docs"].ids.tolist() == [1, 3, 9]
    with pytest.raises(ValueError, match="tokenized by"):
        replay_pools([("a", tmp_path / "a.npz")], train, "bpe-123", 4)
    with pytest.raises(ValueError, match="had 10 chunks then"):
        replay_pools([("a", tmp_path / "a.npz")], {"docs": np.zeros((11, 5))}, "byte", 4)
    with pytest.raises(ValueError, match="no consumed-sample record"):
        load_consumed(tmp_path / "missing.npz")


def test_stability_gap_depth_and_recovery():
    curve = [(0, 2.0), (10, 2.5), (20, 2.8), (30, 2.3), (40, 1.9), (50, 1.7)]
    g = stability_gap(curve)
    assert g["gap_depth"] == pytest.approx(0.8) and g["gap_step"] == 20
    assert g["recovery_step"] == 40 and g["recovery_steps"] == 20 and g["recovered"] == 1.0
    # With a tolerance of half the depth, 2.3 <= 2.0 + 0.4 already counts as recovered.
    assert stability_gap(curve, tolerance=0.5)["recovery_step"] == 30
    never = stability_gap([(0, 1.0), (5, 1.5), (10, 1.2)])
    assert never["recovered"] == 0.0 and "recovery_step" not in never
    assert stability_gap([(0, 1.0), (5, 0.9)]) == {"gap_depth": 0.0, "gap_step": 0}


def test_continual_metrics_hand_computed():
    hist = [(0, {"old1": 2.0, "old2": 3.0, "new": 4.0}),
            (5, {"old1": 2.6, "old2": 3.4, "new": 3.0}),
            (10, {"old1": 2.4, "old2": 3.2, "new": 2.5})]
    m = continual_metrics(hist, {"old": ["old1", "old2"], "new": ["new"]})
    assert m["cl/old/loss"] == pytest.approx(2.8)
    assert m["cl/forgetting"] == pytest.approx(2.8 - 2.5)
    assert m["cl/adaptation"] == pytest.approx(1.5)
    assert m["cl/old/gap_depth"] == pytest.approx(0.5) and m["cl/old/gap_step"] == 5
    assert m["cl/old/recovered"] == 0.0
    assert m["cl/new/gap_depth"] == 0.0
    assert m["cl/delta/old1"] == pytest.approx(0.4) and m["cl/delta/new"] == pytest.approx(-1.5)
    assert m["cl/mean_loss"] == pytest.approx((2.8 + 2.5) / 2)
    assert continual_metrics(hist[:1], {"old": ["old1"]})["cl/forgetting"] == 0.0
