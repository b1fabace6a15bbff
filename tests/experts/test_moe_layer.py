"""Tests of the single-device MoE math: routing, balancing losses, dispatch and the MoE layer."""
from __future__ import annotations

import math

import pytest
import torch

from experts import MoELayer, expert_counts, load_balancing_loss, router_z_loss, topk_softmax
from experts.backends import get_backend, reference_backend, swiglu
from experts.dispatch import combine, permute, plan_dispatch
from experts.config import RouterConfig
from experts.layer import dense_moe_reference

D, F = 8, 12


def _layer(E: int, k: int, normalize: bool = True, seed: int = 0, dtype=torch.float64) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(D, E, k, F, RouterConfig(normalize_topk=normalize)).to(dtype)
    layer.reset_parameters(std=0.5, out_std=0.3)  # large enough for varied routing
    return layer


def _input(B=3, T=7, seed=1, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g, dtype=dtype)


def _grads(fn, layer: MoELayer, x: torch.Tensor, cot: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    params = [layer.router.weight, layer.experts.w1, layer.experts.w3, layer.experts.w2]
    grads = torch.autograd.grad((out * cot).sum(), params + [x])
    return out.detach(), grads


CASES = [(1, 1, True), (4, 1, True), (4, 1, False), (4, 2, True), (4, 2, False),
         (6, 3, True), (8, 2, False), (5, 5, True)]


@pytest.mark.parametrize("E,k,normalize", CASES)
def test_layer_matches_dense_reference_forward_and_backward(E, k, normalize):
    layer = _layer(E, k, normalize)
    x = _input()
    cot = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)

    out, g_moe = _grads(lambda t: layer(t)[0], layer, x, cot)
    ref, g_ref = _grads(lambda t: dense_moe_reference(layer, t), layer, x, cot)

    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)
    names = ["router.weight", "w1", "w3", "w2", "input"]
    for name, a, b in zip(names, g_moe, g_ref):
        assert a.abs().sum() > 0 or E == k == 1 and name == "router.weight", f"{name} got no gradient"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_layer_matches_reference_in_fp32():
    layer = _layer(4, 2, True, dtype=torch.float32)
    x = _input(dtype=torch.float32)
    out, _ = layer(x)
    torch.testing.assert_close(out, dense_moe_reference(layer, x), rtol=1e-5, atol=1e-5)


def test_routing_actually_varies_in_these_tests():
    # guard: the reference comparisons above are only meaningful if several experts are used
    layer = _layer(4, 2)
    _, aux = layer(_input())
    assert (aux.counts_E > 0).sum() >= 3


@pytest.mark.parametrize("k", [1, 2])
def test_dropless_under_adversarial_routing(k):
    E, B, T = 4, 2, 16
    layer = _layer(E, k)
    with torch.no_grad():
        w = torch.zeros(E, D, dtype=torch.float64)
        w[0] = 1.0  # expert 0 wins for any all-positive input
        for e in range(1, E):
            w[e] = -0.01 * e  # distinct (no ties) and losing
        layer.router.weight.copy_(w)
    x = _input(B, T).abs() + 0.1
    out, aux = layer(x)
    N = B * T
    assert aux.counts_E.sum().item() == N * k
    assert aux.counts_E[0].item() == N  # every token went to expert 0: nothing dropped
    if k == 2:
        assert aux.counts_E[1].item() == N
    assert aux.counts_E[2:].sum().item() == 0
    torch.testing.assert_close(out, dense_moe_reference(layer, x), rtol=1e-5, atol=1e-8)
    # every token got expert 0's output
    x_TD = x.reshape(N, D)
    r = layer.route(x_TD)
    ex = layer.experts
    expected = sum(r.weights_TK[:, j:j + 1].double() * swiglu(x_TD, ex.w1[j], ex.w3[j], ex.w2[j])
                   for j in range(k))
    torch.testing.assert_close(out.reshape(N, D), expected, rtol=1e-6, atol=1e-9)
    assert (out.reshape(N, D).abs().sum(-1) > 0).all()


def test_counts_equal_bincount_of_chosen_ids():
    E, k = 6, 2
    layer = _layer(E, k)
    x = _input(4, 9)
    _, aux = layer(x)
    ids = layer.route(x.reshape(-1, D)).ids_TK
    expected = torch.bincount(ids.reshape(-1), minlength=E)
    assert aux.counts_E.dtype == torch.int64
    assert torch.equal(aux.counts_E, expected)
    assert torch.equal(expert_counts(ids, E), expected)
    assert aux.counts_E.sum().item() == 4 * 9 * k
    assert not aux.counts_E.requires_grad
    assert aux.top_k == k
    assert aux.probs_TE.shape == (36, E) and aux.logits_TE.shape == (36, E)
    torch.testing.assert_close(aux.probs_TE.sum(-1), torch.ones(36, dtype=aux.probs_TE.dtype))


