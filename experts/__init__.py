"""Single-device MoE math: routers, balancing losses, dispatch, expert backends, the MoE layer.

Nothing here imports ray or deepspeed; parallelism is applied from `parallel/`.
"""
from experts.layer import MoEAux, MoELayer, GroupedExperts
from experts.losses import load_balancing_loss, router_z_loss
from experts.router import RouterOutput, expert_counts, topk_softmax

__all__ = ["MoEAux", "MoELayer", "GroupedExperts", "load_balancing_loss", "router_z_loss",
           "RouterOutput", "expert_counts", "topk_softmax"]
