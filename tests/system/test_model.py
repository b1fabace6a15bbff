"""Tests of the transformer: shapes, causality, MoE layer placement, heads, overfitting, the loss."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from experts.config import BalancingConfig
from experts.layer import MoELayer
from experts.losses import load_balancing_loss, router_z_loss
from system.configtree import SpecError
from jobs.spec import parse_spec
from system.losses import lm_cross_entropy, training_loss
from system.model import DenseFFN, ModelConfig, Transformer

V = 32


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=2, d_ff=48, num_experts=4, top_k=2, d_expert=24)
    base.update(kw)
    return ModelConfig(**base)


def _model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**kw))


def _ids(B=2, T=10, seed=0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_output_shapes():
    model = _model(n_layers=3, moe_layers=[0, 2])
    out = model(_ids(3, 9))
    assert out.logits_BTV.shape == (3, 9, V)
    assert out.logits_BTV.dtype == torch.float32
    assert torch.isfinite(out.logits_BTV).all()
    assert len(out.moe_aux) == 2
    for a in out.moe_aux:
        assert a.probs_TE.shape == (27, 4)
        assert a.counts_E.sum().item() == 27 * 2


def test_vocab_size_required():
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(tiny(vocab_size=None))


def test_causality():
    model = _model().eval()
    ids = _ids(2, 12)
    t0 = 7
    changed = ids.clone()
    changed[:, t0] = (changed[:, t0] + 5) % V
    with torch.no_grad():
        a = model(ids).logits_BTV
        b = model(changed).logits_BTV
    torch.testing.assert_close(a[:, :t0], b[:, :t0], rtol=0, atol=1e-6)
    assert (a[:, t0:] - b[:, t0:]).abs().amax() > 1e-4  # the change is seen from t0 on


def test_token_order_matters():
    # Without positional information causal attention is order-blind within the prefix:
    # [a, b, c] and [b, a, c] would give the same logits at c. RoPE must tell them apart.
    model = _model().eval()
    with torch.no_grad():
        x = model(torch.tensor([[1, 2, 3]])).logits_BTV[0, 2]
        y = model(torch.tensor([[2, 1, 3]])).logits_BTV[0, 2]
    assert (x - y).abs().amax() > 1e-5


@pytest.mark.parametrize("spec,expected", [
    ("all", [0, 1, 2, 3]), ("none", []), ("every_2", [1, 3]), ("every_1", [0, 1, 2, 3]),
    ("every_3", [2]), ([0, 2], [0, 2]), ([3, 1], [1, 3]), ([], []),
])
def test_moe_layers_variants(spec, expected):
    cfg = tiny(n_layers=4, moe_layers=spec)
    assert list(cfg.check()) == []
    assert cfg.moe_layer_ids() == expected
    torch.manual_seed(0)
    model = Transformer(cfg)
    assert [i for i, b in enumerate(model.blocks) if b.is_moe] == expected
    for i, b in enumerate(model.blocks):
        assert isinstance(b.ffn, MoELayer if i in expected else DenseFFN)
    assert len(model.moe_layers()) == len(expected)
    assert len(model(_ids(1, 5)).moe_aux) == len(expected)


@pytest.mark.parametrize("spec", ["some", "every_0", "every_x", "every_", [4], [-1], [1, 1]])
def test_bad_moe_layers(spec):
    cfg = tiny(n_layers=4, moe_layers=spec)
    probs = list(cfg.check())
    assert [k for k, _ in probs] == ["moe_layers"]
    with pytest.raises(ValueError):
        cfg.moe_layer_ids()
    with pytest.raises(ValueError):
        Transformer(cfg)
    with pytest.raises(SpecError) as ei:
        parse_spec({"model": {"n_layers": 4, "moe_layers": spec}, "stages": [{"name": "a"}]})
    assert [p for p, _ in ei.value.problems] == ["model.moe_layers"]


@pytest.mark.parametrize("kw,key", [
    (dict(d_model=30, n_heads=4), "n_heads"),  # not divisible
    (dict(d_model=36, n_heads=4), "n_heads"),  # head dim 9 is odd (RoPE needs pairs)
    (dict(top_k=5), "top_k"), (dict(vocab_size=1), "vocab_size"), (dict(d_expert=0), "d_expert"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"), (dict(n_kv_heads=0), "n_kv_heads"),
])
def test_model_config_check(kw, key):
    assert [k for k, _ in tiny(**kw).check()] == [key]


def test_model_config_check_accepts_even_head_dim():
    assert list(tiny(d_model=24, n_heads=4).check()) == []


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_tied_vs_untied_head():
    tied = _model(tie_embeddings=True)
    untied = _model(tie_embeddings=False)
    assert tied.head is None
    assert untied.head is not None and untied.head.weight.shape == (V, 32)
    assert _n_params(untied) - _n_params(tied) == V * 32
    # the tied head really is the embedding matrix
    for m, W in ((tied, tied.embed.weight), (untied, untied.head.weight)):
        seen = {}
        hook = m.norm.register_forward_hook(lambda mod, inp, out: seen.update(h=out))
        with torch.no_grad():
            logits = m(_ids(1, 6)).logits_BTV
        hook.remove()
        torch.testing.assert_close(logits, seen["h"] @ W.t())


def test_parameter_count_formula():
    cfg = tiny(n_layers=2, moe_layers=[1], tie_embeddings=True)
    D, E = cfg.d_model, cfg.num_experts
    attn = 4 * D * D
    dense = 3 * D * cfg.d_ff
    moe = D * E + 3 * E * D * cfg.d_expert
    norms = 2 * D * 2 + D
    expected = V * D + 2 * attn + dense + moe + norms
    assert _n_params(Transformer(cfg)) == expected


@pytest.mark.parametrize("n_kv_heads,qkv_bias", [(None, False), (1, False), (2, True), (4, True)])
def test_parameter_count_with_grouped_query_attention(n_kv_heads, qkv_bias):
    cfg = tiny(n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, qkv_bias=qkv_bias, moe_layers="none")
    D, hd, G = cfg.d_model, cfg.d_model // 4, n_kv_heads or 4
    qkv_rows = (4 + 2 * G) * hd
    attn = qkv_rows * D + (qkv_rows if qkv_bias else 0) + D * D
    expected = V * D + 2 * (attn + 3 * D * cfg.d_ff + 2 * D) + D
    model = Transformer(cfg)
    assert _n_params(model) == expected
    assert model.blocks[0].attn.qkv.weight.shape == (qkv_rows, D)
    if qkv_bias:
        assert torch.equal(model.blocks[0].attn.qkv.bias, torch.zeros(qkv_rows))  # biases start at zero


def test_grouped_query_attention_equals_repeated_kv_heads():
    # GQA with G key/value heads is full attention whose k/v heads are repeated: query head h
    # reads key/value head h // (H / G).
    H, G = 4, 2
    gqa = _model(n_heads=H, n_kv_heads=G, qkv_bias=True, moe_layers="none").eval()
    with torch.no_grad():
        for blk in gqa.blocks:
            blk.attn.qkv.bias.normal_()
    mha = _model(n_heads=H, qkv_bias=True, moe_layers="none").eval()
    sd = gqa.state_dict()
    hd = 32 // H
    for i in range(2):
        for name in ("weight", "bias"):
            t = sd[f"blocks.{i}.attn.qkv.{name}"]
            q, k, v = t.split([H * hd, G * hd, G * hd])
            rep = [x.unflatten(0, (G, hd)).repeat_interleave(H // G, 0).flatten(0, 1) for x in (k, v)]
            sd[f"blocks.{i}.attn.qkv.{name}"] = torch.cat([q, *rep])
    mha.load_state_dict(sd)
    with torch.no_grad():
        ids = _ids(2, 11)
        torch.testing.assert_close(gqa(ids).logits_BTV, mha(ids).logits_BTV, rtol=0, atol=1e-5)


def test_tiny_model_overfits_fixed_batch():
    torch.manual_seed(0)
    model = Transformer(tiny(moe_layers="all"))
    seq = torch.randint(0, V, (4, 17), generator=torch.Generator().manual_seed(1))
    x, y = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    bal = BalancingConfig()
    t0 = time.time()
    first = None
    for step in range(150):
        loss, parts = training_loss(model(x), y, bal)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if first is None:
            first = parts["ce"].item()
        if parts["ce"].item() < 0.2 * first:
            break
    final = parts["ce"].item()
    assert first == pytest.approx(torch.log(torch.tensor(float(V))).item(), rel=0.1)
    assert final < 0.2 * first, (first, final, step)
    print(f"overfit: ce {first:.3f} -> {final:.3f} in {step + 1} steps, {time.time() - t0:.1f}s")


# ---------------------------------------------------------------- training_loss

def _out_and_labels(**kw):
    model = _model(**kw)
    ids = _ids(2, 9)
    return model(ids), _ids(2, 9, seed=5)


def test_training_loss_parts():
    out, labels = _out_and_labels()
    bal = BalancingConfig(lbl="micro_batch", lbl_coeff=0.3, z_loss_coeff=0.2)
    total, parts = training_loss(out, labels, bal)
    ce = lm_cross_entropy(out.logits_BTV, labels)
    lbl = sum(load_balancing_loss(a.probs_TE, a.counts_E, a.top_k) for a in out.moe_aux) / len(out.moe_aux)
    z = sum(router_z_loss(a.logits_TE) for a in out.moe_aux) / len(out.moe_aux)
    torch.testing.assert_close(parts["ce"], ce.detach())
    torch.testing.assert_close(parts["lbl"], lbl.detach())
    torch.testing.assert_close(parts["z_loss"], z.detach())
    torch.testing.assert_close(total, parts["ce"] + 0.3 * parts["lbl"] + 0.2 * parts["z_loss"])
    torch.testing.assert_close(parts["loss"], total.detach())
    assert total.requires_grad
    assert not any(v.requires_grad for v in parts.values())
    assert (total - parts["ce"]).item() > 0


def test_cross_entropy_is_plain_mean_nll():
    logits = torch.randn(2, 3, V)
    labels = torch.randint(0, V, (2, 3))
    nll = -torch.log_softmax(logits, -1).gather(-1, labels[..., None]).mean()
    torch.testing.assert_close(lm_cross_entropy(logits, labels), nll)


def test_training_loss_lbl_none_is_not_added():
    out, labels = _out_and_labels()
    total, parts = training_loss(out, labels, BalancingConfig(lbl="none", lbl_coeff=0.3, z_loss_coeff=0.2))
    torch.testing.assert_close(total, parts["ce"] + 0.2 * parts["z_loss"])
    assert "lbl" in parts  # still logged
    total0, parts0 = training_loss(out, labels, BalancingConfig(lbl="micro_batch", lbl_coeff=0.0,
                                                                z_loss_coeff=0.0))
    torch.testing.assert_close(total0, parts0["ce"])


def test_training_loss_without_moe_layers():
    out, labels = _out_and_labels(moe_layers="none")
    total, parts = training_loss(out, labels, BalancingConfig(lbl_coeff=0.3, z_loss_coeff=0.2))
    torch.testing.assert_close(total, parts["ce"])
    assert "lbl" not in parts and "z_loss" not in parts


def test_training_loss_counts_override():
    out, labels = _out_and_labels()
    E = 4
    uniform = [torch.full((E,), 5) for _ in out.moe_aux]
    _, parts = training_loss(out, labels, BalancingConfig(), counts_override=uniform)
    # with uniform f, E * sum_i f_i p_i = sum_i p_i = 1 whatever the probabilities
    assert parts["lbl"].item() == pytest.approx(1.0, abs=1e-6)
    _, local = training_loss(out, labels, BalancingConfig())
    assert local["lbl"].item() != pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("which", ["lbl_coeff", "z_loss_coeff"])
def test_aux_losses_reach_the_router(which):
    def router_grads(coeff):
        model = _model()
        bal = dataclasses.replace(BalancingConfig(lbl_coeff=0.0, z_loss_coeff=0.0), **{which: coeff})
        total, _ = training_loss(model(_ids(2, 9)), _ids(2, 9, seed=5), bal)
        total.backward()
        return [layer.router.weight.grad.clone() for layer in model.moe_layers()]

    for g0, g1 in zip(router_grads(0.0), router_grads(1.0)):
        assert (g1 - g0).abs().amax() > 1e-6
