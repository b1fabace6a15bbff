"""Routers (top-k softmax/sigmoid, aux-loss-free bias, EvoMoE DTS gate), balancing losses and
routing statistics: pure functions checked against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from experts.config import DTSConfig, RouterConfig
from experts.dispatch import plan_dispatch
from experts.layer import MoELayer, dense_moe_reference
from experts.losses import load_balancing_loss, sequence_balancing_loss, sequence_counts
from experts.router import (ROUTERS, Router, RouterOutput, aux_free_bias_update, dts_route, dts_temperature,
                            expert_counts, get_router, topk_route, topk_softmax)
from experts.stats import domain_specialisation, global_load_stats


def _logits(T=6, E=4, seed=0):
    return torch.randn(T, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


# -- top-k --------------------------------------------------------------------------------------
def test_topk_softmax_hand_values():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    r = topk_route(logits, 2, score="softmax", normalize=False)
    assert r.ids_TK.tolist() == [[3, 2]]
    torch.testing.assert_close(r.weights_TK, torch.tensor([[0.4, 0.3]]))
    r = topk_route(logits, 2, score="softmax", normalize=True)
    torch.testing.assert_close(r.weights_TK, torch.tensor([[4 / 7, 3 / 7]]))
    torch.testing.assert_close(r.probs_TE, torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    assert r.valid_TK is None and r.temperature is None


def test_topk_sigmoid_scores_and_lbl_probs():
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0]])
    s = torch.sigmoid(logits)
    r = topk_route(logits, 2, score="sigmoid", normalize=True)
    assert r.ids_TK.tolist() == [[3, 1]]
    torch.testing.assert_close(r.weights_TK, (s[:, [3, 1]] / s[:, [3, 1]].sum()).float())
    torch.testing.assert_close(r.probs_TE, s / s.sum())  # normalised per token (DeepSeek-V3)
    r = topk_route(logits, 2, score="sigmoid", normalize=False)
    torch.testing.assert_close(r.weights_TK, s[:, [3, 1]])


def test_topk_k1_not_normalised_keeps_router_gradient():
    logits = _logits().float().requires_grad_(True)
    r = topk_route(logits, 1, normalize=True)
    (r.weights_TK.sum()).backward()
    assert logits.grad.abs().sum() > 0


def test_bias_changes_choice_but_not_weights():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    bias = torch.tensor([0.5, 0.0, 0.0, 0.0])
    r = topk_route(logits, 2, normalize=False, bias_E=bias)
    assert sorted(r.ids_TK.tolist()[0]) == [0, 3]  # 0.1 + 0.5 beats 0.3
    w = dict(zip(r.ids_TK[0].tolist(), r.weights_TK[0].tolist()))
    assert w[0] == pytest.approx(0.1) and w[3] == pytest.approx(0.4)  # unbiased scores


def test_bias_gets_no_gradient_and_logits_do():
    logits = _logits().float().requires_grad_(True)
    bias = torch.randn(4, requires_grad=True)
    r = topk_route(logits, 2, bias_E=bias)
    r.weights_TK.sum().backward()
    assert bias.grad is None


def test_aux_free_update_hand_values():
    b = torch.zeros(4)
    c = torch.tensor([10, 30, 20, 20])  # mean 20
    out = aux_free_bias_update(b, c, 0.001)
    torch.testing.assert_close(out, torch.tensor([0.001, -0.001, 0.0, 0.0]))


def test_aux_free_bias_balances_a_skewed_router():
    """Repeated updates with the step's counts drive a skewed router towards balance."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 8, generator=g) + torch.linspace(0, 2, 8)  # experts 6, 7 favoured
    bias = torch.zeros(8)
    before = expert_counts(topk_route(logits, 2).ids_TK, 8)
    for _ in range(300):
        bias = aux_free_bias_update(bias, expert_counts(topk_route(logits, 2, bias_E=bias).ids_TK, 8), 0.01)
    after = expert_counts(topk_route(logits, 2, bias_E=bias).ids_TK, 8)
    maxvio = lambda c: float(c.max()) / float(c.float().mean()) - 1
    assert maxvio(before) > 1.0 and maxvio(after) < 0.3


