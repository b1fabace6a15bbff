"""Expert state sharded over the expert-data-parallel group (`parallel.expert_sharding` 1 and 2).

Store level, on 4 ranks as 2 x 2 and 8 ranks as 2 x 4 and 4 x 2: three optimizer steps of two
MoE layers (two micro-batches, global-norm clipping always active; fssdp with a re-sharding move
and hot copies, ep without) for sharding 0, 1 and 2 in the same processes: every expert weight
and AdamW moment, read back from each run's checkpoint, equals the unsharded run's to 1e-6, the
global norms agree, and the working weights of every rank equal the unsharded ones. Checkpoints
of sharded state then load at other EDP sizes, expert-parallel sizes and world sizes, weights
and moments bit for bit. The real trainer with sharding is in test_ep_dp.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from parallel.testing import run_distributed
from system.expert_files import full_expert_weights, read_expert_files
from tests.parallel.test_ep_dp import BATCH, E, _Holder, _layer, _plan

CLIP = 1e-3  # below every norm here: the clip coefficient is always active


def _clipped_step(store) -> float:
    """The strategy's clipping: the global norm over the norm groups, the coefficient from it."""
    from parallel import dist as pdist

    sq = store.grad_sq_norm()
    for g in store.norm_groups():
        pdist.all_reduce_(sq, "sum", g)
    norm = float(sq) ** 0.5
    store.step(1e-2, CLIP / (norm + 1e-6) if norm > CLIP else 1.0)
    return norm


def _train(store, model, rank: int, world: int, steps: int = 3) -> list[float]:
    from parallel.placement import IterationPlan, heterogeneous_sharding, plan_iteration

    _, xs = _layer(False)
    per = BATCH // world
    norms = []
    for step in range(steps):
        store.begin_iteration(step)
        if store.strategy == "fssdp" and step == 1:
            skew = np.stack([1.0 / np.arange(1, E + 1) ** 1.5, 1.0 / np.arange(E, 0, -1) ** 1.5]) * 1000
            assert store.reshard(heterogeneous_sharding(skew, store.own, 1, ranks_per_node=2)) > 0
            store.set_plan(plan_iteration(store.own, None, 0, 0))
        if store.strategy == "fssdp" and step == 2:
            store.set_plan(IterationPlan([_plan(store.world, store.own.owner_LE[l], "hot").holders_L[0]
                                          for l in range(2)]))
        mine = xs[rank * per:(rank + 1) * per] * (1 + step)
        for micro in range(2):  # two micro-batches: level 2 sums each layer's scattered rows
            store.arm_reduce(final=micro == 1)
            h = mine[:, micro::2]  # half of the tokens each (one sequence a rank at 8 ranks)
            for lay in model.ls:
                h = h + lay(h)[0]
            (h.pow(2).mean() / 2).backward()
        store.reduce_grads()
        norms.append(_clipped_step(store))
    return norms


def _store(strategy: str, P: int, level: int, groups=None):
    from parallel.groups import build_expert_groups
    from parallel.sharded_experts import shard_model

    model = _Holder(_layer(False)[0], _layer(True)[0])
    store = shard_model(model, strategy, groups=groups or build_expert_groups(P))
    got = store.enable_sharding(level)
    store.build_optimizer(1e-2, (0.9, 0.95), 1e-8, 0.1)
    return store, model, got


def _train_worker(rank: int, world: int, P: int, root: str) -> dict:
    from parallel.groups import build_expert_groups

    groups = build_expert_groups(P)
    out = {}
    for strategy in ("ep", "fssdp"):
        for level in (0, 1, 2):
            store, model, got = _store(strategy, P, level, groups)
            norms = _train(store, model, rank, world)
            store.save(Path(root) / f"{strategy}{level}")
            mem = store.memory()
            out[(strategy, level)] = {
                "level": got, "norms": norms, "reshards": store.reshards,
                "weights": {f"{l}.{e}": [p[s].clone() for p in store.params()] for l, e, s in store.own.owned(store.rank)},
                "optimizer_bytes": mem["optimizer_bytes"], "pool_grads": [p.grad for p in store.params()]}
    return out


def _records(ckpt: Path) -> dict:
    head, allx = read_expert_files(ckpt)
    return {k: dict(allx[k]) for k in allx}


