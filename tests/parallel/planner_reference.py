"""The FSSDP planner as it was before vectorisation: a frozen copy, kept as a test oracle.

Verbatim copy of `parallel/placement.py`'s Ownership, node_of, plan_materialization (Hecate
Algorithm 1), ownership_holders, _water_fill, assign_tokens, rank_loads, heterogeneous_sharding
(Algorithm 2), moves, IterationPlan, predicted_straggler, reshard_decision and plan_iteration,
taken before the vectorised rewrite. `tests/parallel/test_planner_vectorised.py` checks that the
new planner gives exactly these results, and `bench/planner.py` times both. Do not "fix" or
speed up this file: its value is that it is the old code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np


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
        S = self.slots_per_rank
        for r in range(self.num_ranks):
            slots = np.sort(self.slot_LE[self.owner_LE == r])
            if slots.tolist() != list(range(S)):
                raise ValueError(f"ownership: rank {r} holds slots {slots.tolist()}, expected 0..{S - 1}")

    def owned(self, rank: int) -> list[tuple[int, int, int]]:
        """(layer, expert, slot) owned by `rank`, in slot order."""
        ls, es = np.nonzero(self.owner_LE == rank)
        items = sorted(zip(self.slot_LE[ls, es].tolist(), ls.tolist(), es.tolist()))
        return [(l, e, s) for s, l, e in items]

    def to_dict(self) -> dict:
        return {"owner": self.owner_LE.tolist(), "slot": self.slot_LE.tolist(), "num_ranks": self.num_ranks}

    @classmethod
    def from_dict(cls, d: dict) -> "Ownership":
        return cls(np.asarray(d["owner"], dtype=np.int64), np.asarray(d["slot"], dtype=np.int64), int(d["num_ranks"]))


def node_of(rank: int, ranks_per_node: int) -> int:
    return rank // max(1, ranks_per_node)


def plan_materialization(load_E: Sequence[float], owner_E: Sequence[int], num_ranks: int, t: int, m: int,
                         ranks_per_node: int = 8, tolerance: float = 0.05) -> list[list[int]]:
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
    """
    load = np.asarray(load_E, dtype=np.float64)
    owner = np.asarray(owner_E, dtype=np.int64)
    E, N = len(load), num_ranks
    holders = [[int(owner[e])] for e in range(E)]
    total = float(load.sum())
    t, m = min(int(t), E), min(int(m), int(t), E)
    if N <= 1 or t <= 0 or m <= 0 or total <= 0:
        return holders
    owned_load = np.zeros(N)
    np.add.at(owned_load, owner, load)
    if owned_load.max() <= (1.0 + tolerance) * owned_load.mean():
        return holders
    fair = total / E
    need = np.where(load > fair * (1 + 1e-9), N - 1, 0)
    order = [int(e) for e in np.argsort(-load, kind="stable") if need[e] > 0][:t]
    if not order:
        return holders
    extras = np.zeros(N, dtype=np.int64)
    if t <= m:
        want = {e: int(need[e]) for e in order}
    else:
        budget = N * m
        w = load[order]
        share = budget * w / w.sum()
        base = np.floor(share).astype(np.int64)
        rem = budget - int(base.sum())
        for i in np.argsort(-(share - base), kind="stable")[:rem]:
            base[i] += 1
        want = {e: int(min(base[i], need[e])) for i, e in enumerate(order)}
    for e in order:  # heaviest first
        for _ in range(want[e]):
            held_nodes = {node_of(r, ranks_per_node) for r in holders[e]}
            cands = [r for r in range(N) if r not in holders[e] and extras[r] < m]
            if not cands:
                break
            r = min(cands, key=lambda r: (node_of(r, ranks_per_node) in held_nodes, extras[r], owned_load[r], r))
            holders[e].append(r)
            extras[r] += 1
    return holders


def ownership_holders(owner_E: Sequence[int]) -> list[list[int]]:
    """The plan with no copies: every expert on its owner only (classic EP)."""
    return [[int(o)] for o in owner_E]


