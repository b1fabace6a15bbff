"""The network: alpha-beta with two link classes (NVLink in a node, one NIC per GPU across
nodes), and the messages that bring expert copies from their owner to the other holders.

spAG/spRS schedules (`fssdp.spag`): `chain` is training's (`parallel.copy_schedule`), run round
by round by `Network.schedule_time` as the training ranks run it; `broadcast` prices the same
chains as one ideal, deeply pipelined NCCL broadcast (bytes only: Hecate's broadcasts,
FasterMoE's shadows); `p2p` is the former flat schedule, the owner sending to every holder at
once. The costs of each: docs/simulator.md, "Cost of one MoE layer".
"""
from __future__ import annotations

from typing import Hashable, Mapping, Optional, Sequence, Union

import numpy as np

from parallel import copy_schedule
from parallel.simulator.config import ClusterConfig

Nodes = Union[int, Sequence[int], np.ndarray]


def node_array(nodes: Nodes, num_ranks: int) -> np.ndarray:
    """Node index of each of `num_ranks` ranks: `nodes` is ranks per node or the array itself."""
    if isinstance(nodes, (int, np.integer)):
        return np.arange(num_ranks) // max(1, int(nodes))
    return np.asarray(nodes, dtype=np.int64)


class Network:
    """N ranks, G per node, NVLink inside a node and one NIC per GPU across nodes."""

    def __init__(self, c: ClusterConfig, num_ranks: int):
        self.N, self.G = num_ranks, c.gpus_per_node
        self.nv, self.ib = c.nvlink_bandwidth, c.internode_bandwidth
        self.a_nv, self.a_ib = c.nvlink_alpha, c.internode_alpha
        self.node = np.arange(self.N) // self.G
        self.same = self.node[:, None] == self.node[None, :]
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

    def schedule_time(self, rounds: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                      hold: Optional[float] = None) -> tuple[float, float]:
        """(end, end of round 0) of a round schedule (`round_arrays`), from time 0.

        A rank starts round r when it finished round r-1; the transfer s->d of round r starts when
        both have started it and lasts the larger of the two ranks' round times (alpha per message
        + bytes / beta per link class, sent or received); a rank's round ends with its last
        transfer. `hold`: no rank starts round 1 before this time (the rest of training's spAG is
        posted only at the MoE layer, after the attention).
        """
        ready = np.zeros(self.N)
        first = 0.0
        for r, (src, dst, nb) in enumerate(rounds):
            if r == 1 and hold is not None:
                ready = np.maximum(ready, hold)
            B = np.zeros((self.N, self.N))
            M = np.zeros((self.N, self.N))
            np.add.at(B, (src, dst), nb)
            np.add.at(M, (src, dst), 1.0)
            dur = self.rank_times(B, M)
            t = np.maximum(ready[src], ready[dst]) + np.maximum(dur[src], dur[dst])
            new = ready.copy()
            np.maximum.at(new, src, t)
            np.maximum.at(new, dst, t)
            ready = new
            if r == 0:
                first = float(ready.max())
        return float(ready.max()) if len(rounds) else 0.0, first


# --------------------------------------------------------------------------------------------
# copy messages
# --------------------------------------------------------------------------------------------
def copy_hops(holders: Sequence[int], expert: int, nodes: Nodes, mode: str) -> list[tuple[int, int]]:
    """(src, dst) messages that bring an expert from its owner (holders[0]) to the other holders.

    p2p: the owner sends one message to every holder (the former flat spAG); chain and
    broadcast: the links of `copy_schedule.chain` (each carries the whole expert once).
    """
    if len(holders) <= 1:
        return []
    if mode == "p2p":
        return [(int(holders[0]), int(h)) for h in holders[1:]]
    n = max(int(h) for h in holders) + 1
    return copy_schedule.chain_hops(list(holders), expert, node_array(nodes, n))


def copy_traffic(holders_E: Sequence[Sequence[int]], num_ranks: int, nodes: Nodes,
                 expert_bytes: float, mode: str = "chain",
                 max_chunks: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Bytes and messages matrices of one spAG for a layer's holders; spRS is its transpose
    (gradients flow back along the same links). A chain hop is `num_chunks` messages."""
    B = np.zeros((num_ranks, num_ranks))
    M = np.zeros((num_ranks, num_ranks))
    na = node_array(nodes, num_ranks)
    for e, hs in enumerate(holders_E):
        msgs = copy_schedule.num_chunks(len(hs), max_chunks) if mode == "chain" else 1
        for s, d in copy_hops(hs, e, na, mode):
            B[s, d] += expert_bytes
            M[s, d] += msgs
    return B, M


def layer_chains(holders_E: Sequence[Sequence[int]], nodes: Nodes, num_ranks: int,
                 layer: Hashable = 0) -> dict:
    """{(layer, expert): chain} of the experts with copies, as `parallel.collectives.layer_chains`."""
    na = node_array(nodes, num_ranks)
    return {(layer, e): copy_schedule.chain(hs, e, na) for e, hs in enumerate(holders_E) if len(hs) > 1}


def round_arrays(chains: Mapping[Hashable, Sequence[int]], expert_bytes: float, max_chunks: int = 4,
                 reduce: bool = False) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(src, dst, bytes) arrays of every round of `gather_rounds` (spAG) or `reduce_rounds` (spRS)."""
    rounds = (copy_schedule.reduce_rounds if reduce else copy_schedule.gather_rounds)(chains, max_chunks)
    piece = {k: expert_bytes / copy_schedule.num_chunks(len(c), max_chunks) for k, c in chains.items()}
    out = []
    for rnd in rounds:
        out.append((np.fromiter((h.src for h in rnd), np.int64, len(rnd)),
                    np.fromiter((h.dst for h in rnd), np.int64, len(rnd)),
                    np.fromiter((piece[h.key] for h in rnd), np.float64, len(rnd))))
    return out
