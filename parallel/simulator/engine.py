"""The simulator loop: every policy over the same per-iteration loads, priced per MoE layer.

All N GPUs route tokens; ep, fssdp and fastermoe run in N/P expert-parallel groups of P
consecutive GPUs (`cluster.expert_parallel_size`): tokens move only inside their group, a layer
costs what its slowest group costs, and expert gradients are all-reduced over the N/P groups.
FSSDP plans once from the global counts / (N/P) (`ExpertStore.group_forecast`): every group gets
the same plan, so its spAG/spRS cost is computed once. ZeRO-3 shards over all N GPUs.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from parallel import placement
from parallel.placement import IterationPlan, LoadPredictor, Ownership
from parallel.simulator.config import SimConfig, config_from_dict, moe_spacing
from parallel.simulator.derived import derive
from parallel.simulator.loads import LoadGenerator, read_trace
from parallel.simulator.network import Network, copy_hops, copy_traffic, layer_chains, round_arrays
from parallel.simulator.summary import MASTER_BYTES, Sums, Track, summarize, straggler
from system.configtree import to_dict

__all__ = ["Simulator", "simulate", "straggler", "sweep", "token_matrix"]


def token_matrix(send: np.ndarray) -> np.ndarray:
    """tok[s, d]: (token, expert) pairs rank s sends to rank d, from assign_tokens' send[s, e, d]."""
    return send.sum(axis=1)


