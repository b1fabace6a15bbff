"""The deepspeed_moe strategy: DeepSpeed's MoE layer behind MoELayer's interface.

Single-process tests use ep_size=1 (no process groups needed); the distributed ones run
DeepSpeed engines on 2 gloo ranks with ep_size=2, all in one spawn (module-scoped fixture).
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from experts.backends import swiglu  # noqa: E402
from experts.config import BalancingConfig, RouterConfig  # noqa: E402
from parallel.ds_moe import DeepSpeedMoELayer, ds_moe_param_groups, tokens_dropped  # noqa: E402
from experts.losses import load_balancing_loss, router_z_loss  # noqa: E402
from parallel.testing import run_distributed  # noqa: E402

D, E, F_, B, T = 16, 4, 32, 2, 8


class _Tiny(nn.Module):
    """in-projection -> DeepSpeed MoE -> out-projection."""

    def __init__(self, ep_size: int, top_k: int, **kw):
        super().__init__()
        self.inp = nn.Linear(D, D, bias=False)
        self.ffn = DeepSpeedMoELayer(D, E, top_k, F_, ep_size, **kw)
        self.out = nn.Linear(D, D, bias=False)

    def forward(self, x):
        y, aux = self.ffn(self.inp(x))
        return self.out(y), aux


def _expert_weights(layer: DeepSpeedMoELayer) -> list[tuple[torch.Tensor, ...]]:
    return [(ex.w1, ex.w3, ex.w2) for ex in layer.experts.deepspeed_experts]


def _reference(x_BTD, aux, weights) -> torch.Tensor:
    """sum_k weight_k * expert_{id_k}(x) over the routes the gate kept; `weights` lists every
    global expert's (w1, w3, w2)."""
    x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
    out = torch.zeros_like(x_TD)
    for k in range(aux.ids_TK.shape[1]):
        for e, (w1, w3, w2) in enumerate(weights):
            sel = (aux.ids_TK[:, k] == e) & aux.valid_TK[:, k]
            if sel.any():
                out[sel] += aux.weights_TK[sel, k:k + 1].to(x_TD.dtype) * swiglu(x_TD[sel], w1, w3, w2)
    return out.reshape(x_BTD.shape)


# ---------------------------------------------------------------- single process, ep_size=1

