"""The vectorised FSSDP planner (`parallel.placement`) gives exactly the old planner's results.

The old code is kept verbatim in `tests/parallel/planner_reference.py`. On many random loads
(Zipf with several exponents, uniform, all zero, small integers full of ties), ownerships (even,
random, Algorithm 2's heterogeneous ones), plans (Algorithm 1's and random holder sets), budgets
t / caps m / tolerances, and nodes given as ranks-per-node ints or as explicit node-id arrays,
every function must return the same holders, send amounts, owners and slots, and floats.
The reference only knows `rank // ranks_per_node`; for node arrays its `node_of` is patched to
read the array (the rule the new code implements), which for ints is the original function.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import planner_reference as R  # noqa: E402

from parallel import placement as P  # noqa: E402

_node_of = R.node_of


@pytest.fixture(autouse=True)
def _reference_node_arrays(monkeypatch):
    monkeypatch.setattr(R, "node_of", lambda r, k: _node_of(r, k) if isinstance(k, (int, np.integer)) else int(k[r]))


def _loads(rng, kind: str, L: int, E: int, N: int) -> np.ndarray:
    if kind.startswith("zipf"):
        p = 1.0 / np.arange(1, E + 1) ** float(kind[4:])
        p /= p.sum()
        return np.stack([rng.multinomial(512 * N, rng.permutation(p)) for _ in range(L)]).astype(np.float64)
    if kind == "uniform":
        return rng.random((L, E)) * 100.0
    if kind == "zero":
        return np.zeros((L, E))
    return rng.integers(0, 4, (L, E)).astype(np.float64)  # "ties"


def _nodes(rng, N: int, how: str):
    if how == "int":
        return int(rng.choice([1, 2, 3, 4, 8]))
    if how == "blocks":  # an array equal to some rank // ranks_per_node
        return P.node_ids(N, int(rng.choice([2, 4])))
    ids = rng.integers(0, max(1, N // 3), N) * 7 + 100  # Ray's placement: any ids, any order
    return ids.tolist() if how == "list" else ids


def _random_ownership(rng, L: int, E: int, N: int) -> P.Ownership:
    S = L * E // N
    flat = rng.permutation(N * S)  # every (rank, slot) once
    return P.Ownership((flat // S).reshape(L, E).astype(np.int64), (flat % S).reshape(L, E).astype(np.int64), N)


def _counts(rng, N: int, E: int, load_E: np.ndarray) -> np.ndarray:
    if rng.random() < 0.3:
        return np.tile(np.round(load_E / max(N, 1)).astype(np.int64), (N, 1))  # predicted_straggler's counts
    scale = int(rng.choice([3, 50, 5000]))
    return rng.integers(0, scale, (N, E)) * (rng.random((N, E)) < 0.8)


def _random_holders(rng, owner_E: np.ndarray, N: int) -> list[list[int]]:
    out = []
    for o in owner_E.tolist():
        k = int(rng.choice([0, 0, 1, 2, N // 2, N - 1])) if N > 1 else 0
        others = [r for r in rng.permutation(N).tolist() if r != o][:k]
        out.append([o] + others)
    return out


def _same_assign(counts, holders, nodes):
    ref = R.assign_tokens(counts, holders, nodes)
    new = P.assign_tokens(counts, holders, nodes)
    np.testing.assert_array_equal(new, ref)
    np.testing.assert_array_equal(P.rank_loads(P.assign(counts, holders, nodes)), R.rank_loads(ref))
    np.testing.assert_array_equal(P.rank_loads(new), R.rank_loads(ref))


CASES = [(N, E) for N in (1, 2, 4, 8, 16, 32) for E in (4, 8, 16, 64) if E >= N]
KINDS = ["zipf0.8", "zipf1.2", "zipf2.0", "uniform", "zero", "ties"]


@pytest.mark.parametrize("N,E", CASES)
def test_plan_and_assignment_match_the_reference(N, E):
    rng = np.random.default_rng(1000 * N + E)
    for trial in range(6):
        kind = KINDS[trial % len(KINDS)]
        nodes = _nodes(rng, N, ["int", "blocks", "array", "list"][trial % 4])
        L = 2
        load = _loads(rng, kind, L, E, N)
        owners = [P.Ownership.even(L, E, N) if E % N == 0 else _random_ownership(rng, L, E, N)]
        owners.append(R.heterogeneous_sharding(load, owners[0], int(rng.integers(0, 5)), nodes))
        owners.append(P.Ownership(rng.integers(0, N, (L, E)), np.zeros((L, E), dtype=np.int64), N))  # any owners
        for own in owners:
            for _ in range(3):
                t, m = int(rng.integers(0, E + 2)), int(rng.integers(0, 5))
                tol = float(rng.choice([0.0, 0.05, 0.5]))
                for l in range(L):
                    ref = R.plan_materialization(load[l], own.owner_LE[l], N, t, m, nodes, tol)
                    new = P.plan_materialization(load[l], own.owner_LE[l], N, t, m, nodes, tol)
                    assert new == ref and all(type(h) is int for hs in new for h in hs)
                    _same_assign(_counts(rng, N, E, load[l]), ref, nodes)
            _same_assign(_counts(rng, N, E, load[0]), _random_holders(rng, own.owner_LE[0], N), nodes)


@pytest.mark.parametrize("N,E", [(N, E) for N, E in CASES if E % N == 0 and E <= 16] + [(32, 64)])
def test_sharding_straggler_and_reshard_match_the_reference(N, E):
    rng = np.random.default_rng(7 * N + E)
    for trial in range(4):
        L = int(rng.integers(1, 4))
        load = _loads(rng, KINDS[(trial + N) % len(KINDS)], L, E, N)
        nodes = _nodes(rng, N, ["int", "array", "blocks", "int"][trial])
        t, m, tol = int(rng.integers(0, 6)), int(rng.integers(0, 4)), float(rng.choice([0.0, 0.05, 0.3]))
        for cur in (P.Ownership.even(L, E, N), _random_ownership(rng, L, E, N)):
            ref = R.heterogeneous_sharding(load, cur, t, nodes)
            new = P.heterogeneous_sharding(load, cur, t, nodes)
            np.testing.assert_array_equal(new.owner_LE, ref.owner_LE)
            np.testing.assert_array_equal(new.slot_LE, ref.slot_LE)
            assert P.moves(cur, new) == R.moves(cur, ref)
            assert P.predicted_straggler(cur, load, t, m, nodes, tol) == R.predicted_straggler(cur, load, t, m,
                                                                                                nodes, tol)
            a, b = P.reshard_decision(cur, load, t, m, nodes, tol), R.reshard_decision(cur, load, t, m, nodes, tol)
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_array_equal(a.owner_LE, b.owner_LE)
                np.testing.assert_array_equal(a.slot_LE, b.slot_LE)


def test_many_global_fills_and_wide_nodes():
    """Sources on nodes without a holder (one global fill after another, over many holders),
    and nodes wider than the Python fast path (33+ holders in one node)."""
    rng = np.random.default_rng(3)
    for N, nodes in [(64, 8), (64, P.node_ids(64, 40)), (96, [r % 3 for r in range(96)]), (128, 16)]:
        E = 16
        for _ in range(3):
            counts = rng.integers(0, 3000, (N, E))
            holders = []
            for e in range(E):
                k = int(rng.choice([1, 3, 20, 40, N // 2]))
                pool = np.flatnonzero(P.node_ids(N, nodes) == P.node_ids(N, nodes)[rng.integers(N)])
                pick = rng.permutation(pool if rng.random() < 0.5 else np.arange(N))[:k].tolist()
                holders.append(pick)
            _same_assign(counts, holders, nodes)


def test_token_assignment_views_match_the_dense_matrix():
    rng = np.random.default_rng(5)
    for N, E, nodes in [(1, 4, 8), (4, 8, 2), (8, 16, [0, 0, 5, 5, 1, 1, 1, 9]), (16, 16, 4), (32, 64, 8)]:
        load = _loads(rng, "zipf1.5", 1, E, N)[0]
        holders = P.plan_materialization(load, rng.integers(0, N, E), N, 6, 2, nodes)
        counts = rng.integers(0, 100, (N, E))
        a = P.assign(counts, holders, nodes)
        send = a.dense()
        np.testing.assert_array_equal(send, R.assign_tokens(counts, holders, nodes))
        for s in range(N):
            np.testing.assert_array_equal(a.from_rank(s), send[s])
            np.testing.assert_array_equal(a.to_rank(s), send[:, :, s])
        np.testing.assert_array_equal(a.rank_loads(), send.sum(axis=(0, 1)))
        np.testing.assert_array_equal(a.token_matrix(), send.sum(axis=1))
        np.testing.assert_array_equal(send.sum(axis=2), counts)  # every token goes somewhere, once
        assert a.nbytes < send.nbytes or N <= 4


def test_node_ids_and_int_nodes_unchanged():
    np.testing.assert_array_equal(P.node_ids(10, 4), [0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(P.node_ids(3, 0), [0, 1, 2])  # ranks_per_node <= 0: one rank per node
    np.testing.assert_array_equal(P.node_ids(3, [7, 7, 2]), [7, 7, 2])
    with pytest.raises(ValueError):
        P.node_ids(3, [0, 1])
    assert P.node_of(9, 4) == 2 and P.node_of(2, [7, 7, 2]) == 2
    rng = np.random.default_rng(11)
    load = _loads(rng, "zipf1.2", 3, 32, 16)
    own = P.Ownership.even(3, 32, 16)
    for rpn in (1, 4, 8):
        arr = P.node_ids(16, rpn)
        assert P.plan_iteration(own, load, 4, 2, rpn).holders_L == P.plan_iteration(own, load, 4, 2, arr).holders_L
        a, b = P.heterogeneous_sharding(load, own, 4, rpn), P.heterogeneous_sharding(load, own, 4, arr)
        np.testing.assert_array_equal(a.owner_LE, b.owner_LE)
        assert P.predicted_straggler(own, load, 4, 2, rpn) == P.predicted_straggler(own, load, 4, 2, arr)


def test_ownership_check_reports_the_first_bad_rank():
    own = P.Ownership.even(2, 8, 4)
    own.check()
    bad = P.Ownership(own.owner_LE.copy(), own.slot_LE.copy(), 4)
    bad.slot_LE[0, 2] = bad.slot_LE[1, 2]  # rank 1 uses one slot twice
    with pytest.raises(ValueError, match="rank 1 holds slots"):
        bad.check()
    with pytest.raises(ValueError, match="rank 1 holds slots"):
        R.Ownership(bad.owner_LE, bad.slot_LE, 4).check()
