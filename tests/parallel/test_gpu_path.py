"""The GPU path, checked on CPU: the worker's device choice, the process group bound to it, and
bf16 training whose dense gradients accumulate and reduce in fp32 under ZeRO 1/2 with DeepSpeed's
ZeRO optimizer (what ep/fssdp clipping and the non-finite-step skip reach into). DeepSpeed's CPU
accelerator supports bf16, so the bf16 runs below are real DeepSpeed runs on 2 gloo ranks."""
from __future__ import annotations

import contextlib
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from jobs.plan import plan_job
from jobs.spec import parse_spec
from jobs.stage_runner import worker_device
from parallel import dist as pdist
from parallel.engine import ZERO_OPTIMIZER_INTERFACE, deepspeed_config
from parallel.testing import run_distributed
from tests.helpers import tiny_spec

BF16 = {"bf16": {"enabled": True}}


# -- the device ---------------------------------------------------------------------------------
def test_worker_device_is_cpu_without_gpus(monkeypatch):
    assert worker_device(False) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert worker_device(True) == torch.device("cpu")  # use_gpu on a machine without CUDA


def test_worker_device_outside_ray_is_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False))
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert worker_device(True) == torch.device("cuda", 1)
    assert worker_device(False) == torch.device("cpu")


def test_worker_device_in_a_ray_worker_is_rays(monkeypatch):
    """Ray's GPU for the worker (an index into its CUDA_VISIBLE_DEVICES), not LOCAL_RANK."""
    import ray
    import ray.train.torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cuda", 3))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert worker_device(True) == torch.device("cuda", 3)


def test_binding_is_a_no_op_on_cpu():
    pdist.bind_device(torch.device("cpu"))
    assert pdist.eager_connect(torch.device("cpu")) is False


# -- the generated DeepSpeed config ---------------------------------------------------------------
def _stage(tmp_path, zero: int):
    spec = tiny_spec(tmp_path, parallel={"zero_stage": zero})
    return plan_job(parse_spec(spec, preflight=False)).stages[0]


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_bf16_config_reduces_in_fp32_and_accumulates_in_fp32_under_zero(tmp_path, zero):
    st = _stage(tmp_path, zero)
    fp32 = deepspeed_config(st, st.parallel, {}, 1, on_gpu=False)
    assert "bf16" not in fp32 and "data_types" not in fp32 and "communication_data_type" not in fp32
    cfg = deepspeed_config(st, st.parallel, BF16, 1, on_gpu=False)
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["communication_data_type"] == "fp32"
    if zero:
        assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    else:  # DeepSpeed refuses fp32 accumulation of bf16 gradients without ZeRO
        assert "data_types" not in cfg


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_zero_overlaps_its_gradient_reduction_on_gpu_only(tmp_path, zero):
    st = _stage(tmp_path, zero)
    gpu = deepspeed_config(st, st.parallel, {}, 2, on_gpu=True)
    assert gpu["zero_optimization"].get("overlap_comm", False) is (zero in (1, 2))
    assert "overlap_comm" not in deepspeed_config(st, st.parallel, {}, 2, on_gpu=False)["zero_optimization"]
    off = deepspeed_config(st, st.parallel, {"zero_optimization": {"overlap_comm": False}}, 2, on_gpu=True)
    assert off["zero_optimization"]["overlap_comm"] is False  # the spec's passthrough wins


def test_passthrough_dtypes_win(tmp_path):
    st = _stage(tmp_path, 1)
    cfg = deepspeed_config(st, st.parallel, {**BF16, "data_types": {"grad_accum_dtype": "bf16"},
                                             "communication_data_type": "bf16"}, 1, on_gpu=False)
    assert cfg["data_types"] == {"grad_accum_dtype": "bf16"} and cfg["communication_data_type"] == "bf16"


