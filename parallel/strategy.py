"""The expert strategies by name (`STRATEGIES`), and `build_strategy`, which makes a stage's.

`replicated` is the interface itself (`parallel.expert_strategy.ExpertStrategy`), `deepspeed_moe`
is defined here, `ep` and `fssdp` are `parallel.sharded_strategy.ShardedStrategy`. A new
strategy is a subclass of `ExpertStrategy` and its name in `STRATEGIES`.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Optional

import torch
from torch import nn

from parallel import dist as pdist
from parallel.expert_strategy import ExpertStrategy
from parallel.sharded_strategy import ShardedStrategy

__all__ = ["STRATEGIES", "DeepSpeedMoEStrategy", "ExpertStrategy", "ShardedStrategy", "build_strategy"]


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

    def grad_norm_parts(self, engine, model: nn.Module) -> Optional[list[torch.Tensor]]:
        """Expert gradients differ per rank; each expert sits on world/ep ranks: the experts'
        squared norm summed over ranks, then each dense parameter's (device scalars)."""
        if engine.zero_optimization_stage() != 0:
            return None
        self._moe_norm = getattr(engine, "has_moe_layers", False)
        if not self._moe_norm:
            return super().grad_norm_parts(engine, model)
        dense, expert = [], None
        for p in model.parameters():
            if p.grad is None:
                continue
            sq = p.grad.double().pow(2).sum()
            if getattr(p, "allreduce", True) is False:
                expert = sq if expert is None else expert + sq
            else:
                dense.append(sq)
        if expert is None:
            expert = torch.zeros((), dtype=torch.float64)
        layers = model.moe_layers()
        self._ep = max(getattr(layer, "ep_size", 1) for layer in layers) if layers else 1
        return [pdist.all_reduce_sum(expert.reshape(1)), *dense]

    def grad_norm_from(self, values: list[float]) -> float:
        if not self._moe_norm:
            return super().grad_norm_from(values)
        expert = values[0] * self._ep / pdist.world_size()
        dense = 0.0
        for sq in values[1:]:
            dense += sq
        return math.sqrt(dense + expert)

    @torch.no_grad()
    def full_expert_weights(self, model: nn.Module) -> dict[int, tuple[torch.Tensor, ...]]:
        out = {}
        for i, layer in enumerate(model.moe_layers()):
            local = layer.experts.deepspeed_experts
            mine = [torch.stack([getattr(ex, n).detach() for ex in local]) for n in ("w1", "w3", "w2")]
            g = layer.moe.deepspeed_moe.ep_group
            if g is None or pdist.world_size(g) == 1:
                out[i] = tuple(m.clone() for m in mine)
                continue
            parts = [torch.cat(pdist.all_gather(m.contiguous(), g)) for m in mine]
            out[i] = tuple(parts)
        return out


STRATEGIES: dict[str, type[ExpertStrategy]] = {
    "replicated": ExpertStrategy,
    "deepspeed_moe": DeepSpeedMoEStrategy,
    "ep": ShardedStrategy,
    "fssdp": ShardedStrategy,
}


def build_strategy(parallel, ep_size: int, grad_clip: float, rank_nodes=None) -> ExpertStrategy:
    """The strategy object of a stage's parallel section (`rank_nodes`: the node index of every
    rank as Ray placed the workers; None: `parallel.fssdp.ranks_per_node` consecutive ranks)."""
    name = parallel.expert_strategy
    if name not in STRATEGIES:
        raise ValueError(f"parallel.expert_strategy: unknown strategy {name!r}")
    return STRATEGIES[name](parallel, ep_size, grad_clip, rank_nodes)
