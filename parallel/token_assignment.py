"""Where each token goes: the token assignment of EP and FSSDP, and the rank -> node layout.

Given every source rank's token counts per expert (`counts[s, e]`) and the ranks holding each
expert this iteration (`holders[e]`, owner first), `assign` decides how many tokens of expert e
rank s sends to rank d: its own copy when it holds one, else the holders on its node, else every
holder, filling the least-loaded first (Hecate's dispatcher, methods.md section 1). The result is
a `TokenAssignment` in O(N*E) memory; `assign_tokens` gives the dense send[s, e, d] array. Split
from `parallel.placement` (which re-exports these names); the same pure numpy, no torch.

nodes: where a function takes `ranks_per_node`, it is either an int (node of rank r =
r // ranks_per_node) or the node id of every rank (as Ray placed them), see `node_ids`.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

Nodes = Union[int, Sequence[int], np.ndarray]  # ranks per node, or the node id of every rank


def node_of(rank: int, ranks_per_node: Nodes) -> int:
    if isinstance(ranks_per_node, (int, np.integer)):
        return rank // max(1, int(ranks_per_node))
    return int(ranks_per_node[rank])


def node_ids(num_ranks: int, ranks_per_node: Nodes = 8) -> np.ndarray:
    """(N,) node id of every rank: rank // ranks_per_node for an int, else the given ids."""
    if isinstance(ranks_per_node, (int, np.integer)):
        return np.arange(num_ranks, dtype=np.int64) // max(1, int(ranks_per_node))
    ids = np.asarray(ranks_per_node, dtype=np.int64).reshape(-1)
    if ids.shape[0] != num_ranks:
        raise ValueError(f"{ids.shape[0]} node ids for {num_ranks} ranks")
    return ids


def _dense_nodes(num_ranks: int, ranks_per_node: Nodes) -> tuple[np.ndarray, int]:
    """Node of every rank as 0..G-1 in ascending id order, and G."""
    if isinstance(ranks_per_node, (int, np.integer)):
        nd = node_ids(num_ranks, ranks_per_node)
        return nd, int(nd[-1]) + 1 if num_ranks else 0
    uniq, nd = np.unique(node_ids(num_ranks, ranks_per_node), return_inverse=True)
    return nd.reshape(-1).astype(np.int64), len(uniq)


# --------------------------------------------------------------------------------------------
# token assignment
# --------------------------------------------------------------------------------------------
@dataclass
class TokenAssignment:
    """send[s, e, d] in O(N*E + sends) memory: a single-holder expert e sends all its tokens to
    `single_dst[e]` (-1: replicated); the replicated experts' sends are the rows (src, exp, dst,
    amt), one per nonzero send[s, e, d]. `loads`: the expert tokens each rank computes."""

    counts: np.ndarray  # (N, E) int64 tokens of every source per expert
    single_dst: np.ndarray  # (E,) int64
    src: np.ndarray  # the replicated experts' sends: (src, exp, dst, amt) int64 rows
    exp: np.ndarray
    dst: np.ndarray
    amt: np.ndarray
    loads: np.ndarray  # (N,) int64

    @property
    def nbytes(self) -> int:
        return sum(int(getattr(self, k).nbytes) for k in ("counts", "single_dst", "src", "exp", "dst", "amt", "loads"))

    def from_rank(self, s: int) -> np.ndarray:
        """(E, N): tokens of each expert that rank s sends to each rank."""
        out = np.zeros(self.counts.shape[::-1], dtype=np.int64)
        es = np.flatnonzero(self.single_dst >= 0)
        out[es, self.single_dst[es]] = self.counts[s, es]
        k = self.src == s
        out[self.exp[k], self.dst[k]] += self.amt[k]
        return out

    def to_rank(self, d: int) -> np.ndarray:
        """(N, E): tokens of each expert that arrive at rank d from each source."""
        out = np.zeros(self.counts.shape, dtype=np.int64)
        es = np.flatnonzero(self.single_dst == d)
        out[:, es] = self.counts[:, es]
        k = self.dst == d
        out[self.src[k], self.exp[k]] += self.amt[k]
        return out

    def rank_loads(self) -> np.ndarray:
        return self.loads.copy()

    def token_matrix(self) -> np.ndarray:
        """(N, N): tokens rank s sends to rank d, summed over experts (= dense().sum(axis=1))."""
        N = self.counts.shape[0]
        tok = np.zeros((N, N), dtype=np.int64)
        es = np.flatnonzero(self.single_dst >= 0)
        if es.size:
            es = es[np.argsort(self.single_dst[es], kind="stable")]
            d = self.single_dst[es]
            start = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
            tok[:, d[start]] = np.add.reduceat(self.counts[:, es], start, axis=1)
        np.add.at(tok, (self.src, self.dst), self.amt)
        return tok

    def dense(self) -> np.ndarray:
        """send[s, e, d] as `assign_tokens` returns it: (N, E, N), for tests and small N."""
        N, E = self.counts.shape
        send = np.zeros((N, E, N), dtype=np.int64)
        es = np.flatnonzero(self.single_dst >= 0)
        send[:, es, self.single_dst[es]] = self.counts[:, es]
        np.add.at(send, (self.src, self.exp, self.dst), self.amt)
        return send


