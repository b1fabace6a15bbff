"""SparseReduceScatter overlapped with the backward pass (`parallel.fssdp.sprs_overlap`).

Three MoE layers in a residual stack, two micro-batches per step, on 2 and 4 gloo ranks (one
expert-parallel group, and 2 x 2 EP x DP), with plans that copy experts in every layer (and
rematerialization): each layer's spRS starts when
its backward has finished and advances one round per later layer. The owners' expert gradients
must equal the post-backward spRS bit for bit (the same chains sum in the same order), and the
single-process reference to 1e-5; the spRS must really have started inside the backward pass.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from parallel.testing import run_distributed

E, D, F, TOKENS, BATCH, LAYERS, MICRO = 8, 16, 24, 6, 8, 3, 2


def _model():
    from experts.layer import MoELayer

    torch.manual_seed(0)
    layers = torch.nn.ModuleList()
    for _ in range(LAYERS):
        lay = MoELayer(D, E, 2, F)
        lay.reset_parameters(0.2, 0.2)
        layers.append(lay)
    xs = torch.randn(BATCH, TOKENS, D)
    return layers, xs


class _Stack(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.ls = layers

    def moe_layers(self):
        return list(self.ls)

    def forward(self, h):
        for lay in self.ls:
            h = h + lay(h)[0]
        return h


def _plan(world: int, owner_LE, seed: int):
    """Every layer: its hot experts copied to every rank, the others to random ranks."""
    from parallel.placement import IterationPlan

    rng = np.random.default_rng(seed)
    holders = []
    for l in range(LAYERS):
        hs = []
        for e in range(E):
            o = int(owner_LE[l][e])
            extra = [r for r in range(world) if r != o and (e == l or rng.random() < 0.4)]
            hs.append([o] + extra)
        holders.append(hs)
    return IterationPlan(holders)


def _worker(rank: int, world: int, cases: list, P: int) -> list:
    from parallel.groups import build_expert_groups, second_ep_group
    from parallel.placement import FSSDPPlanConfig
    from parallel.sharded_experts import shard_model

    groups = build_expert_groups(P)
    out = []
    per = BATCH // (world * MICRO)
    for overlap, remat, post_all, edp in cases:
        layers, xs = _model()
        model = _Stack(layers)
        store = shard_model(model, "fssdp", FSSDPPlanConfig(sprs_overlap=overlap, rematerialize=remat),
                            groups=groups)
        if post_all:  # NCCL's spAG: every round posted at once, on a group of its own
            store.gather_post_all, store.gather_group = True, second_ep_group(groups)
        store.edp_in_backward = edp and groups.edp_group is not None  # NCCL's per-layer EDP sum
        store.begin_iteration(0)
        store.set_plan(_plan(P, store.own.owner_LE, seed=world))
        for m in range(MICRO):
            lo = (m * world + rank) * per
            store.arm_reduce(m == MICRO - 1)
            x = xs[lo:lo + per].clone().requires_grad_(True)  # as a model's embeddings: layer 0 too
            (model(x).pow(2).sum() / BATCH).backward()
        started = store.sprs_in_backward
        edp_layers = sorted(store.iteration.edp_works)
        store.reduce_grads()
        grads = {(l, e): tuple(g[s].clone() * world for g in (store.w1.grad, store.w3.grad, store.w2.grad))
                 for (l, e, s) in store.own.owned(store.rank)}
        out.append({"grads": grads, "started": started, "sprs_bytes": store.comm.sprs, "edp_layers": edp_layers,
                    "spag_bytes": store.comm.spag,
                    "copies": len([c for c in store.plan.copies() if c[2] == rank])})
    return out


# (sprs_overlap, rematerialize, spAG posted at once on its own group, EDP sum in the backward)
CASES = [(False, False, False, False), (True, False, False, False), (True, True, False, False),
         (True, True, True, False), (False, False, True, True), (True, False, False, True)]


def _reference():
    layers, xs = _model()
    model = _Stack(layers)
    (model(xs).pow(2).sum() / BATCH).backward()
    return layers


@pytest.mark.procs
@pytest.mark.parametrize("world,P", [(2, 2), (4, 4), (4, 2)])
def test_overlapped_sprs_equals_the_post_backward_one(world, P):
    """(4, 2): two expert-parallel groups of 2 (EP x DP), the spRS inside each group."""
    res = run_distributed(_worker, world, CASES, P)
    ref = _reference()
    base = {}
    for r in res:
        base.update(r[0]["grads"])
    assert sorted(base) == [(l, e) for l in range(LAYERS) for e in range(E)]  # every expert owned
    for (l, e), gs in base.items():
        ex = ref[l].experts
        for g, want in zip(gs, (ex.w1.grad[e], ex.w3.grad[e], ex.w2.grad[e])):
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"layer {l} expert {e}: {m}")
    for c, (overlap, remat, post_all, edp) in enumerate(CASES):
        edp = edp and world != P
        for rank, r in enumerate(res):
            got = r[c]
            assert got["started"] == (LAYERS if overlap else 0), (overlap, remat, rank)
            assert got["sprs_bytes"] == r[0]["sprs_bytes"]  # the same messages, only earlier
            assert remat or got["spag_bytes"] == r[0]["spag_bytes"]  # the same copies (remat gathers again)
            assert got["edp_layers"] == (list(range(LAYERS)) if edp else [])  # posted inside the backward
            for k, gs in got["grads"].items():
                for g, b in zip(gs, r[0]["grads"][k]):
                    if edp:  # the copies' sums are summed over EDP apart from the owned rows: order only
                        torch.testing.assert_close(g, b, rtol=1e-6, atol=1e-7)
                    else:
                        assert torch.equal(g, b), f"case {c} rank {rank} {k}: differs from post-backward spRS"
    assert sum(r[0]["copies"] for r in res) > 0 and res[0][0]["sprs_bytes"] > 0  # there was something to reduce


def _eval_worker(rank: int, world: int) -> dict:
    """A forward without gradients (evaluation) and a step abandoned after its backward
    (non-finite loss: discard_grads) leave no reduction half-done."""
    from parallel.placement import FSSDPPlanConfig
    from parallel.sharded_experts import shard_model

    layers, xs = _model()
    model = _Stack(layers)
    store = shard_model(model, "fssdp", FSSDPPlanConfig(sprs_overlap=True))
    store.build_optimizer(1e-2, (0.9, 0.95), 1e-8, 0.0)
    per = BATCH // world
    x = xs[rank * per:(rank + 1) * per].clone().requires_grad_(True)
    for step in range(2):
        store.begin_iteration(step)
        store.set_plan(_plan(world, store.own.owner_LE, seed=3))
        with torch.no_grad():
            model(x)
        store.arm_reduce(True)
        model(x).pow(2).mean().backward()
        if step == 0:
            store.discard_grads()  # the step is skipped: the reductions in flight complete
            assert not store.iteration.reducing
        else:
            store.reduce_grads()
            store.step(1e-2)
    return {"pool": store.w1.detach().clone(), "started": store.sprs_in_backward}


@pytest.mark.procs
def test_skipped_step_and_evaluation_keep_ranks_in_step():
    res = run_distributed(_eval_worker, 2)
    assert all(r["started"] == LAYERS for r in res)
    assert all(torch.isfinite(r["pool"]).all() for r in res)


def test_copy_gradients_are_summed_in_fp32_over_micro_batches():
    """bf16 copies: each backward's gradient is added into an fp32 sum (not the copy's bf16
    `.grad`), which is what the SparseReduceScatter sends; fp32 copies keep their exact sum."""
    from types import SimpleNamespace

    from parallel.expert_store import ExpertStore, IterationState

    store = SimpleNamespace(iteration=IterationState(), grad_dtype=torch.float32)
    t = torch.zeros(3, 4, dtype=torch.bfloat16, requires_grad=True)
    parts = [torch.full((3, 4), 1.0, dtype=torch.bfloat16), torch.full((3, 4), 2.0 ** -9, dtype=torch.bfloat16)]
    for g in parts:  # two micro-batches
        t.grad = g.clone()
        ExpertStore._keep_copy_grad(store, t, (0, 1))
        assert t.grad is None
    acc = store.iteration.copy_grads[(0, 1)]
    assert acc.dtype == torch.float32 and torch.all(acc == 1.0 + 2.0 ** -9)  # bf16 would round to 1.0
    assert (parts[0] + parts[1]).eq(1.0).all()
    assert store.iteration.accumulated == {(0, 1)}
