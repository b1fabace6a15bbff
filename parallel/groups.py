"""Expert-parallel x data-parallel process groups of `ep` and `fssdp`.

For a world of W ranks and `parallel.expert_parallel_size` P (P divides W):

    EP group g      = ranks [g*P, (g+1)*P)             (g = 0 .. W/P - 1)
    EDP group i     = ranks {i, i + P, i + 2P, ...}    (i = 0 .. P - 1: the rank's place in its EP group)

Each EP group holds every expert once and its tokens never leave it; the ranks at the same place
of every group own the same experts in the same pool slots, so expert gradients are summed over
the EDP group (dense ones over the world). `rank_nodes` (node of every global rank) comes from
where Ray placed the workers when the caller knows it (`jobs.stage_runner`), else from
`ranks_per_node`; Ray numbers workers node by node, so with P dividing the ranks per node only
the EDP all-reduce crosses nodes. More: docs/expert_parallel.md, "EP x DP".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from parallel import dist as pdist


@dataclass
class ExpertGroups:
    world: int
    ep_size: int
    rank: int  # global rank
    ep_group: Any  # process group of this rank's EP group (None: the whole world)
    edp_group: Any  # process group of this rank's EDP group (None: one EP group only)
    ep_ranks: list  # global ranks of this EP group, by place in the group
    edp_ranks: list  # global ranks of this EDP group, by group index
    rank_nodes: np.ndarray  # node index of every global rank

    @property
    def num_groups(self) -> int:
        return self.world // self.ep_size

    @property
    def group_index(self) -> int:
        return self.rank // self.ep_size

    @property
    def local_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def nodes(self) -> np.ndarray:
        """Node index of each rank of this EP group, by place in the group (for the planner)."""
        return self.rank_nodes[np.asarray(self.ep_ranks, dtype=np.int64)]

    def global_rank(self, local: int) -> int:
        return int(self.ep_ranks[int(local)])

    def describe(self) -> str:
        return (f"{self.num_groups} expert-parallel group(s) of {self.ep_size} rank(s) "
                f"(this rank {self.rank}: group {self.group_index}, place {self.local_rank}); "
                f"node of each rank {self.rank_nodes.tolist()}")


def default_rank_nodes(world: int, ranks_per_node: int) -> np.ndarray:
    return np.arange(world, dtype=np.int64) // max(1, int(ranks_per_node))


def layout_problems(world: int, ep_size: int, rank_nodes: Sequence[int]) -> list[str]:
    """Why this layout is bad for expert parallelism (empty: fine). Groups must lie inside a node
    or be made of whole nodes; otherwise one group's all-to-all spans part of another node."""
    nodes = np.asarray(rank_nodes, dtype=np.int64)
    out = []
    if world % ep_size:
        return [f"expert_parallel_size={ep_size} does not divide the world of {world} ranks"]
    for g in range(world // ep_size):
        ns = nodes[g * ep_size:(g + 1) * ep_size]
        uniq = set(ns.tolist())
        if len(uniq) > 1:
            whole = all(set(np.nonzero(nodes == n)[0].tolist()) <= set(range(g * ep_size, (g + 1) * ep_size))
                        for n in uniq)
            if not whole:
                out.append(f"expert-parallel group {g} (ranks {g * ep_size}..{(g + 1) * ep_size - 1}) spans "
                           f"part of nodes {sorted(uniq)}")
    return out


def build_expert_groups(ep_size: int, rank_nodes: Optional[Sequence[int]] = None,
                        ranks_per_node: int = 8) -> ExpertGroups:
    """The EP and EDP groups of this process (a collective: every rank calls it, in order)."""
    world, rank = pdist.world_size(), pdist.rank()
    P = int(ep_size)
    if P < 1 or world % P:
        raise ValueError(f"parallel.expert_parallel_size={P} does not divide the world of {world} ranks")
    nodes = (default_rank_nodes(world, ranks_per_node) if rank_nodes is None
             else np.asarray(rank_nodes, dtype=np.int64))
    if nodes.shape != (world,):
        raise ValueError(f"rank_nodes has {nodes.shape[0]} entries for a world of {world} ranks")
    G = world // P
    ep_ranks = list(range((rank // P) * P, (rank // P + 1) * P))
    edp_ranks = list(range(rank % P, world, P))
    ep_group = edp_group = None
    if G > 1:
        # new_group is collective over the world: every rank creates every group, in one order.
        for g in range(G):
            pg = pdist.new_group(range(g * P, (g + 1) * P))
            if g == rank // P:
                ep_group = pg
        for i in range(P):
            pg = pdist.new_group(range(i, world, P))
            if i == rank % P:
                edp_group = pg
    return ExpertGroups(world, P, rank, ep_group, edp_group, ep_ranks, edp_ranks, nodes)


def second_ep_group(groups: ExpertGroups):
    """A second process group over this rank's EP group (a collective over the world: every rank
    creates every group, in one order). The overlapped SparseReduceScatter runs on it: under NCCL
    each group has its own communicator and stream, so the backward pass's all-to-alls, queued on
    the first group, never wait behind spRS transfers in flight (at the price of one more
    communicator per rank)."""
    if not pdist.is_dist() or groups.world == 1:
        return None
    P, mine = groups.ep_size, None
    for g in range(groups.num_groups):
        pg = pdist.new_group(range(g * P, (g + 1) * P))
        if g == groups.group_index:
            mine = pg
    return mine


def single_group(world: int = 1, rank: int = 0, ranks_per_node: int = 8) -> ExpertGroups:
    """The whole world as one EP group (no process groups made): classic EP/FSSDP."""
    return ExpertGroups(world, world, rank, None, None, list(range(world)), [rank],
                        default_rank_nodes(world, ranks_per_node))