def _fill_run(ns: list[int], cands: list[int], ld: np.ndarray) -> list[tuple[list[int], list[int]]]:
    """Consecutive water fills (the original `_water_fill`) of ns[0], ns[1], ... tokens over the
    same candidates, nothing else touching them meanwhile, on one sorted list of (load, rank).
    Returns per fill the raised ranks and what each gets; updates `ld`."""
    lst = sorted(zip(ld[cands].tolist(), cands))
    K, out, raised = len(lst), [], {}
    for n in ns:
        k, rem = 1, n
        while k < K and rem >= (lst[k][0] - lst[k - 1][0]) * k:
            rem -= (lst[k][0] - lst[k - 1][0]) * k
            k += 1
        q, r = divmod(rem, k)
        lam = lst[k - 1][0] + q
        low, rest = lst[:k], lst[k:]
        out.append(([c for _, c in low], [lam + (j < r) - v for j, (v, _) in enumerate(low)]))
        raised.update((c, lam + (j < r)) for j, (_, c) in enumerate(low))
        lst = [(lam, c) for c in sorted(c for _, c in low[r:])]  # below rest[0][0] >= lam + 1
        if r:
            t = bisect.bisect_right(rest, (lam + 1, math.inf))  # rest's entries at lam + 1
            lst += sorted([(lam + 1, c) for _, c in low[:r]] + rest[:t]) + rest[t:]
        else:
            lst += rest
    ld[list(raised)] = list(raised.values())
    return out


def _fill_rows(n: np.ndarray, C: np.ndarray, ld: np.ndarray, N: int) -> tuple[np.ndarray, np.ndarray]:
    """One water fill in each of R independent rows: n (R,) tokens over C (R, K), padded with rank
    N (ld[N] too high to be raised), in closed form (docs/planner.md). Returns C sorted by
    (load, rank) and what each gets."""
    R, K = C.shape
    v, C = np.divmod(np.sort(ld[C] * (N + 1) + C, axis=1), N + 1)
    P = np.cumsum(v, axis=1)
    kk = np.arange(K)
    kf = 1 + (kk[1:] * v[:, 1:] - P[:, :-1] <= n[:, None]).sum(axis=1)
    rows = np.arange(R)
    lev = v[rows, kf - 1]
    q, r = np.divmod(n - kf * lev + P[rows, kf - 1], kf)
    add = (lev + q)[:, None] + (kk < r[:, None]) - v
    add[kk >= kf[:, None]] = 0
    return C, add


