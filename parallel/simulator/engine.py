"""The simulator loop: every policy over the same per-iteration loads, priced per MoE layer.

All N GPUs route tokens; ep, fssdp and fastermoe run in N/P expert-parallel groups of P
consecutive GPUs (`cluster.expert_parallel_size`): tokens move only inside their group, a layer
costs what its slowest group costs, and expert gradients are all-reduced over the N/P groups.
FSSDP plans once from the global counts / (N/P) (`ExpertStore.group_forecast`): every group gets
the same plan, so its spAG/spRS cost is computed once. ZeRO-3 shards over all N GPUs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import numpy as np

from parallel import placement
from parallel.placement import LoadPredictor, Ownership
from parallel.simulator.config import SimConfig, config_from_dict, moe_spacing
from parallel.simulator.derived import derive
from parallel.simulator.loads import LoadGenerator, read_trace
from parallel.simulator.network import Network, copy_hops, copy_traffic, layer_chains, round_arrays
from system.configtree import to_dict

ADAM_BYTES = 16  # bytes per parameter of an owned expert: param, grad, m, v (+ fp32 master with bf16)
MASTER_BYTES = 4  # the fp32 master a bf16 owner keeps
GIB = float(1 << 30)


def token_matrix(send: np.ndarray) -> np.ndarray:
    """tok[s, d]: (token, expert) pairs rank s sends to rank d, from assign_tokens' send[s, e, d]."""
    return send.sum(axis=1)


def straggler(loads: np.ndarray) -> float:
    mean = float(loads.mean())
    return float(loads.max()) / mean if mean > 0 else 1.0


class _Acc:
    """Per-policy sums over iterations."""

    KEYS = ("time", "a2a", "compute", "comm_total", "comm_exposed", "reshard", "straggler",
            "bytes", "copies")

    def __init__(self):
        self.s = {k: 0.0 for k in self.KEYS}
        self.iters = 0
        self.layers = 0

    def add_layer(self, a2a: float, compute: float, comm_total: float, comm_exposed: float,
                  strag: float, nbytes: float, copies: int) -> None:
        self.s["a2a"] += a2a
        self.s["compute"] += compute
        self.s["straggler"] += strag
        self.s["copies"] += copies
        self.layers += 1
        self.add_comm(comm_total, comm_exposed, nbytes)

    def add_comm(self, total: float, exposed: float, nbytes: float = 0.0) -> None:
        """Traffic outside the layers' own sums, e.g. what runs after the backward pass."""
        self.s["comm_total"] += total
        self.s["comm_exposed"] += exposed
        self.s["time"] += exposed
        self.s["bytes"] += nbytes

    def close_layer(self, a2a: float, compute: float) -> None:
        self.s["time"] += a2a + compute


