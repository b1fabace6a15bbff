"""Cluster-scale simulator of MoE-layer training: EP vs FSSDP (Hecate) vs FasterMoE vs ZeRO-3.

`moeforge simulate CONFIG.yaml [flags]` runs it. Nothing here touches a GPU or torch: it draws the
expert loads of every iteration (synthetic Zipf with a drifting ranking, or a trace of a real
run's `metrics.jsonl`), plans every policy with the planner the training code uses
(`parallel.placement`: `Ownership`, `LoadPredictor`, `overlap_budget`, `plan_iteration`
= Hecate Algorithm 1, `assign_tokens`, `heterogeneous_sharding` = Algorithm 2), and prices the
result with the alpha-beta cost model of methods.md section 1:

    per MoE layer  T = 4*T_all2all + T_compute + exposed(parameter/gradient collectives)
    T_compute      = 6 * matrices * H * F * max_rank(expert tokens) / flops
    T_all2all      = alpha_nvlink*(G-1) + alpha_ib*(N-G) + max_rank(intra/nvlink + inter/ib)
    spAG / spRS    = max_rank(alpha * messages + intra/nvlink + inter/ib)

where a rank's intra/inter bytes are the larger of what it sends and receives over that link
class. docs/simulator.md states every modelling choice; the short version:

* spAG is a chained (pipelined) broadcast per copied expert, as NCCL's broadcast is: the owner,
  then the other holders in its node, then one node after another; a node's first holder rotates
  with the expert so that the inter-node receives spread over the node's NICs. spRS is the same
  chain reversed (reduce), so it costs the same.
* The forward spAG hides behind the non-MoE forward compute before the layer (attention, and the
  dense blocks when MoE is every k-th layer); spRS (and, with re-materialization, the second spAG
  of the previous layer) behind the backward of that compute (2x forward). Only the excess counts.
* With more GPUs than experts (N > E), every policy but ZeRO-3 runs in expert groups of E ranks
  (EP+DP, as DeepSpeed's ep_size <= E); one group is simulated, the N/E replicas of each expert
  all-reduce their gradients (a ring across the groups, hidden behind the backward like spRS).
  ZeRO-3 shards over all N ranks.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from jobs.configtree import SpecError, build_dataclass, to_dict
from parallel import placement
from parallel.placement import LoadPredictor, Ownership

POLICIES = ("ep", "fssdp", "fssdp_remat", "fastermoe", "zero3")
ADAM_BYTES = 16  # bytes per parameter with mixed-precision Adam (param, grad, fp32 master, m, v)
COPY_BYTES = 4  # a copy holds a bf16 parameter and its bf16 gradient
MOVE_BYTES = 14  # moving ownership moves param (2) + fp32 master (4) + Adam m, v (8); grads are empty
GIB = float(1 << 30)


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass
class ClusterConfig:
    gpus: int = 32  # N, 8..256
    gpus_per_node: int = 8  # G
    nvlink_bandwidth: float = 150e9  # bytes/s a GPU sends (and receives) inside its node
    internode_bandwidth: float = 25e9  # bytes/s a GPU sends (and receives) across nodes (its NIC)
    nvlink_alpha: float = 5e-6  # seconds per message inside a node
    internode_alpha: float = 10e-6  # seconds per message across nodes
    flops: float = 150e12  # sustained dense flop/s of one GPU

    def check(self):
        if not 8 <= self.gpus <= 256:
            yield "gpus", f"{self.gpus} is outside 8..256"
        if self.gpus_per_node < 1:
            yield "gpus_per_node", f"{self.gpus_per_node} must be >= 1"
        elif self.gpus % min(self.gpus, self.gpus_per_node):
            yield "gpus_per_node", f"gpus={self.gpus} is not a multiple of gpus_per_node={self.gpus_per_node}"
        for k in ("nvlink_bandwidth", "internode_bandwidth", "flops"):
            if getattr(self, k) <= 0:
                yield k, f"{getattr(self, k)} must be > 0"
        for k in ("nvlink_alpha", "internode_alpha"):
            if getattr(self, k) < 0:
                yield k, f"{getattr(self, k)} must be >= 0"


@dataclass
class ModelConfig:
    d_model: int = 1024  # H
    d_expert: int = 4096  # F, hidden size of one expert
    experts: int = 64  # E per MoE layer
    top_k: int = 2
    moe_layers: int = 12  # L
    matrices: int = 3  # 3: SwiGLU expert (gate, up, down); 2: GELU expert
    bytes_per_param: int = 2  # bf16 parameters and gradients
    bytes_per_activation: int = 2  # bf16 tokens in the all-to-all
    seq_len: int = 1024  # for the attention flops when attention_time_ms is null
    attention_time_ms: Optional[float] = None  # forward time of the non-MoE compute before each MoE layer
    moe_every: int = 1  # a MoE layer every k transformer blocks (the others have a dense FFN)
    d_ffn_dense: Optional[int] = None  # hidden size of those dense FFNs (null: d_expert)

    def check(self):
        for k in ("d_model", "d_expert", "experts", "top_k", "moe_layers", "bytes_per_param",
                  "bytes_per_activation", "seq_len", "moe_every"):
            if getattr(self, k) < 1:
                yield k, f"{getattr(self, k)} must be >= 1"
        if self.top_k > self.experts:
            yield "top_k", f"{self.top_k} is more than experts={self.experts}"
        if self.matrices not in (2, 3):
            yield "matrices", f"{self.matrices} is not 2 or 3"
        if self.attention_time_ms is not None and self.attention_time_ms < 0:
            yield "attention_time_ms", f"{self.attention_time_ms} must be >= 0"
        if self.d_ffn_dense is not None and self.d_ffn_dense < 1:
            yield "d_ffn_dense", f"{self.d_ffn_dense} must be >= 1"


@dataclass
class LoadConfig:
    kind: str = "zipf"  # zipf | uniform | trace
    tokens_per_gpu: int = 8192  # tokens each GPU routes per MoE layer and iteration (each to top_k experts)
    zipf_s: float = 1.0  # expert of popularity rank j gets a share proportional to (j+1)^-s
    drift: float = 0.5  # mean number of adjacent swaps in each layer's expert ranking per iteration
    trace: Optional[str] = None  # metrics.jsonl (or its run directory) with moe/<i>/tokens_per_expert
    trace_scale: bool = True  # rescale trace counts to tokens_per_gpu; false: split the trace's own counts
    seed: int = 0

    def check(self):
        if self.kind not in ("zipf", "uniform", "trace"):
            yield "kind", f"{self.kind!r} is not one of ['zipf', 'uniform', 'trace']"
        if self.kind == "trace" and not self.trace:
            yield "trace", "load.kind is 'trace' but no trace file is given"
        if self.tokens_per_gpu < 1:
            yield "tokens_per_gpu", f"{self.tokens_per_gpu} must be >= 1"
        if self.zipf_s < 0:
            yield "zipf_s", f"{self.zipf_s} must be >= 0"
        if self.drift < 0:
            yield "drift", f"{self.drift} must be >= 0"


@dataclass
class FSSDPKnobs:
    window: int = 5  # w: iterations the load prediction averages
    overlap_budget: Optional[int] = None  # t; null: placement.overlap_budget(attention, bandwidth, expert bytes)
    overlap_bandwidth: Optional[float] = None  # bytes/s for that derivation; null: see docs/simulator.md
    memory_cap: int = 2  # m: extra experts a rank may hold per layer
    reshard_every: int = 100  # heterogeneous sharding (Algorithm 2) period in iterations; 0: never
    rematerialize: bool = True  # also simulate fssdp_remat when sim.policies is not given
    tolerance: Optional[float] = None  # no copies while owners are within this of the mean load; null: planner default
    spag: str = "p2p"  # p2p: owner sends to every holder (parallel/collectives.py); broadcast: pipelined chain (Hecate)
    sprs_overlap: bool = True  # spRS hidden behind the backward attention (Hecate); false: after the backward

    def check(self):
        if self.window < 1:
            yield "window", f"{self.window} must be >= 1"
        if self.overlap_budget is not None and self.overlap_budget < 0:
            yield "overlap_budget", f"{self.overlap_budget} must be >= 0"
        if self.overlap_bandwidth is not None and self.overlap_bandwidth <= 0:
            yield "overlap_bandwidth", f"{self.overlap_bandwidth} must be > 0"
        if self.memory_cap < 0:
            yield "memory_cap", f"{self.memory_cap} must be >= 0"
        if self.reshard_every < 0:
            yield "reshard_every", f"{self.reshard_every} must be >= 0"
        if self.tolerance is not None and self.tolerance < 0:
            yield "tolerance", f"{self.tolerance} must be >= 0"
        if self.spag not in ("p2p", "broadcast"):
            yield "spag", f"{self.spag!r} is not one of ['p2p', 'broadcast']"


@dataclass
class RunConfig:
    iterations: int = 50
    policies: Optional[list[str]] = None  # null: all (fssdp_remat only if fssdp.rematerialize)

    def check(self):
        if self.iterations < 1:
            yield "iterations", f"{self.iterations} must be >= 1"
        for i, p in enumerate(self.policies or []):
            if p not in POLICIES:
                yield f"policies[{i}]", f"{p!r} is not one of {list(POLICIES)}"


@dataclass
class SimConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    fssdp: FSSDPKnobs = field(default_factory=FSSDPKnobs)
    sim: RunConfig = field(default_factory=RunConfig)

    def check(self):
        N, E = self.cluster.gpus, self.model.experts
        if self.load.kind != "trace" and E % N and N % E:
            yield "model.experts", (f"experts={E} and gpus={N}: one must divide the other "
                                    f"(E/N experts per GPU, or expert groups of E GPUs)")

    def policies(self) -> list[str]:
        if self.sim.policies:
            return list(dict.fromkeys(self.sim.policies))
        return [p for p in POLICIES if p != "fssdp_remat" or self.fssdp.rematerialize]


def config_from_dict(data: Any, overrides: Optional[dict[str, Any]] = None, source: str = "simulate config") -> SimConfig:
    """Validated config from plain data; `overrides` maps dotted paths ("cluster.gpus") to values.

    Raises `SpecError` (a ValueError) whose message names every bad field's dotted path.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError([("", f"the config must be a mapping, not {type(data).__name__}")], source)
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for path, value in (overrides or {}).items():
        d = data
        *parents, leaf = path.split(".")
        for p in parents:
            if not isinstance(d.get(p), dict):
                d[p] = {}
            d = d[p]
        d[leaf] = value
    problems: list[tuple[str, str]] = []
    cfg = build_dataclass(SimConfig, data, "", problems)
    if problems:
        raise SpecError(problems, source)
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[dict[str, Any]] = None) -> SimConfig:
    import yaml

    data: Any = {}
    source = "simulate config"
    if path:
        p = Path(path)
        if not p.is_file():
            raise SpecError([("", f"config file {path!r} does not exist")], path)
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise SpecError([("", f"YAML syntax error: {e}")], path) from None
        source = path
    return config_from_dict(data, overrides, source)


