"""Where experts live and where tokens go: the pure planning code of EP and FSSDP (Hecate).

Deterministic functions of small numpy arrays, no torch.distributed: every rank computes the
same plan from the same inputs, and the cluster simulator (`parallel.simulator`) runs the very
same functions. Here: ownership P0 (`Ownership`, one owner rank and pool slot per (layer,
expert)), the per-iteration copies P1 (`plan_materialization` = Algorithm 1, `plan_iteration`:
`holders[e]`, owner first), heterogeneous sharding (`heterogeneous_sharding` = Algorithm 2,
`reshard_decision`); the token assignment lives in `parallel.token_assignment`, re-exported.
`ranks_per_node`: an int or the node id of every rank. The vocabulary, and the vectorised planner
that gives exactly the original loops' results (kept as the test oracle in
`tests/parallel/planner_reference.py`): docs/planner.md.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from parallel.token_assignment import (Nodes, TokenAssignment, _dense_nodes, assign, assign_tokens,  # noqa: F401
                                       node_ids, node_of, rank_loads)


# --------------------------------------------------------------------------------------------
# ownership
# --------------------------------------------------------------------------------------------
@dataclass
class Ownership:
    """P0 for all MoE layers: owner rank and pool slot of every (layer, expert)."""

    owner_LE: np.ndarray  # (L, E) int64
    slot_LE: np.ndarray  # (L, E) int64
    num_ranks: int

    @property
    def num_layers(self) -> int:
        return int(self.owner_LE.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.owner_LE.shape[1])

    @property
    def slots_per_rank(self) -> int:
        return self.num_layers * self.num_experts // self.num_ranks

    @classmethod
    def even(cls, num_layers: int, num_experts: int, num_ranks: int) -> "Ownership":
        """Classic EP sharding: rank r owns experts [r*E/N, (r+1)*E/N) of every layer."""
        if num_experts % num_ranks:
            raise ValueError(f"num_experts={num_experts} is not divisible by the {num_ranks} expert-parallel ranks")
        per = num_experts // num_ranks
        e = np.arange(num_experts)
        owner = np.tile(e // per, (num_layers, 1)).astype(np.int64)
        slot = (np.arange(num_layers)[:, None] * per + (e % per)[None, :]).astype(np.int64)
        return cls(owner, slot, num_ranks)

    def check(self) -> None:
        """Every rank uses each of its S slots exactly once."""
        S, N = self.slots_per_rank, self.num_ranks
        o, s = self.owner_LE.ravel(), self.slot_LE.ravel()
        k = (o >= 0) & (o < N)
        o, s = o[k], s[k]
        i = np.lexsort((s, o))
        o, s = o[i], s[i]
        cnt = np.bincount(o, minlength=N)
        pos = np.arange(len(o)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        bad = cnt != S
        np.logical_or.at(bad, o, s != pos)
        if bad.any():
            r = int(np.argmax(bad))
            slots = np.sort(self.slot_LE[self.owner_LE == r])
            raise ValueError(f"ownership: rank {r} holds slots {slots.tolist()}, expected 0..{S - 1}")

    def owned(self, rank: int) -> list[tuple[int, int, int]]:
        """(layer, expert, slot) owned by `rank`, in slot order."""
        ls, es = np.nonzero(self.owner_LE == rank)
        items = sorted(zip(self.slot_LE[ls, es].tolist(), ls.tolist(), es.tolist()))
        return [(layer, e, s) for s, layer, e in items]

    def to_dict(self) -> dict:
        return {"owner": self.owner_LE.tolist(), "slot": self.slot_LE.tolist(), "num_ranks": self.num_ranks}

    @classmethod
    def from_dict(cls, d: dict) -> "Ownership":
        return cls(np.asarray(d["owner"], dtype=np.int64), np.asarray(d["slot"], dtype=np.int64), int(d["num_ranks"]))


# --------------------------------------------------------------------------------------------
# load prediction and the overlap budget
# --------------------------------------------------------------------------------------------
class LoadPredictor:
    """Predicted expert loads: the mean of the last `window` iterations' global (L, E) counts."""

    def __init__(self, window: int = 5):
        if window < 1:
            raise ValueError(f"window={window} must be >= 1")
        self.window = window
        self.history: deque = deque(maxlen=window)

    def observe(self, counts_LE) -> None:
        self.history.append(np.asarray(counts_LE, dtype=np.float64))

    def predict(self) -> Optional[np.ndarray]:
        if not self.history:
            return None
        return np.mean(np.stack(self.history), axis=0)

    def state_dict(self) -> dict:
        return {"window": self.window, "history": [h.tolist() for h in self.history]}

    def load_state_dict(self, d: dict) -> None:
        self.history.clear()
        for h in d.get("history", [])[-self.window:]:
            self.history.append(np.asarray(h, dtype=np.float64))


