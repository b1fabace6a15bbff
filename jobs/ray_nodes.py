"""Which node each rank runs on, as Ray placed the workers.

Ray Train numbers its workers node by node, but a node's IP does not identify it (several raylets
can share one machine, as in multi-node tests), so the rank's Ray node id is what counts. The
expert-parallel groups and FSSDP's same-node preference follow this list
(`parallel.groups`); outside Ray, None (the caller falls back to `ranks_per_node`). Ray is
never imported here: a Ray worker has imported it already, and a rank started by torch's
launcher (`jobs.torchrun`, on machines without Ray) must not pay for or need it.
"""
from __future__ import annotations

import sys
from typing import Optional

from parallel import dist as pdist


def this_node_id() -> Optional[str]:
    ray = sys.modules.get("ray")
    if ray is None:
        return None
    try:
        if not ray.is_initialized():
            return None
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - not a Ray worker
        return None


def rank_nodes() -> Optional[list[int]]:
    """Node index (0, 1, ... by first rank on it) of every rank; None outside Ray. A collective
    when distributed: every rank calls it."""
    mine = this_node_id()
    if not pdist.is_dist():
        return None if mine is None else [0]
    ids = pdist.all_gather_object(mine)
    if any(i is None for i in ids):
        return None
    order: dict = {}
    return [order.setdefault(i, len(order)) for i in ids]
