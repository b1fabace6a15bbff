"""Non-finite steps: detect a NaN/Inf in the loss or the gradients on any rank, skip the update.

A skipped step changes no weight and no optimizer moment anywhere (dense parameters in the
DeepSpeed engine, experts in an ep/fssdp store); its data is consumed and the LR schedule moves
on, so the stage stays on its schedule. The trainer counts skipped steps and stops the stage
after `max_bad_steps` in a row (`parallel.trainer`).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from parallel import dist as pdist


def _nonfinite(tensors: Iterable[Optional[torch.Tensor]]) -> bool:
    """Whether any tensor holds a NaN/Inf: the checks stay on the device and one value comes back
    to the host (not one synchronisation per parameter on every step)."""
    return bool(nonfinite_flag(tensors))


def nonfinite_flag(tensors: Iterable[Optional[torch.Tensor]], device=None) -> torch.Tensor:
    """Whether any tensor holds a NaN/Inf, as a device bool tensor (no host sync)."""
    flags = [torch.isfinite(t).all().logical_not() for t in tensors if t is not None]
    if not flags:
        return torch.zeros((), dtype=torch.bool, device=device)
    return torch.stack([f.to(flags[0].device) for f in flags]).any()


def local_dense_nonfinite(engine, model: nn.Module) -> bool:
    """Whether this rank holds a non-finite dense gradient after the boundary backward: in the
    parameters' `.grad` (ZeRO 0; ZeRO 1 before its reduction) or, under ZeRO 1/2, in the
    partition DeepSpeed reduced into (its `averaged_gradients`)."""
    return bool(local_dense_nonfinite_flag(engine, model))


def local_dense_nonfinite_flag(engine, model: nn.Module, device=None) -> torch.Tensor:
    """`local_dense_nonfinite` as a device bool tensor (no host sync)."""
    tensors = [p.grad for p in model.parameters()]
    parts = getattr(getattr(engine, "optimizer", None), "averaged_gradients", None)
    if isinstance(parts, dict):
        tensors += [t for v in parts.values() for t in (v or [])]
    return nonfinite_flag(tensors, device)


def any_rank(flag) -> bool:
    """True on every rank when `flag` (a bool or a device bool tensor) is true on any (one
    all-reduce of one number)."""
    return bool(any_rank_flag(flag)[0] > 0)


def any_rank_flag(flag) -> torch.Tensor:
    """`any_rank` as a (1,) float64 tensor, 1.0 or 0.0, left on the device (no host sync)."""
    if torch.is_tensor(flag):
        t = flag.detach().to(torch.float64).reshape(1)
    else:
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    return pdist.all_reduce_max(t)


def skip_dense_update(engine, model: nn.Module) -> None:
    """Finish the step in DeepSpeed without updating anything, keeping its counters in step.

    ZeRO 0: the optimizer's step is replaced for this step by one that only drops the gradients:
    dropping `.grad` alone is not enough under bf16, where DeepSpeed's wrapper keeps fp32
    gradients of its own and would step AdamW on zeros (moments decay, weight decay applies).
    Clipping is off for this step (DeepSpeed's clip needs a gradient).
    ZeRO 1/2: DeepSpeed's own overflow path for this step (its grad
    overflow check on, the overflow forced), which clears the partitioned gradients and leaves
    weights and moments untouched. In both the LR scheduler advances once, as on a good step."""
    zero = engine.zero_optimization_stage()
    if zero == 0:
        for p in model.parameters():
            p.grad = None
        opt = engine.optimizer
        own_step = vars(opt).get("step")  # None: the class's method
        opt.step = lambda closure=None: _drop_wrapper_grads(opt)
        clip = engine._config.gradient_clipping
        engine._config.gradient_clipping = 0.0
        try:
            engine.step()
        finally:
            engine._config.gradient_clipping = clip
            if own_step is None:
                del opt.step
            else:
                opt.step = own_step
        return
    opt = engine.optimizer
    saved = opt.check_grad_overflow
    opt.check_grad_overflow = True
    opt.has_overflow = lambda partition_gradients=True: True  # instance attribute, removed below
    try:
        engine.step()
    finally:
        del opt.has_overflow
        opt.check_grad_overflow = saved
    if engine.lr_scheduler is not None:  # DeepSpeed holds the schedule back on overflow
        engine.lr_scheduler.step()


def _drop_wrapper_grads(opt) -> None:
    """A skipped ZeRO-0 optimizer step: clear the gradients a DeepSpeed wrapper holds besides
    `.grad` (BF16_Optimizer's fp32 ones) and report no overflow, so the engine moves the LR
    schedule on as on a good step."""
    for name in ("clear_hp_grads", "clear_lp_grads"):
        fn = getattr(opt, name, None)
        if fn is not None:
            fn()
    if hasattr(opt, "overflow"):
        opt.overflow = False