def _levels(is_global: np.ndarray, grp: np.ndarray) -> np.ndarray:
    """Level of each water fill (given in sequential order): a local fill waits for the previous
    one of its node `grp` and the previous global fill, a global fill for all earlier ones."""
    seg = np.cumsum(is_global)  # a global fill starts a new segment
    occ = np.zeros(len(grp), dtype=np.int64)
    li = np.flatnonzero(~is_global)
    D = np.zeros(int(seg[-1]) + 1, dtype=np.int64)  # the depth of each segment
    if li.size:
        li = li[np.lexsort((li, grp[li], seg[li]))]
        g = seg[li] * (int(grp.max()) + 1) + grp[li]
        j = np.arange(li.size)
        occ[li] = j - np.maximum.accumulate(np.where(np.r_[True, g[1:] != g[:-1]], j, 0))
        np.maximum.at(D, seg[li], occ[li] + 1)
    base = np.concatenate([[0], np.cumsum(D[:-1] + 1)])
    return base[seg] + np.where(is_global, 0, occ + 1)


_PY_ROWS = 6  # levels with at most this many fills run them in Python (numpy's per-call cost)


def _bincount(idx: np.ndarray, w: np.ndarray, n: int) -> np.ndarray:
    """Exact integer sums of w per index (float sums of integers are exact below 2**53)."""
    if w.size and int(np.abs(w).sum()) < 2 ** 53:
        return np.bincount(idx, weights=w, minlength=n).astype(np.int64)
    out = np.zeros(n, dtype=np.int64)
    np.add.at(out, idx, w)
    return out


@dataclass
class _Replicated:
    """The experts with more than one holder: their (expert, holder) pairs, the fill order and
    the holder table the water fills draw their candidates from."""

    experts: np.ndarray  # (M,) the replicated experts, ascending
    holder: np.ndarray  # rank of every (expert, holder) pair, expert by expert
    index: np.ndarray  # index into `experts` of every pair
    kept: np.ndarray  # tokens each holder keeps: its own tokens of that expert
    pos: np.ndarray  # (M,) place of each expert in the fill order
    fill_experts: np.ndarray  # (M,) the experts in fill order: most remote tokens first, then id
    node: np.ndarray  # (N,) node of every rank as 0..G-1
    num_nodes: int  # G
    table: np.ndarray  # row p*G + g: the holders of fill_experts[p] on node g, padded with rank N
    per_row: np.ndarray  # holders in each table row (0: the node has none)


@dataclass
class _Fills:
    """One water fill per (replicated expert, source holding no copy, with tokens of it), in
    level order; level i is the fills cut[i]:cut[i+1]."""

    src: np.ndarray  # the source rank
    expert: np.ndarray  # the expert
    row: np.ndarray  # the holder-table row of its candidates
    tokens: np.ndarray  # tokens it sends
    is_global: np.ndarray  # the source's node holds no copy: the candidates are all holders
    cut: list