# -- DTS gate -------------------------------------------------------------------------------
@pytest.mark.parametrize("step,expected", [(0, 2.0), (2500, 1.25), (5000, 0.5), (9000, 0.5)])
def test_dts_temperature_linear(step, expected):
    assert dts_temperature(step, DTSConfig(2.0, 0.5, 5000, "linear")) == pytest.approx(expected)


@pytest.mark.parametrize("step,expected", [(0, 2.0), (2500, 1.0), (5000, 0.5), (7000, 0.5)])
def test_dts_temperature_exponential(step, expected):
    # 2 * exp(t * ln(0.25) / 5000): at t = 2500, 2 * 0.25 ** 0.5 = 1.0
    assert dts_temperature(step, DTSConfig(2.0, 0.5, 5000, "exponential")) == pytest.approx(expected)


def test_dts_dense_phase_hand_computed():
    cfg = DTSConfig(t_max=2.0, t_min=0.5, decay_steps=10, threshold=0.1)
    logits = torch.tensor([[2.0, 1.0, 0.0, -4.0]])
    gumbel = torch.zeros(1, 4)
    r = dts_route(logits, 0, cfg, hard_top_k=1, training=True, gumbel_TE=gumbel)
    g = torch.softmax(logits / 2.0, -1)  # T(0) = 2: [0.506, 0.307, 0.186, 0.0025]
    assert r.temperature == 2.0
    assert r.ids_TK.tolist() == [[0, 1, 2]] and r.valid_TK.tolist() == [[True, True, True]]
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(r.weights_TK, p[:, :3])  # softmax of the logits, not renormalised
    assert g[0, 3] < 0.1 < g[0, 2]


def test_dts_dynamic_k_pads_invalid_slots_and_never_drops_a_token():
    cfg = DTSConfig(t_max=1.0, t_min=0.5, decay_steps=10, threshold=0.2)
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-50.0, 50.0, 0.0, 0.0]])
    r = dts_route(logits, 0, cfg, hard_top_k=1, training=True, gumbel_TE=torch.zeros(3, 4))
    assert r.ids_TK.shape == (3, 4)  # token 1 activates all 4 experts
    assert r.valid_TK.sum(1).tolist() == [1, 4, 1]
    assert (r.weights_TK[~r.valid_TK] == 0).all()
    assert r.active_per_token() == pytest.approx(2.0)
    plan = plan_dispatch(r.ids_TK, 4, r.valid_TK)
    assert plan.counts_E.tolist() == [2, 2, 1, 1] and len(plan.token_idx_N) == 6


def test_dts_hard_after_t_hard_and_in_eval():
    cfg = DTSConfig(t_max=2.0, t_min=0.5, decay_steps=10, hard_at_step=4)
    logits = _logits(T=20, E=6)
    for r in (dts_route(logits, 4, cfg, 2, training=True), dts_route(logits, 0, cfg, 2, training=False)):
        ref = topk_route(logits, 2)
        assert r.valid_TK is None and torch.equal(r.ids_TK, ref.ids_TK)
        torch.testing.assert_close(r.weights_TK, ref.weights_TK)
    # before t_hard at high temperature most experts are active
    r = dts_route(logits, 0, cfg, 2, training=True, gumbel_TE=torch.zeros(20, 6))
    assert r.active_per_token() > 4


def test_dts_active_experts_fall_as_temperature_anneals():
    cfg = DTSConfig(t_max=2.0, t_min=0.05, decay_steps=100, schedule="exponential", threshold=0.01)
    logits = _logits(T=200, E=8)
    noise = torch.distributions.Gumbel(0.0, 1.0).sample((200, 8)).double()
    active = [dts_route(logits, s, cfg, 1, training=True, gumbel_TE=noise).active_per_token() for s in (0, 50, 99)]
    assert active[0] > active[1] > active[2] >= 1.0


