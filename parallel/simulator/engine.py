"""The simulator loop: every policy over the same per-iteration loads, priced per MoE layer."""
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
from parallel.simulator.network import Network, copy_hops, copy_traffic
from system.configtree import to_dict

ADAM_BYTES = 16  # bytes per parameter with mixed-precision Adam (param, grad, fp32 master, m, v)
COPY_BYTES = 4  # a copy holds a bf16 parameter and its bf16 gradient
MOVE_BYTES = 14  # moving ownership moves param (2) + fp32 master (4) + Adam m, v (8); grads are empty
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
        self.mem_bytes = 0.0
        self.iters = 0
        self.layers = 0

    def add_layer(self, a2a: float, compute: float, comm_total: float, comm_exposed: float,
                  strag: float, nbytes: float, copies: int) -> None:
        self.s["a2a"] += a2a
        self.s["compute"] += compute
        self.s["comm_total"] += comm_total
        self.s["comm_exposed"] += comm_exposed
        self.s["time"] += a2a + compute + comm_exposed
        self.s["straggler"] += strag
        self.s["bytes"] += nbytes
        self.s["copies"] += copies
        self.layers += 1


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
        self.Ng, self.G = self.d.group, cfg.cluster.gpus_per_node
        self.net = Network(cfg.cluster, self.Ng)  # one expert group (ranks 0..Ng-1 of the cluster)
        self.net_all = Network(cfg.cluster, cfg.cluster.gpus)
        self.gen = LoadGenerator(cfg, self.Ng, trace)

    # ---- building blocks -------------------------------------------------------------------
    def _a2a(self, tok: np.ndarray) -> float:
        return self.net.all_to_all(tok, self.cfg.model.d_model * self.cfg.cost_model.bytes_per_activation)

    def _compute(self, loads: np.ndarray) -> float:
        return float(loads.max()) * self.d.flops_per_token / self.cfg.cluster.flops

    def _a2a_bytes(self, tok: np.ndarray) -> float:
        off = tok.sum() - np.trace(tok)
        return 4.0 * float(off) * self.cfg.model.d_model * self.cfg.cost_model.bytes_per_activation

    def _copy_time(self, B: np.ndarray, M: np.ndarray) -> float:
        return float(self.net.rank_times(B, M).max()) if B.any() else 0.0

    def fastermoe_holders(self, counts_NE: np.ndarray, owner_E: np.ndarray) -> list[list[int]]:
        """FasterMoE shadowing: broadcast the heaviest remaining expert to every rank while the
        estimated layer latency drops (with this iteration's real counts, as FasterMoE decides
        after the gate; so its broadcast cannot hide behind the attention, while the gradient
        reduce in the backward can)."""
        N, d = self.Ng, self.d
        load = counts_NE.sum(axis=0)
        tok = np.zeros((N, N), dtype=np.int64)
        np.add.at(tok, (slice(None), owner_E), counts_NE)  # EP: every pair goes to the owner
        B = np.zeros((N, N))
        M = np.zeros((N, N))
        win_b = 2 * d.non_moe_fwd_s

        def cost(tok, B, M):
            c = self._copy_time(B, M)
            return (4 * self._a2a(tok) + self._compute(tok.sum(axis=0)) + c
                    + max(0.0, c + d.replica_allreduce_s - win_b))

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
        nbytes = self.d.expert_params * MOVE_BYTES
        for (_l, _e, fr, _fs, to, _ts) in mv:
            B[fr, to] += nbytes
            M[fr, to] += 1
        return float(self.net.rank_times(B, M).max())

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, d = self.cfg, self.d
        L, E, N, G = self.L, self.E, self.Ng, self.G
        iters = cfg.sim.iterations
        if self.trace is not None:
            iters = min(iters, len(self.trace))
        pol = self.policies
        acc = {p: _Acc() for p in pol}
        win_f, win_b = d.non_moe_fwd_s, 2 * d.non_moe_fwd_s
        ar = d.replica_allreduce_s
        own_ep = Ownership.even(L, E, N)
        own_fs = Ownership.even(L, E, N)
        predictor = LoadPredictor(cfg.fssdp.window)
        want_fs = any(p in pol for p in ("fssdp", "fssdp_remat"))
        S = own_ep.slots_per_rank  # owned experts per rank, all layers
        P = d.expert_params
        peak_copies_all = np.zeros(N)  # fssdp: copies resident at once (all layers)
        peak_copies_layer = np.zeros(N)  # remat: one layer's copies
        peak_shadow_all = np.zeros(N)
        n_moves = 0
        # ZeRO-3 over all N GPUs: gather the layer's E experts, reduce-scatter their gradients
        z_ag = self.net_all.ring(E * d.expert_bytes)
        z_rs = z_ag
        z_bytes_per_gpu = 3 * (cfg.cluster.gpus - 1) / cfg.cluster.gpus * E * d.expert_bytes
        ar_bytes = (2 * (d.replicas - 1) / d.replicas * (E // N) * d.expert_bytes) if d.replicas > 1 else 0.0

        for it in range(iters):
            counts = self.gen.next()  # (L, N, E)
            glob = counts.sum(axis=1)  # (L, E) what the training code all-reduces and logs
            reshard_s, mv = 0.0, []
            if want_fs:
                pred = predictor.predict()
                kw = {} if cfg.fssdp.tolerance is None else {"tolerance": cfg.fssdp.tolerance}
                if (cfg.fssdp.reshard_every and it > 0 and it % cfg.fssdp.reshard_every == 0
                        and pred is not None):
                    # the training store's rule: Algorithm 2 only when it lowers the predicted straggler
                    new = placement.reshard_decision(own_fs, pred, d.t, d.m, G, **kw)
                    if new is not None:
                        mv = placement.moves(own_fs, new)
                        n_moves += len(mv)
                        reshard_s = self._move_time(mv)
                        own_fs = new
                plan = placement.plan_iteration(own_fs, pred, d.t, d.m, G, **kw)
                copies_all = np.zeros(N)
                for l in range(L):
                    per = np.zeros(N)
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
                        acc[p].s["bytes"] += len(mv) * P * MOVE_BYTES / N
            shadow_all = np.zeros(N)
            for l in range(L):
                c_l = counts[l]
                if "ep" in acc:
                    send = placement.assign_tokens(c_l, placement.ownership_holders(own_ep.owner_LE[l]), G)
                    tok = token_matrix(send)
                    loads = tok.sum(axis=0)
                    exp = max(0.0, ar - win_b)
                    acc["ep"].add_layer(4 * self._a2a(tok), self._compute(loads), ar, exp, straggler(loads),
                                        (self._a2a_bytes(tok)) / N + ar_bytes, 0)
                if want_fs:
                    hl = plan.holders_L[l]
                    send = placement.assign_tokens(c_l, hl, G)
                    tok = token_matrix(send)
                    loads = tok.sum(axis=0)
                    B, M = copy_traffic(hl, N, G, d.expert_bytes, cfg.fssdp.spag)
                    ag = self._copy_time(B, M)
                    ncopies = sum(len(h) - 1 for h in hl)
                    a2a, comp, strag = 4 * self._a2a(tok), self._compute(loads), straggler(loads)
                    copy_bytes = float(B.sum()) / N
                    rs_hidden = ag if cfg.fssdp.sprs_overlap else 0.0  # spRS (= spAG reversed)
                    rs_after = 0.0 if cfg.fssdp.sprs_overlap else ag
                    if "fssdp" in acc:  # spAG under the forward attention, spRS under its backward
                        exp = max(0.0, ag - win_f) + max(0.0, rs_hidden + ar - win_b) + rs_after
                        acc["fssdp"].add_layer(a2a, comp, 2 * ag + ar, exp, strag,
                                               self._a2a_bytes(tok) / N + 2 * copy_bytes + ar_bytes, ncopies)
                    if "fssdp_remat" in acc:  # + a second spAG in the backward, sharing that window
                        exp = max(0.0, ag - win_f) + max(0.0, ag + rs_hidden + ar - win_b) + rs_after
                        acc["fssdp_remat"].add_layer(a2a, comp, 3 * ag + ar, exp, strag,
                                                     self._a2a_bytes(tok) / N + 3 * copy_bytes + ar_bytes, ncopies)
                if "fastermoe" in acc:
                    hl = self.fastermoe_holders(c_l, own_ep.owner_LE[l])
                    send = placement.assign_tokens(c_l, hl, G)
                    tok = token_matrix(send)
                    loads = tok.sum(axis=0)
                    B, M = copy_traffic(hl, N, G, d.expert_bytes, "broadcast")
                    bc = self._copy_time(B, M)
                    for hs in hl:
                        for h in hs[1:]:
                            shadow_all[h] += 1
                    exp = bc + max(0.0, bc + ar - win_b)
                    acc["fastermoe"].add_layer(4 * self._a2a(tok), self._compute(loads), 2 * bc + ar, exp,
                                               straggler(loads),
                                               self._a2a_bytes(tok) / N + 2 * float(B.sum()) / N + ar_bytes,
                                               sum(len(h) - 1 for h in hl))
                if "zero3" in acc:  # every GPU holds the whole layer: its tokens stay local
                    loads = c_l.sum(axis=1)
                    exp = max(0.0, z_ag - win_f) + max(0.0, z_ag + z_rs - win_b)
                    acc["zero3"].add_layer(0.0, self._compute(loads), 2 * z_ag + z_rs, exp, straggler(loads),
                                           z_bytes_per_gpu, 0)
            peak_shadow_all = np.maximum(peak_shadow_all, shadow_all)
            for a in acc.values():
                a.iters += 1
            if want_fs:
                predictor.observe(glob)

        # ---- summary ---------------------------------------------------------------------
        mem = {
            "ep": S * P * ADAM_BYTES,
            "fssdp": S * P * ADAM_BYTES + float(peak_copies_all.max()) * P * COPY_BYTES,
            "fssdp_remat": S * P * ADAM_BYTES + float(peak_copies_layer.max()) * P * COPY_BYTES,
            "fastermoe": S * P * ADAM_BYTES + float(peak_shadow_all.max()) * P * COPY_BYTES,
            "zero3": ADAM_BYTES * E * P * L / cfg.cluster.gpus + E * P * cfg.cost_model.bytes_per_param,
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
                "gpus": d.gpus, "expert_group": d.group, "replicas": d.replicas,
                "expert_params": d.expert_params, "expert_mib": d.expert_bytes / 2**20,
                "non_moe_fwd_ms": d.non_moe_fwd_s * 1e3, "non_moe_iter_ms": non_moe_iter * 1e3,
                "overlap_bandwidth": d.overlap_bandwidth, "t": d.t, "m": d.m,
                "iterations": iters, "ownership_moves": n_moves,
            },
            "policies": out,
        }


def simulate(cfg: SimConfig) -> dict:
    return Simulator(cfg).run()


def sweep(cfg: SimConfig, gpus: list[int]) -> list[dict]:
    out = []
    trace = read_trace(cfg.load.trace) if cfg.load.kind == "trace" else None
    for n in gpus:
        c = config_from_dict(to_dict(cfg), {"cluster.gpus": n})
        out.append(Simulator(c, trace).run())
    return out