def overlap_budget(attention_time_s: float, bandwidth_bytes_per_s: float, expert_bytes: float) -> int:
    """Hecate's t: how many experts can be gathered while the attention before the layer runs."""
    if expert_bytes <= 0:
        raise ValueError("expert_bytes must be > 0")
    return max(0, int(math.floor(attention_time_s * bandwidth_bytes_per_s / expert_bytes)))


# --------------------------------------------------------------------------------------------
# Algorithm 1: the materialization plan of one layer
# --------------------------------------------------------------------------------------------
def plan_materialization(load_E: Sequence[float], owner_E: Sequence[int], num_ranks: int, t: int, m: int,
                         ranks_per_node: Nodes = 8, tolerance: float = 0.05) -> list[list[int]]:
    """Holders of every expert for this iteration: `holders[e]` = [owner, extra ranks...].

    Hecate Algorithm 1 with inputs: predicted loads, overlap budget t (experts a rank can gather
    while attention runs) and memory cap m (extra experts a rank may hold).
    t <- min(t, E), m <- min(m, t). Only experts heavier than the uniform share (load > total/E)
    are candidates (a copy of a lighter expert cannot unload anyone), and an expert has at most N
    holders. When the ownership alone already keeps every rank within `tolerance` of the mean
    load there is nothing to balance and no copies are made (no bytes moved).
    * t <= m: the top-t candidates are copied to every rank (up to their need).
    * t > m: N*m slots are spread over the top-t candidates in proportion to their load (largest
      remainder), each copy on a rank that does not hold the expert, preferring nodes that do not
      hold it yet, then the rank with the fewest extras and the lowest owned load; a rank takes at
      most m extras.
    Vectorised per expert (docs/planner.md), the same picks as one copy at a time.
    """
    load = np.asarray(load_E, dtype=np.float64)
    owner = np.asarray(owner_E, dtype=np.int64)
    E, N = len(load), num_ranks
    holders = [[o] for o in owner.tolist()]
    total = float(load.sum())
    t, m = min(int(t), E), min(int(m), int(t), E)
    if N <= 1 or t <= 0 or m <= 0 or total <= 0:
        return holders
    owned_load = np.bincount(owner, weights=load, minlength=N)  # the same sequential sums as np.add.at
    if owned_load.max() <= (1.0 + tolerance) * owned_load.mean():
        return holders
    fair = total / E
    need = np.where(load > fair * (1 + 1e-9), N - 1, 0)
    srt = np.argsort(-load, kind="stable")
    order = srt[need[srt] > 0][:t]
    if order.size == 0:
        return holders
    if t <= m:
        want = need[order]
    else:
        budget = N * m
        w = load[order]
        share = budget * w / w.sum()
        base = np.floor(share).astype(np.int64)
        rem = budget - int(base.sum())
        base[np.argsort(-(share - base), kind="stable")[:rem]] += 1
        want = np.minimum(base, need[order])
    nd, G = _dense_nodes(N, ranks_per_node)
    pos = np.empty(N, dtype=np.int64)
    pos[np.argsort(owned_load, kind="stable")] = np.arange(N)  # rank of (owned_load[r], r)
    extras = np.zeros(N, dtype=np.int64)
    for e, k in zip(order.tolist(), want.tolist()):  # heaviest first
        if k <= 0:
            continue
        o = holders[e][0]
        key = extras * N + pos
        cand = extras < m
        cand[o] = False
        held = np.zeros(G, dtype=bool)
        held[nd[o]] = True
        c1 = np.flatnonzero(cand & ~held[nd])  # on nodes without a holder
        c1 = c1[np.argsort(key[c1])]
        _, first = np.unique(nd[c1], return_index=True)
        picks = c1[np.sort(first)][:k]
        if len(picks) < k:  # every node holds it now: the rest in key order
            cand[picks] = False
            c2 = np.flatnonzero(cand)
            picks = np.concatenate([picks, c2[np.argsort(key[c2])][:k - len(picks)]])
        extras[picks] += 1
        holders[e].extend(picks.tolist())
    return holders


def ownership_holders(owner_E: Sequence[int]) -> list[list[int]]:
    """The plan with no copies: every expert on its owner only (classic EP)."""
    return [[int(o)] for o in owner_E]


