"""Wrap a single-device model in a DeepSpeed engine configured from the job spec."""
from __future__ import annotations

import contextlib
import copy
import os
from types import SimpleNamespace
from typing import Any, Iterator, Optional

import torch
from torch import nn

from system.schedules import lr_multiplier


def deepspeed_config(stage, parallel, passthrough: dict[str, Any], world_size: int,
                     on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config for one stage: generated keys, then the spec's passthrough keys.

    The spec validator forbids passthrough keys that would contradict the generated ones
    (batch sizes, optimizer, scheduler, clipping, ZeRO stage).
    """
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": stage.grad_accum_steps,
        "train_batch_size": stage.micro_batch_size * stage.grad_accum_steps * world_size,
        "gradient_clipping": stage.grad_clip,
        "zero_optimization": {"stage": parallel.zero_stage},
        # Our optimizer is a plain torch AdamW; ZeRO partitions its state like any other.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        cfg["bf16"] = {"enabled": True}
    if on_gpu and parallel.zero_stage in (1, 2):
        # the gradient reduce-scatter on its own stream, bucket by bucket during the backward
        cfg["zero_optimization"]["overlap_comm"] = True
    return with_fp32_gradients(_deep_merge(cfg, passthrough), parallel.zero_stage)


def engine_param_dtype(stage, world_size: int) -> Optional[torch.dtype]:
    """The dtype DeepSpeed will cast the stage's model parameters to (bf16 / fp16), or None (fp32)."""
    on_gpu = stage.parallel.use_gpu and torch.cuda.is_available()
    cfg = deepspeed_config(stage, stage.parallel, stage.deepspeed, world_size, on_gpu)
    if bf16_enabled(cfg):
        return torch.bfloat16
    return torch.float16 if (cfg.get("fp16") or {}).get("enabled") else None


def cast_like_engine(model: nn.Module, dtype: Optional[torch.dtype], keep_experts: bool) -> int:
    """Cast the parameters DeepSpeed would cast (floating ones; buffers stay, as DeepSpeed leaves
    them) to `dtype` now, so the model can move to the GPU already cast: an fp32 copy of the
    whole model never sits there. `keep_experts`: expert parameters stay fp32 (an expert store
    keeps them as masters outside DeepSpeed). Returns the number of parameters cast."""
    if dtype is None:
        return 0
    n = 0
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype and not (keep_experts and getattr(p, "moeforge_expert", False)):
            p.data = p.data.to(dtype)
            n += 1
    return n


def bf16_enabled(cfg: dict[str, Any]) -> bool:
    """Whether a DeepSpeed config trains in bf16 (DeepSpeed reads `bf16` or its alias `bfloat16`)."""
    return any(bool((cfg.get(k) or {}).get("enabled")) for k in ("bf16", "bfloat16"))


def with_fp32_gradients(cfg: dict[str, Any], zero_stage: int) -> dict[str, Any]:
    """bf16: dense gradients are reduced over the ranks in fp32 and, under ZeRO 1/2, accumulated
    over micro-batches in fp32 (DeepSpeed's defaults for both are the model's dtype, bf16).

    `communication_data_type: fp32` makes DeepSpeed's all-reduce / reduce-scatter cast the
    gradients to fp32; `data_types.grad_accum_dtype: fp32` makes the ZeRO 1/2 optimizer keep
    each rank's gradient partition (and, at ZeRO 1, each parameter's `grad_accum`) in fp32. ZeRO 0
    keeps bf16 accumulation in `param.grad`: DeepSpeed refuses grad_accum_dtype != the model's
    dtype without ZeRO. Keys the spec's passthrough sets explicitly win."""
    if not bf16_enabled(cfg):
        return cfg
    cfg.setdefault("communication_data_type", "fp32")
    if zero_stage in (1, 2):
        cfg["data_types"] = dict(cfg.get("data_types") or {})
        cfg["data_types"].setdefault("grad_accum_dtype", "fp32")
    return cfg


# What the strategies and `parallel/numerics.py` use of DeepSpeed's ZeRO 1/2 optimizer
# (stage_1_and_2.DeepSpeedZeroOptimizer): the dense norm and clip threshold (ep/fssdp global-norm
# clipping), the loss scale, the reduced partitions and the overflow path (skipped steps).
ZERO_OPTIMIZER_INTERFACE = ("scaled_global_norm", "clip_grad", "loss_scale", "averaged_gradients",
                            "check_grad_overflow", "has_overflow")


@contextlib.contextmanager
def _zero_optimizer_at_stage1() -> Iterator[None]:
    """Keep DeepSpeed's ZeRO optimizer for ZeRO 1 + bf16 + fp32 gradient accumulation.

    For that combination DeepSpeed's engine picks its `BF16_Optimizer`
    (`DeepSpeedEngine._do_optimizer_sanity_check` returns "bf16"), a different class: no
    `scaled_global_norm`, `loss_scale`, `averaged_gradients` or overflow path, so ep/fssdp
    clipping, the non-finite-step skip and ZeRO re-sharding on resume could not work with it.
    `DeepSpeedZeroOptimizer` (what ZeRO 2, and ZeRO 1 with CPU offload, get for the same dtypes)
    accumulates in fp32 as well (each parameter's `grad_accum`, then a fp32 partition); the
    two give the same gradients, norms and weights (tests/parallel/test_gpu_path.py). Patched on
    the class for the duration of `deepspeed.initialize` only."""
    try:
        from deepspeed.runtime.constants import BFLOAT16
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION
        original = DeepSpeedEngine._do_optimizer_sanity_check
    except (ImportError, AttributeError):  # another DeepSpeed: `check_zero_optimizer` says what is wrong
        yield
        return

    def sanity_check(self, basic_optimizer):
        wrapper = original(self, basic_optimizer)
        if wrapper == BFLOAT16 and self.zero_optimization_stage() == 1:
            return ZERO_OPTIMIZATION
        return wrapper

    DeepSpeedEngine._do_optimizer_sanity_check = sanity_check
    try:
        yield
    finally:
        DeepSpeedEngine._do_optimizer_sanity_check = original


def check_zero_optimizer(engine) -> None:
    """Under ZeRO 1/2 the engine's optimizer must offer what our code reaches into."""
    if engine.zero_optimization_stage() not in (1, 2):
        return
    missing = [a for a in ZERO_OPTIMIZER_INTERFACE if not hasattr(engine.optimizer, a)]
    if missing:
        raise RuntimeError(f"DeepSpeed built a {type(engine.optimizer).__name__} for ZeRO "
                           f"{engine.zero_optimization_stage()}, without {missing}, which gradient "
                           f"clipping and skipped steps need (parallel/engine.py)")


def grad_accum_dtype(engine) -> torch.dtype:
    """The dtype the engine's optimizer accumulates dense gradients in."""
    opt = engine.optimizer
    for name in ("gradient_accumulation_dtype", "grad_acc_dtype"):
        if getattr(opt, name, None) is not None:
            return getattr(opt, name)
    return next(p for p in engine.module.parameters()).dtype


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: dense and expert parameters apart, each split by weight decay.

    Matrices decay; vectors (norm gains) and the embedding do not. Expert parameters
    (tagged `moeforge_expert`) get groups of their own so that expert-parallel strategies can
    reduce and step them in their own process groups.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_expert = bool(getattr(p, "moeforge_expert", False))
        decay = p.ndim >= 2 and "embed" not in name
        groups.setdefault((is_expert, decay), []).append(p)
    out = []
    for (is_expert, decay), params in sorted(groups.items()):
        out.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                    "name": f"{'expert' if is_expert else 'dense'}_{'decay' if decay else 'no_decay'}"})
    return out


