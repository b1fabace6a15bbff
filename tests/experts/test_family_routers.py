"""The routers of the Hugging Face MoE families, against transformers' own router modules."""
from __future__ import annotations

import pytest
import torch

from experts.router import group_limited_mask, topk_route, topk_then_softmax

transformers = pytest.importorskip("transformers")


def _logits(T=64, E=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, E, generator=g) * 2


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2), (8, 3)])
def test_deepseek_v3_routing_matches_transformers(normalize, n_group, topk_group):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    E, D, K = 16, 12, 4
    cfg = DeepseekV3Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, n_group=n_group,
                           topk_group=topk_group, norm_topk_prob=normalize, routed_scaling_factor=2.5)
    hf = DeepseekV3TopkRouter(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(E, D, generator=g))
        hf.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.1)
    x = torch.randn(50, D, generator=g)
    _, w_hf, ids_hf = hf(x)
    ours = topk_route(x @ hf.weight.t(), K, score="sigmoid", normalize=normalize, bias_E=hf.e_score_correction_bias,
                      n_group=n_group, topk_group=topk_group, scaling=2.5)
    # transformers does not sort the chosen experts; compare as sets with their weights
    o_ids, o_order = ours.ids_TK.sort(dim=1)
    h_ids, h_order = ids_hf.sort(dim=1)
    assert torch.equal(o_ids, h_ids)
    torch.testing.assert_close(ours.weights_TK.gather(1, o_order), w_hf.gather(1, h_order), rtol=1e-6, atol=1e-7)


def test_group_limited_mask_keeps_the_best_groups():
    s = torch.tensor([[0.9, 0.8, 0.1, 0.0, 0.5, 0.5, 0.95, 0.0]])  # groups of 2: sums 1.7, 0.1, 1.0, 0.95
    m = group_limited_mask(s, n_group=4, topk_group=2)
    assert m.tolist() == [[True, True, False, False, True, True, False, False]]
    # the single best expert (0.95) is outside the chosen groups, so it cannot be picked
    r = topk_route(torch.logit(s.clamp(1e-4, 1 - 1e-4)), 2, score="sigmoid", n_group=4, topk_group=2)
    assert set(r.ids_TK[0].tolist()) == {0, 1}


def test_group_limited_needs_divisible_experts():
    with pytest.raises(ValueError, match="does not divide"):
        group_limited_mask(torch.zeros(2, 10), n_group=4, topk_group=1)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_mixtral_topk_then_softmax_equals_softmax_topk_renormalised(k):
    logits = _logits()
    a = topk_then_softmax(logits, k)
    b = topk_route(logits, k, score="softmax", normalize=True)
    assert torch.equal(a.ids_TK, b.ids_TK)
    if k > 1:
        torch.testing.assert_close(a.weights_TK, b.weights_TK, rtol=1e-6, atol=1e-7)
    else:
        # k = 1: the softmax over one logit is 1; ours keeps the probability (router gradient)
        assert torch.all(a.weights_TK == 1)


# Mixtral always renormalises; the other two have norm_topk_prob
@pytest.mark.parametrize("family,normalize", [("mixtral", True), ("qwen2_moe", True), ("qwen2_moe", False),
                                              ("olmoe", True), ("olmoe", False)])
def test_softmax_routers_match_transformers(family, normalize):
    import importlib

    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    cls = {"mixtral": "MixtralTopKRouter", "qwen2_moe": "Qwen2MoeTopKRouter", "olmoe": "OlmoeTopKRouter"}[family]
    cfg_cls = {"mixtral": transformers.MixtralConfig, "qwen2_moe": transformers.Qwen2MoeConfig,
               "olmoe": transformers.OlmoeConfig}[family]
    E, D, K = 8, 12, 2
    kw = {"num_local_experts": E} if family == "mixtral" else {"num_experts": E, "norm_topk_prob": normalize}
    hf = getattr(mod, cls)(cfg_cls(hidden_size=D, num_experts_per_tok=K, **kw))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(E, D, generator=g))
    x = torch.randn(40, D, generator=g)
    _, w_hf, ids_hf = hf(x)
    ours = topk_route(x @ hf.weight.t(), K, score="softmax", normalize=normalize)
    assert torch.equal(ours.ids_TK, ids_hf)
    torch.testing.assert_close(ours.weights_TK, w_hf.float(), rtol=1e-6, atol=1e-7)