def test_dts_layer_matches_dense_reference_forward_and_backward():
    torch.manual_seed(0)
    rc = RouterConfig(kind="dts", dts=DTSConfig(t_max=2.0, t_min=0.5, decay_steps=100, threshold=0.05))
    layer = MoELayer(8, 6, 2, 12, rc).double()
    layer.reset_parameters(std=0.5, out_std=0.3)
    layer.train()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    params = [layer.router.weight, layer.experts.w1, layer.experts.w2]
    torch.manual_seed(3)
    y, aux = layer(x)
    g1 = torch.autograd.grad(y.square().sum(), params)
    torch.manual_seed(3)  # same Gumbel noise
    y_ref = dense_moe_reference(layer, x)
    g2 = torch.autograd.grad(y_ref.square().sum(), params)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    assert aux.valid_TK is not None and aux.temperature == 2.0
    assert int(aux.counts_E.sum()) == int(aux.valid_TK.sum())


# -- the router registry ---------------------------------------------------------------------------
def test_the_layer_routes_through_the_registry_and_reports_the_routers_own_figures(monkeypatch):
    """A kind registered in ROUTERS runs in MoELayer with no edit to the layer; its check runs at
    build; the DTS gate's temperature and phase reach MoEAux.router_scalars (what the trainer logs)."""
    assert set(ROUTERS) == {"topk", "dts"}
    with pytest.raises(ValueError, match="unknown router kind 'nope'; available: \\['dts', 'topk'\\]"):
        get_router("nope")

    def first_expert(logits_TE, cfg, ctx):
        T = logits_TE.shape[0]
        ids = torch.zeros(T, ctx.top_k, dtype=torch.int64)
        ids[:, 1:] = torch.arange(1, ctx.top_k)
        w = torch.full((T, ctx.top_k), 1.0 / ctx.top_k, dtype=logits_TE.dtype)
        return RouterOutput(w, ids, logits_TE, torch.softmax(logits_TE, dim=-1))

    def refuse_odd_k(cfg, top_k, num_experts):
        if top_k % 2:
            raise ValueError("first_expert wants an even top_k")

    monkeypatch.setitem(ROUTERS, "first", Router(first_expert, refuse_odd_k))
    layer = MoELayer(8, 4, 2, 12, RouterConfig(kind="first")).double()
    layer.reset_parameters(std=0.5, out_std=0.3)
    _, aux = layer(torch.randn(2, 3, 8, dtype=torch.float64))
    assert aux.counts_E.tolist() == [6, 6, 0, 0] and aux.router_scalars() == {}
    with pytest.raises(ValueError, match="even top_k"):
        MoELayer(8, 4, 1, 12, RouterConfig(kind="first"))
    with pytest.raises(ValueError, match="dts.hard_top_k=5 must be in \\[1, num_experts=4\\]"):
        MoELayer(8, 4, 2, 12, RouterConfig(kind="dts", dts=DTSConfig(hard_top_k=5)))

    dts = MoELayer(8, 4, 2, 12, RouterConfig(kind="dts", dts=DTSConfig(t_max=2.0, t_min=0.5, decay_steps=4,
                                                                       hard_at_step=2))).double()
    dts.reset_parameters(std=0.5, out_std=0.3)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    seen = []
    for step in (0, 1, 2, 3):
        dts.routing_step = step
        seen.append(dts(x)[1].router_scalars())
    assert [s["temperature"] for s in seen] == [dts_temperature(t, dts.cfg.dts) for t in (0, 1, 2, 3)]
    hard = [s["dts_hard"] for s in seen]
    assert hard == [float(t >= dts.cfg.dts.hard_step()) for t in (0, 1, 2, 3)] and 0.0 in hard and 1.0 in hard


# -- losses -----------------------------------------------------------------------------------
def test_lbl_hand_value():
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    counts = torch.tensor([3, 1])  # f = [0.75, 0.25], p = [0.7, 0.3]
    assert float(load_balancing_loss(probs, counts, 1)) == pytest.approx(2 * (0.75 * 0.7 + 0.25 * 0.3))