# --------------------------------------------------------------------------------------------
# token assignment
# --------------------------------------------------------------------------------------------
def _water_fill(n: int, cands: list[int], load: dict[int, int]) -> dict[int, int]:
    """Split n tokens over `cands` so that their loads end as even as possible (integers)."""
    out = {c: 0 for c in cands}
    if n <= 0:
        return out
    lv = sorted(cands, key=lambda c: (load[c], c))
    vals = [load[c] for c in lv]
    remaining, k = n, 1
    # raise the k lowest to the (k+1)-th level while tokens last
    while k < len(lv) and remaining >= (vals[k] - vals[k - 1]) * k:
        remaining -= (vals[k] - vals[k - 1]) * k
        for j in range(k):
            vals[j] = vals[k]
        k += 1
    q, r = divmod(remaining, k)
    for j in range(k):
        vals[j] += q + (1 if j < r else 0)
    for j, c in enumerate(lv):
        out[c] = vals[j] - load[c]
    return out


def assign_tokens(counts_NE: np.ndarray, holders: Sequence[Sequence[int]], ranks_per_node: int = 8) -> np.ndarray:
    """send[s, e, d]: tokens of expert e that rank s sends to holder d.

    A source that holds a copy keeps its tokens (local first). Other sources send to holders in
    their own node when there are any, else to all holders; within that choice the tokens go
    where they even out the holders' total expert loads (water filling over the ranks' loads from
    every expert, the heaviest replicated experts placed last). Deterministic: every rank agrees.
    """
    counts = np.asarray(counts_NE, dtype=np.int64)
    N, E = counts.shape
    send = np.zeros((N, E, N), dtype=np.int64)
    load = {r: 0 for r in range(N)}
    multi = []
    for e in range(E):  # fixed part: single-holder experts and tokens already on a holder
        hs = list(holders[e])
        if len(hs) == 1:
            send[:, e, hs[0]] = counts[:, e]
            load[hs[0]] += int(counts[:, e].sum())
            continue
        for h in hs:
            send[h, e, h] = counts[h, e]
            load[h] += int(counts[h, e])
        multi.append(e)
    hset_of = {e: set(holders[e]) for e in multi}
    remote = {e: int(sum(counts[s, e] for s in range(N) if s not in hset_of[e])) for e in multi}
    for e in sorted(multi, key=lambda e: (-remote[e], e)):
        hs = list(holders[e])
        for s in range(N):
            if s in hset_of[e] or counts[s, e] == 0:
                continue
            same = [h for h in hs if node_of(h, ranks_per_node) == node_of(s, ranks_per_node)]
            split = _water_fill(int(counts[s, e]), same or hs, load)
            for h, n in split.items():
                send[s, e, h] += n
                load[h] += n
    return send


def rank_loads(send: np.ndarray) -> np.ndarray:
    """Expert tokens each rank computes: (N,)."""
    return send.sum(axis=(0, 1))


