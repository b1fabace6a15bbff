"""Expert strategies: how a stage lays its experts over the ranks, behind one interface.

The trainer and the model never branch on the strategy; they call these hooks:

    moe_factory()        how the model builds its MoE layers (None: our MoELayer)
    prepare(model)       after the initial weights are in: shard or wrap the experts
    param_groups(...)    the optimizer groups the DeepSpeed engine gets
    configure(cfg)       adjust the generated DeepSpeed config
    attach(engine, opt)  after the engine exists: optimizer of experts outside it, clipping
    begin_step(step)     before the step's first forward (FSSDP plans its copies)
    optimizer_step(...)  at the accumulation boundary: reduce, clip, step, or skip the update on
                         every rank when a loss or gradient is non-finite; returns (the global
                         gradient norm before clipping (None: the engine knows it), skipped)
    observe(counts)      the step's global (L, E) expert counts
    step_metrics()       the strategy's own figures of the step (bytes moved, copies, ...)
    joins_every_forward  whether every rank must run every forward (collectives inside)
    owns_initially(l, e, E) whether this rank keeps expert e of MoE layer l after prepare
    save / load / load_init_state / full_expert_weights   checkpoints and export

`build_strategy` picks the class from the stage's parallel section.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from parallel import dist as pdist
from parallel.engine import param_groups
from parallel.numerics import any_rank, local_dense_nonfinite, skip_dense_update


class ExpertStrategy:
    """`replicated`: every rank holds every expert; DeepSpeed reduces and steps everything."""

    name = "replicated"
    sharded_checkpoint = False  # whether checkpoints keep experts in experts/rank*.pt files
    # whether DeepSpeed's ZeRO partitions are all over the data-parallel world (so that
    # `parallel.zero_reshard` can resume them on another world size)
    reshardable_dense_state = True
    # set before `moe_factory` when the stage starts from its seed (no init_from): a strategy that
    # shards experts may then build only this rank's (ep/fssdp: `ShardedStrategy.moe_factory`)
    build_owned_only = False

    def __init__(self, parallel, ep_size: int, grad_clip: float):
        self.parallel, self.ep_size, self.grad_clip = parallel, ep_size, float(grad_clip or 0.0)
        self.model: Optional[nn.Module] = None

    # -- building -----------------------------------------------------------------------------
    def moe_factory(self):
        return None

    def prepare(self, model: nn.Module) -> None:
        self.model = model

    def owns_initially(self, moe_layer: int, expert: int, num_experts: int) -> bool:
        """Whether this rank keeps `expert` of the `moe_layer`-th MoE layer when `prepare` shards
        the model (loaders skip reading the others)."""
        return True

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        return param_groups(model, weight_decay)

    def configure(self, ds_config: dict[str, Any]) -> dict[str, Any]:
        return ds_config

    def attach(self, engine, optimizer_cfg) -> None:
        self.engine = engine

    # -- the step -----------------------------------------------------------------------------
    @property
    def joins_every_forward(self) -> bool:
        return False

    def begin_step(self, step: int) -> None:
        pass

    def before_backward(self, final: bool) -> None:
        """Before each micro-batch's backward pass; `final`: the step's last (its boundary)."""

    def optimizer_step(self, engine, model: nn.Module, local_bad: bool = False) -> tuple[Optional[float], bool]:
        """(global gradient norm before clipping or None when the engine reports it, skipped).

        The update is skipped on every rank when any rank saw a non-finite loss (`local_bad`)
        or holds a non-finite gradient (`parallel.numerics`)."""
        if any_rank(local_bad or local_dense_nonfinite(engine, model)):
            skip_dense_update(engine, model)
            return math.nan, True
        norm = self.grad_norm(engine, model)
        engine.step()
        return norm, False

    def grad_norm(self, engine, model: nn.Module) -> Optional[float]:
        """Without ZeRO, DeepSpeed has all-reduced the gradients in the boundary `backward`, so
        each rank holds the full averaged gradient; with ZeRO the engine reports the norm."""
        if engine.zero_optimization_stage() != 0:
            return None
        sq = sum(float(p.grad.float().pow(2).sum()) for p in model.parameters() if p.grad is not None)
        return math.sqrt(sq)

    def observe(self, step_counts_LE: torch.Tensor) -> None:
        pass

    def step_metrics(self) -> dict[str, float]:
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


class DeepSpeedMoEStrategy(ExpertStrategy):
    """`deepspeed_moe`: DeepSpeed's own MoE layer (the GShard-style baseline), `ep_size` ranks
    per expert group; DeepSpeed reduces expert gradients over the expert-data-parallel group."""

    name = "deepspeed_moe"
    reshardable_dense_state = False  # expert groups are partitioned over expert-data-parallel groups

    def moe_factory(self):
        from parallel.ds_moe import DeepSpeedMoELayer

        knobs = {"ep_size": self.ep_size, **asdict(self.parallel.deepspeed_moe)}

        def build(cfg, experts):
            return DeepSpeedMoELayer(cfg.d_model, cfg.num_experts, cfg.top_k, cfg.d_expert, router=experts.router,
                                     init_std=cfg.init_std, **knobs)
        return build

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        from parallel.ds_moe import ds_moe_param_groups  # expert groups DeepSpeed's ZeRO can find

        return ds_moe_param_groups(model, weight_decay)

    @property
    def joins_every_forward(self) -> bool:
        return True  # the layer's all-to-alls run over the expert-parallel group

    def grad_norm(self, engine, model: nn.Module) -> Optional[float]:
        """Expert gradients differ per rank; each expert sits on world/ep ranks."""
        if engine.zero_optimization_stage() != 0:
            return None
        if not getattr(engine, "has_moe_layers", False):
            return super().grad_norm(engine, model)
        dense = expert = 0.0
        for p in model.parameters():
            if p.grad is None:
                continue
            sq = float(p.grad.double().pow(2).sum())
            if getattr(p, "allreduce", True) is False:
                expert += sq
            else:
                dense += sq
        layers = model.moe_layers()
        ep = max(getattr(layer, "ep_size", 1) for layer in layers) if layers else 1
        expert = float(pdist.all_reduce_sum(torch.tensor(expert, dtype=torch.float64))) * ep / pdist.world_size()
        return math.sqrt(dense + expert)

    @torch.no_grad()
    def full_expert_weights(self, model: nn.Module) -> dict[int, tuple[torch.Tensor, ...]]:
        import torch.distributed as dist

        out = {}
        for i, layer in enumerate(model.moe_layers()):
            local = layer.experts.deepspeed_experts
            mine = [torch.stack([getattr(ex, n).detach() for ex in local]) for n in ("w1", "w3", "w2")]
            g = layer.moe.deepspeed_moe.ep_group
            if g is None or dist.get_world_size(group=g) == 1:
                out[i] = tuple(m.clone() for m in mine)
                continue
            n = dist.get_world_size(group=g)
            parts = []
            for m in mine:
                got = [torch.empty_like(m) for _ in range(n)]
                dist.all_gather(got, m.contiguous(), group=g)
                parts.append(torch.cat(got))
            out[i] = tuple(parts)
        return out


def build_strategy(parallel, ep_size: int, grad_clip: float, rank_nodes=None) -> ExpertStrategy:
    """The strategy object of a stage's parallel section (`rank_nodes`: the node index of every
    rank as Ray placed the workers; None: `parallel.fssdp.ranks_per_node` consecutive ranks)."""
    name = parallel.expert_strategy
    if name == "replicated":
        return ExpertStrategy(parallel, ep_size, grad_clip)
    if name == "deepspeed_moe":
        return DeepSpeedMoEStrategy(parallel, ep_size, grad_clip)
    if name in ("ep", "fssdp"):
        from parallel.sharded_strategy import ShardedStrategy

        return ShardedStrategy(parallel, ep_size, grad_clip, rank_nodes)
    raise ValueError(f"parallel.expert_strategy: unknown strategy {name!r}")