def test_sequence_lbl_equals_mean_of_per_sequence_lbl():
    B, S, E, K = 3, 5, 4, 2
    probs = torch.softmax(_logits(B * S, E), -1)
    ids = topk_route(torch.log(probs), K).ids_TK
    val = sequence_balancing_loss(probs, ids, B)
    per = [load_balancing_loss(probs[b * S:(b + 1) * S], expert_counts(ids[b * S:(b + 1) * S], E), K)
           for b in range(B)]
    assert float(val) == pytest.approx(float(sum(per) / B))
    assert sequence_counts(ids, E, B).sum().item() == B * S * K
    # one sequence: the micro-batch loss
    assert float(sequence_balancing_loss(probs, ids, 1)) == pytest.approx(
        float(load_balancing_loss(probs, expert_counts(ids, E), K)))


def test_sequence_lbl_ignores_invalid_slots():
    probs = torch.softmax(_logits(4, 3), -1)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1]])
    valid = torch.tensor([[True, False], [True, True], [True, False], [True, True]])
    c = sequence_counts(ids, 3, 2, valid)
    assert c.tolist() == [[1, 1, 1], [1, 1, 1]]


# -- statistics -------------------------------------------------------------------------------
def test_global_load_stats():
    s = global_load_stats(torch.tensor([6, 2, 0, 0]), torch.tensor([1, 1, 0, 2]), torch.tensor([0.1, -0.2, 0.0, 0.3]))
    assert s["maxvio_global"] == pytest.approx(6 / 2 - 1) and s["max_over_mean"] == pytest.approx(3.0)
    assert s["dead_experts"] == 2
    assert s["frac_global"] == [0.75, 0.25, 0.0, 0.0] and s["frac_micro"] == [0.25, 0.25, 0.0, 0.5]
    assert s["bias_spread"] == pytest.approx(0.5)
    q = torch.tensor([0.75, 0.25])
    assert s["load_entropy"] == pytest.approx(float(-(q * q.log()).sum()) / math.log(4))
    assert global_load_stats(torch.tensor([5, 5, 5]))["load_entropy"] == pytest.approx(1.0)


def test_domain_specialisation_hand_values():
    perfect = domain_specialisation(torch.tensor([[10, 0], [0, 10]]))
    assert perfect["mutual_information"] == pytest.approx(1.0) and perfect["normalized_mi"] == pytest.approx(1.0)
    assert perfect["top_share"] == [1.0, 1.0]
    none = domain_specialisation(torch.tensor([[5, 5], [5, 5]]))
    assert none["mutual_information"] == pytest.approx(0.0, abs=1e-12) and none["top_share"] == [0.5, 0.5]
    # joint [[3,1],[1,3]]/8: I = sum p log2(p / (pd pe)) = 2*(3/8 log2(1.5) + 1/8 log2(0.5))
    mixed = domain_specialisation(torch.tensor([[3, 1], [1, 3]]))
    assert mixed["mutual_information"] == pytest.approx(2 * (3 / 8 * math.log2(1.5) + 1 / 8 * math.log2(0.5)))


def test_topk_softmax_alias():
    logits = _logits()
    a, b = topk_softmax(logits, 2), topk_route(logits, 2)
    assert torch.equal(a.ids_TK, b.ids_TK)


def test_router_logits_in_fp32_for_a_bf16_layer_unless_asked_otherwise():
    """A bf16 layer computes its router projection in fp32 (top-k decisions hinge on close
    logits); `logits_fp32: false` keeps the model's dtype. The gradient reaches the bf16 weight."""
    torch.manual_seed(0)
    x = torch.randn(16, 8).to(torch.bfloat16)
    for fp32 in (True, False):
        layer = MoELayer(8, 4, 2, 12, RouterConfig(logits_fp32=fp32)).to(torch.bfloat16)
        layer.reset_parameters(std=0.5, out_std=0.3)
        r = layer.route(x)
        w = layer.router.weight
        want = x.float() @ w.float().T if fp32 else (x @ w.T).float()
        assert r.logits_TE.dtype == torch.float32 and torch.equal(r.logits_TE, want)
        r.logits_TE.square().sum().backward()
        assert w.grad is not None and w.grad.dtype == torch.bfloat16
    assert not torch.equal(x.float() @ w.float().T, (x @ w.T).float())  # the choice is visible
