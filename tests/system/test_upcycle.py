"""Sparse upcycling and expert diversification: pure functions and loading our own checkpoints."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from experts.config import ExpertsConfig, RouterConfig
from system.model import ModelConfig, Transformer
from system.upcycle import UpcycleConfig, diversify_experts, init_model_from, num_reinit_units

V = 40


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24, num_experts=4, top_k=2,
                d_expert=24, moe_layers="all")
    base.update(kw)
    return ModelConfig(**base)


def _model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**kw), ExpertsConfig(router=RouterConfig(normalize_topk=True))).eval()


def _ids(B=2, T=9, seed=0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids=None):
    with torch.no_grad():
        return model(_ids() if ids is None else ids).logits_BTV


def _ffn(D=32, F=48, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(D, F, generator=g) * 0.05 + 0.01
    w3 = torch.randn(D, F, generator=g) * 0.03 - 0.02
    w2 = torch.randn(F, D, generator=g) * 0.02
    return w1.to(dtype), w3.to(dtype), w2.to(dtype)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- UpcycleConfig

@pytest.mark.parametrize("kw,key", [
    (dict(fraction=-0.1), "fraction"), (dict(fraction=1.5), "fraction"), (dict(noise_std=-1.0), "noise_std"),
    (dict(noise_std=float("nan")), "noise_std"), (dict(seed=-1), "seed"),
])
def test_upcycle_config_check(kw, key):
    assert list(UpcycleConfig().check()) == []
    assert [k for k, _ in UpcycleConfig(**kw).check()] == [key]


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="fraction"):
        diversify_experts(*_ffn(), 4, UpcycleConfig(diversify="mask", fraction=2.0), _gen())
    with pytest.raises(ValueError, match="diversify"):
        diversify_experts(*_ffn(), 4, UpcycleConfig(diversify="drop"), _gen())
    with pytest.raises(ValueError, match="noise_std"):
        init_model_from(_model(), {}, UpcycleConfig(noise_std=-1.0), seed=0)


# ---------------------------------------------------------------- diversify_experts

def test_copy_makes_exact_copies():
    w1, w3, w2 = _ffn()
    e1, e3, e2 = diversify_experts(w1, w3, w2, 5, UpcycleConfig(diversify="copy"), _gen())
    assert e1.shape == (5, 32, 48) and e3.shape == (5, 32, 48) and e2.shape == (5, 48, 32)
    for e in range(5):
        assert torch.equal(e1[e], w1) and torch.equal(e3[e], w3) and torch.equal(e2[e], w2)


def _changed_units(e1, e3, e2, w1, w3, w2):
    c1 = (e1 != w1).any(dim=0)  # (F,) hidden units whose w1 column changed
    c3 = (e3 != w3).any(dim=0)
    c2 = (e2 != w2).any(dim=1)
    return c1, c3, c2


@pytest.mark.parametrize("fraction", [0.5, 0.3, 1.0])
@pytest.mark.parametrize("keep_first", [True, False])
def test_mask_reinitialises_a_fraction_of_hidden_units(fraction, keep_first):
    F = 48
    w1, w3, w2 = _ffn(F=F)
    cfg = UpcycleConfig(diversify="mask", fraction=fraction, keep_first=keep_first)
    e1, e3, e2 = diversify_experts(w1, w3, w2, 4, cfg, _gen(1))
    n = num_reinit_units(F, fraction)
    assert n == round(fraction * F)
    masks = []
    for e in range(4):
        c1, c3, c2 = _changed_units(e1[e], e3[e], e2[e], w1, w3, w2)
        if e == 0 and keep_first:
            assert not c1.any() and not c3.any() and not c2.any()
            continue
        assert int(c1.sum()) == n
        # the same hidden units in all three matrices, whole columns / rows
        assert torch.equal(c1, c3) and torch.equal(c1, c2)
        assert (e1[e][:, c1] != w1[:, c1]).all() and (e2[e][c2] != w2[c2]).all()
        # kept units are bit-exact copies
        assert torch.equal(e1[e][:, ~c1], w1[:, ~c1]) and torch.equal(e2[e][~c2], w2[~c2])
        masks.append(c1)
    for a in range(1, 4):
        for b in range(a):
            assert not torch.equal(e1[a], e1[b])  # copies differ from each other
    if fraction < 1.0:
        assert len({tuple(m.tolist()) for m in masks}) > 1  # different units per copy


def test_mask_draws_from_the_original_statistics():
    D, F = 64, 256
    w1, w3, w2 = _ffn(D, F)
    e1, e3, e2 = diversify_experts(w1, w3, w2, 3, UpcycleConfig(diversify="mask", fraction=0.5), _gen(2))
    for ex, w in ((e1[1], w1), (e3[2], w3)):
        new = ex[:, (ex != w).any(dim=0)]
        assert new.mean().item() == pytest.approx(w.mean().item(), abs=0.1 * w.std().item())
        assert new.std().item() == pytest.approx(w.std().item(), rel=0.05)
    new = e2[1][(e2[1] != w2).any(dim=1)]
    assert new.std().item() == pytest.approx(w2.std().item(), rel=0.05)


def test_mask_with_zero_fraction_copies():
    w = _ffn()
    out = diversify_experts(*w, 3, UpcycleConfig(diversify="mask", fraction=0.0), _gen())
    for t, src in zip(out, w):
        assert all(torch.equal(t[e], src) for e in range(3))


@pytest.mark.parametrize("noise_std", [0.01, 0.2])
def test_noise_has_the_requested_relative_std(noise_std):
    D, F = 64, 256
    w1, w3, w2 = _ffn(D, F)
    e1, e3, e2 = diversify_experts(w1, w3, w2, 3, UpcycleConfig(diversify="noise", noise_std=noise_std), _gen(3))
    for ex, w in ((e1, w1), (e3, w3), (e2, w2)):
        assert torch.equal(ex[0], w)  # keep_first
        for e in (1, 2):
            rel = ((ex[e] - w).std() / w.std()).item()
            assert rel == pytest.approx(noise_std, rel=0.05)
            assert (ex[e] - w).mean().abs().item() < 0.05 * noise_std * w.std().item()
        assert not torch.equal(ex[1], ex[2])


def test_diversify_is_deterministic_in_the_generator_and_keeps_dtype():
    w = _ffn(dtype=torch.bfloat16)
    cfg = UpcycleConfig(diversify="mask", fraction=0.25)
    a = diversify_experts(*w, 4, cfg, _gen(5))
    b = diversify_experts(*w, 4, cfg, _gen(5))
    c = diversify_experts(*w, 4, cfg, _gen(6))
    assert all(t.dtype == torch.bfloat16 for t in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_diversify_rejects_inconsistent_shapes():
    w1, w3, w2 = _ffn()
    with pytest.raises(ValueError, match="shapes"):
        diversify_experts(w1, w3, w2.t(), 4, UpcycleConfig(), _gen())


# ---------------------------------------------------------------- init_model_from: our own weights

def test_dense_state_dict_upcycles_to_equal_logits():
    dense = _model(seed=1, moe_layers="none")
    moe = _model(seed=2)
    routers = [m.router.weight.clone() for m in moe.moe_layers()]
    report = init_model_from(moe, dense.state_dict(), UpcycleConfig(), seed=0)
    assert report["kind"] == "state_dict"
    assert report["upcycled_layers"] == {"0": "dense", "1": "dense"}
    assert report["num_experts"] == {"0": 4, "1": 4}
    json.dumps(report)  # JSON-able, for the manifest
    for layer, r in zip(moe.moe_layers(), routers):
        assert torch.equal(layer.router.weight, r)
        assert torch.equal(layer.expert_bias, torch.zeros(4))
    blk = dense.blocks[1].ffn
    ex = moe.blocks[1].ffn.experts
    for e in range(4):
        assert torch.equal(ex.w1[e], blk.w1.weight.t()) and torch.equal(ex.w2[e], blk.w2.weight.t())
    torch.testing.assert_close(_logits(moe), _logits(dense), rtol=0, atol=1e-5)


def test_partial_moe_layers_and_diversification_seed():
    dense = _model(seed=1, moe_layers="none")
    a, b, c = (_model(seed=s, moe_layers=[1]) for s in (2, 3, 4))
    cfg = UpcycleConfig(diversify="mask", fraction=0.5)
    ra = init_model_from(a, dense.state_dict(), cfg, seed=11)
    init_model_from(b, dense.state_dict(), cfg, seed=11)
    init_model_from(c, dense.state_dict(), replace(cfg, seed=12), seed=11)
    assert ra["upcycled_layers"] == {"1": "dense"} and ra["seed"] == 11
    assert "blocks.0.ffn.w1.weight" in ra["loaded"]
    assert torch.equal(a.blocks[0].ffn.w1.weight, dense.blocks[0].ffn.w1.weight)
    assert torch.equal(a.blocks[1].ffn.experts.w1, b.blocks[1].ffn.experts.w1)  # same seed, same experts
    assert not torch.equal(a.blocks[1].ffn.experts.w1, c.blocks[1].ffn.experts.w1)  # upcycle.seed wins


def test_one_expert_moe_spawns_experts():
    one = _model(seed=1, num_experts=1, top_k=1)
    target = _model(seed=2)
    routers = [m.router.weight.clone() for m in target.moe_layers()]
    report = init_model_from(target, one.state_dict(), UpcycleConfig(), seed=0)
    assert report["upcycled_layers"] == {"0": "moe_1_expert", "1": "moe_1_expert"}
    for src, dst, r in zip(one.moe_layers(), target.moe_layers(), routers):
        assert dst.experts.w1.shape == (4, 32, 24)
        for e in range(4):
            assert torch.equal(dst.experts.w3[e], src.experts.w3[0])
        assert torch.equal(dst.router.weight, r)
    torch.testing.assert_close(_logits(target), _logits(one), rtol=0, atol=1e-5)


def test_same_expert_count_loads_as_is_and_missing_expert_bias_is_fine():
    src = _model(seed=1)
    sd = src.state_dict()
    with torch.no_grad():
        sd["blocks.1.ffn.expert_bias"] = torch.tensor([0.1, -0.2, 0.0, 0.3])
    del sd["blocks.0.ffn.expert_bias"]  # an older checkpoint, before the buffer existed
    target = _model(seed=2)
    report = init_model_from(target, sd, UpcycleConfig(diversify="mask"), seed=0)
    assert report["moe_layers_loaded"] == [0, 1] and report["upcycled_layers"] == {}
    assert report["kept_init"] == ["blocks.0.ffn.expert_bias"]
    assert torch.equal(target.blocks[0].ffn.expert_bias, torch.zeros(4))
    assert torch.equal(target.blocks[1].ffn.expert_bias, sd["blocks.1.ffn.expert_bias"])
    for a, b in zip(src.moe_layers(), target.moe_layers()):
        assert torch.equal(a.router.weight, b.router.weight) and torch.equal(a.experts.w2, b.experts.w2)


def test_moeforge_checkpoint_directory(tmp_path):
    dense = _model(seed=1, moe_layers="none")
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    torch.save({"module": dense.state_dict()}, ckpt / "mp_rank_00_model_states.pt")
    (ckpt / "moeforge.json").write_text(json.dumps({"spec": {"model": {"moe_layers": "none"}}, "final": True}))
    (tmp_path / "checkpoints" / "latest").write_text(ckpt.name)
    for src in (ckpt, tmp_path):  # a checkpoint, or a root holding them
        moe = _model(seed=2)
        report = init_model_from(moe, src, UpcycleConfig(), seed=0)
        assert report["kind"] == "moeforge" and report["source"] == str(ckpt)
        torch.testing.assert_close(_logits(moe), _logits(dense), rtol=0, atol=1e-5)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="neither a moeforge checkpoint nor a Hugging Face"):
        init_model_from(_model(), tmp_path, UpcycleConfig(), seed=0)
    with pytest.raises(ValueError, match="does not exist"):
        init_model_from(_model(), tmp_path / "nope", UpcycleConfig(), seed=0)


def _edit(sd, **changes):
    sd = dict(sd)
    for k, v in changes.items():
        k = k.replace("__", ".")
        if v is None:
            del sd[k]
        else:
            sd[k] = v
    return sd


@pytest.mark.parametrize("make_source,target_kw,words", [
    # an MoE source with E_src > 1 and != E
    (lambda: _model(seed=1, num_experts=2, top_k=1).state_dict(), {},
     ["blocks.0.ffn.experts.w1", "(2, 32, 24)", "(4, 32, 24)"]),
    # dense -> MoE needs d_ff(source) == d_expert(target)
    (lambda: _model(seed=1, moe_layers="none", d_ff=48).state_dict(), {},
     ["blocks.0.ffn.w1.weight", "d_ff", "d_expert", "(48, 32)"]),
    # a dense target layer whose source is MoE
    (lambda: _model(seed=1).state_dict(), dict(moe_layers="none"), ["blocks.0.ffn", "dense", "MoE"]),
    # a different d_model
    (lambda: _model(seed=1, d_model=48, moe_layers="none").state_dict(), dict(moe_layers="none"),
     ["(40, 48)", "(40, 32)"]),
    # a different vocabulary
    (lambda: _model(seed=1, vocab_size=V + 8).state_dict(), {}, ["embed.weight", "(48, 32)", "(40, 32)"]),
    # grouped-query vs full attention
    (lambda: _model(seed=1, n_kv_heads=4).state_dict(), {}, ["blocks.0.attn.qkv.weight", "n_kv_heads"]),
    # a missing key
    (lambda: _edit(_model(seed=1).state_dict(), norm__weight=None), {}, ["norm.weight", "missing"]),
    # an extra key (biases the target does not have)
    (lambda: _model(seed=1, qkv_bias=True).state_dict(), {}, ["blocks.0.attn.qkv.bias", "qkv_bias"]),
    # a missing layer
    (lambda: _model(seed=1, n_layers=1).state_dict(), {}, ["blocks.1."]),
])
def test_incompatible_sources_raise_naming_the_key(make_source, target_kw, words):
    target = _model(seed=2, **target_kw)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError) as ei:
        init_model_from(target, make_source(), UpcycleConfig(), seed=0)
    msg = str(ei.value)
    for w in words:
        assert w in msg, msg
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was written