# --------------------------------------------------------------------------------------------
# Algorithm 2: heterogeneous sharding
# --------------------------------------------------------------------------------------------
def heterogeneous_sharding(load_LE: np.ndarray, current: Ownership, t: int,
                           ranks_per_node: Nodes = 8) -> Ownership:
    """New ownership for all layers: same slots per rank, each layer's load spread over ranks.

    Hecate Algorithm 2: hold back each layer's top-t experts (they are copied anyway; as in the
    materialization plan only experts above the uniform share count, so at most those); place the
    rest, layers with the largest max load first and experts in descending load, each on the
    least-loaded node (for that layer) then least-loaded rank with a free slot; fill the leftover
    slots with the held-back experts. Experts that stay on their rank keep their slot, so only the
    experts that really move change hands.

    Only the node that took an expert changes load: it alone is re-summed, a heap orders nodes.
    """
    load = np.asarray(load_LE, dtype=np.float64)
    L, E = load.shape
    N, S = current.num_ranks, current.slots_per_rank
    nd, G = _dense_nodes(N, ranks_per_node)
    nd_l = nd.tolist()
    ranks_of: list[list[int]] = [[] for _ in range(G)]
    for r in range(N):
        ranks_of[nd_l[r]].append(r)
    t = max(0, min(int(t), E))
    free = [S] * N
    open_ranks = [len(rs) if S > 0 else 0 for rs in ranks_of]  # ranks with a free slot
    cur_owner = current.owner_LE.tolist()
    new_owner = np.full((L, E), -1, dtype=np.int64)
    held: list[tuple[int, int]] = []
    for layer in np.argsort(-load.max(axis=1), kind="stable").tolist():
        order = np.argsort(-load[layer], kind="stable")
        total = load[layer].sum()
        n_hot = int((load[layer] > total / E * (1 + 1e-9)).sum()) if total > 0 else 0
        th = min(t, n_hot)
        held += [(layer, int(e)) for e in order[:th]]
        row, own_row, out = load[layer].tolist(), cur_owner[layer], new_owner[layer]
        ll, node_ld, ver = [0.0] * N, [0.0] * G, [0] * G
        heap = [(0.0, n, 0) for n in range(G) if open_ranks[n] > 0]
        for e in order[th:].tolist():
            while heap and (heap[0][2] != ver[heap[0][1]] or open_ranks[heap[0][1]] == 0):
                heapq.heappop(heap)
            if not heap:
                raise ValueError("heterogeneous_sharding: no free slot left (inconsistent ownership)")
            v, n, _ = heap[0]
            o = own_row[e]
            home = nd_l[o]
            if home != n and open_ranks[home] > 0 and node_ld[home] == v:
                n = home  # min over (node load, node != home, node)
            r = min((ll[q], q != o, q) for q in ranks_of[n] if free[q] > 0)[2]
            out[e] = r
            free[r] -= 1
            ll[r] += row[e]
            open_ranks[n] -= free[r] == 0
            s = 0.0  # sequential, as the original sum() of numpy floats
            for q in ranks_of[n]:
                if free[q] > 0:
                    s += ll[q]
            node_ld[n] = s
            ver[n] += 1
            if open_ranks[n] > 0:
                heapq.heappush(heap, (s, n, ver[n]))
    free_a = np.asarray(free, dtype=np.int64)
    for layer, e in held:  # leftover slots: prefer the current owner (no move), then the emptiest rank
        cur = cur_owner[layer][e]
        r = cur if free_a[cur] > 0 else int(np.argmax(free_a))
        new_owner[layer, e] = r
        free_a[r] -= 1
    out = Ownership(new_owner, _new_slots(current, new_owner), N)
    out.check()
    return out


def _new_slots(current: Ownership, new_owner: np.ndarray) -> np.ndarray:
    """Slots of `new_owner`: experts that stay keep theirs, the arrivals at each rank take its
    free slots in ascending order, in (layer, expert) order."""
    N, S = current.num_ranks, current.slots_per_rank
    new_slot = np.full(new_owner.shape, -1, dtype=np.int64)
    stays = new_owner == current.owner_LE
    new_slot[stays] = current.slot_LE[stays]
    mv = np.flatnonzero(~stays.ravel())
    mo = new_owner.ravel()[mv]
    used = np.zeros((N, S), dtype=bool)
    used[new_owner[stays], current.slot_LE[stays]] = True  # a valid current ownership: no repeats
    ar, free_slots = np.nonzero(~used)  # by rank, then slot
    if used.sum() != stays.sum() or not np.array_equal(np.bincount(ar, minlength=N), np.bincount(mo, minlength=N)):
        raise ValueError("heterogeneous_sharding: the current ownership does not use every slot once")
    new_slot.reshape(-1)[mv[np.argsort(mo, kind="stable")]] = free_slots
    return new_slot


