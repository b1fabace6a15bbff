"""Quantities derived once from a config: the MoE layers and their spacing, expert group and
replicas, expert size and flops, the non-MoE overlap window, FSSDP's overlap budget t and the
replicas' gradient all-reduce."""
from __future__ import annotations

from dataclasses import dataclass

from parallel import placement
from parallel.simulator.config import SimConfig, moe_spacing
from system.configtree import SpecError


@dataclass
class Derived:
    moe_layers: int  # L
    moe_every: int  # k: a MoE layer closes every k-th block (the others have a dense FFN)
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
    c, mo, cm = cfg.cluster, cfg.model, cfg.cost_model
    E = mo.num_experts
    N = c.gpus
    if E % N and N % E:
        raise SpecError([("model.num_experts", f"num_experts={E} and gpus={N}: one must divide the other")])
    try:
        L, k = moe_spacing(mo)
    except ValueError as e:
        raise SpecError([("model.moe_layers", str(e))]) from None
    group = min(N, E)
    replicas = N // group
    H, F = mo.d_model, mo.d_expert
    P = cm.matrices * H * F
    expert_bytes = P * cm.bytes_per_param
    if cm.attention_time_ms is not None:
        non_moe = cm.attention_time_ms * 1e-3
    else:
        T = cfg.load.tokens_per_gpu
        attn = T * (8.0 * H * H + 4.0 * cm.seq_len * H)  # QKV+O projections, scores and AV (forward)
        dense = T * 2.0 * cm.matrices * H * mo.d_ff  # the dense FFNs of the k-1 blocks between MoE layers
        non_moe = (k * attn + (k - 1) * dense) / c.flops
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
    return Derived(moe_layers=L, moe_every=k, gpus=N, group=group, replicas=replicas, expert_params=P,
                   expert_bytes=expert_bytes, flops_per_token=6.0 * cm.matrices * H * F, non_moe_fwd_s=non_moe, overlap_bandwidth=bw,
                   t=t, m=cfg.fssdp.memory_cap, replica_allreduce_s=ar)
