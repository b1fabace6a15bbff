"""The expert strategies behind one interface: evaluation with fewer held-out batches than ranks
(no strategy may hang), ranks that measure different attention times still plan identically,
and every strategy exports the same full expert weights."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from parallel.testing import run_distributed

STRATEGIES = ["replicated", "ep", "fssdp", "deepspeed_moe"]


def _spec(tmp_path: Path, strategy: str, world: int) -> dict:
    from tests.helpers import tiny_spec

    return tiny_spec(tmp_path, run={"name": f"few-{strategy}"}, experts={"balancing": {"lbl": "none"}},
                     parallel={"world_size": world, "expert_strategy": strategy},
                     stages=[{"name": "pretrain", "steps": 1, "micro_batch_size": 2, "checkpoint_every": 1,
                              "eval_every": 1, "eval_batches": 2,  # 2 held-out batches per domain, 4 ranks
                              "optimizer": {"lr": 1e-3}, "lr_schedule": {"kind": "constant"}}])


def _run(rank: int, world: int, spec: dict) -> list[dict]:
    from jobs.stage_runner import run_stage
    from system.metrics import read_jsonl

    run_stage(spec, 0)
    return read_jsonl(Path(spec["run"]["output_dir"]) / spec["run"]["name"] / "metrics.jsonl") if rank == 0 else []


@pytest.mark.slow
def test_evaluation_with_fewer_batches_than_ranks(tmp_path):
    """4 ranks, 2 held-out batches per domain: ranks without a batch join every forward with a
    repeated one that is not counted (every strategy with collectives in its forward), so no
    strategy hangs, and the held-out loss before training is the same under each (the padding
    adds nothing to it)."""
    step0 = {}
    for strategy in STRATEGIES:
        recs = run_distributed(_run, 4, _spec(tmp_path, strategy, 4), timeout_s=240)[0]
        assert [r["step"] for r in recs] == [0, 1]
        for r in recs:
            losses = {k: v for k, v in r.items() if k.startswith("eval/") and k.endswith("/loss")}
            assert set(losses) == {"eval/english_docs/loss", "eval/python_code/loss"}, strategy
            assert all(math.isfinite(v) for v in losses.values())
        step0[strategy] = {k: v for k, v in recs[0].items() if k.endswith("/loss")}
    ref = step0["replicated"]
    for strategy in ("ep", "fssdp"):  # the same initial model, sharded
        for k, v in ref.items():
            assert step0[strategy][k] == pytest.approx(v, rel=1e-5), (strategy, k)


def _plans_worker(rank: int, world: int) -> dict:
    from experts.layer import MoELayer
    from parallel.placement import FSSDPPlanConfig
    from parallel.sharded_experts import shard_model

    torch.manual_seed(0)

    class _Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(MoELayer(16, 8, 2, 24) for _ in range(2))

        def moe_layers(self):
            return list(self.layers)

    cfg = FSSDPPlanConfig(window=2, overlap_budget=None, memory_cap=2, reshard_every=3, tolerance=0.0,
                          link_gbps=1.0)
    store = shard_model(_Holder(), "fssdp", cfg)
    # Each rank "measured" its own attention times: rank r's are (r+1)^3 times longer, so on
    # its own each would allow a different number of copies per layer.
    store._attn_times = [1e-4 * (rank + 1) ** 3] * 8
    own_budget = store.derive_budget()
    skew = torch.tensor([[400, 200, 100, 50, 20, 10, 5, 1], [1, 5, 10, 20, 50, 100, 200, 400]], dtype=torch.int64)
    prints = []
    for step in range(6):
        store.begin_iteration(step)
        prints.append(store.plan_fingerprint())
        store.observe(skew)
    return {"own_budget": own_budget, "agreed": store.t_budget, "prints": prints,
            "copies": len(store.plan.copies())}


@pytest.mark.procs
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_with_different_attention_times_build_identical_plans(world):
    res = run_distributed(_plans_worker, world, timeout_s=120)
    budgets = [r["own_budget"] for r in res]
    assert len(set(budgets)) > 1, budgets  # on their own, the ranks would plan differently
    assert all(r["agreed"] == min(budgets) for r in res)  # the all-reduced minimum
    assert all(r["prints"] == res[0]["prints"] for r in res)  # every iteration's plan, every rank
    assert res[0]["copies"] > 0  # the skew made copies worth planning


def _export_worker(rank: int, world: int, strategy: str) -> dict:
    from experts.config import ExpertsConfig
    from jobs.schema import ParallelSection
    from parallel.strategy import build_strategy
    from system.model import ModelConfig, Transformer

    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, moe_layers="all", num_experts=4, top_k=2,
                      d_expert=24, vocab_size=50)
    par = ParallelSection(world_size=world, expert_strategy=strategy)
    strat = build_strategy(par, 1 if strategy == "replicated" else world, 1.0)
    torch.manual_seed(3)
    model = Transformer(cfg, ExpertsConfig(), moe_factory=strat.moe_factory())
    strat.prepare(model)
    return {l: [t.clone() for t in ws] for l, ws in strat.full_expert_weights(model).items()}


@pytest.mark.procs
@pytest.mark.parametrize("strategy", ["ep", "fssdp", "deepspeed_moe"])
def test_full_expert_weights_equal_the_single_process_model(strategy):
    """On 2 ranks every rank assembles every expert, equal to the 1-rank model's (ours for
    ep/fssdp, DeepSpeed's layer for deepspeed_moe: it draws its own initialisation)."""
    ref = run_distributed(_export_worker, 1, "deepspeed_moe" if strategy == "deepspeed_moe" else "replicated")[0]
    for got in run_distributed(_export_worker, 2, strategy):
        assert got.keys() == ref.keys() == {0, 1}
        for l in ref:
            assert [t.shape for t in got[l]] == [(4, 16, 24), (4, 16, 24), (4, 24, 16)]
            for a, b in zip(got[l], ref[l]):
                assert torch.equal(a, b)


def test_zero_clip_threshold_reproduces_the_global_multiplier():
    """ZeRO 1/2: DeepSpeed multiplies its dense partitions by 1/clip, clip computed from the
    dense norm; the threshold the sharded strategy sets makes that multiplier the one the global
    (dense + expert) norm gives at grad_clip: bit for bit where a float32 threshold can express
    it (most steps), otherwise within two float32 ulps (DeepSpeed rounds the threshold to
    float32, so some multipliers are out of reach of any threshold)."""
    from parallel.sharded_strategy import _ds_multiplier, _matching_threshold

    g = torch.Generator().manual_seed(0)
    exact, n = 0, 2000
    for _ in range(n):
        dense = (torch.rand((), generator=g) * 20).to(torch.float32)
        expert_sq = float(torch.rand((), generator=g) * 50)
        max_norm = float(torch.tensor(float(torch.rand((), generator=g) * 3 + 0.05), dtype=torch.float32))
        total = torch.sqrt(dense.double() ** 2 + expert_sq).to(dense.dtype)
        got = _ds_multiplier(dense, 1.0, _matching_threshold(dense, total, 1.0, max_norm))
        want = _ds_multiplier(total, 1.0, max_norm)
        exact += bool(torch.equal(got, want))
        assert abs(float(got) - float(want)) <= 2.5e-7 * float(want), (float(got), float(want))
    assert exact >= 0.9 * n, exact