def _single_holder_loads(counts: np.ndarray, holders: Sequence[Sequence[int]],
                         num_holders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The destination of every single-holder expert (-1: replicated) and the (N + 1,) loads
    they put on their holders (loads[N]: the holder table's pad, set by `_replicated`)."""
    world, num_experts = counts.shape
    single = np.flatnonzero(num_holders == 1)
    single_dst = np.full(num_experts, -1, dtype=np.int64)
    single_dst[single] = [holders[e][0] for e in single.tolist()]
    loads = np.zeros(world + 1, dtype=np.int64)
    loads[:world] = _bincount(single_dst[single], counts.sum(axis=0)[single], world)
    return single_dst, loads


def _replicated(counts: np.ndarray, holders: Sequence[Sequence[int]], num_holders: np.ndarray,
                loads: np.ndarray, ranks_per_node: Nodes) -> _Replicated:
    """Every holder keeps its own tokens (added to `loads`); the experts fill in order of their
    remote tokens, heaviest first; the holder table groups each expert's holders by node."""
    world = counts.shape[0]
    colsum = counts.sum(axis=0)
    experts = np.flatnonzero(num_holders > 1)
    num = len(experts)
    holder = np.concatenate([np.asarray(holders[e], dtype=np.int64) for e in experts.tolist()])
    index = np.repeat(np.arange(num), num_holders[experts])
    kept = counts[holder, experts[index]]
    loads[:world] += _bincount(holder, kept, world)
    remote = colsum[experts] - _bincount(index, kept, num)
    order = np.lexsort((experts, -remote))  # (-remote, e)
    pos = np.empty(num, dtype=np.int64)
    pos[order] = np.arange(num)
    loads[world] = (int(colsum.sum()) + 1) * (world + 1)  # above any load + fill: sorts last, never raised
    node, num_nodes = _dense_nodes(world, ranks_per_node)
    key = pos[index] * num_nodes + node[holder]
    o = np.argsort(key, kind="stable")
    per_row = np.bincount(key, minlength=num * num_nodes)
    table = np.full((num * num_nodes, int(per_row.max())), world, dtype=np.int64)
    table[key[o], np.arange(len(holder)) - np.repeat(np.cumsum(per_row) - per_row, per_row)] = holder[o]
    return _Replicated(experts, holder, index, kept, pos, experts[order], node, num_nodes, table, per_row)


def _fills(counts: np.ndarray, rep: _Replicated) -> Optional[_Fills]:
    """The fills in level order (`_levels`); None when every source holds what it sends."""
    is_holder = np.zeros((len(rep.experts), counts.shape[0]), dtype=bool)
    is_holder[rep.pos[rep.index], rep.holder] = True
    fill_pos, src = np.nonzero(~is_holder & (counts[:, rep.fill_experts].T > 0))  # in sequential order
    if not fill_pos.size:
        return None
    row = fill_pos * rep.num_nodes + rep.node[src]
    is_global = rep.per_row[row] == 0
    level = _levels(is_global, rep.node[src])
    so = np.argsort(level, kind="stable")
    level, fill_pos, src, row, is_global = level[so], fill_pos[so], src[so], row[so], is_global[so]
    expert = rep.fill_experts[fill_pos]
    cut = np.flatnonzero(np.r_[True, level[1:] != level[:-1], True]).tolist()
    return _Fills(src, expert, row, counts[src, expert], is_global, cut)


def _python_runs(level: int, cut: list, is_global: list, expert: list, cands: np.ndarray,
                 holders: Sequence[Sequence[int]], world: int) -> tuple[list, int]:
    """The fills from `level` on that run in plain Python (faster than numpy for a few), as
    (fill indices, candidates) runs, and the next level: a global fill with the global fills of
    its expert right after it, or a level of at most _PY_ROWS fills over at most 32 candidates.
    No runs: the level runs in numpy."""
    first, end = cut[level], cut[level + 1]
    nxt = level + 1
    if is_global[first]:
        while nxt < len(cut) - 1 and is_global[cut[nxt]] and expert[cut[nxt]] == expert[first]:
            nxt += 1
        return [(cut[level:nxt], [int(c) for c in holders[expert[first]]])], nxt
    if end - first <= _PY_ROWS:
        runs = [([x], [c for c in cands[x].tolist() if c < world]) for x in range(first, end)]
        if max(len(c) for _, c in runs) <= 32:
            return runs, nxt
    return [], nxt


def _fill_levels(fills: _Fills, cands: np.ndarray, holders: Sequence[Sequence[int]], loads: np.ndarray,
                 world: int) -> tuple[np.ndarray, np.ndarray, tuple[list, list, list, list]]:
    """Run the fills level by level, raising `loads`. Returns the numpy levels' candidates
    (sorted) and what each gets, and the (src, exp, dst, amt) lists of the Python fills."""
    add = np.zeros_like(cands)
    python_sends: tuple[list, list, list, list] = ([], [], [], [])
    tokens, is_global = fills.tokens.tolist(), fills.is_global.tolist()
    src, expert = fills.src.tolist(), fills.expert.tolist()
    level, num_levels = 0, len(fills.cut) - 1
    while level < num_levels:
        runs, nxt = _python_runs(level, fills.cut, is_global, expert, cands, holders, world)
        for xs, run_cands in runs:
            for x, (cs, ad) in zip(xs, _fill_run([tokens[x] for x in xs], run_cands, loads)):
                python_sends[0].extend([src[x]] * len(cs))
                python_sends[1].extend([expert[x]] * len(cs))
                python_sends[2].extend(cs)
                python_sends[3].extend(ad)
        if not runs:
            a, b = fills.cut[level], fills.cut[level + 1]
            cands[a:b], add[a:b] = _fill_rows(fills.tokens[a:b], cands[a:b], loads, world)
            loads[cands[a:b]] += add[a:b]  # pads get 0, the rows' holders are disjoint
        level = nxt
    return cands, add, python_sends


def assign(counts_NE: np.ndarray, holders: Sequence[Sequence[int]], ranks_per_node: Nodes = 8) -> TokenAssignment:
    """The token assignment of `assign_tokens` as a TokenAssignment (O(N*E) memory), the same
    integers. Single-holder experts are one vectorised step; the replicated experts' water fills
    run in levels of fills on disjoint holders (docs/planner.md). `holders[e]`: distinct ranks."""
    counts = np.asarray(counts_NE, dtype=np.int64)
    world = counts.shape[0]
    num_holders = np.array([len(h) for h in holders], dtype=np.int64)
    single_dst, loads = _single_holder_loads(counts, holders, num_holders)
    if not (num_holders > 1).any():
        none = np.zeros(0, dtype=np.int64)
        return TokenAssignment(counts, single_dst, none, none, none, none, loads[:world])
    rep = _replicated(counts, holders, num_holders, loads, ranks_per_node)
    kept = (rep.holder, rep.experts[rep.index], rep.holder, rep.kept)  # every holder's own tokens
    fills = _fills(counts, rep)
    if fills is None:
        return TokenAssignment(counts, single_dst, *kept, loads[:world])
    cands, add, python_sends = _fill_levels(fills, rep.table[fills.row], holders, loads, world)
    k = (add > 0).ravel()
    K = cands.shape[1]
    parts = [kept, tuple(np.asarray(x, dtype=np.int64) for x in python_sends),
             (np.repeat(fills.src, K)[k], np.repeat(fills.expert, K)[k], cands.ravel()[k], add.ravel()[k])]
    src, exp, dst, amt = (np.concatenate([p[i] for p in parts]) for i in range(4))
    nonzero = amt != 0
    return TokenAssignment(counts, single_dst, src[nonzero], exp[nonzero], dst[nonzero], amt[nonzero], loads[:world])


def assign_tokens(counts_NE: np.ndarray, holders: Sequence[Sequence[int]], ranks_per_node: Nodes = 8) -> np.ndarray:
    """send[s, e, d]: tokens of expert e that rank s sends to holder d, as an (N, E, N) array
    (= `assign(...).dense()`; use `assign` at scale).

    A source that holds a copy keeps its tokens (local first). Other sources send to holders in
    their own node when there are any, else to all holders; within that choice the tokens go
    where they even out the holders' total expert loads (water filling over the ranks' loads from
    every expert, the heaviest replicated experts placed last). Deterministic: every rank agrees.
    """
    return assign(counts_NE, holders, ranks_per_node).dense()


def rank_loads(send) -> np.ndarray:
    """Expert tokens each rank computes: (N,), from a TokenAssignment or a send[s, e, d] array."""
    if isinstance(send, TokenAssignment):
        return send.rank_loads()
    return np.asarray(send).sum(axis=(0, 1))