# --------------------------------------------------------------------------------------------
# Algorithm 2: heterogeneous sharding
# --------------------------------------------------------------------------------------------
def heterogeneous_sharding(load_LE: np.ndarray, current: Ownership, t: int,
                           ranks_per_node: int = 8) -> Ownership:
    """New ownership for all layers: same slots per rank, each layer's load spread over ranks.

    Hecate Algorithm 2: hold back each layer's top-t experts (they are copied anyway; as in the
    materialization plan only experts above the uniform share count, so at most those); place the
    rest, layers with the largest max load first and experts in descending load, each on the
    least-loaded node (for that layer) then least-loaded rank with a free slot; fill the leftover
    slots with the held-back experts. Experts that stay on their rank keep their slot, so only the
    experts that really move change hands.
    """
    load = np.asarray(load_LE, dtype=np.float64)
    L, E = load.shape
    N, S = current.num_ranks, current.slots_per_rank
    nodes = sorted({node_of(r, ranks_per_node) for r in range(N)})
    t = max(0, min(int(t), E))
    free = np.full(N, S, dtype=np.int64)
    layer_load = np.zeros((L, N))
    new_owner = np.full((L, E), -1, dtype=np.int64)
    held: list[tuple[int, int]] = []
    for l in np.argsort(-load.max(axis=1), kind="stable"):
        order = np.argsort(-load[l], kind="stable")
        total = load[l].sum()
        n_hot = int((load[l] > total / E * (1 + 1e-9)).sum()) if total > 0 else 0
        th = min(t, n_hot)
        held += [(int(l), int(e)) for e in order[:th]]
        for e in order[th:]:
            node_ld = {n: sum(layer_load[l, r] for r in range(N) if node_of(r, ranks_per_node) == n and free[r] > 0)
                       for n in nodes}
            open_nodes = [n for n in nodes if any(free[r] > 0 for r in range(N) if node_of(r, ranks_per_node) == n)]
            home = node_of(int(current.owner_LE[l, e]), ranks_per_node)
            n_best = min(open_nodes, key=lambda n: (node_ld[n], n != home, n))
            cands = [r for r in range(N) if node_of(r, ranks_per_node) == n_best and free[r] > 0]
            r = min(cands, key=lambda r: (layer_load[l, r], int(current.owner_LE[l, e]) != r, r))
            new_owner[l, e] = r
            free[r] -= 1
            layer_load[l, r] += load[l, e]
    for l, e in held:  # leftover slots: prefer the current owner (no move), then the emptiest rank
        cur = int(current.owner_LE[l, e])
        r = cur if free[cur] > 0 else int(np.argmax(free))
        new_owner[l, e] = r
        free[r] -= 1
    # slots: keep the slot of experts that stay, give freed slots to the arrivals
    new_slot = np.full((L, E), -1, dtype=np.int64)
    stays = new_owner == current.owner_LE
    new_slot[stays] = current.slot_LE[stays]
    for r in range(N):
        used = set(new_slot[(new_owner == r) & stays].tolist())
        avail = iter(s for s in range(S) if s not in used)
        for l, e in zip(*np.nonzero((new_owner == r) & ~stays)):
            new_slot[l, e] = next(avail)
    out = Ownership(new_owner, new_slot, N)
    out.check()
    return out


def moves(old: Ownership, new: Ownership) -> list[tuple[int, int, int, int, int, int]]:
    """(layer, expert, from_rank, from_slot, to_rank, to_slot) for every expert that changes place."""
    out = []
    for l in range(old.num_layers):
        for e in range(old.num_experts):
            a = (int(old.owner_LE[l, e]), int(old.slot_LE[l, e]))
            b = (int(new.owner_LE[l, e]), int(new.slot_LE[l, e]))
            if a != b:
                out.append((l, e, a[0], a[1], b[0], b[1]))
    return out


@dataclass
class IterationPlan:
    holders_L: list[list[list[int]]] = field(default_factory=list)

    def copies(self) -> list[tuple[int, int, int]]:
        """(layer, expert, holder) for every copy (not the owner)."""
        return [(l, e, h) for l, hs in enumerate(self.holders_L) for e, hl in enumerate(hs) for h in hl[1:]]


def predicted_straggler(own: Ownership, load_LE: np.ndarray, t: int, m: int, ranks_per_node: int = 8,
                        tolerance: float = 0.05) -> float:
    """The worst layer's busiest-rank / mean expert load under `own` and the plan Algorithm 1
    makes for it, with every rank sending an equal share of each expert's predicted tokens."""
    load = np.asarray(load_LE, dtype=np.float64)
    N = own.num_ranks
    plan = plan_iteration(own, load, t, m, ranks_per_node, tolerance)
    worst = 1.0
    for l in range(own.num_layers):
        counts = np.tile(np.round(load[l] / N).astype(np.int64), (N, 1))
        r = rank_loads(assign_tokens(counts, plan.holders_L[l], ranks_per_node)).astype(np.float64)
        if r.mean() > 0:
            worst = max(worst, float(r.max() / r.mean()))
    return worst


def reshard_decision(own: Ownership, load_LE: np.ndarray, t: int, m: int, ranks_per_node: int = 8,
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
                   ranks_per_node: int = 8, tolerance: float = 0.05) -> IterationPlan:
    holders = []
    for l in range(own.num_layers):
        if load_LE is None:
            holders.append(ownership_holders(own.owner_LE[l]))
        else:
            holders.append(plan_materialization(load_LE[l], own.owner_LE[l], own.num_ranks, t, m, ranks_per_node,
                                                tolerance))
    return IterationPlan(holders)
