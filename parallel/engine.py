"""Wrap a single-device model in a DeepSpeed engine configured from the job spec."""
from __future__ import annotations

import copy
from typing import Any

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
    return _deep_merge(cfg, passthrough)


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
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config, dist_init_required=False)
    strategy.attach(engine, opt_cfg)
    return engine
