"""Model features the Hugging Face families need (QK-norm, head_dim, shared experts, layer
layouts) and activation checkpointing: gradients identical to no checkpointing, every strategy."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from experts.config import ExpertsConfig
from parallel.testing import run_distributed
from system.model import ModelConfig, Transformer

CFG = ModelConfig(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=40, moe_layers=[0, 2], num_experts=4,
                  top_k=2, d_expert=24, vocab_size=64, head_dim=12, qk_norm="head", d_shared=16,
                  shared_expert_gate=True, tie_embeddings=False)


def _ids(B=2, T=9, seed=0):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def test_feature_shapes():
    m = Transformer(CFG)
    b0 = m.blocks[0]
    assert tuple(b0.attn.qkv.weight.shape) == ((4 + 2 * 2) * 12, 32)
    assert tuple(b0.attn.proj.weight.shape) == (32, 4 * 12)
    assert tuple(b0.attn.q_norm.weight.shape) == (12,) and tuple(b0.attn.k_norm.weight.shape) == (12,)
    assert b0.shared is not None and tuple(b0.shared.w1.weight.shape) == (16, 32) and b0.shared_gate is not None
    assert m.blocks[1].shared is None and not m.blocks[1].is_moe
    full = Transformer(replace(CFG, qk_norm="full"))
    assert tuple(full.blocks[0].attn.q_norm.weight.shape) == (48,)
    assert tuple(full.blocks[0].attn.k_norm.weight.shape) == (24,)
    assert list(m(_ids()).logits_BTV.shape) == [2, 9, 64]


def test_defaults_build_the_same_model_as_before():
    """The new fields off: the same parameters, in the same order, drawn from the same RNG."""
    base = ModelConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=64)
    torch.manual_seed(0)
    names = [n for n, _ in Transformer(base).named_parameters()]
    assert not any("norm.weight" in n and "attn." in n for n in names)
    assert not any(".shared" in n for n in names)


def test_config_checks():
    bad = dict(ModelConfig(head_dim=7, d_shared=-1).check())
    assert "head_dim" in bad and "d_shared" in bad
    assert "shared_expert_gate" in dict(ModelConfig(shared_expert_gate=True).check())
    assert "n_heads" not in dict(ModelConfig(d_model=30, n_heads=4, head_dim=8).check())


def _grads(cfg: ModelConfig, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    m = Transformer(cfg)
    out = m(ids)
    loss = out.logits_BTV.float().logsumexp(-1).mean() + sum(a.probs_TE.pow(2).mean() for a in out.moe_aux)
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "moe"])
@pytest.mark.parametrize("qk", ["head", "full"])
def test_activation_checkpointing_gives_identical_gradients(mode, qk):
    cfg = replace(CFG, qk_norm=qk)
    ref = _grads(cfg, _ids())
    got = _grads(replace(cfg, activation_checkpointing=mode), _ids())
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def _strategy_grads(rank: int, world: int, strategy: str, mode: str) -> dict:
    from jobs.schema import ParallelSection
    from parallel.strategy import build_strategy

    cfg = replace(CFG, activation_checkpointing=mode, head_dim=None, qk_norm="none", n_kv_heads=None)
    if strategy == "deepspeed_moe":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    par = ParallelSection(world_size=world, expert_strategy=strategy)
    strat = build_strategy(par, world, 0.0)
    torch.manual_seed(3)
    model = Transformer(cfg, ExpertsConfig(), moe_factory=strat.moe_factory())
    strat.prepare(model)
    out = model(_ids(seed=10 + rank))
    loss = out.logits_BTV.float().logsumexp(-1).mean() + sum(a.probs_TE.pow(2).mean() for a in out.moe_aux)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    store = getattr(strat, "store", None)
    if store is not None:
        for i, p in enumerate(store.params()):
            grads[f"store.{i}"] = p.grad.clone()
    return grads


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ep", "fssdp", "deepspeed_moe"])
def test_activation_checkpointing_on_every_strategy(strategy):
    """2 gloo ranks: each rank's local gradients (dense and its experts') are bit-identical with
    and without checkpointing; the communication in the MoE layer is not redone."""
    ref = run_distributed(_strategy_grads, 2, strategy, "none", timeout_s=180)
    for mode in ("full", "moe"):
        got = run_distributed(_strategy_grads, 2, strategy, mode, timeout_s=180)
        for r, g in zip(ref, got):
            assert r.keys() == g.keys() and len(r) > 10
            for k in r:
                assert torch.equal(r[k], g[k]), (strategy, mode, k)