class Simulator:
    """Runs every policy over the same per-iteration loads; `run()` returns the summary dict.

    N GPUs, G per node, in R = N/P expert-parallel groups of P ranks; L MoE layers of E experts.
    """

    def __init__(self, cfg: SimConfig, trace: Optional[np.ndarray] = None):
        if cfg.load.kind == "trace" and trace is None:
            trace = read_trace(cfg.load.trace)
        if trace is not None:  # the trace fixes L and E; the spacing k stays the config's
            k = moe_spacing(cfg.model)[1]
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(
                cfg.model, n_layers=int(trace.shape[1]) * k, moe_layers="all" if k == 1 else f"every_{k}",
                num_experts=int(trace.shape[2])))
        self.cfg = cfg
        self.trace = trace
        self.d = derive(cfg)
        self.policies = cfg.policies()
        self.L, self.E = self.d.moe_layers, cfg.model.num_experts
        self.N, self.G = cfg.cluster.gpus, cfg.cluster.gpus_per_node
        self.P, self.R = self.d.group, self.d.replicas  # P ranks per expert-parallel group, N/P groups
        self.net = Network(cfg.cluster, self.P)  # one expert-parallel group (all have the same layout)
        self.net_all = Network(cfg.cluster, self.N)
        self.gen = LoadGenerator(cfg, self.N, trace)
        self._spag_cache: dict = {}

    # ---- building blocks -------------------------------------------------------------------
    def _a2a(self, tok: np.ndarray) -> float:
        return self.net.all_to_all(tok, self.cfg.model.d_model * self.cfg.cost_model.activation_bytes())

    def _compute(self, loads: np.ndarray) -> float:
        return float(loads.max()) * self.d.flops_per_token / self.cfg.cluster.flops

    def _a2a_bytes(self, tok: np.ndarray) -> float:
        off = tok.sum() - np.trace(tok)
        return 4.0 * float(off) * self.cfg.model.d_model * self.cfg.cost_model.activation_bytes()

    def _copy_time(self, B: np.ndarray, M: np.ndarray) -> float:
        return float(self.net.rank_times(B, M).max()) if B.any() else 0.0

    def _groups(self, counts_NE: np.ndarray):
        """(N, E) counts of one layer -> the (P, E) counts of each expert-parallel group."""
        P = self.P
        return [counts_NE[g * P:(g + 1) * P] for g in range(self.R)]

    @property
    def _replica_allreduce_bytes(self) -> float:
        """Bytes per GPU of one layer's expert-gradient all-reduce over the R replicas (ring)."""
        R = self.R
        return (2 * (R - 1) / R * (self.E // self.P) * self.d.expert_bytes) if R > 1 else 0.0

    def spag_cost(self, holders_E: list[list[int]]) -> dict:
        """One layer's spAG under `fssdp.spag` (every group the same): `time` (alone, from the
        start), `exposed` (forward: after the attention of A = non-MoE forward, per
        `fssdp.gather_overlap`), `sprs` (its spRS alone), `B` (bytes matrix)."""
        key = tuple(tuple(h) for h in holders_E)
        hit = self._spag_cache.get(key)
        if hit is not None:
            return hit
        fs, d, P, G = self.cfg.fssdp, self.d, self.P, self.G
        A = d.non_moe_fwd_s
        B, M = copy_traffic(holders_E, P, G, d.expert_bytes, fs.spag, fs.max_chunks)
        if fs.spag == "chain":
            chains = layer_chains(holders_E, G, P)
            rounds = round_arrays(chains, d.expert_bytes, fs.max_chunks)
            t, _ = self.net.schedule_time(rounds)
            if fs.gather_overlap == "first_round" and len(rounds) > 1:
                held, _ = self.net.schedule_time(rounds, hold=A)
                exposed = max(0.0, held - A)
            else:
                exposed = max(0.0, t - A)
            rs, _ = self.net.schedule_time(round_arrays(chains, d.expert_bytes, fs.max_chunks, reduce=True))
        else:  # one flat exchange, all posted at once; spRS is its transpose
            t = self._copy_time(B, M)
            exposed, rs = max(0.0, t - A), t
        out = {"time": t, "exposed": exposed, "sprs": rs, "B": B, "M": M,
               "rounds": len(rounds) if fs.spag == "chain" else int(B.any())}
        if len(self._spag_cache) > 4096:
            self._spag_cache.clear()
        self._spag_cache[key] = out
        return out

    def sprs_after_backward(self, holders_L: list[list[list[int]]], layer_costs: list[dict]) -> float:
        """ExpertStore.reduce_grads: one spRS over the copies of all layers after the backward."""
        fs, d = self.cfg.fssdp, self.d
        if fs.spag == "chain":
            chains: dict = {}
            for layer, holders_E in enumerate(holders_L):
                chains.update(layer_chains(holders_E, self.G, self.P, layer=layer))
            if not chains:
                return 0.0
            return self.net.schedule_time(round_arrays(chains, d.expert_bytes, fs.max_chunks, reduce=True))[0]
        B = sum(c["B"] for c in layer_costs)
        M = sum(c["M"] for c in layer_costs)
        return self._copy_time(B.T, M.T)

    def fastermoe_holders(self, counts_NE: np.ndarray, owner_E: np.ndarray) -> list[list[int]]:
        """FasterMoE shadowing in one expert-parallel group: broadcast the heaviest remaining
        expert to every rank of the group while the estimated layer latency drops (with this
        iteration's real counts, as FasterMoE decides after the gate; so its broadcast cannot hide
        behind the attention, while the gradient reduce in the backward can)."""
        P, d = self.P, self.d
        load = counts_NE.sum(axis=0)
        tok = np.zeros((P, P), dtype=np.int64)
        np.add.at(tok, (slice(None), owner_E), counts_NE)  # EP: every pair goes to the owner
        B = np.zeros((P, P))
        M = np.zeros((P, P))
        win_b = 2 * d.non_moe_fwd_s
        ar = d.replica_allreduce_s if self.cfg.fssdp.sprs_overlap else 0.0

        def cost(tok, B, M):
            c = self._copy_time(B, M)
            return (4 * self._a2a(tok) + self._compute(tok.sum(axis=0)) + c
                    + max(0.0, c + ar - win_b))

        def everyone(e: int) -> list[int]:  # the owner first, then every other rank of the group
            return [int(owner_E[e])] + [r for r in range(P) if r != owner_E[e]]

        best = cost(tok, B, M)
        shadow: list[int] = []
        for e in np.argsort(-load, kind="stable"):
            e = int(e)
            if load[e] <= 0 or P <= 1:
                break
            tok2 = tok.copy()
            tok2[:, owner_E[e]] -= counts_NE[:, e]
            tok2[np.arange(P), np.arange(P)] += counts_NE[:, e]
            B2, M2 = B.copy(), M.copy()
            for s, dst in copy_hops(everyone(e), e, self.G, "broadcast"):
                B2[s, dst] += d.expert_bytes
                M2[s, dst] += 1
            c2 = cost(tok2, B2, M2)
            if c2 >= best:
                break
            best, tok, B, M = c2, tok2, B2, M2
            shadow.append(e)
        holders = placement.ownership_holders(owner_E)
        for e in shadow:
            holders[e] = everyone(e)
        return holders

    def _move_time(self, moves: list) -> float:
        if not moves:
            return 0.0
        B = np.zeros((self.P, self.P))
        M = np.zeros((self.P, self.P))
        nbytes = self.d.expert_params * self.move_bytes
        for (_layer, _expert, src, _src_slot, dst, _dst_slot) in moves:
            B[src, dst] += nbytes
            M[src, dst] += 1
        return float(self.net.rank_times(B, M).max())

    @property
    def move_bytes(self) -> int:
        """Moving ownership moves what ExpertPool.reshard sends: the owner's fp32 weights (the
        masters, whatever the training dtype) and Adam's two fp32 moments."""
        return 3 * MASTER_BYTES

    def _tokens(self, counts_PE: np.ndarray, holders: list[list[int]]):
        tok = placement.assign(counts_PE, holders, self.G).token_matrix()  # = token_matrix(assign_tokens(...))
        return tok, tok.sum(axis=0)

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> dict:
        """Draw each iteration's loads, plan FSSDP, price every MoE layer under every policy,
        then the gradient reduction after the backward; the per-iteration means."""
        iters = self.cfg.sim.iterations
        if self.trace is not None:
            iters = min(iters, len(self.trace))
        sums = {p: Sums() for p in self.policies}
        own_ep = Ownership.even(self.L, self.E, self.P)
        track = Track(own_fs=Ownership.even(self.L, self.E, self.P), predictor=LoadPredictor(self.cfg.fssdp.window),
                      peak_copies_all=np.zeros(self.P), peak_copies_layer=np.zeros(self.P))
        plans_fssdp = any(p in self.policies for p in ("fssdp", "fssdp_remat"))
        for it in range(iters):
            counts = self.gen.next()  # (L, N, E) of all N GPUs
            plan = self._plan_fssdp(it, sums, track) if plans_fssdp else None
            layer_costs: list[dict] = []  # fssdp: spag_cost of each layer
            shadows = np.zeros((self.R, self.P))  # fastermoe: shadowed experts on each rank of each group
            for layer in range(self.L):
                groups = self._groups(counts[layer])
                fs_holders = plan.holders_L[layer] if plan is not None else None
                self._price_layer(sums, groups, own_ep.owner_LE[layer], fs_holders, layer_costs, shadows, track)
                if "zero3" in sums:
                    self._zero3_layer(sums["zero3"], counts[layer])
            if not self.cfg.fssdp.sprs_overlap:
                self._reduce_after_backward(sums, plan, layer_costs)
            track.peak_shadow_all = max(track.peak_shadow_all, float(shadows.max()))
            for s in sums.values():
                s.iters += 1
            if plans_fssdp:
                track.predictor.observe(counts.sum(axis=1))  # (L, E): what training all-reduces and logs
        return summarize(self.cfg, self.d, sums, track, own_ep.slots_per_rank, iters)

    def _plan_fssdp(self, it: int, sums: dict[str, Sums], track: Track) -> IterationPlan:
        """ExpertStore's plan of this iteration: forecast one group's loads, reshard ownership
        every `fssdp.reshard_every` iterations (Algorithm 2, charged to the fssdp policies), then
        plan the copies (Algorithm 1)."""
        fs, d = self.cfg.fssdp, self.d
        pred = track.predictor.predict()
        if pred is not None and self.R > 1:
            pred = pred / self.R  # ExpertStore.group_forecast: one group's share of the global load
        kw = {} if fs.tolerance is None else {"tolerance": fs.tolerance}
        reshard_s, moves = 0.0, []
        if fs.reshard_every and it > 0 and it % fs.reshard_every == 0 and pred is not None:
            # the training store's rule: Algorithm 2 only when it lowers the predicted straggler
            new = placement.reshard_decision(track.own_fs, pred, d.t, d.m, self.G, **kw)
            if new is not None:
                moves = placement.moves(track.own_fs, new)
                track.moves += len(moves)
                reshard_s = self._move_time(moves)
                track.own_fs = new
        plan = placement.plan_iteration(track.own_fs, pred, d.t, d.m, self.G, **kw)
        track.observe_copies(plan.holders_L, self.P)
        for p in ("fssdp", "fssdp_remat"):
            if p in sums:
                sums[p].s["reshard"] += reshard_s
                sums[p].s["time"] += reshard_s
                sums[p].s["bytes"] += len(moves) * d.expert_params * self.move_bytes / self.P
        return plan

    def _price_layer(self, sums: dict[str, Sums], groups, owner_E: np.ndarray, fs_holders: Optional[list],
                     layer_costs: list[dict], shadows: np.ndarray, track: Track) -> None:
        """One MoE layer under ep, fssdp / fssdp_remat (`fs_holders`: the plan's, None when not
        simulated) and fastermoe; ZeRO-3 is `_zero3_layer`."""
        hide = self.cfg.fssdp.sprs_overlap
        # ar: one layer's expert-gradient all-reduce over the replicas; win_b: the backward window 2A
        ar, win_b, ar_bytes = self.d.replica_allreduce_s, 2 * self.d.non_moe_fwd_s, self._replica_allreduce_bytes
        if "ep" in sums:  # the replicas' all-reduce under the backward, else counted once after it
            self._layer(sums["ep"], groups, placement.ownership_holders(owner_E), 0.0, 0.0,
                        ar if hide else 0.0, max(0.0, ar - win_b) if hide else 0.0, ar_bytes if hide else 0.0)
        if fs_holders is not None:
            self._fssdp_layer(sums, groups, fs_holders, layer_costs, track)
        if "fastermoe" in sums:
            self._fastermoe_layer(sums["fastermoe"], groups, owner_E, shadows, ar if hide else 0.0, ar_bytes)

    def _fssdp_layer(self, sums: dict[str, Sums], groups, holders_E: list[list[int]],
                     layer_costs: list[dict], track: Track) -> None:
        """fssdp: spAG under the forward attention; fssdp_remat: a second spAG in the backward.
        Their spRS (+ the replicas' all-reduce) runs under the backward attention with
        `fssdp.sprs_overlap`, else after the backward (`_reduce_after_backward`)."""
        fs, hide = self.cfg.fssdp, self.cfg.fssdp.sprs_overlap
        ar, win_b, ar_bytes = self.d.replica_allreduce_s, 2 * self.d.non_moe_fwd_s, self._replica_allreduce_bytes
        cost = self.spag_cost(holders_E)
        layer_costs.append(cost)
        track.rounds_sum, track.rounds_n = track.rounds_sum + cost["rounds"], track.rounds_n + 1
        ag, rs = cost["time"], cost["sprs"]
        ncopies = sum(len(h) - 1 for h in holders_E)
        cb = float(cost["B"].sum()) / self.P
        red_tot, red_hid = (rs + ar, rs + ar) if hide else (0.0, 0.0)
        if "fssdp" in sums:
            exp = cost["exposed"] + max(0.0, red_hid - win_b)
            self._layer(sums["fssdp"], groups, holders_E, ag + red_tot, exp,
                        copies=ncopies, nbytes=cb + (cb + ar_bytes if hide else 0.0))
        if "fssdp_remat" in sums:
            if fs.gather_overlap == "full":  # prefetched, sharing the backward window
                exp = cost["exposed"] + max(0.0, ag + red_hid - win_b)
            else:  # ExpertStore.refill_layer gathers when the backward reaches the layer
                exp = cost["exposed"] + ag + max(0.0, red_hid - win_b)
            self._layer(sums["fssdp_remat"], groups, holders_E, 2 * ag + red_tot, exp,
                        copies=ncopies, nbytes=2 * cb + (cb + ar_bytes if hide else 0.0))

    def _zero3_layer(self, sums: Sums, counts_NE: np.ndarray) -> None:
        """ZeRO-3 over all N GPUs: gather the layer's E experts (forward and backward) and
        reduce-scatter their gradients; every GPU holds the whole layer, so tokens stay local."""
        d, N = self.d, self.N
        gather = reduce = self.net_all.ring(self.E * d.expert_bytes)
        loads = counts_NE.sum(axis=1)
        exp = max(0.0, gather - d.non_moe_fwd_s) + max(0.0, gather + reduce - 2 * d.non_moe_fwd_s)
        sums.add_layer(0.0, self._compute(loads), 2 * gather + reduce, exp, straggler(loads),
                       3 * (N - 1) / N * self.E * d.expert_bytes, 0)
        sums.close_layer(0.0, self._compute(loads))

    def _reduce_after_backward(self, sums: dict[str, Sums], plan: Optional[IterationPlan],
                               layer_costs: list[dict]) -> None:
        """ExpertStore.reduce_grads after the backward: the spRS of all layers, then the replicas'
        all-reduce (every policy but ZeRO-3)."""
        rs_all = self.sprs_after_backward(plan.holders_L, layer_costs) if plan is not None else 0.0
        cb_all = sum(float(c["B"].sum()) for c in layer_costs) / self.P if plan is not None else 0.0
        ar_iter, ar_bytes = self.d.replica_allreduce_iter_s, self._replica_allreduce_bytes
        for p in self.policies:
            if p == "zero3":
                continue
            extra = rs_all if p in ("fssdp", "fssdp_remat") else 0.0
            sums[p].add_comm(extra + ar_iter, extra + ar_iter, (cb_all if extra else 0.0) + self.L * ar_bytes)

    def _layer(self, a: Sums, groups, holders: list[list[int]], comm_total: float, comm_exposed: float,
               red_tot: float = 0.0, red_exp: float = 0.0, nbytes: float = 0.0, copies: int = 0) -> None:
        """One MoE layer of ep/fssdp: every group's all-to-all and compute under the same plan; the
        layer costs what its slowest group costs. `red_*`: the replicas' all-reduce (ep)."""
        worst, loads_all, a2a_bytes = None, [], 0.0
        for counts_PE in groups:
            tok, loads = self._tokens(counts_PE, holders)
            a2a, comp = 4 * self._a2a(tok), self._compute(loads)
            if worst is None or a2a + comp > worst[0] + worst[1]:
                worst = (a2a, comp)
            loads_all.append(loads)
            a2a_bytes += self._a2a_bytes(tok)
        a.add_layer(worst[0], worst[1], comm_total + red_tot, comm_exposed + red_exp,
                    straggler(np.concatenate(loads_all)), a2a_bytes / self.N + nbytes, copies)
        a.close_layer(*worst)

    def _fastermoe_layer(self, a: Sums, groups, owner_E, shadows: np.ndarray, ar: float, ar_bytes: float) -> None:
        """Each group shadows from its own counts; the layer costs its slowest group."""
        win_b = 2 * self.d.non_moe_fwd_s
        worst, loads_all, nbytes, copies = None, [], 0.0, 0
        for g, counts_PE in enumerate(groups):
            holders = self.fastermoe_holders(counts_PE, owner_E)
            tok, loads = self._tokens(counts_PE, holders)
            B, M = copy_traffic(holders, self.P, self.G, self.d.expert_bytes, "broadcast")
            bc = self._copy_time(B, M)
            for hs in holders:
                for h in hs[1:]:
                    shadows[g, h] += 1
            cur = (4 * self._a2a(tok), self._compute(loads), 2 * bc + ar, bc + max(0.0, bc + ar - win_b))
            if worst is None or cur[0] + cur[1] + cur[3] > worst[0] + worst[1] + worst[3]:
                worst = cur
            loads_all.append(loads)
            nbytes += self._a2a_bytes(tok) + 2 * float(B.sum())
            copies += sum(len(h) - 1 for h in holders)
        a.add_layer(worst[0], worst[1], worst[2], worst[3], straggler(np.concatenate(loads_all)),
                    nbytes / self.N + (ar_bytes if ar else 0.0), copies / len(groups))
        a.close_layer(worst[0], worst[1])


def simulate(cfg: SimConfig) -> dict:
    return Simulator(cfg).run()


def sweep(cfg: SimConfig, gpus: list[int]) -> list[dict]:
    out = []
    trace = read_trace(cfg.load.trace) if cfg.load.kind == "trace" else None
    for n in gpus:
        c = config_from_dict(to_dict(cfg), {"cluster.gpus": n})
        out.append(Simulator(c, trace).run())
    return out
