"""The network: alpha-beta with two link classes (NVLink in a node, one NIC per GPU across
nodes), and the messages that bring expert copies from their owner to the other holders."""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import numpy as np

from parallel.simulator.config import ClusterConfig


class Network:
    """N ranks, G per node, NVLink inside a node and one NIC per GPU across nodes."""

    def __init__(self, c: ClusterConfig, num_ranks: int):
        self.N, self.G = num_ranks, c.gpus_per_node
        self.nv, self.ib = c.nvlink_bandwidth, c.internode_bandwidth
        self.a_nv, self.a_ib = c.nvlink_alpha, c.internode_alpha
        node = np.arange(self.N) // self.G
        self.same = node[:, None] == node[None, :]
        self.multi_node = self.N > self.G

    def rank_times(self, B: np.ndarray, M: Optional[np.ndarray] = None) -> np.ndarray:
        """Per-rank seconds of an exchange: B[s, d] bytes s->d, M[s, d] messages (diagonal ignored).

        A rank's bytes per link class are the larger of what it sends and receives (full duplex).
        """
        B = np.asarray(B, dtype=np.float64).copy()
        np.fill_diagonal(B, 0.0)
        intra, inter = np.where(self.same, B, 0.0), np.where(self.same, 0.0, B)
        t = (np.maximum(intra.sum(1), intra.sum(0)) / self.nv
             + np.maximum(inter.sum(1), inter.sum(0)) / self.ib)
        if M is not None:
            M = np.asarray(M, dtype=np.float64).copy()
            np.fill_diagonal(M, 0.0)
            mi, me = np.where(self.same, M, 0.0), np.where(self.same, 0.0, M)
            t = t + (self.a_nv * np.maximum(mi.sum(1), mi.sum(0))
                     + self.a_ib * np.maximum(me.sum(1), me.sum(0)))
        return t

    def all_to_all(self, tok: np.ndarray, bytes_per_token: float) -> float:
        """alpha*(N-1) by link class + the busiest rank's bytes / beta."""
        if self.N <= 1:
            return 0.0
        g = min(self.N, self.G)
        alpha = self.a_nv * (g - 1) + self.a_ib * (self.N - g)
        return alpha + float(self.rank_times(tok * bytes_per_token).max())

    def ring(self, nbytes: float, passes: float = 1.0) -> float:
        """A ring all-gather or reduce-scatter of `nbytes` (the gathered size) over all N ranks.

        NCCL runs one ring per NIC, so a GPU sends (G-1)/G of its (N-1)/N*nbytes over NVLink and
        1/G over its NIC; `passes` = 2 for an all-reduce.
        """
        N, G = self.N, min(self.N, self.G)
        if N <= 1 or nbytes <= 0:
            return 0.0
        per = passes * (N - 1) / N * nbytes
        if not self.multi_node:
            return passes * (N - 1) * self.a_nv + per / self.nv
        return passes * (N - 1) * self.a_ib + per * (G - 1) / G / self.nv + per / G / self.ib


def broadcast_chain(holders: list[int], expert: int, ranks_per_node: int) -> list[tuple[int, int]]:
    """(src, dst) hops of a pipelined broadcast from holders[0] (the owner) to the others.

    Owner first, then the other holders of its node, then node after node (in rank order from the
    owner's node); a remote node's first holder rotates with `expert` to spread NIC traffic.
    """
    owner = holders[0]
    G = max(1, ranks_per_node)
    by_node: dict[int, list[int]] = defaultdict(list)
    for h in holders[1:]:
        by_node[h // G].append(h)
    on = owner // G
    chain = [owner] + sorted(by_node.pop(on, []))
    K = max(max(by_node, default=on), on) + 1
    for n in sorted(by_node, key=lambda n: (n - on) % K):
        rs = sorted(by_node[n])
        k = expert % len(rs)
        chain += rs[k:] + rs[:k]
    return list(zip(chain[:-1], chain[1:]))


def copy_hops(holders: list[int], expert: int, ranks_per_node: int, mode: str) -> list[tuple[int, int]]:
    """(src, dst) messages that bring an expert from its owner (holders[0]) to the other holders.

    p2p: the owner sends one message to every holder, as parallel/collectives.py's spAG does;
    broadcast: the pipelined chain of `broadcast_chain` (NCCL broadcast, as Hecate and FasterMoE).
    """
    if len(holders) <= 1:
        return []
    if mode == "p2p":
        return [(int(holders[0]), int(h)) for h in holders[1:]]
    return broadcast_chain(list(holders), expert, ranks_per_node)


def copy_traffic(holders_E: list[list[int]], num_ranks: int, ranks_per_node: int,
                 expert_bytes: float, mode: str = "p2p") -> tuple[np.ndarray, np.ndarray]:
    """Bytes and messages matrices of one spAG for a layer's holders; spRS is its transpose
    (gradients flow back along the same messages), so it costs the same."""
    B = np.zeros((num_ranks, num_ranks))
    M = np.zeros((num_ranks, num_ranks))
    for e, hs in enumerate(holders_E):
        for s, d in copy_hops(hs, e, ranks_per_node, mode):
            B[s, d] += expert_bytes
            M[s, d] += 1
    return B, M