# -- ZeRO 1: DeepSpeed's ZeRO optimizer instead of BF16_Optimizer, with the same numbers ----------
def _tiny_engine(rank: int, world: int, zero: int, keep_zero_optimizer: bool, precast: bool = False) -> dict:
    import deepspeed

    from parallel.engine import _zero_optimizer_at_stage1, cast_like_engine, grad_accum_dtype, with_fp32_gradients

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    if precast:  # what a GPU stage does before moving the model: DeepSpeed must find nothing left to cast
        assert cast_like_engine(model, torch.bfloat16, keep_experts=False) == 4
    from deepspeed.runtime.engine import DeepSpeedEngine

    left, cast = [], DeepSpeedEngine._cast_module_mixed_precision

    def spy(self, *a, **k):  # what DeepSpeed still had to cast
        left.append(sum(p.dtype != torch.bfloat16 for p in self.module.parameters()))
        return cast(self, *a, **k)

    DeepSpeedEngine._cast_module_mixed_precision = spy
    cfg = with_fp32_gradients({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                               "train_batch_size": 4 * world, "gradient_clipping": 0.05,
                               "zero_optimization": {"stage": zero}, "zero_allow_untested_optimizer": True,
                               "steps_per_print": 1 << 30, **BF16}, zero)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with _zero_optimizer_at_stage1() if keep_zero_optimizer else contextlib.nullcontext():
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
    g = torch.Generator().manual_seed(rank)
    norms = []
    for _ in range(3):
        for _ in range(2):
            engine.backward(engine(torch.randn(2, 16, generator=g).bfloat16()).float().pow(2).mean())
            engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    return {"cls": type(engine.optimizer).__name__, "accum": grad_accum_dtype(engine),
            "comm": engine.communication_data_type, "norms": norms,
            "interface": [a for a in ZERO_OPTIMIZER_INTERFACE if hasattr(engine.optimizer, a)],
            "left_to_cast": left,
            "weights": [p.detach().float().clone() for p in model.parameters()]}