@pytest.mark.procs
@pytest.mark.parametrize("world,P", [(4, 2), (8, 2), (8, 4)])
def test_sharded_expert_state_equals_unsharded(tmp_path, world, P):
    res = run_distributed(_train_worker, world, P, str(tmp_path))
    G = world // P
    for strategy in ("ep", "fssdp"):
        ref = _records(tmp_path / f"{strategy}0")
        assert len(list((tmp_path / f"{strategy}0" / "experts").glob("rank*.pt"))) == P
        for level in (1, 2):
            d = tmp_path / f"{strategy}{level}"
            assert len(list((d / "experts").glob("rank*.pt"))) == world  # one file per EDP member
            got = _records(d)
            assert got.keys() == ref.keys() and len(got) == 2 * E
            for layer, ws in full_expert_weights(d).items():  # what export and upcycling read
                for x, y in zip(ws, full_expert_weights(tmp_path / f"{strategy}0")[layer]):
                    torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
            for k in ref:
                assert set(got[k]) == set(ref[k]) >= {"w1", "exp_avg.w2", "exp_avg_sq.w3"}
                for n in ref[k]:
                    torch.testing.assert_close(got[k][n], ref[k][n], rtol=0, atol=1e-6,
                                               msg=lambda m: f"{strategy} sharding {level} {k} {n}: {m}")
            for r in res:
                a, b = r[(strategy, level)], r[(strategy, 0)]
                assert a["level"] == level and a["reshards"] == b["reshards"] == (strategy == "fssdp")
                assert a["norms"] == pytest.approx(b["norms"], rel=1e-6)  # clipping by the global norm
                for k, ws in b["weights"].items():  # every rank's working weights
                    for x, y in zip(a["weights"][k], ws):
                        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
                # the moments (and fp32 masters) of 1/G of the rows: 12 bytes/element instead of 8 x G
                assert a["optimizer_bytes"] * G == pytest.approx(b["optimizer_bytes"] * 1.5, rel=0.05)
                assert all(g is None for g in a["pool_grads"])  # no pool-sized gradient after the step


def _load_worker(rank: int, world: int, P: int, jobs: list) -> list:
    """For each (checkpoint, level, out): a store at (world, P, level) loads it and saves again."""
    from parallel.groups import build_expert_groups

    groups = build_expert_groups(P)
    out = []
    for ckpt, level, dst in jobs:
        store, _, got = _store("fssdp", P, level, groups)
        info = store.load(Path(ckpt))
        store.save(Path(dst))
        out.append({"level": got, "optimizer_state": info["optimizer_state"]})
    return out


@pytest.mark.procs
def test_sharded_checkpoints_load_at_other_layouts_bit_for_bit(tmp_path):
    """Saved at 8 ranks (P=2, EDP 4) and (P=4, EDP 2) with sharding; resumed at 4 ranks P=2
    (EDP 2, sharded), at 2 ranks (one group: unsharded) and back at 8 ranks P=2 sharded: every
    weight and moment of the re-saved state equals the original bit for bit."""
    a, b = tmp_path / "a", tmp_path / "b"
    run_distributed(_train_worker_small, 8, 2, str(a), 2)
    run_distributed(_train_worker_small, 8, 4, str(b), 1)
    ref_a, ref_b = _records(a), _records(b)
    plans = {4: (2, [(str(a), 2, str(tmp_path / "a4")), (str(b), 1, str(tmp_path / "b4"))]),
             2: (2, [(str(a), 1, str(tmp_path / "a2")), (str(b), 2, str(tmp_path / "b2"))])}
    for world, (P, jobs) in plans.items():
        res = run_distributed(_load_worker, world, P, jobs)
        assert all(x["optimizer_state"] for r in res for x in r)
        assert [x["level"] for x in res[0]] == ([2, 1] if world == 4 else [0, 0])
    for name, ref in (("a4", ref_a), ("b4", ref_b), ("a2", ref_a), ("b2", ref_b)):
        got = _records(tmp_path / name)
        assert got.keys() == ref.keys()
        for k in ref:
            for n in ref[k]:
                assert torch.equal(got[k][n], ref[k][n]), (name, k, n)
    # and back up: the 2-rank unsharded files at 8 ranks, P=2, sharding 2
    run_distributed(_load_worker, 8, 2, [(str(tmp_path / "a2"), 2, str(tmp_path / "a8"))])
    got = _records(tmp_path / "a8")
    assert all(torch.equal(got[k][n], ref_a[k][n]) for k in ref_a for n in ref_a[k])


def _train_worker_small(rank: int, world: int, P: int, root: str, level: int) -> None:
    store, model, got = _store("fssdp", P, level)
    assert got == level
    _train(store, model, rank, world, steps=2)
    store.save(Path(root))
