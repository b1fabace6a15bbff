"""The schedule of SparseAllGather and SparseReduceScatter: pipelined chains over each expert's holders.

Pure (no torch.distributed): training (`parallel.collectives`) and the cluster simulator
(`parallel.simulator`) use the same schedule. Each copied expert travels down a chain of its
holders (owner, its node's other holders, then node after node) in `chunks` pieces, so the
owner's link is no hotspot: in round r, hop i forwards piece r - i; spRS runs the chains
backwards, summing. Every rank derives the same rounds of `Hop`s in a fixed order, so message
matching never depends on tags. Why and how: docs/expert_parallel.md, "SparseAllGather /
SparseReduceScatter as pipelined chains".
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence


@dataclass(frozen=True)
class Hop:
    """Piece `chunk` of the message `key` (e.g. (layer, expert)) moves from `src` to `dst`."""

    key: Hashable
    chunk: int
    src: int
    dst: int


def chain(holders: Sequence[int], expert: int, node_of: Sequence[int]) -> list[int]:
    """The holders in chain order: holders[0] (the owner), its node's other holders by rank, then
    the other nodes in ring order from the owner's, each entered at a holder rotating with
    `expert`."""
    owner = int(holders[0])
    by_node: dict[int, list[int]] = defaultdict(list)
    for h in holders[1:]:
        by_node[int(node_of[int(h)])].append(int(h))
    on = int(node_of[owner])
    order = [owner] + sorted(by_node.pop(on, []))
    K = max(max(by_node, default=on), on) + 1
    for n in sorted(by_node, key=lambda n: (n - on) % K):
        rs = sorted(by_node[n])
        k = expert % len(rs)
        order += rs[k:] + rs[:k]
    return order


def chain_hops(holders: Sequence[int], expert: int, node_of: Sequence[int]) -> list[tuple[int, int]]:
    """(src, dst) of each link of the expert's chain (no pieces)."""
    c = chain(holders, expert, node_of)
    return list(zip(c[:-1], c[1:]))


def num_chunks(num_holders: int, max_chunks: int) -> int:
    """Pieces for a chain of `num_holders`: none to pipeline with one hop; at most `max_chunks`."""
    return max(1, min(max_chunks, num_holders - 1))


def gather_rounds(chains: Mapping[Hashable, Sequence[int]], max_chunks: int = 4) -> list[list[Hop]]:
    """spAG rounds for chains given in chain order (`chains[key] = [owner, h1, h2, ...]`)."""
    rounds: list[list[Hop]] = []
    for key in chains:
        c = list(chains[key])
        C = num_chunks(len(c), max_chunks)
        for i, (s, d) in enumerate(zip(c[:-1], c[1:])):
            for p in range(C):
                r = i + p
                while len(rounds) <= r:
                    rounds.append([])
                rounds[r].append(Hop(key, p, s, d))
    return rounds


def reduce_rounds(chains: Mapping[Hashable, Sequence[int]], max_chunks: int = 4) -> list[list[Hop]]:
    """spRS rounds: the chains reversed, ending at the owner, pieces pipelined the same way."""
    return gather_rounds({k: list(reversed(list(c))) for k, c in chains.items()}, max_chunks)


def chunk_bounds(numel: int, chunks: int) -> list[tuple[int, int]]:
    """[start, end) of each piece of a flat message of `numel` elements (sizes differ by <= 1)."""
    q, r = divmod(numel, chunks)
    out, start = [], 0
    for p in range(chunks):
        n = q + (1 if p < r else 0)
        out.append((start, start + n))
        start += n
    return out


def busiest_sender_copies(rounds: Sequence[Sequence[Hop]], chunks_of: Mapping[Hashable, int]) -> dict[int, float]:
    """Expert copies each rank sends (pieces / pieces per message), for reports and tests."""
    out: dict[int, float] = defaultdict(float)
    for rnd in rounds:
        for h in rnd:
            out[h.src] += 1.0 / chunks_of[h.key]
    return dict(out)