@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("drop_tokens", [False, True])
def test_output_matches_reference_from_gate_weights(top_k, drop_tokens):
    torch.manual_seed(0)
    layer = DeepSpeedMoELayer(D, E, top_k, F_, 1, drop_tokens=drop_tokens, capacity_factor=0.5, min_capacity=1)
    x = torch.randn(B, T, D)
    y, aux = layer(x)
    assert y.shape == x.shape
    assert aux.counts_E.dtype == torch.int64 and not aux.counts_E.requires_grad
    assert int(aux.counts_E.sum()) == B * T * top_k  # exp_counts: the top-k choice before capacity
    assert aux.top_k == top_k and aux.batch_size == B and aux.probs_TE.shape == (B * T, E)
    if drop_tokens:
        assert tokens_dropped(aux) > 0  # capacity 0.5: some routes must go
    else:
        assert tokens_dropped(aux) == 0
    torch.testing.assert_close(y, _reference(x, aux, _expert_weights(layer)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_recomputed_probs_are_the_gates(top_k):
    """Without drops the combine weights are the (renormalised, for k >= 2) softmax of the
    recomputed logits at the chosen experts: our probs/logits are the gate's own."""
    torch.manual_seed(1)
    layer = DeepSpeedMoELayer(D, E, top_k, F_, 1, drop_tokens=False)
    _, aux = layer(torch.randn(B, T, D))
    p_TK = aux.probs_TE.gather(1, aux.ids_TK)
    if top_k > 1:
        p_TK = p_TK / p_TK.sum(dim=1, keepdim=True)
    torch.testing.assert_close(aux.weights_TK, p_TK)
    counts = torch.bincount(aux.ids_TK.reshape(-1), minlength=E)
    assert torch.equal(counts, aux.counts_E)


def test_training_loss_terms_reach_the_gate():
    from system.losses import training_loss
    from system.model import ModelOutput

    torch.manual_seed(2)
    layer = DeepSpeedMoELayer(D, E, 2, F_, 1, drop_tokens=False)
    _, aux = layer(torch.randn(B, T, D))
    logits = torch.randn(B, T, 11, requires_grad=True)
    labels = torch.randint(0, 11, (B, T))
    for lbl in ("micro_batch", "sequence"):
        total, parts = training_loss(ModelOutput(logits, [aux]), labels, BalancingConfig(lbl=lbl))
        assert torch.isfinite(total) and parts["lbl"] > 0 and parts["z_loss"] > 0
    (load_balancing_loss(aux.probs_TE, aux.counts_E, 2) + router_z_loss(aux.logits_TE)
     + aux.ds_l_aux).backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_walks_like_moe_layer():
    layer = DeepSpeedMoELayer(D, E, 2, F_, 1)
    assert (layer.num_experts, layer.top_k, layer.hard_top_k, layer.routing_step) == (E, 2, 2, 0)
    assert layer.cfg == RouterConfig() and torch.equal(layer.expert_bias, torch.zeros(E))
    assert "expert_bias" in layer.state_dict()
    assert getattr(layer.experts, "prefetch", None) is None
    layer.reset_parameters(0.02, 0.01)
    # local experts are distinct draws, not copies of one expert
    w = [ex.w1 for ex in layer.experts.deepspeed_experts]
    assert not torch.equal(w[0], w[1])
    with pytest.raises(ValueError, match="topk"):
        DeepSpeedMoELayer(D, E, 2, F_, 1, router=RouterConfig(kind="dts"))
    with pytest.raises(RuntimeError, match="init_process_group"):
        DeepSpeedMoELayer(D, E, 2, F_, 2)


def test_param_groups_split_experts_for_deepspeed():
    model = _Tiny(1, 2)
    groups = ds_moe_param_groups(model, 0.1)
    by_name = {g["moeforge_name"]: g for g in groups}
    assert set(by_name) == {"dense_decay", "expert_decay"}
    dense, expert = by_name["dense_decay"], by_name["expert_decay"]
    assert dense["name"] == "dense_decay" and not dense.get("moe", False)
    assert expert["name"] == "ep_size_1" and expert["moe"] is True and expert["weight_decay"] == 0.1
    assert {id(p) for p in expert["params"]} == {id(p) for p in model.ffn.experts.parameters()}
    assert len(dense["params"]) == 3  # inp, gate, out
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


# ---------------------------------------------------------------- 2 gloo ranks, ep_size=2

def _ds_config(zero_stage: int, clip: float) -> dict:
    return {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1, "train_batch_size": B * 2,
            "gradient_clipping": clip, "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}


def _x(rank: int, step: int) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(100 * step + rank))


def _engine(model, optimizer, zero_stage, clip=1.0):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=_ds_config(zero_stage, clip),
                                           dist_init_required=False)
    return engine


def _gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    import torch.distributed as dist

    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.detach().contiguous())
    return out


