"""What a simulation run accumulates and reports: per-policy sums over iterations (`Sums`), the
state carried across iterations (`Track`), and the summary dict `Simulator.run` returns
(per-iteration means in ms, memory per GPU, speedups over EP)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from parallel.placement import LoadPredictor, Ownership
from parallel.simulator.config import SimConfig
from parallel.simulator.derived import Derived
from system.configtree import to_dict

ADAM_BYTES = 16  # bytes per parameter of an owned expert: param, grad, m, v (+ fp32 master with bf16)
MASTER_BYTES = 4  # the fp32 master a bf16 owner keeps
GIB = float(1 << 30)


def straggler(loads: np.ndarray) -> float:
    """The busiest rank's load over the mean (1.0: balanced or empty)."""
    mean = float(loads.mean())
    return float(loads.max()) / mean if mean > 0 else 1.0


class Sums:
    """One policy's sums over iterations (seconds, bytes, copies) and its iteration/layer counts."""

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


@dataclass
class Track:
    """What one run carries from iteration to iteration besides the per-policy sums."""

    own_fs: Ownership  # fssdp's ownership, changed by resharding
    predictor: LoadPredictor  # fssdp's load forecast
    peak_copies_all: np.ndarray  # fssdp: most copies resident at once on each rank (all layers)
    peak_copies_layer: np.ndarray  # fssdp_remat: most copies of one layer on each rank
    peak_shadow_all: float = 0.0  # fastermoe: most shadowed experts on one rank
    moves: int = 0  # ownership moves of all reshards
    rounds_sum: int = 0  # spAG rounds over all fssdp layers priced
    rounds_n: int = 0

    def observe_copies(self, holders_L: list[list[list[int]]], num_ranks: int) -> None:
        """Raise the peaks by this iteration's copies (every holder but the owner)."""
        copies_all = np.zeros(num_ranks)
        for holders_E in holders_L:
            per = np.zeros(num_ranks)
            for hs in holders_E:
                for h in hs[1:]:
                    per[h] += 1
            copies_all += per
            self.peak_copies_layer = np.maximum(self.peak_copies_layer, per)
        self.peak_copies_all = np.maximum(self.peak_copies_all, copies_all)


def _memory(cfg: SimConfig, d: Derived, track: Track, slots: int) -> dict[str, float]:
    """Bytes per GPU of each policy: owned experts with Adam state, plus its peak copies (a copy
    holds a parameter and its gradient in the training dtype); ZeRO-3 a shard and one layer."""
    L, E, N, Pp = d.moe_layers, cfg.model.num_experts, cfg.cluster.gpus, d.expert_params
    copy_b = 2 * d.param_bytes
    return {
        "ep": slots * Pp * ADAM_BYTES,
        "fssdp": slots * Pp * ADAM_BYTES + float(track.peak_copies_all.max()) * Pp * copy_b,
        "fssdp_remat": slots * Pp * ADAM_BYTES + float(track.peak_copies_layer.max()) * Pp * copy_b,
        "fastermoe": slots * Pp * ADAM_BYTES + track.peak_shadow_all * Pp * copy_b,
        "zero3": ADAM_BYTES * E * Pp * L / N + E * Pp * d.param_bytes,
    }


def _policy_row(sums: Sums, memory: float, non_moe_iter: float) -> dict[str, float]:
    """One policy's per-iteration means (ms), per-layer means and memory (GiB)."""
    it = max(1, sums.iters)
    nl = max(1, sums.layers)
    s = sums.s
    r = {
        "time_ms": s["time"] / it * 1e3,
        "a2a_ms": s["a2a"] / it * 1e3,
        "compute_ms": s["compute"] / it * 1e3,
        "comm_total_ms": s["comm_total"] / it * 1e3,
        "comm_exposed_ms": s["comm_exposed"] / it * 1e3,
        "reshard_ms": s["reshard"] / it * 1e3,
        "straggler": s["straggler"] / nl,
        "memory_gib": memory / GIB,
        "gb_moved_per_gpu": s["bytes"] / it / 1e9,
        "copies_per_layer": s["copies"] / nl,
    }
    r["e2e_ms"] = r["time_ms"] + non_moe_iter * 1e3
    return r


def summarize(cfg: SimConfig, d: Derived, sums: dict[str, Sums], track: Track, slots: int,
              iters: int) -> dict:
    """`Simulator.run`'s result: the config, derived constants and every policy's row.
    `slots`: owned experts per rank (all layers)."""
    L, hide = d.moe_layers, cfg.fssdp.sprs_overlap
    mem = _memory(cfg, d, track, slots)
    non_moe_iter = L * 3 * d.non_moe_fwd_s  # forward + backward of the non-MoE compute
    out: dict[str, Any] = {p: _policy_row(a, mem[p], non_moe_iter) for p, a in sums.items()}
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
            "iterations": iters, "ownership_moves": track.moves,
            "replica_allreduce_ms": (d.replica_allreduce_s * L if hide else d.replica_allreduce_iter_s) * 1e3,
            "spag_rounds_per_layer": track.rounds_sum / track.rounds_n if track.rounds_n else 0.0,
        },
        "policies": out,
    }