def build_engine(model: nn.Module, stage, passthrough: dict[str, Any], world_size: int, strategy):
    """deepspeed.initialize with our optimizer and LR schedule, as the expert strategy wants them
    (its parameter groups and config changes; it is attached to the engine afterwards).

    `stage` carries the optimisation settings (optimizer, lr_schedule, steps, batch sizes,
    grad_clip) and `stage.parallel` the ZeRO stage and device."""
    import deepspeed

    parallel = stage.parallel
    opt_cfg = stage.optimizer
    groups = strategy.param_groups(model, opt_cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps)
    sched_cfg, total = stage.lr_schedule, stage.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(sched_cfg, s, total))
    on_gpu = parallel.use_gpu and torch.cuda.is_available()
    config = strategy.configure(deepspeed_config(stage, parallel, passthrough, world_size, on_gpu))
    device = next(model.parameters()).device
    # DeepSpeed takes cuda:LOCAL_RANK unless told the device; the worker's (Ray's) GPU may differ
    args = SimpleNamespace(device_rank=device.index) if device.type == "cuda" else None
    with _zero_optimizer_at_stage1():
        engine, _, _, _ = deepspeed.initialize(args=args, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=config, dist_init_required=False)
    check_engine_device(engine, device)
    check_zero_optimizer(engine)
    strategy.attach(engine, opt_cfg)
    return engine


def check_engine_device(engine, device: torch.device) -> None:
    """The engine must compute where the model and the expert store live: one device per worker."""
    got = torch.device(engine.device)
    if got.type != device.type or (device.type == "cuda" and got != device):
        raise RuntimeError(f"DeepSpeed bound this rank to {got} but its model is on {device} (LOCAL_RANK="
                           f"{os.environ.get('LOCAL_RANK')}, CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES')}): one device per worker is required")
