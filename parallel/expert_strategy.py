"""The expert-strategy interface: the hooks through which the trainer and the model reach
everything that depends on how experts are laid out over the ranks, and the `replicated` strategy.

The trainer and the model never branch on the strategy. A step calls `begin_step`, then per
micro-batch the forward and `before_backward`, then `optimizer_step` (reduce, clip, step, or skip
on every rank) at the accumulation boundary, `observe` and `step_metrics`. `parallel.strategy`
picks the class by name (`build_strategy`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from parallel import dist as pdist
from parallel.engine import param_groups
from parallel.numerics import any_rank_flag, local_dense_nonfinite_flag, skip_dense_update


class ExpertStrategy:
    """The interface, and `replicated`: every rank holds every expert; DeepSpeed reduces and
    steps everything. A strategy overrides the hooks it needs."""

    name = "replicated"
    sharded_checkpoint = False  # whether checkpoints keep experts in experts/rank*.pt files
    # whether DeepSpeed's ZeRO partitions are all over the data-parallel world (so that
    # `parallel.zero_reshard` can resume them on another world size)
    reshardable_dense_state = True
    # set before `moe_factory` when the stage starts from its seed (no init_from): a strategy that
    # shards experts may then build only this rank's (ep/fssdp: `ShardedStrategy.moe_factory`)
    build_owned_only = False
    # whether the expert parameters are the DeepSpeed module's (and cast with it under bf16);
    # ep/fssdp keep fp32 masters in their own store instead
    engine_holds_experts = True

    def __init__(self, parallel, ep_size: int, grad_clip: float, rank_nodes=None):
        self.parallel, self.ep_size, self.grad_clip = parallel, ep_size, float(grad_clip or 0.0)
        self.rank_nodes = rank_nodes  # node index of every rank, as Ray placed them (None: ranks_per_node)
        self.model: Optional[nn.Module] = None

    # -- building -----------------------------------------------------------------------------
    def moe_factory(self):
        """How the model builds its MoE layers (None: our `MoELayer`)."""
        return None

    def prepare(self, model: nn.Module) -> None:
        """After the initial weights are in: shard or wrap the experts."""
        self.model = model

    def owns_initially(self, moe_layer: int, expert: int, num_experts: int) -> bool:
        """Whether this rank keeps `expert` of the `moe_layer`-th MoE layer when `prepare` shards
        the model (loaders skip reading the others)."""
        return True

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """The optimizer groups the DeepSpeed engine gets."""
        return param_groups(model, weight_decay)

    def configure(self, ds_config: dict[str, Any]) -> dict[str, Any]:
        """Adjust the generated DeepSpeed config."""
        return ds_config

    def attach(self, engine, optimizer_cfg) -> None:
        """After the engine exists: the optimizer of experts outside it, clipping."""
        self.engine = engine

    # -- the step -----------------------------------------------------------------------------
    @property
    def joins_every_forward(self) -> bool:
        """Whether every rank must run every forward (collectives inside the MoE layers)."""
        return False

    def begin_step(self, step: int) -> None:
        """Before the step's first forward (FSSDP plans its copies)."""

    def before_backward(self, final: bool) -> None:
        """Before each micro-batch's backward pass; `final`: the step's last (its boundary)."""

    def optimizer_step(self, engine, model: nn.Module, local_bad=False) -> tuple[Optional[float], bool]:
        """(global gradient norm before clipping or None when the engine reports it, skipped).

        The update is skipped on every rank when any rank saw a non-finite loss (`local_bad`: a
        bool or a device bool tensor) or holds a non-finite gradient (`parallel.numerics`). The
        flag and the norm's parts come to the host together: the step's one host sync."""
        bad = local_dense_nonfinite_flag(engine, model)
        if torch.is_tensor(local_bad):
            bad = bad | local_bad.to(bad.device)
        elif local_bad:
            bad = torch.ones_like(bad)
        flag = any_rank_flag(bad)
        parts = self.grad_norm_parts(engine, model)
        host = torch.cat([flag, *[p.to(flag.device, torch.float64).reshape(1) for p in parts or []]]).tolist()
        if host[0] > 0:
            skip_dense_update(engine, model)
            return math.nan, True
        norm = None if parts is None else self.grad_norm_from(host[1:])
        engine.step()
        return norm, False

    def grad_norm_parts(self, engine, model: nn.Module) -> Optional[list[torch.Tensor]]:
        """The global gradient norm's parts as device scalars (`grad_norm_from` adds them up on
        the host), or None when the engine reports the norm. Without ZeRO, DeepSpeed has
        all-reduced the gradients in the boundary `backward`, so each rank holds the full
        averaged gradient: each parameter's squared norm."""
        if engine.zero_optimization_stage() != 0:
            return None
        return [p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None]

    def grad_norm_from(self, values: list[float]) -> float:
        """The norm from the host values of `grad_norm_parts` (summed in order, in double)."""
        return math.sqrt(sum(values))

    def grad_norm(self, engine, model: nn.Module) -> Optional[float]:
        parts = self.grad_norm_parts(engine, model)
        if parts is None:
            return None
        return self.grad_norm_from(torch.cat([p.reshape(1).double() for p in parts]).tolist() if parts else [])

    def observe(self, step_counts_LE: torch.Tensor) -> None:
        """The step's global (L, E) expert counts."""

    def step_metrics(self) -> dict[str, float]:
        """The strategy's own figures of the step (bytes moved, copies, ...)."""
        return {}

    # -- checkpoints and export ------------------------------------------------------------------
    def save(self, ckpt_dir: Path) -> None:
        """This rank's state beyond DeepSpeed's files (called inside the checkpoint's commit)."""

    def load(self, ckpt_dir: Path) -> None:
        """Resume: the state `save` wrote."""

    def load_init_state(self, engine, ckpt: Path) -> None:
        """Optimizer state from the checkpoint a stage starts from (weights are already in).

        Same layout family (replicated/deepspeed_moe -> the same, ep/fssdp -> ep/fssdp at any
        world size): DeepSpeed restores the dense state and the strategy the experts'. Across
        families the optimizer groups differ, so the moments start at zero (the weights still
        carry over) and we say so.
        """
        if (Path(ckpt) / "experts").is_dir() == self.sharded_checkpoint:
            from system.safe_load import screen_checkpoint

            screen_checkpoint(Path(ckpt))  # DeepSpeed unpickles its files fully: screen them first
            engine.load_checkpoint(str(Path(ckpt).parent), tag=Path(ckpt).name, load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
            self.load(Path(ckpt))
        elif pdist.rank() == 0:
            print(f"[moeforge] {ckpt} was written with a different expert layout than expert_strategy "
                  f"{self.name!r}: weights carried over, optimizer moments start fresh", flush=True)

    @torch.no_grad()
    def full_expert_weights(self, model: nn.Module) -> dict[int, tuple[torch.Tensor, ...]]:
        """Every MoE layer's (E, ...) w1, w3, w2, whole, on every rank (a collective for sharded
        strategies): what an export writes."""
        return {i: tuple(getattr(layer.experts, n).detach().clone() for n in ("w1", "w3", "w2"))
                for i, layer in enumerate(model.moe_layers())}