@pytest.mark.parametrize("top_k", [0, -1, 5])
def test_invalid_top_k_raises(top_k):
    with pytest.raises(ValueError, match="top_k"):
        MoELayer(D, 4, top_k, F)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown expert backend"):
        get_backend("nope")
    with pytest.raises(ValueError):
        MoELayer(D, 4, 2, F, backend="nope")


def test_reference_backend_handles_empty_experts():
    torch.manual_seed(0)
    w1, w3, w2 = torch.randn(3, D, F), torch.randn(3, D, F), torch.randn(3, F, D)
    x = torch.randn(5, D)
    out = reference_backend(x, [0, 5, 0], w1, w3, w2)
    torch.testing.assert_close(out, swiglu(x, w1[1], w3[1], w2[1]))
    assert reference_backend(x[:0], [0, 0, 0], w1, w3, w2).shape == (0, D)


# ---------------------------------------------------------------- routing

@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_softmax(k):
    logits = torch.randn(10, 5, generator=torch.Generator().manual_seed(3))
    r = topk_softmax(logits, k, normalize=True)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(r.probs_TE, probs)
    assert r.ids_TK.shape == (10, k) and r.ids_TK.dtype == torch.int64
    # the chosen ids are the k largest probabilities
    assert torch.equal(torch.sort(r.ids_TK, -1).values, torch.sort(probs.topk(k, -1).indices, -1).values)
    chosen = probs.gather(1, r.ids_TK)
    if k > 1:
        torch.testing.assert_close(r.weights_TK.sum(-1), torch.ones(10))
        torch.testing.assert_close(r.weights_TK, chosen / chosen.sum(-1, keepdim=True))
    else:
        torch.testing.assert_close(r.weights_TK, chosen)  # k=1: the raw probability (Switch)
    raw = topk_softmax(logits, k, normalize=False)
    torch.testing.assert_close(raw.weights_TK, chosen)
    if k > 1:
        assert (raw.weights_TK.sum(-1) < 1).all()


