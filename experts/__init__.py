"""Single-device MoE math: routers, balancing losses, dispatch, expert backends, the MoE layer.

Nothing here imports ray or deepspeed; parallelism is applied from `parallel/`. The names below
load on first use, so `experts.config` (read by the job spec) costs no torch import.
"""
from __future__ import annotations

import importlib

_WHERE = {"MoEAux": "experts.layer", "MoELayer": "experts.layer", "GroupedExperts": "experts.layer",
          "load_balancing_loss": "experts.losses", "router_z_loss": "experts.losses",
          "RouterOutput": "experts.router", "expert_counts": "experts.router", "topk_softmax": "experts.router"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'experts' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
