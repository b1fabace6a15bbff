"""Quantities derived once from a config: the MoE layers and their spacing, the expert-parallel
groups (P ranks each) and their N/P replicas, expert size (in the training dtype) and flops, the
non-MoE overlap window, FSSDP's overlap budget t and the expert-data-parallel gradient all-reduce."""
from __future__ import annotations

from dataclasses import dataclass

from parallel import placement
from parallel.simulator.config import SimConfig, expert_group_problems, expert_parallel_size, moe_spacing
from system.configtree import SpecError


@dataclass
class Derived:
    moe_layers: int  # L
    moe_every: int  # k: a MoE layer closes every k-th block (the others have a dense FFN)
    gpus: int
    group: int  # P: ranks of one expert-parallel group (each group holds every expert once)
    replicas: int  # N / P: the expert-data-parallel group of each rank
    expert_params: int
    expert_bytes: int  # one expert's parameters (or gradients) in the training dtype
    param_bytes: int  # bytes per parameter on the wire (2: bf16, 4: fp32)
    flops_per_token: float  # expert forward+backward flops per routed (token, expert) pair
    non_moe_fwd_s: float  # forward time of the non-MoE compute per MoE layer (the overlap window)
    overlap_bandwidth: float
    t: int
    m: int
    replica_allreduce_s: float  # one layer's expert-gradient all-reduce over the replicas (0: one group)
    replica_allreduce_iter_s: float  # all layers' at once, after the backward (3 pool tensors)


def derive(cfg: SimConfig) -> Derived:
    c, mo, cm = cfg.cluster, cfg.model, cfg.cost_model
    E = mo.num_experts
    N = c.gpus
    problems = expert_group_problems(N, E, c.expert_parallel_size)
    if problems:
        raise SpecError(problems)
    try:
        L, k = moe_spacing(mo)
    except ValueError as e:
        raise SpecError([("model.moe_layers", str(e))]) from None
    group = expert_parallel_size(N, E, c.expert_parallel_size)
    replicas = N // group
    H, F = mo.d_model, mo.d_expert
    P = cm.matrices * H * F
    expert_bytes = P * cm.param_bytes()
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
    ar = ar_iter = 0.0
    if replicas > 1:  # ring all-reduce of each rank's expert grads over its expert-data-parallel group
        nbytes = (E // group) * expert_bytes  # one layer's owned experts (even ownership)
        ranks = [i * group for i in range(replicas)]  # the ring {i, i+P, i+2P, ...}
        cross = any(a // c.gpus_per_node != b // c.gpus_per_node for a, b in zip(ranks, ranks[1:] + ranks[:1]))
        a, beta = (c.internode_alpha, c.internode_bandwidth) if cross else (c.nvlink_alpha, c.nvlink_bandwidth)
        steps = 2 * (replicas - 1)
        ar = steps * a + steps / replicas * nbytes / beta
        # ExpertStore.reduce_grads: one all-reduce per pool tensor (w1, w3, w2) of all layers' slots
        ar_iter = 3 * steps * a + steps / replicas * L * nbytes / beta
    return Derived(moe_layers=L, moe_every=k, gpus=N, group=group, replicas=replicas, expert_params=P,
                   expert_bytes=expert_bytes, param_bytes=cm.param_bytes(), flops_per_token=6.0 * cm.matrices * H * F,
                   non_moe_fwd_s=non_moe, overlap_bandwidth=bw, t=t, m=cfg.fssdp.memory_cap,
                   replica_allreduce_s=ar, replica_allreduce_iter_s=ar_iter)
