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


def build_engine(model: nn.Module, stage, parallel, passthrough: dict[str, Any], world_size: int,
                 store=None):
    """deepspeed.initialize with our optimizer and LR schedule. Returns the engine.

    With an ExpertStore (ep/fssdp) the engine holds the dense parameters only; the store gets an
    AdamW of its own with the same hyper-parameters, and gradient clipping uses the global norm
    of both (see `ExpertClipping`).
    """
    import deepspeed

    opt_cfg = stage.optimizer
    if parallel.expert_strategy == "deepspeed_moe":
        from experts.ds_moe import ds_moe_param_groups  # expert groups DeepSpeed's ZeRO can find
        groups = ds_moe_param_groups(model, opt_cfg.weight_decay)
    else:
        groups = param_groups(model, opt_cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=opt_cfg.lr,
                                  betas=tuple(opt_cfg.betas), eps=opt_cfg.eps)
    sched_cfg, total = stage.lr_schedule, stage.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(sched_cfg, s, total))
    on_gpu = parallel.use_gpu and torch.cuda.is_available()
    config = deepspeed_config(stage, parallel, passthrough, world_size, on_gpu)
    if store is not None:
        store.build_optimizer(opt_cfg.lr, opt_cfg.betas, opt_cfg.eps, opt_cfg.weight_decay)
        if parallel.zero_stage == 0:
            config["gradient_clipping"] = 0.0  # ExpertClipping clips dense and expert grads together
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config, dist_init_required=False)
    if store is not None:
        engine.moeforge_clipping = ExpertClipping(engine, store, stage.grad_clip)
    return engine


class ExpertClipping:
    """Global-norm gradient clipping over dense (DeepSpeed) and sharded expert (store) grads.

    The global squared norm = dense part (replicated after DeepSpeed's reduction, counted once)
    + the sum over ranks of each rank's owned experts. ZeRO 0: we clip both ourselves (DeepSpeed's
    clipping is off). ZeRO 1/2: the dense gradients are partitioned inside DeepSpeed's optimizer,
    so its norm function is wrapped to add the experts' part; DeepSpeed then clips the dense
    gradients by the global norm and we clip the experts by the same.
    """

    def __init__(self, engine, store, max_norm: float):
        import torch.distributed as dist

        self.engine, self.store, self.max_norm = engine, store, float(max_norm or 0.0)
        self.zero = engine.zero_optimization_stage()
        self._dist = dist
        self.expert_sq = 0.0
        self.last_norm: float | None = None
        if self.zero != 0:
            opt = engine.optimizer
            orig = opt.scaled_global_norm

            def scaled_global_norm(*a, **kw):
                dense = orig(*a, **kw)
                total = torch.sqrt(dense.double() ** 2 + self.expert_sq).to(dense.dtype)
                self.last_norm = float(total)
                return total

            opt.scaled_global_norm = scaled_global_norm

    def _expert_sq(self) -> float:
        sq = self.store.grad_sq_norm()
        if self._dist.is_initialized():
            self._dist.all_reduce(sq)
        return float(sq)

    def before_step(self, model: nn.Module) -> float | None:
        """At the boundary micro-batch, after backward and spRS: returns the global norm (ZeRO 0)
        and clips the dense gradients; ZeRO 1/2 hand the experts' part to DeepSpeed's norm."""
        self.lr = float(self.engine.get_lr()[0])  # the LR this step uses (the scheduler moves in step())
        self.expert_sq = self._expert_sq()
        if self.zero != 0:
            return None
        dense_sq = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
        norm = (dense_sq + self.expert_sq) ** 0.5
        self.last_norm = norm
        coef = self.coef(norm)
        if coef < 1.0:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm

    def coef(self, norm: float | None) -> float:
        if not self.max_norm or norm is None or not norm > self.max_norm:
            return 1.0
        return self.max_norm / (norm + 1e-6)

    def after_step(self) -> None:
        """Step the experts with the LR the dense step used and the same clip coefficient."""
        self.store.step(self.lr, self.coef(self.last_norm))