def moves(old: Ownership, new: Ownership) -> list[tuple[int, int, int, int, int, int]]:
    """(layer, expert, from_rank, from_slot, to_rank, to_slot) for every expert that changes place."""
    ls, es = np.nonzero((old.owner_LE != new.owner_LE) | (old.slot_LE != new.slot_LE))
    cols = (ls, es, old.owner_LE[ls, es], old.slot_LE[ls, es], new.owner_LE[ls, es], new.slot_LE[ls, es])
    return list(zip(*(c.tolist() for c in cols)))


# --------------------------------------------------------------------------------------------
# the per-iteration plan of all layers
# --------------------------------------------------------------------------------------------
@dataclass
class FSSDPPlanConfig:
    """The knobs of the planner (`parallel.fssdp` in the spec)."""

    window: int = 5  # iterations of global counts the load prediction averages
    overlap_budget: Optional[int] = None  # t; None: derived from measured times (see ExpertStore)
    memory_cap: int = 2  # m: extra experts a rank may hold per layer
    reshard_every: int = 100  # heterogeneous sharding period (0: never)
    tolerance: float = 0.05  # no copies while every rank is within this fraction of the mean load
    rematerialize: bool = False  # free copies after forward, gather again in backward
    sprs_overlap: bool = False  # each layer's spRS starts in the backward pass, once its gradients are final
    ranks_per_node: Nodes = 8  # or the node id of every rank
    link_gbps: float = 400.0  # to derive t from the measured attention time


@dataclass
class IterationPlan:
    holders_L: list[list[list[int]]] = field(default_factory=list)

    def copies(self) -> list[tuple[int, int, int]]:
        """(layer, expert, holder) for every copy (not the owner)."""
        return [(layer, e, h) for layer, hs in enumerate(self.holders_L) for e, hl in enumerate(hs) for h in hl[1:]]


def predicted_straggler(own: Ownership, load_LE: np.ndarray, t: int, m: int, ranks_per_node: Nodes = 8,
                        tolerance: float = 0.05) -> float:
    """The worst layer's busiest-rank / mean expert load under `own` and the plan Algorithm 1
    makes for it, with every rank sending an equal share of each expert's predicted tokens."""
    load = np.asarray(load_LE, dtype=np.float64)
    N = own.num_ranks
    plan = plan_iteration(own, load, t, m, ranks_per_node, tolerance)
    worst = 1.0
    for layer in range(own.num_layers):
        counts = np.tile(np.round(load[layer] / N).astype(np.int64), (N, 1))
        r = assign(counts, plan.holders_L[layer], ranks_per_node).rank_loads().astype(np.float64)
        if r.mean() > 0:
            worst = max(worst, float(r.max() / r.mean()))
    return worst


def reshard_decision(own: Ownership, load_LE: np.ndarray, t: int, m: int, ranks_per_node: Nodes = 8,
                     tolerance: float = 0.05) -> Optional[Ownership]:
    """Heterogeneous sharding when it pays: None while the predicted straggler ratio (with the
    materialization plan) is within tolerance, or when Algorithm 2's ownership would not lower
    it (moving experts costs bytes, so a balanced layout stays where it is)."""
    before = predicted_straggler(own, load_LE, t, m, ranks_per_node, tolerance)
    if before <= 1.0 + tolerance:
        return None
    new = heterogeneous_sharding(load_LE, own, t, ranks_per_node)
    if predicted_straggler(new, load_LE, t, m, ranks_per_node, tolerance) >= before - 1e-6:
        return None
    return new


def plan_iteration(own: Ownership, load_LE: Optional[np.ndarray], t: int, m: int,
                   ranks_per_node: Nodes = 8, tolerance: float = 0.05) -> IterationPlan:
    """Every layer's holders this iteration: Algorithm 1 on the forecast `load_LE`, or the
    ownership alone before there is one."""
    holders = []
    for layer in range(own.num_layers):
        if load_LE is None:
            holders.append(ownership_holders(own.owner_LE[layer]))
        else:
            holders.append(plan_materialization(load_LE[layer], own.owner_LE[layer], own.num_ranks, t, m,
                                                ranks_per_node, tolerance))
    return IterationPlan(holders)
