"""EP x DP (`parallel.expert_parallel_size` < world size) on 4 and 8 gloo ranks against one process.

Layer level: outputs, input/router gradients and every expert gradient of groups of P ranks
(4 = 2 x 2, 8 = 2 groups of 4 and 4 groups of 2), for ep and fssdp with copies inside each group
(hot experts everywhere in the group, random plans, rematerialization): every group's owners end
with the world's averaged gradient, the same in every group. Store level: a checkpoint written
at (8 ranks, P=4) after optimizer steps and re-sharding loads at (4, P=2), (2, P=2) and one rank,
experts and Adam moments bit for bit. Trainer level (slow): optimizer steps of the real DeepSpeed
trainer equal single-process training.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from parallel.testing import run_distributed

E, D, F, TOKENS = 8, 16, 24, 6
BATCH = 8  # sequences in the global batch


def _layer(adversarial: bool):
    from experts.layer import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(D, E, 2, F)
    layer.reset_parameters(0.2, 0.2)
    xs = torch.randn(BATCH, TOKENS, D)
    if adversarial:
        with torch.no_grad():
            layer.router.weight.mul_(1e-3)
            layer.expert_bias[3], layer.expert_bias[5] = 5.0, 4.0
    return layer, xs


class _Holder(torch.nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.ls = torch.nn.ModuleList(layers)

    def moe_layers(self):
        return list(self.ls)


def _plan(P: int, owner, name: str, layers: int = 1):
    from parallel.placement import IterationPlan

    own = [[int(owner[e])] for e in range(E)]
    if name == "ownership":
        return IterationPlan([own] * layers)
    if name == "hot":
        hot = [list(h) for h in own]
        for e in (3, 5):
            hot[e] = hot[e] + [r for r in range(P) if r != hot[e][0]]
        return IterationPlan([hot] * layers)
    rng = np.random.default_rng(P)  # the same plan in every group
    return IterationPlan([[list(h) + [int(r) for r in rng.permutation(P) if r != h[0] and rng.random() < 0.5]
                           for h in own]] * layers)


CASES = [("ep", "ownership", False, False), ("ep", "ownership", True, False), ("fssdp", "hot", True, False),
         ("fssdp", "random", False, False), ("fssdp", "hot", True, True)]


def _layer_worker(rank: int, world: int, P: int) -> list:
    from parallel.groups import build_expert_groups
    from parallel.placement import FSSDPPlanConfig
    from parallel.sharded_experts import shard_model

    groups = build_expert_groups(P)
    out = []
    per = BATCH // world
    for strategy, plan, adversarial, remat in CASES:
        layer, xs = _layer(adversarial)
        store = shard_model(_Holder(layer), strategy, FSSDPPlanConfig(rematerialize=remat), groups=groups)
        store.set_plan(_plan(P, store.own.owner_LE[0], plan))
        x = xs[rank * per:(rank + 1) * per].clone().requires_grad_(True)
        y, _ = layer(x)
        (y.pow(2).sum() / BATCH).backward()
        store.reduce_grads()
        experts = {e: tuple(g[s] * world for g in (store.w1.grad, store.w3.grad, store.w2.grad))
                   for (_, e, s) in store.own.owned(store.rank)}
        out.append({"y": y.detach(), "gx": x.grad, "grouter": layer.router.weight.grad, "experts": experts,
                    "group": groups.group_index, "place": groups.local_rank, "comm": store.comm.as_dict(),
                    "param_bytes": store.memory()["param_bytes"]})
    return out


def _reference(adversarial: bool):
    layer, xs = _layer(adversarial)
    x = xs.clone().requires_grad_(True)
    y, _ = layer(x)
    (y.pow(2).sum() / BATCH).backward()
    return layer, x, y.detach()


@pytest.mark.procs
@pytest.mark.parametrize("world,P", [(4, 2), (8, 4), (8, 2), (8, 8)])
def test_layer_groups_match_single_process(world, P):
    results = run_distributed(_layer_worker, world, P)
    refs = {adv: _reference(adv) for adv in (False, True)}
    for c, case in enumerate(CASES):
        layer, x, y = refs[case[2]]
        ranks = [r[c] for r in results]
        assert [r["group"] for r in ranks] == [g for g in range(world // P) for _ in range(P)]
        torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{case} output: {m}")
        torch.testing.assert_close(torch.cat([r["gx"] for r in ranks]), x.grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{case} input grad: {m}")
        torch.testing.assert_close(sum(r["grouter"] for r in ranks), layer.router.weight.grad, rtol=1e-5,
                                   atol=1e-5, msg=lambda m: f"{case} router grad: {m}")
        for g in range(world // P):  # every group holds every expert once, with the world's gradient
            members = [r for r in ranks if r["group"] == g]
            seen = {}
            for r in members:
                for e, grads in r["experts"].items():
                    assert e not in seen
                    seen[e] = grads
                assert r["param_bytes"] == (E // P) * 3 * D * F * 4  # E/P experts per rank
            assert sorted(seen) == list(range(E))
            for e, (g1, g3, g2) in seen.items():
                for got, ref in ((g1, layer.experts.w1.grad[e]), (g3, layer.experts.w3.grad[e]),
                                 (g2, layer.experts.w2.grad[e])):
                    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5,
                                               msg=lambda m: f"{case} group {g} expert {e}: {m}")
        if case[1] == "hot" and not case[3]:  # (rematerialization gathers twice)
            # pipelined chains: the busiest rank sends at most one copy of each hot expert (the flat
            # spAG had the owner send P - 1), and every copy arrives exactly once, both ways
            expert_bytes = 3 * D * F * 4
            assert max(r["comm"]["spag"] for r in ranks) <= 2 * expert_bytes
            assert sum(r["comm"]["spag"] for r in ranks) == (world // P) * 2 * (P - 1) * expert_bytes
            assert sum(r["comm"]["sprs"] for r in ranks) == (world // P) * 2 * (P - 1) * expert_bytes


def _train_worker(rank: int, world: int, P: int, ckpt: str) -> dict:
    """Three steps of two MoE layers (an optimizer step each), re-sharding between; save."""
    from parallel.groups import build_expert_groups
    from parallel.placement import heterogeneous_sharding, plan_iteration
    from parallel.sharded_experts import shard_model

    groups = build_expert_groups(P)
    model = _Holder(_layer(False)[0], _layer(True)[0])
    store = shard_model(model, "fssdp", groups=groups)
    store.build_optimizer(1e-2, (0.9, 0.95), 1e-8, 0.1)
    _, xs = _layer(False)
    per = BATCH // world
    for step in range(3):
        store.begin_iteration(step)
        if step == 1:
            skew = np.stack([1.0 / np.arange(1, E + 1) ** 1.5, 1.0 / np.arange(E, 0, -1) ** 1.5]) * 1000
            assert store.reshard(heterogeneous_sharding(skew, store.own, 1, ranks_per_node=2)) > 0
            store.set_plan(plan_iteration(store.own, None, 0, 0))
        if step == 2:
            from parallel.placement import IterationPlan

            store.set_plan(IterationPlan([_plan(P, store.own.owner_LE[l], "hot").holders_L[0] for l in range(2)]))
        h = xs[rank * per:(rank + 1) * per]
        for lay in model.ls:
            h = h + lay(h)[0]
        h.pow(2).mean().backward()
        store.reduce_grads()
        store.step(1e-2)
    store.save(Path(ckpt))
    return {"experts": store.state_for_checkpoint()["experts"], "group": groups.group_index}


def _load_worker(rank: int, world: int, P: int, ckpt: str) -> dict:
    from parallel.groups import build_expert_groups
    from parallel.sharded_experts import shard_model

    store = shard_model(_Holder(_layer(False)[0], _layer(True)[0]), "ep", groups=build_expert_groups(P))
    store.build_optimizer(1e-2, (0.9, 0.95), 1e-8, 0.1)
    info = store.load(Path(ckpt))
    return {"experts": store.state_for_checkpoint()["experts"], "info": info}


def _merge(parts):
    out = {}
    for p in parts:
        for k, v in p["experts"].items():
            assert k not in out, f"expert {k} held twice in one group"
            out[k] = v
    return out


@pytest.mark.procs
def test_checkpoint_at_8x4_loads_at_other_layouts_bit_for_bit(tmp_path):
    res = run_distributed(_train_worker, 8, 4, str(tmp_path))
    files = sorted(p.name for p in (tmp_path / "experts").glob("rank*.pt"))
    assert files == [f"rank{i:05d}.pt" for i in range(4)]  # group 0 writes one file per place
    g0, g1 = _merge([r for r in res if r["group"] == 0]), _merge([r for r in res if r["group"] == 1])
    assert len(g0) == 2 * E
    for k in g0:  # the groups hold equal experts and moments after the EDP reduction
        assert set(g0[k]) >= {"w1", "exp_avg.w1", "exp_avg_sq.w2"}
        for n in g0[k]:
            assert torch.equal(g0[k][n], g1[k][n]), (k, n)
    for world, P in ((4, 2), (2, 2), (1, 1)):
        loaded = run_distributed(_load_worker, world, P, str(tmp_path))
        for g in range(world // P):
            got = _merge(loaded[g * P:(g + 1) * P])
            assert got.keys() == g0.keys()
            for k in g0:
                for n in g0[k]:
                    assert torch.equal(got[k][n], g0[k][n]), (world, P, k, n)
        assert all(r["info"]["optimizer_state"] for r in loaded)


def test_spec_validation_of_expert_parallel_size(tmp_path):
    from jobs.spec import SpecError, parse_spec
    from tests.helpers import tiny_spec

    def problems(**par):
        try:
            parse_spec(tiny_spec(tmp_path, parallel=par))
        except SpecError as e:
            return str(e)
        return ""

    assert problems(world_size=4, expert_strategy="fssdp", expert_parallel_size=2) == ""
    assert "does not divide world_size=4" in problems(world_size=4, expert_strategy="ep", expert_parallel_size=3)
    assert "inside one node" in problems(world_size=8, expert_strategy="ep", expert_parallel_size=4,
                                         fssdp={"ranks_per_node": 3})
    assert problems(world_size=8, expert_strategy="ep", expert_parallel_size=4, fssdp={"ranks_per_node": 2}) == ""
    assert problems(world_size=4, expert_strategy="ep", fssdp={"ranks_per_node": 3}) == ""  # the whole world
    spec = tiny_spec(tmp_path, parallel={"world_size": 4, "expert_strategy": "ep", "expert_parallel_size": 4})
    spec["model"]["num_experts"] = 6
    with pytest.raises(SpecError, match="num_experts"):
        parse_spec(spec)


def test_layout_problems_and_rank_nodes():
    from parallel.groups import default_rank_nodes, layout_problems

    assert layout_problems(8, 4, default_rank_nodes(8, 4)) == []
    assert layout_problems(8, 8, default_rank_nodes(8, 4)) == []  # whole nodes
    assert layout_problems(8, 4, [0, 0, 1, 1, 1, 1, 0, 0]) != []  # a group straddles part of two nodes


# -- the real trainer and DeepSpeed engine --------------------------------------------------------
from tests.parallel.test_expert_parallel import _run_stage, _spec, _weights, replicated_reference  # noqa: E402,F401


@pytest.mark.slow
@pytest.mark.parametrize("world,P,strategy,zero,fssdp,accum,sharding", [
    (4, 2, "ep", 0, None, 1, 0),
    (4, 2, "fssdp", 1, None, 2, 2),
    (8, 4, "fssdp", 0, {"rematerialize": True, "reshard_every": 1}, 1, 1),
    (8, 2, "fssdp", 0, None, 1, 2),
])
def test_trainer_groups_match_single_process(tmp_path, replicated_reference, world, P, strategy, zero, fssdp,
                                             accum, sharding):
    """Four optimizer steps (clipping active, evaluations between) of world/P expert-parallel
    groups, with the expert state replicated or sharded over the EDP group
    (`parallel.expert_sharding`): losses, global gradient norms, held-out losses and every final
    parameter equal single-process replicated training."""
    ref, ref_w = replicated_reference
    spec = _spec(tmp_path, world, strategy, f"{strategy}{world}x{P}", zero, fssdp, accum=accum)
    spec["parallel"]["expert_parallel_size"] = P
    spec["parallel"]["expert_sharding"] = sharding
    recs = run_distributed(_run_stage, world, spec)[0]
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]
    for r, q in zip(recs, ref):
        for k in [k for k in q if k.startswith("eval/") and k.endswith("/loss")]:
            assert r[k] == pytest.approx(q[k], rel=1e-5), k
        if r["step"] == 0:
            continue
        assert r["ce"] == pytest.approx(q["ce"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(q["grad_norm"], rel=1e-5)
        assert r["moe/0/tokens_per_expert"] == q["moe/0/tokens_per_expert"]
    w = _weights(spec)
    assert w.keys() == ref_w.keys()
    for k in w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    ck = Path(spec["run"]["output_dir"]) / spec["run"]["name"] / "stages" / "pretrain" / "checkpoints"
    last_ck = sorted(ck.glob("step_*"))[-1]
    assert len(list((last_ck / "experts").glob("rank*.pt"))) == (world if sharding else P)
    last = recs[-1]
    assert last["ep/bytes_all_to_all"] > 0
    if strategy == "fssdp":
        assert last["ep/copies"] > 0 and last["ep/bytes_spag"] > 0