def _ranks(rank: int, world: int) -> dict:
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups as dsgroups

    res: dict = {}
    # 1. Train with AdamW, ZeRO 0 and ZeRO 1: top-2 without drops (exact counts), top-1 with drops.
    for zero_stage, top_k, drop in ((0, 2, False), (1, 1, True)):
        torch.manual_seed(0)
        model = _Tiny(2, top_k, drop_tokens=drop, min_capacity=1)
        layer = model.ffn
        engine = _engine(model, torch.optim.AdamW(ds_moe_param_groups(model, 0.1), lr=1e-2), zero_stage)
        assert layer.moe.deepspeed_moe.ep_group is not None
        assert dsgroups._get_expert_parallel_world_size(layer.group_name) == 2
        # reference through the all-to-alls: every global expert's weights, gathered
        x = _x(rank, 0)
        with torch.no_grad():
            h = model.inp(x)
            y, aux = layer(h)
            local = _expert_weights(layer)
            gathered = [_gather(torch.stack([w[j] for w in local]), world) for j in range(3)]
            everyone = [tuple(gathered[j][r][i] for j in range(3)) for r in range(world) for i in range(len(local))]
            torch.testing.assert_close(y, _reference(h, aux, everyone), rtol=1e-5, atol=1e-6)
        losses, counts, dropped = [], [], []
        for step in range(3):
            out, aux = engine(_x(rank, step))
            assert out.shape == (B, T, D)
            loss = (out.pow(2).mean() + 0.01 * aux.ds_l_aux + 0.01 * load_balancing_loss(aux.probs_TE, aux.counts_E)
                    + 1e-3 * router_z_loss(aux.logits_TE))
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
            counts.append(int(aux.counts_E.sum()))
            dropped.append(tokens_dropped(aux))
        expert_names = sorted(n for n, p in model.named_parameters() if is_moe_param(p))
        res[zero_stage] = {
            "losses": losses, "counts": counts, "dropped": dropped, "expert_names": expert_names,
            "n_local": len(layer.experts.deepspeed_experts),
            "gate": layer.router.weight.detach().clone(), "inp": model.inp.weight.detach().clone(),
            "expert_w1": torch.stack([ex.w1.detach() for ex in layer.experts.deepspeed_experts]),
        }
    # 2. One SGD step, deterministic routing without drops: compared with one process, ep_size=1.
    # No clipping: DeepSpeed's ZeRO-0 clipping averages the ranks' local norms (each rank sees
    # other experts), which is not the single process's global norm.
    torch.manual_seed(0)
    model = _Tiny(2, 2, drop_tokens=False, top2_2nd_expert_sampling=False, init_std=0.5)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    engine = _engine(model, torch.optim.SGD(ds_moe_param_groups(model, 0.0), lr=0.1), 0, clip=0.0)
    out, _ = engine(_x(rank, 0))
    engine.backward(out.pow(2).mean())
    engine.step()
    res["sgd_update"] = {k: v.detach() - before[k] for k, v in model.state_dict().items()}
    return res


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_ranks, 2)


@pytest.mark.procs
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_engine_trains_expert_parallel(two_ranks, zero_stage):
    r0, r1 = two_ranks[0][zero_stage], two_ranks[1][zero_stage]
    top_k = 2 if zero_stage == 0 else 1
    for r in (r0, r1):
        assert all(torch.isfinite(torch.tensor(r["losses"])))
        assert r["n_local"] == E // 2  # each rank holds num_experts / ep_size experts
        assert len(r["expert_names"]) == 3 * (E // 2)
        assert r["counts"] == [B * T * top_k] * 3  # exp_counts count the choice before capacity
        if zero_stage == 0:
            assert r["dropped"] == [0, 0, 0]  # drop_tokens=False
        else:
            assert sum(r["dropped"]) > 0  # top-1 at capacity factor 1 overflows some expert
    # dense parameters stay replicated; experts are different experts on the two ranks
    torch.testing.assert_close(r0["gate"], r1["gate"], rtol=0, atol=0)
    torch.testing.assert_close(r0["inp"], r1["inp"], rtol=0, atol=0)
    assert not torch.allclose(r0["expert_w1"], r1["expert_w1"])


@pytest.mark.procs
def test_engine_step_matches_single_process(two_ranks):
    """Gradient reduction: dense grads averaged over ranks, expert grads (holding both ranks'
    tokens through the all-to-all) divided by the data-parallel size. One SGD step on 2 ranks
    (ep_size 2) makes the same updates as one step on the concatenated batch in one process
    (ep_size 1, same initial weights: experts are drawn in global order)."""
    torch.manual_seed(0)
    model = _Tiny(1, 2, drop_tokens=False, top2_2nd_expert_sampling=False, init_std=0.5)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out, _ = model(torch.cat([_x(0, 0), _x(1, 0)]))
    out.pow(2).mean().backward()
    opt.step()
    want = {k: v.detach() - before[k] for k, v in model.state_dict().items()}
    prefix = "ffn.moe.deepspeed_moe.experts.deepspeed_experts."
    n_local = E // 2
    for rank, res in enumerate(two_ranks):
        for k, v in res["sgd_update"].items():
            if k.startswith(prefix):
                i, rest = k[len(prefix):].split(".", 1)
                k = f"{prefix}{rank * n_local + int(i)}.{rest}"
            if k != "ffn.expert_bias":
                assert want[k].abs().max() > 1e-4, k  # a real update, not noise
            torch.testing.assert_close(v, want[k], rtol=1e-4, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