class Simulator:
    """Runs every policy over the same per-iteration loads; `run()` returns the summary dict."""

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
        self.Ng, self.R = self.d.group, self.d.replicas  # P ranks per expert-parallel group, N/P groups
        self.net = Network(cfg.cluster, self.Ng)  # one expert-parallel group (all have the same layout)
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

    def _groups(self, c_l: np.ndarray):
        """(N, E) counts of one layer -> the (P, E) counts of each expert-parallel group."""
        P = self.Ng
        return [c_l[g * P:(g + 1) * P] for g in range(self.R)]

    def spag_cost(self, holders_E: list[list[int]]) -> dict:
        """One layer's spAG under `fssdp.spag` (every group the same): `time` (alone, from the
        start), `exposed` (forward: after the attention of A = non-MoE forward, per
        `fssdp.gather_overlap`), `sprs` (its spRS alone), `B` (bytes matrix)."""
        key = tuple(tuple(h) for h in holders_E)
        hit = self._spag_cache.get(key)
        if hit is not None:
            return hit
        fs, d, P, G = self.cfg.fssdp, self.d, self.Ng, self.G
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
            for l, hl in enumerate(holders_L):
                chains.update(layer_chains(hl, self.G, self.Ng, layer=l))
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
        N, d = self.Ng, self.d
        load = counts_NE.sum(axis=0)
        tok = np.zeros((N, N), dtype=np.int64)
        np.add.at(tok, (slice(None), owner_E), counts_NE)  # EP: every pair goes to the owner
        B = np.zeros((N, N))
        M = np.zeros((N, N))
        win_b = 2 * d.non_moe_fwd_s
        ar = d.replica_allreduce_s if self.cfg.fssdp.sprs_overlap else 0.0

        def cost(tok, B, M):
            c = self._copy_time(B, M)
            return (4 * self._a2a(tok) + self._compute(tok.sum(axis=0)) + c
                    + max(0.0, c + ar - win_b))

        best = cost(tok, B, M)
        shadow: list[int] = []
        for e in np.argsort(-load, kind="stable"):
            e = int(e)
            if load[e] <= 0 or N <= 1:
                break
            tok2 = tok.copy()
            tok2[:, owner_E[e]] -= counts_NE[:, e]
            tok2[np.arange(N), np.arange(N)] += counts_NE[:, e]
            hs = [int(owner_E[e])] + [r for r in range(N) if r != owner_E[e]]
            B2, M2 = B.copy(), M.copy()
            for s, dst in copy_hops(hs, e, self.G, "broadcast"):
                B2[s, dst] += d.expert_bytes
                M2[s, dst] += 1
            c2 = cost(tok2, B2, M2)
            if c2 >= best:
                break
            best, tok, B, M = c2, tok2, B2, M2
            shadow.append(e)
        holders = placement.ownership_holders(owner_E)
        for e in shadow:
            holders[e] = [int(owner_E[e])] + [r for r in range(N) if r != owner_E[e]]
        return holders

    def _move_time(self, mv: list) -> float:
        if not mv:
            return 0.0
        B = np.zeros((self.Ng, self.Ng))
        M = np.zeros((self.Ng, self.Ng))
        nbytes = self.d.expert_params * self.move_bytes
        for (_l, _e, fr, _fs, to, _ts) in mv:
            B[fr, to] += nbytes
            M[fr, to] += 1
        return float(self.net.rank_times(B, M).max())

    @property
    def move_bytes(self) -> int:
        """Moving ownership moves what ExpertPool.reshard sends: the owner's fp32 weights (the
        masters, whatever the training dtype) and Adam's two fp32 moments."""
        return 3 * MASTER_BYTES

    def _tokens(self, c_g: np.ndarray, holders: list[list[int]]):
        tok = placement.assign(c_g, holders, self.G).token_matrix()  # = token_matrix(assign_tokens(...))
        return tok, tok.sum(axis=0)

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, d, fs = self.cfg, self.d, self.cfg.fssdp
        L, E, P, G, N, R = self.L, self.E, self.Ng, self.G, self.N, self.R
        iters = cfg.sim.iterations
        if self.trace is not None:
            iters = min(iters, len(self.trace))
        pol = self.policies
        acc = {p: _Acc() for p in pol}
        win_f, win_b = d.non_moe_fwd_s, 2 * d.non_moe_fwd_s
        ar, ar_iter, hide = d.replica_allreduce_s, d.replica_allreduce_iter_s, fs.sprs_overlap
        own_ep = Ownership.even(L, E, P)
        own_fs = Ownership.even(L, E, P)
        predictor = LoadPredictor(fs.window)
        want_fs = any(p in pol for p in ("fssdp", "fssdp_remat"))
        S = own_ep.slots_per_rank  # owned experts per rank, all layers
        Pp = d.expert_params
        copy_b = 2 * d.param_bytes  # a copy holds a parameter and its gradient in the training dtype
        peak_copies_all = np.zeros(P)  # fssdp: copies resident at once (all layers)
        peak_copies_layer = np.zeros(P)  # remat: one layer's copies
        peak_shadow_all = 0.0
        n_moves, rounds_sum, rounds_n = 0, 0, 0
        # ZeRO-3 over all N GPUs: gather the layer's E experts, reduce-scatter their gradients
        z_ag = self.net_all.ring(E * d.expert_bytes)
        z_rs = z_ag
        z_bytes_per_gpu = 3 * (N - 1) / N * E * d.expert_bytes
        ar_bytes = (2 * (R - 1) / R * (E // P) * d.expert_bytes) if R > 1 else 0.0
        ep_holders = [placement.ownership_holders(own_ep.owner_LE[l]) for l in range(L)]

        for it in range(iters):
            counts = self.gen.next()  # (L, N, E) of all N GPUs
            glob = counts.sum(axis=1)  # (L, E) what the training code all-reduces and logs
            reshard_s, mv = 0.0, []
            if want_fs:
                pred = predictor.predict()
                if pred is not None and R > 1:
                    pred = pred / R  # ExpertStore.group_forecast: one group's share of the global load
                kw = {} if fs.tolerance is None else {"tolerance": fs.tolerance}
                if fs.reshard_every and it > 0 and it % fs.reshard_every == 0 and pred is not None:
                    # the training store's rule: Algorithm 2 only when it lowers the predicted straggler
                    new = placement.reshard_decision(own_fs, pred, d.t, d.m, G, **kw)
                    if new is not None:
                        mv = placement.moves(own_fs, new)
                        n_moves += len(mv)
                        reshard_s = self._move_time(mv)
                        own_fs = new
                plan = placement.plan_iteration(own_fs, pred, d.t, d.m, G, **kw)
                copies_all = np.zeros(P)
                for l in range(L):
                    per = np.zeros(P)
                    for hs in plan.holders_L[l]:
                        for h in hs[1:]:
                            per[h] += 1
                    copies_all += per
                    peak_copies_layer = np.maximum(peak_copies_layer, per)
                peak_copies_all = np.maximum(peak_copies_all, copies_all)
                for p in ("fssdp", "fssdp_remat"):
                    if p in acc:
                        acc[p].s["reshard"] += reshard_s
                        acc[p].s["time"] += reshard_s
                        acc[p].s["bytes"] += len(mv) * Pp * self.move_bytes / P
                layer_costs = []
            shadow_all = np.zeros((R, P))
            for l in range(L):
                groups = self._groups(counts[l])
                if "ep" in acc:
                    self._layer(acc["ep"], groups, lambda c: ep_holders[l], 0.0, 0.0,
                                ar if hide else 0.0, max(0.0, ar - win_b) if hide else 0.0,
                                ar_bytes if hide else 0.0)  # else counted once, after the backward
                if want_fs:
                    hl = plan.holders_L[l]
                    sc = self.spag_cost(hl)
                    layer_costs.append(sc)
                    rounds_sum, rounds_n = rounds_sum + sc["rounds"], rounds_n + 1
                    ag, rs = sc["time"], sc["sprs"]
                    ncopies = sum(len(h) - 1 for h in hl)
                    cb = float(sc["B"].sum()) / P
                    # spRS (+ the replicas' all-reduce) under the backward attention, or after the backward
                    red_tot, red_hid = (rs + ar, rs + ar) if hide else (0.0, 0.0)
                    if "fssdp" in acc:  # spAG under the forward attention
                        exp = sc["exposed"] + max(0.0, red_hid - win_b)
                        self._layer(acc["fssdp"], groups, lambda c: hl, ag + red_tot, exp,
                                    copies=ncopies, nbytes=cb + (cb + ar_bytes if hide else 0.0))
                    if "fssdp_remat" in acc:  # + a second spAG in the backward
                        if fs.gather_overlap == "full":  # prefetched, sharing the backward window
                            exp = sc["exposed"] + max(0.0, ag + red_hid - win_b)
                        else:  # ExpertStore.refill_layer gathers when the backward reaches the layer
                            exp = sc["exposed"] + ag + max(0.0, red_hid - win_b)
                        self._layer(acc["fssdp_remat"], groups, lambda c: hl, 2 * ag + red_tot, exp,
                                    copies=ncopies, nbytes=2 * cb + (cb + ar_bytes if hide else 0.0))
                if "fastermoe" in acc:
                    self._fastermoe_layer(acc["fastermoe"], groups, own_ep.owner_LE[l], shadow_all,
                                          ar if hide else 0.0, ar_bytes)
                if "zero3" in acc:  # every GPU holds the whole layer: its tokens stay local
                    loads = counts[l].sum(axis=1)
                    exp = max(0.0, z_ag - win_f) + max(0.0, z_ag + z_rs - win_b)
                    acc["zero3"].add_layer(0.0, self._compute(loads), 2 * z_ag + z_rs, exp, straggler(loads),
                                           z_bytes_per_gpu, 0)
                    acc["zero3"].close_layer(0.0, self._compute(loads))
            if not hide:  # ExpertStore.reduce_grads after the backward: spRS of all layers, then the all-reduce
                rs_all = self.sprs_after_backward(plan.holders_L, layer_costs) if want_fs else 0.0
                cb_all = sum(float(c["B"].sum()) for c in layer_costs) / P if want_fs else 0.0
                for p in pol:
                    if p == "zero3":
                        continue
                    extra = rs_all if p in ("fssdp", "fssdp_remat") else 0.0
                    acc[p].add_comm(extra + ar_iter, extra + ar_iter,
                                    (cb_all if extra else 0.0) + L * ar_bytes)
            peak_shadow_all = max(peak_shadow_all, float(shadow_all.max()))
            for a in acc.values():
                a.iters += 1
            if want_fs:
                predictor.observe(glob)

        # ---- summary ---------------------------------------------------------------------
        mem = {
            "ep": S * Pp * ADAM_BYTES,
            "fssdp": S * Pp * ADAM_BYTES + float(peak_copies_all.max()) * Pp * copy_b,
            "fssdp_remat": S * Pp * ADAM_BYTES + float(peak_copies_layer.max()) * Pp * copy_b,
            "fastermoe": S * Pp * ADAM_BYTES + peak_shadow_all * Pp * copy_b,
            "zero3": ADAM_BYTES * E * Pp * L / N + E * Pp * d.param_bytes,
        }
        non_moe_iter = L * 3 * d.non_moe_fwd_s  # forward + backward of the non-MoE compute
        out: dict[str, Any] = {}
        for p, a in acc.items():
            it = max(1, a.iters)
            nl = max(1, a.layers)
            r = {
                "time_ms": a.s["time"] / it * 1e3,
                "a2a_ms": a.s["a2a"] / it * 1e3,
                "compute_ms": a.s["compute"] / it * 1e3,
                "comm_total_ms": a.s["comm_total"] / it * 1e3,
                "comm_exposed_ms": a.s["comm_exposed"] / it * 1e3,
                "reshard_ms": a.s["reshard"] / it * 1e3,
                "straggler": a.s["straggler"] / nl,
                "memory_gib": mem[p] / GIB,
                "gb_moved_per_gpu": a.s["bytes"] / it / 1e9,
                "copies_per_layer": a.s["copies"] / nl,
            }
            r["e2e_ms"] = r["time_ms"] + non_moe_iter * 1e3
            out[p] = r
        if "ep" in out:
            for r in out.values():
                r["speedup_vs_ep"] = out["ep"]["time_ms"] / r["time_ms"] if r["time_ms"] > 0 else math.inf
                r["e2e_speedup_vs_ep"] = out["ep"]["e2e_ms"] / r["e2e_ms"]
        return {
            "config": to_dict(cfg),
            "derived": {
                "gpus": d.gpus, "expert_group": d.group, "expert_parallel_size": d.group, "replicas": d.replicas,
                "expert_params": d.expert_params, "expert_mib": d.expert_bytes / 2**20,
                "param_bytes": d.param_bytes,
                "non_moe_fwd_ms": d.non_moe_fwd_s * 1e3, "non_moe_iter_ms": non_moe_iter * 1e3,
                "overlap_bandwidth": d.overlap_bandwidth, "t": d.t, "m": d.m,
                "iterations": iters, "ownership_moves": n_moves,
                "replica_allreduce_ms": (d.replica_allreduce_s * L if hide else d.replica_allreduce_iter_s) * 1e3,
                "spag_rounds_per_layer": rounds_sum / rounds_n if rounds_n else 0.0,
            },
            "policies": out,
        }

    def _layer(self, a: _Acc, groups, holders_of, comm_total: float, comm_exposed: float,
               red_tot: float = 0.0, red_exp: float = 0.0, nbytes: float = 0.0, copies: int = 0) -> None:
        """One MoE layer of ep/fssdp: every group's all-to-all and compute under the same plan; the
        layer costs what its slowest group costs. `red_*`: the replicas' all-reduce (ep)."""
        worst, loads_all, a2a_bytes = None, [], 0.0
        for c_g in groups:
            tok, loads = self._tokens(c_g, holders_of(c_g))
            a2a, comp = 4 * self._a2a(tok), self._compute(loads)
            if worst is None or a2a + comp > worst[0] + worst[1]:
                worst = (a2a, comp)
            loads_all.append(loads)
            a2a_bytes += self._a2a_bytes(tok)
        a.add_layer(worst[0], worst[1], comm_total + red_tot, comm_exposed + red_exp,
                    straggler(np.concatenate(loads_all)), a2a_bytes / self.N + nbytes, copies)
        a.close_layer(*worst)

    def _fastermoe_layer(self, a: _Acc, groups, owner_E, shadow_all: np.ndarray, ar: float, ar_bytes: float) -> None:
        """Each group shadows from its own counts; the layer costs its slowest group."""
        win_b = 2 * self.d.non_moe_fwd_s
        worst, loads_all, nbytes, copies = None, [], 0.0, 0
        for g, c_g in enumerate(groups):
            hl = self.fastermoe_holders(c_g, owner_E)
            tok, loads = self._tokens(c_g, hl)
            B, M = copy_traffic(hl, self.Ng, self.G, self.d.expert_bytes, "broadcast")
            bc = self._copy_time(B, M)
            for hs in hl:
                for h in hs[1:]:
                    shadow_all[g, h] += 1
            cur = (4 * self._a2a(tok), self._compute(loads), 2 * bc + ar, bc + max(0.0, bc + ar - win_b))
            if worst is None or cur[0] + cur[1] + cur[3] > worst[0] + worst[1] + worst[3]:
                worst = cur
            loads_all.append(loads)
            nbytes += self._a2a_bytes(tok) + 2 * float(B.sum())
            copies += sum(len(h) - 1 for h in hl)
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
