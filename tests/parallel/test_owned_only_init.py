"""ep/fssdp ranks build only the experts they own (issue 16, "meta-device initialisation").

A stage that starts from its seed builds, on every rank, MoE layers whose `GroupedExperts` hold
only that rank's experts (`rows`); `reset_parameters` draws the full tensors one at a time and
keeps the rows, so the values are the full model's. Checked here: the values (single process,
every parameter, dense and expert), the resident expert bytes on 4 gloo ranks for ep (one group
of 4) and fssdp (EP x DP, 2 groups of 2) against each rank's share, and that a sharded model
built this way computes the loss of the full model.
"""
from __future__ import annotations

import pytest
import torch

from parallel.testing import run_distributed

E, L = 8, 2


def _cfg():
    from system.model import ModelConfig

    return ModelConfig(d_model=16, n_layers=L, n_heads=2, d_ff=32, moe_layers="all", num_experts=E, top_k=2,
                       d_expert=24, vocab_size=50)


def _build(rows=None, seed=3):
    from experts.config import ExpertsConfig
    from system.model import Transformer, default_moe_layer

    torch.manual_seed(seed)
    factory = None if rows is None else (lambda c, x: default_moe_layer(c, x, expert_rows=rows))
    return Transformer(_cfg(), ExpertsConfig(), moe_factory=factory)


def _score(model) -> float:
    torch.manual_seed(11)
    ids = torch.randint(0, 50, (2, 8))
    return model(ids).logits_BTV.float().logsumexp(-1).mean().item()  # a function of every expert's weights


def test_partial_experts_hold_the_full_models_values():
    full, part = _build(), _build(rows=[1, 4, 6])
    fp, pp = dict(full.named_parameters()), dict(part.named_parameters())
    assert fp.keys() == pp.keys()
    for name, p in pp.items():
        if ".experts." in name:
            assert p.shape[0] == 3 and fp[name].shape[0] == E
            torch.testing.assert_close(p, fp[name][[1, 4, 6]], rtol=0, atol=0)
        else:  # every dense parameter drew the same numbers after the experts' full draws
            torch.testing.assert_close(p, fp[name], rtol=0, atol=0)
    ex = part.moe_layers()[0].experts
    assert ex.partial and ex.rows == [1, 4, 6]
    with pytest.raises(RuntimeError, match="hold only experts"):
        ex(torch.zeros(2, 16), torch.tensor([2] + [0] * 7))


def _dense_source(n_experts=None) -> dict:
    """A state dict in our naming: a dense model (n_experts None) or a one-expert MoE model."""
    from dataclasses import replace

    from experts.config import ExpertsConfig
    from system.model import Transformer

    cfg = _cfg()
    cfg = replace(cfg, moe_layers="none", d_ff=cfg.d_expert) if n_experts is None else replace(cfg, num_experts=n_experts, top_k=1)
    torch.manual_seed(9)
    return Transformer(cfg, ExpertsConfig()).state_dict()


@pytest.mark.parametrize("source", ["same_experts", "dense", "one_expert"])
def test_init_from_fills_only_the_owned_rows(source):
    """With init_from, ranks build only their experts too: loading a checkpoint of the same
    shape, sparse upcycling from a dense FFN and EvoMoE's one-expert diversification give a
    partial layer exactly the full load's rows (the diversification draws all E on every rank)."""
    from system.upcycle import init_model_from

    if source == "same_experts":
        src = _build(seed=21).state_dict()
    else:
        src = _dense_source(None if source == "dense" else 1)
    rows = [0, 5]
    full, part = _build(), _build(rows=rows)
    rep_full = init_model_from(full, src, seed=4)
    rep = init_model_from(part, src, seed=4)
    assert rep["upcycled_layers"] == rep_full["upcycled_layers"] and rep["num_experts"] == rep_full["num_experts"]
    assert bool(rep["upcycled_layers"]) == (source != "same_experts")
    fp = dict(full.named_parameters())
    for name, p in part.named_parameters():
        want = fp[name][rows] if ".experts." in name else fp[name]
        assert p.shape == want.shape and torch.equal(p, want), name
    bad = {k: (v[:3] if k.endswith("experts.w1") else v) for k, v in _build(seed=21).state_dict().items()}
    with pytest.raises(ValueError, match=r"experts\.w1.*\(3, 16, 24\).*\(8, 16, 24\)"):
        init_model_from(_build(rows=rows), bad)  # shapes are compared with the full layer's


def test_bad_rows_are_refused():
    from experts.layer import GroupedExperts

    for rows in ([3, 1], [1, 1], [8], [-1]):
        with pytest.raises(ValueError, match="rows="):
            GroupedExperts(E, 16, 24, rows=rows)


def _worker(rank: int, world: int, strategy: str, P: int) -> dict:
    from jobs.schema import ParallelSection
    from parallel.strategy import build_strategy

    par = ParallelSection(world_size=world, expert_strategy=strategy, expert_parallel_size=P)
    strat = build_strategy(par, P, 1.0)
    strat.build_owned_only = True
    from experts.config import ExpertsConfig
    from system.model import Transformer

    torch.manual_seed(3)
    model = Transformer(_cfg(), ExpertsConfig(), moe_factory=strat.moe_factory())
    built = {n: p.shape[0] for n, p in model.named_parameters() if ".experts." in n}
    strat.prepare(model)
    st = strat.store
    owned = {l: [e for e in range(E) if st.owner(l, e) == st.rank] for l in range(L)}
    rows = {(l, e): [getattr(st, w)[st.slot(l, e)].clone() for w in ("w1", "w3", "w2")]
            for l in range(L) for e in owned[l]}
    resident = sum(t.numel() * t.element_size() for t in (st.w1, st.w3, st.w2))
    strat.begin_step(0)
    with torch.no_grad():  # every rank the same tokens: each computes the full model's output
        loss = _score(model)
    return {"built": built, "owned": owned, "rows": rows, "resident": resident, "loss": loss}


@pytest.mark.procs
@pytest.mark.parametrize("strategy, P", [("ep", 4), ("fssdp", 2)])
def test_each_rank_materializes_its_share(strategy, P):
    full = _build()
    ref_w = {l: [getattr(full.moe_layers()[l].experts, w).detach() for w in ("w1", "w3", "w2")] for l in range(L)}
    share = L * (E // P) * 3 * 16 * 24 * 4  # L layers x E/P experts x 3 fp32 matrices
    res = run_distributed(_worker, 4, strategy, P, timeout_s=240)
    for r in res:
        assert set(r["built"].values()) == {E // P}  # the model never held another rank's experts
        assert r["resident"] == share
        for (l, e), ws in r["rows"].items():
            for got, ref in zip(ws, ref_w[l]):
                torch.testing.assert_close(got, ref[e], rtol=0, atol=0)
    # the experts of every layer are owned once per group, and every group owns all of them
    for g in range(4 // P):
        for l in range(L):
            assert sorted(e for r in res[g * P:(g + 1) * P] for e in r["owned"][l]) == list(range(E))
    with torch.no_grad():
        ref = _score(full)
    assert all(r["loss"] == pytest.approx(ref, rel=1e-5) for r in res)
