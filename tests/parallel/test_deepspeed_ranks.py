"""DeepSpeed training on 2 and 4 gloo ranks equals the single-process run on the same global batch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parallel.testing import run_distributed
from tests.helpers import tiny_spec

GLOBAL_BATCH = 8


def _run_stage(rank: int, world: int, spec: dict) -> list[dict]:
    from jobs.stage_runner import run_stage
    from system.metrics import read_jsonl

    run_stage(spec, 0)
    if rank != 0:
        return []
    return read_jsonl(Path(spec["run"]["output_dir"]) / spec["run"]["name"] / "metrics.jsonl")


def _spec(tmp_path: Path, world: int, zero: int, name: str) -> dict:
    # Micro-batch LBL depends on the micro-batch by design; leave it out so the objective
    # (mean CE + z-loss over the global batch) is the same on every world size.
    return tiny_spec(tmp_path, run={"name": name},
                     experts={"balancing": {"lbl": "none"}},
                     parallel={"world_size": world, "zero_stage": zero},
                     stages=[{"name": "pretrain", "steps": 3, "micro_batch_size": GLOBAL_BATCH // world,
                              "checkpoint_every": 3, "optimizer": {"lr": 1e-3},
                              "lr_schedule": {"kind": "constant"}}])


def _final_weights(spec: dict) -> dict[str, torch.Tensor]:
    from system.checkpoint import latest_checkpoint, load_module_weights

    root = Path(spec["run"]["output_dir"]) / spec["run"]["name"] / "stages" / "pretrain" / "checkpoints"
    return load_module_weights(latest_checkpoint(root))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    spec = _spec(tmp, 1, 0, "ref")
    records = run_distributed(_run_stage, 1, spec)[0]
    return records, _final_weights(spec)


@pytest.mark.slow
@pytest.mark.parametrize("world,zero", [(2, 0), (2, 1), (4, 2)])
def test_multi_rank_matches_single_process(tmp_path, reference, world, zero):
    ref_records, ref_w = reference
    spec = _spec(tmp_path, world, zero, f"w{world}z{zero}")
    records = run_distributed(_run_stage, world, spec)[0]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r, q in zip(records, ref_records):
        assert r["tokens"] == q["tokens"]
        assert r["ce"] == pytest.approx(q["ce"], rel=1e-5, abs=1e-6)
        assert r["z_loss"] == pytest.approx(q["z_loss"], rel=1e-4)
        assert r["grad_norm"] == pytest.approx(q["grad_norm"], rel=1e-4)
        # The global expert counts are the same tokens routed by the same weights.
        assert r["moe/0/tokens_per_expert"] == q["moe/0/tokens_per_expert"]
    w = _final_weights(spec)
    assert w.keys() == ref_w.keys()
    for k in w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    moved = max((w[k] - v).abs().max().item() for k, v in _initial_weights(spec).items())
    assert moved > 1e-4  # training changed the weights, so the comparison above means something


def _initial_weights(spec: dict) -> dict[str, torch.Tensor]:
    from jobs.plan import plan_job
    from jobs.spec import parse_spec
    from jobs.stage_runner import build_model

    torch.manual_seed(parse_spec(spec).run.seed)
    m = build_model(plan_job(parse_spec(spec)).stages[0], 257)
    return {k: v.detach() for k, v in m.state_dict().items()}


@pytest.mark.slow
def test_two_rank_loss_falls(tmp_path):
    spec = tiny_spec(tmp_path, run={"name": "falls"}, parallel={"world_size": 2, "zero_stage": 1},
                     stages=[{"name": "pretrain", "steps": 30, "micro_batch_size": 4, "checkpoint_every": 30,
                              "optimizer": {"lr": 1e-2}, "lr_schedule": {"kind": "cosine", "warmup_steps": 3}}])
    records = run_distributed(_run_stage, 2, spec)[0]
    first = sum(r["ce"] for r in records[:3]) / 3
    last = sum(r["ce"] for r in records[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert all(r["lbl"] > 0 and r["z_loss"] > 0 for r in records)


# -- global-batch LBL and aux-loss-free biases through the real trainer and DeepSpeed engine --
_GLOBAL_BAL = {"lbl": "global_batch", "global_accumulation": "exact", "lbl_coeff": 0.1,
               "aux_free": True, "bias_update_rate": 0.01}


def _global_spec(tmp_path: Path, world: int, accum: int, name: str) -> dict:
    return tiny_spec(tmp_path, run={"name": name},
                     experts={"balancing": _GLOBAL_BAL},
                     parallel={"world_size": world, "zero_stage": 1 if world > 1 else 0},
                     stages=[{"name": "pretrain", "steps": 3, "micro_batch_size": GLOBAL_BATCH // (world * accum),
                              "grad_accum_steps": accum, "checkpoint_every": 3, "optimizer": {"lr": 1e-3},
                              "lr_schedule": {"kind": "constant"}}])


@pytest.mark.slow
def test_global_batch_lbl_and_aux_free_bias_match_single_process(tmp_path):
    """2 ranks x 2 micro-batches with exact global-batch LBL and aux-loss-free biases follow the
    single-process run on the same global batch: LBL value, grad norm, biases, final weights."""
    ref_spec = _global_spec(tmp_path / "ref", 1, 1, "gref")
    ref = run_distributed(_run_stage, 1, ref_spec)[0]
    spec = _global_spec(tmp_path / "dist", 2, 2, "gdist")
    records = run_distributed(_run_stage, 2, spec)[0]
    for r, q in zip(records, ref):
        assert r["lbl"] == pytest.approx(q["lbl"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(q["grad_norm"], rel=1e-4)
        assert r["moe/0/tokens_per_expert"] == q["moe/0/tokens_per_expert"]
        assert r["moe/0/bias_spread"] == pytest.approx(q["moe/0/bias_spread"])
    assert records[-1]["moe/0/bias_spread"] > 0  # the biases moved
    w, ref_w = _final_weights(spec), _final_weights(ref_spec)
    bias_keys = [k for k in w if k.endswith("expert_bias")]
    assert bias_keys and all(w[k].abs().sum() > 0 for k in bias_keys)  # checkpointed
    for k in w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