@pytest.mark.parametrize("dtype,expected", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                            (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_router_computes_in_at_least_fp32(dtype, expected):
    r = topk_softmax(torch.randn(4, 3).to(dtype), 2)
    assert r.logits_TE.dtype == expected and r.probs_TE.dtype == expected


# ---------------------------------------------------------------- dispatch

@pytest.mark.parametrize("k", [1, 2, 3])
def test_permute_then_combine_with_uniform_weights_recovers_x(k):
    T, E = 11, 5
    g = torch.Generator().manual_seed(4)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    plan = plan_dispatch(ids, E)
    rows = permute(x, plan)
    assert rows.shape == (T * k, D)
    flat = ids.reshape(-1)
    # rows are grouped by expert, in token order within an expert (stable)
    sorted_ids = flat[plan.slot_idx_N]
    assert (sorted_ids[1:] >= sorted_ids[:-1]).all()
    for e in range(E):
        toks = plan.token_idx_N[sorted_ids == e]
        assert (toks[1:] > toks[:-1]).all()
    assert torch.equal(plan.token_idx_N, plan.slot_idx_N // k)
    assert torch.equal(plan.counts_E, torch.bincount(flat, minlength=E))
    torch.testing.assert_close(rows, x[plan.token_idx_N])
    out = combine(rows, torch.full((T, k), 1.0 / k), plan, T)
    torch.testing.assert_close(out, x)


def test_combine_applies_each_slots_weight():
    ids = torch.tensor([[1, 0], [1, 2]])
    plan = plan_dispatch(ids, 3)
    x = torch.tensor([[1.0], [10.0]])
    y = permute(x, plan) * torch.tensor([[2.0], [3.0], [5.0], [7.0]])[plan.slot_idx_N]  # per-slot factor
    w = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    out = combine(y, w, plan, 2)
    torch.testing.assert_close(out, torch.tensor([[0.25 * 2 + 0.75 * 3], [0.5 * 50 + 0.5 * 70]]))


# ---------------------------------------------------------------- balancing losses

@pytest.mark.parametrize("E", [2, 4, 8, 16])
def test_load_balancing_loss_is_exactly_one_when_uniform(E):
    T, k = 4 * E, 2
    probs = torch.full((T, E), 1.0 / E)
    counts = torch.full((E,), T * k // E)
    assert load_balancing_loss(probs, counts, k).item() == 1.0


@pytest.mark.parametrize("E", [3, 5, 6])
def test_load_balancing_loss_is_one_when_uniform_any_E(E):
    probs = torch.full((2 * E, E), 1.0 / E, dtype=torch.float64)
    assert load_balancing_loss(probs, torch.full((E,), 4), 2).item() == pytest.approx(1.0, abs=1e-12)


def test_load_balancing_loss_hand_computed():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([1, 1, 0])
    # f = [.5, .5, 0]; p = [.3, .45, .25]; 3 * (.15 + .225) = 1.125
    loss = load_balancing_loss(probs, counts, top_k=1)
    assert loss.item() == pytest.approx(1.125, abs=1e-12)
    # skewed counts: f = [.75, .25, 0] -> 3 * (.225 + .1125) = 1.0125
    assert load_balancing_loss(probs, torch.tensor([3, 1, 0]), 2).item() == pytest.approx(1.0125, abs=1e-12)
    # gradient flows to the probabilities only: d/dp_ti = E * f_i / T
    loss.backward()
    expected = torch.tensor([[0.75, 0.75, 0.0]] * 2, dtype=torch.float64)
    torch.testing.assert_close(probs.grad, expected)


def test_load_balancing_loss_penalises_imbalance():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    assert load_balancing_loss(probs, torch.tensor([2, 0]), 1).item() > 1.0


def test_router_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], requires_grad=True)
    # logsumexp: ln 2 and ln 4 = 2 ln 2 -> mean of squares = 2.5 (ln 2)^2
    z = router_z_loss(logits)
    assert z.item() == pytest.approx(2.5 * math.log(2.0) ** 2, rel=1e-6)
    z.backward()
    # d/dl_te = 2 * lse_t * softmax_te / T
    lse = torch.tensor([math.log(2.0), math.log(4.0)])
    expected = (lse[:, None] * torch.softmax(logits.detach(), -1))
    torch.testing.assert_close(logits.grad, expected)


def test_router_z_loss_zero_only_when_lse_zero():
    assert router_z_loss(torch.zeros(3, 1)).item() == 0.0
    assert router_z_loss(torch.full((2, 4), -math.log(4.0))).item() == pytest.approx(0.0, abs=1e-10)


def test_combine_accumulates_in_fp32_deterministically_and_keeps_two_slot_sums_bit_for_bit():
    """bf16 expert outputs: the combine sums a token's k weighted rows in fp32 (the old index_add
    summed in bf16, in an order CUDA does not fix), so the result is the fp64 sum rounded once to
    bf16 nearly everywhere; with k = 2 in fp32 it is the old formula's result bit for bit."""
    g = torch.Generator().manual_seed(0)
    T, K, E, D = 64, 6, 8, 32
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=g), -1)
    plan = plan_dispatch(ids, E)
    y = (torch.randn(T * K, D, generator=g) * 10).to(torch.bfloat16)
    exact = torch.zeros(T, D, dtype=torch.float64).index_add(
        0, plan.token_idx_N, y.double() * w.reshape(-1)[plan.slot_idx_N].double().unsqueeze(-1))
    out = combine(y, w, plan, T)
    assert out.dtype == torch.bfloat16 and torch.equal(out, combine(y, w, plan, T))
    old = y.new_zeros(T, D).index_add(0, plan.token_idx_N, y * w.reshape(-1)[plan.slot_idx_N].to(y.dtype).unsqueeze(-1))
    rounded = exact.to(torch.bfloat16)
    assert (out == rounded).float().mean() > 0.99 and (old == rounded).float().mean() < 0.9  # old: 0.54

    ids2, w2 = ids[:, :2], torch.softmax(torch.randn(T, 2, generator=g), -1)
    plan2 = plan_dispatch(ids2, E)
    y2 = torch.randn(T * 2, D, generator=g)
    old2 = y2.new_zeros(T, D).index_add(0, plan2.token_idx_N, y2 * w2.reshape(-1)[plan2.slot_idx_N].unsqueeze(-1))
    assert torch.equal(combine(y2, w2, plan2, T), old2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_keeps_rows_in_their_dtype_for_the_backward_with_autograds_numbers(dtype):
    """The combine's weighting keeps y (bf16 rows) for the backward, not the fp32 copy autograd
    would keep (twice the bytes per MoE layer); outputs and gradients are autograd's bit for bit."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 4, (32, 3), generator=g)
    plan = plan_dispatch(ids, 4)
    y0, w0 = torch.randn(96, 24, generator=g).to(dtype), torch.rand(32, 3, generator=g)
    go = torch.randn(32, 24, generator=g).to(dtype)
    saved: list = []

    def keep(t):
        saved.append((t.dtype, t.numel()))
        return t

    got = []
    for mode in ("ours", "autograd"):
        y, w = y0.clone().requires_grad_(), w0.clone().requires_grad_()
        if mode == "ours":
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                out = combine(y, w, plan, 32)
        else:  # the formula autograd differentiates itself
            acc = torch.promote_types(dtype, torch.float32)
            w_N = w.reshape(-1).index_select(0, plan.slot_idx_N).to(acc)
            slots = y.new_zeros(96, 24, dtype=acc).index_copy(0, plan.slot_idx_N, y.to(acc) * w_N.unsqueeze(-1))
            out = slots.view(32, 3, -1).sum(dim=1).to(dtype)
        out.backward(go)
        got.append((out.detach(), y.grad, w.grad))
    for a, b in zip(*got):
        assert torch.equal(a, b)
    assert all(n < 96 * 24 for dt, n in saved if dt != dtype)  # no fp32 copy of the rows (nor of the slots)
    assert (dtype, 96 * 24) in saved