@pytest.mark.slow
def test_zero1_bf16_keeps_the_zero_optimizer_with_bf16_optimizers_numbers():
    ours = run_distributed(_tiny_engine, 2, 1, True)[0]
    theirs = run_distributed(_tiny_engine, 2, 1, False)[0]
    zero2 = run_distributed(_tiny_engine, 2, 2, True)[0]
    precast = run_distributed(_tiny_engine, 2, 1, True, True)[0]
    assert ours["left_to_cast"] == [4] and precast["left_to_cast"] == [0]  # cast before the move: nothing left
    assert ours["cls"] == zero2["cls"] == "DeepSpeedZeroOptimizer" and theirs["cls"] == "BF16_Optimizer"
    assert ours["accum"] == zero2["accum"] == theirs["accum"] == torch.float32
    assert ours["comm"] == torch.float32
    assert ours["interface"] == list(ZERO_OPTIMIZER_INTERFACE)
    for other in (theirs, zero2, precast):  # clipping is active (norms > 0.05): the same norms, the same weights
        assert ours["norms"] == pytest.approx(other["norms"], rel=1e-6) and min(ours["norms"]) > 0.05
        for a, b in zip(ours["weights"], other["weights"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_gpu_stage_casts_as_deepspeed_will_before_the_model_moves(tmp_path):
    """bf16: the dense parameters are cast on the host (the fp32 model never sits on the GPU);
    ep/fssdp expert parameters stay fp32 (their store keeps fp32 masters)."""
    from jobs.stage_runner import build_model
    from parallel.engine import cast_like_engine, engine_param_dtype
    from parallel.strategy import STRATEGIES

    spec = tiny_spec(tmp_path, deepspeed=BF16, parallel={"expert_strategy": "fssdp"})
    st = plan_job(parse_spec(spec, preflight=False)).stages[0]
    assert engine_param_dtype(st, 1) == torch.bfloat16
    assert engine_param_dtype(_stage(tmp_path, 1), 1) is None  # fp32 stage: nothing cast
    for name, keep in (("replicated", False), ("fssdp", True)):
        assert STRATEGIES[name].engine_holds_experts is not keep
        model = build_model(st, 64)
        buffers = {n: b.dtype for n, b in model.named_buffers()}
        n = cast_like_engine(model, torch.bfloat16, keep_experts=keep)
        expert = {nm: p.dtype for nm, p in model.named_parameters() if getattr(p, "moeforge_expert", False)}
        dense = {nm: p.dtype for nm, p in model.named_parameters() if not getattr(p, "moeforge_expert", False)}
        assert expert and set(dense.values()) == {torch.bfloat16}
        assert set(expert.values()) == ({torch.float32} if keep else {torch.bfloat16})
        assert n == len(dense) + (0 if keep else len(expert))
        assert {n: b.dtype for n, b in model.named_buffers()} == buffers  # buffers as DeepSpeed leaves them


# -- whole stages in bf16 -------------------------------------------------------------------------
def _bf16_stage(rank: int, world: int, spec: dict) -> dict:
    import parallel.engine as E
    from jobs.stage_runner import run_stage

    seen = {}
    build = E.build_engine

    def spy(*a, **k):
        engine = build(*a, **k)
        seen.update(cls=type(engine.optimizer).__name__, accum=E.grad_accum_dtype(engine),
                    comm=engine.communication_data_type, dtype=next(engine.module.parameters()).dtype)
        return engine

    E.build_engine = spy
    run_stage(spec, 0)
    return seen


def _spec(tmp: Path, strategy: str, zero: int) -> dict:
    return tiny_spec(tmp, run={"name": f"bf16-{strategy}-{zero}"}, deepspeed=BF16,
                     parallel={"world_size": 2, "expert_strategy": strategy, "zero_stage": zero},
                     stages=[{"name": "pretrain", "steps": 3, "micro_batch_size": 2, "grad_accum_steps": 2,
                              "checkpoint_every": 3, "grad_clip": 0.1}])


@pytest.mark.slow
@pytest.mark.parametrize("strategy,zero", [("replicated", 1), ("fssdp", 1), ("ep", 2)])
def test_bf16_stage_accumulates_dense_gradients_in_fp32(tmp_path, strategy, zero):
    spec = _spec(tmp_path, strategy, zero)
    seen = run_distributed(_bf16_stage, 2, spec)[0]
    assert seen == {"cls": "DeepSpeedZeroOptimizer", "accum": torch.float32, "comm": torch.float32,
                    "dtype": torch.bfloat16}
    run = Path(spec["run"]["output_dir"]) / spec["run"]["name"]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in recs)
    assert not any(r["step_skipped"] for r in recs)


@pytest.mark.slow
def test_bf16_zero1_skips_a_nonfinite_step_through_deepspeeds_overflow_path(tmp_path, monkeypatch):
    """parallel/numerics.py's skip under ZeRO 1 + bf16 + fp32 accumulation: nothing changes at the
    bad step (the fp32 `grad_accum`s are dropped with the partitions) and training goes on."""
    from system.safe_load import checkpoint_tensors
    from tests.parallel.test_numerics_guard import _records, _spec as guard_spec, _train

    monkeypatch.setenv("MOEFORGE_FAULT_NONFINITE", "3")
    monkeypatch.setenv("MOEFORGE_FAULT_NONFINITE_RANK", "1")
    spec = guard_spec(tmp_path, "fssdp", 1)
    spec["deepspeed"] = BF16
    run_distributed(_train, 2, spec, timeout_s=300)
    run = tmp_path / "runs" / "guard"
    recs = _records(run)
    assert [recs[s]["step_skipped"] for s in range(1, 6)] == [0, 0, 1, 0, 0]
    assert all(math.isfinite(recs[s]["loss"]) and math.isfinite(recs[s]["grad_norm"]) for s in (4, 5))
    ckpts = run / "stages" / "pretrain" / "checkpoints"
    before, after = (checkpoint_tensors(ckpts / f"step_{s:08d}") for s in (2, 3))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