# --------------------------------------------------------------------------------------------
# loads
# --------------------------------------------------------------------------------------------
_TPE = re.compile(r"^moe/(\d+)/tokens_per_expert$")


def read_trace(path: str) -> np.ndarray:
    """(steps, L, E) global token counts from a run's metrics.jsonl (or its run directory).

    Records without `moe/<i>/tokens_per_expert` (evaluations, stage summaries) are skipped; the
    layers are the union of indices seen, and a step must carry all of them.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise SpecError([("load.trace", f"{str(p)!r} does not exist")])
    recs: list[dict[int, list]] = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpecError([("load.trace", f"{p}:{n}: not JSON ({e.msg})")]) from None
        layers = {int(m.group(1)): v for k, v in rec.items() if (m := _TPE.match(k))}
        if layers:
            recs.append(layers)
    if not recs:
        raise SpecError([("load.trace", f"{p}: no record has moe/<i>/tokens_per_expert")])
    idx = sorted(set().union(*recs))
    widths = {len(v) for r in recs for v in r.values()}
    if len(widths) != 1:
        raise SpecError([("load.trace", f"{p}: layers/steps disagree on the number of experts {sorted(widths)}")])
    steps = [[r[i] for i in idx] for r in recs if all(i in r for i in idx)]
    if not steps:
        raise SpecError([("load.trace", f"{p}: no step carries all MoE layers {idx}")])
    arr = np.asarray(steps, dtype=np.float64)
    if (arr < 0).any():
        raise SpecError([("load.trace", f"{p}: negative token counts")])
    return arr


class LoadGenerator:
    """Per-iteration routed (token, expert) counts of every simulated rank: (L, N, E) int64.

    zipf:    each layer's experts are ranked by a random permutation; rank j has probability
             (j+1)^-s / sum; every iteration Poisson(drift) random adjacent pairs of the ranking
             swap (the popular experts wander slowly); each rank routes tokens_per_gpu*top_k
             (token, expert) pairs as a multinomial draw.
    uniform: every rank sends exactly the same number to every expert (remainders spread).
    trace:   the shares of step i's global counts, drawn per rank as for zipf; with
             trace_scale false each rank routes (the trace's pairs)/N instead of tokens_per_gpu*k.
    """

    def __init__(self, cfg: SimConfig, num_ranks: int, trace: Optional[np.ndarray] = None):
        self.kind = cfg.load.kind
        self.L, self.E, self.N = cfg.model.moe_layers, cfg.model.experts, num_ranks
        self.pairs = cfg.load.tokens_per_gpu * cfg.model.top_k
        self.drift = cfg.load.drift
        self.rng = np.random.default_rng(cfg.load.seed)
        self.trace = trace
        self.scale = cfg.load.trace_scale
        self.it = 0
        if self.kind == "zipf":
            j = np.arange(self.E, dtype=np.float64)
            p = (j + 1.0) ** -cfg.load.zipf_s
            self.p_rank = p / p.sum()
            self.rank_of = np.stack([self.rng.permutation(self.E) for _ in range(self.L)])  # expert at rank j

    def _drift(self) -> None:
        for l in range(self.L):
            for _ in range(self.rng.poisson(self.drift) if self.drift > 0 else 0):
                j = int(self.rng.integers(0, self.E - 1))
                self.rank_of[l, [j, j + 1]] = self.rank_of[l, [j + 1, j]]

    def shares(self) -> np.ndarray:
        """(L, E) expected share of each expert this iteration (before drawing)."""
        if self.kind == "zipf":
            out = np.zeros((self.L, self.E))
            for l in range(self.L):
                out[l, self.rank_of[l]] = self.p_rank
            return out
        if self.kind == "uniform":
            return np.full((self.L, self.E), 1.0 / self.E)
        step = self.trace[self.it % len(self.trace)]
        tot = step.sum(axis=1, keepdims=True)
        return np.where(tot > 0, step / np.maximum(tot, 1e-300), 1.0 / self.E)

    def next(self) -> np.ndarray:
        out = np.zeros((self.L, self.N, self.E), dtype=np.int64)
        if self.kind == "uniform":
            base, rem = divmod(self.pairs, self.E)
            out += base
            for s in range(self.N):
                out[:, s, (s * rem + np.arange(rem)) % self.E] += 1
        else:
            sh = self.shares()
            pairs = self.pairs
            if self.kind == "trace" and not self.scale:
                step = self.trace[self.it % len(self.trace)]
                pairs = max(1, int(round(step.sum(axis=1).mean() / self.N)))
            for l in range(self.L):
                out[l] = self.rng.multinomial(pairs, sh[l], size=self.N)
        self.it += 1
        if self.kind == "zipf":
            self._drift()
        return out


# --------------------------------------------------------------------------------------------
# the network: alpha-beta with two link classes
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# the simulator
# --------------------------------------------------------------------------------------------
@dataclass
class Derived:
    gpus: int
    group: int  # ranks that share one set of experts (min(N, E))
    replicas: int  # N / group
    expert_params: int
    expert_bytes: int
    flops_per_token: float  # expert forward+backward flops per routed (token, expert) pair
    non_moe_fwd_s: float  # forward time of the non-MoE compute per MoE layer (the overlap window)
    overlap_bandwidth: float
    t: int
    m: int
    replica_allreduce_s: float  # per layer, per rank (0 when replicas == 1)


def derive(cfg: SimConfig) -> Derived:
    c, mo = cfg.cluster, cfg.model
    E = mo.experts
    N = c.gpus
    if E % N and N % E:
        raise SpecError([("model.experts", f"experts={E} and gpus={N}: one must divide the other")])
    group = min(N, E)
    replicas = N // group
    H, F = mo.d_model, mo.d_expert
    P = mo.matrices * H * F
    expert_bytes = P * mo.bytes_per_param
    if mo.attention_time_ms is not None:
        non_moe = mo.attention_time_ms * 1e-3
    else:
        T = cfg.load.tokens_per_gpu
        attn = T * (8.0 * H * H + 4.0 * mo.seq_len * H)  # QKV+O projections, scores and AV (forward)
        dense = T * 2.0 * mo.matrices * H * (mo.d_ffn_dense or F)
        non_moe = (mo.moe_every * attn + (mo.moe_every - 1) * dense) / c.flops
    if cfg.fssdp.overlap_bandwidth is not None:
        bw = cfg.fssdp.overlap_bandwidth
    elif group <= c.gpus_per_node:
        bw = c.nvlink_bandwidth
    else:  # copies to every rank of a node enter it once and then travel over NVLink
        bw = min(c.nvlink_bandwidth, c.gpus_per_node * c.internode_bandwidth)
    t = cfg.fssdp.overlap_budget
    if t is None:
        t = placement.overlap_budget(non_moe, bw, expert_bytes)
    t = min(int(t), E)
    ar = 0.0
    if replicas > 1:  # ring all-reduce of each rank's expert grads across the replicas of its group
        nbytes = (E // group) * expert_bytes
        ranks = [i * group for i in range(replicas)]
        cross = any(a // c.gpus_per_node != b // c.gpus_per_node for a, b in zip(ranks, ranks[1:] + ranks[:1]))
        a, beta = (c.internode_alpha, c.internode_bandwidth) if cross else (c.nvlink_alpha, c.nvlink_bandwidth)
        ar = 2 * (replicas - 1) * a + 2 * (replicas - 1) / replicas * nbytes / beta
    return Derived(gpus=N, group=group, replicas=replicas, expert_params=P, expert_bytes=expert_bytes,
                   flops_per_token=6.0 * mo.matrices * H * F, non_moe_fwd_s=non_moe, overlap_bandwidth=bw,
                   t=t, m=cfg.fssdp.memory_cap, replica_allreduce_s=ar)


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
        if trace is not None:  # the trace fixes L and E
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(
                cfg.model, moe_layers=int(trace.shape[1]), experts=int(trace.shape[2])))
        self.cfg = cfg
        self.trace = trace
        self.d = derive(cfg)
        self.policies = cfg.policies()
        self.L, self.E = cfg.model.moe_layers, cfg.model.experts
        self.Ng, self.G = self.d.group, cfg.cluster.gpus_per_node
        self.net = Network(cfg.cluster, self.Ng)  # one expert group (ranks 0..Ng-1 of the cluster)
        self.net_all = Network(cfg.cluster, cfg.cluster.gpus)
        self.gen = LoadGenerator(cfg, self.Ng, trace)

    # ---- building blocks -------------------------------------------------------------------
    def _a2a(self, tok: np.ndarray) -> float:
        return self.net.all_to_all(tok, self.cfg.model.d_model * self.cfg.model.bytes_per_activation)

    def _compute(self, loads: np.ndarray) -> float:
        return float(loads.max()) * self.d.flops_per_token / self.cfg.cluster.flops

    def _a2a_bytes(self, tok: np.ndarray) -> float:
        off = tok.sum() - np.trace(tok)
        return 4.0 * float(off) * self.cfg.model.d_model * self.cfg.model.bytes_per_activation

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
            "zero3": ADAM_BYTES * E * P * L / cfg.cluster.gpus + E * P * cfg.model.bytes_per_param,
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


# --------------------------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------------------------
def _describe(res: dict) -> str:
    d, c = res["derived"], res["config"]
    m, ld, fs = c["model"], c["load"], c["fssdp"]
    src = (f"trace {ld['trace']}" if ld["kind"] == "trace" else
           f"zipf s={ld['zipf_s']} drift={ld['drift']}" if ld["kind"] == "zipf" else "uniform")
    return (f"{m['moe_layers']} MoE layers x {m['experts']} experts top-{m['top_k']}, H={m['d_model']} "
            f"F={m['d_expert']} ({m['matrices']} matrices, {d['expert_mib']:.1f} MiB/expert), "
            f"{ld['tokens_per_gpu']} tokens/GPU, {src}; {d['iterations']} iterations; "
            f"{c['cluster']['gpus_per_node']} GPUs/node; spAG {fs['spag']}, m={d['m']}, "
            f"non-MoE forward {d['non_moe_fwd_ms']:.3f} ms/layer")


def format_result(res: dict) -> str:
    d = res["derived"]
    head = (f"{d['gpus']} GPUs"
            + (f" ({d['replicas']} expert groups of {d['expert_group']})" if d["replicas"] > 1 else "")
            + f": {_describe(res)}\n"
            f"overlap budget t={d['t']} (bandwidth {d['overlap_bandwidth'] / 1e9:.0f} GB/s), "
            f"ownership moves {d['ownership_moves']}")
    cols = ("policy", "time ms", "x EP", "a2a ms", "comp ms", "comm exp/tot ms", "reshard ms", "straggler",
            "mem GiB", "GB/GPU", "e2e ms", "e2e x")
    rows = []
    for p, r in res["policies"].items():
        rows.append((p, f"{r['time_ms']:.1f}", f"{r.get('speedup_vs_ep', float('nan')):.2f}",
                     f"{r['a2a_ms']:.1f}", f"{r['compute_ms']:.1f}",
                     f"{r['comm_exposed_ms']:.1f}/{r['comm_total_ms']:.1f}", f"{r['reshard_ms']:.1f}",
                     f"{r['straggler']:.2f}",
                     f"{r['memory_gib']:.2f}", f"{r['gb_moved_per_gpu']:.2f}", f"{r['e2e_ms']:.1f}",
                     f"{r.get('e2e_speedup_vs_ep', float('nan')):.2f}"))
    return head + "\n" + _table(cols, rows)


def format_sweep(results: list[dict]) -> str:
    """One row per GPU count: MoE-layer time per iteration (speedup over EP), end-to-end speedups."""
    pols = list(results[0]["policies"])
    cols = ["gpus", "t"] + [f"{p} ms (x)" for p in pols] + ["e2e x " + p for p in pols if p != "ep"] + \
        ["straggler ep/fssdp"]
    rows = []
    for res in results:
        P = res["policies"]
        row = [str(res["derived"]["gpus"]), str(res["derived"]["t"])]
        row += [f"{P[p]['time_ms']:.1f} ({P[p].get('speedup_vs_ep', float('nan')):.2f})" for p in pols]
        row += [f"{P[p].get('e2e_speedup_vs_ep', float('nan')):.2f}" for p in pols if p != "ep"]
        fs = P.get("fssdp", P.get("fssdp_remat"))
        row.append(f"{P['ep']['straggler']:.2f}/{fs['straggler']:.2f}" if "ep" in P and fs else "-")
        rows.append(row)
    return _describe(results[0]) + "\n" + _table(cols, rows)


def _table(cols, rows) -> str:
    w = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    line = lambda r: "  ".join(str(x).rjust(n) if i else str(x).ljust(n) for i, (x, n) in enumerate(zip(r, w)))
    return "\n".join([line(cols), line(["-" * n for n in w])] + [line(r) for r in rows])
