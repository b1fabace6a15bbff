"""Routing statistics for the metrics: pure functions of counts, router outputs and biases.

Names follow methods.md: f_i is expert i's share of the routed (token, slot) pairs;
MaxVio = max_i c_i / mean(c) - 1; an expert is dead when it received no token.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from experts.layer import MoEAux


def local_routing_scalars(aux: MoEAux) -> dict[str, Any]:
    """Per-micro-batch quantities, to be averaged over micro-batches and ranks; 0-dim float64
    tensors on the layer's device (no host sync: the trainer brings them over once a step).

    entropy:          mean over tokens of the entropy (nats) of the router distribution;
    maxvio_micro:     MaxVio of this micro-batch's counts;
    active_per_token: experts each token was sent to (dynamic under the DTS gate).
    """
    with torch.no_grad():
        p = aux.probs_TE.detach().float()
        ent = (-(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1).mean()).double()
        c = aux.counts_E.double()
        mean = c.mean()
        maxvio = torch.where(mean > 0, c.max() / mean - 1.0, torch.zeros_like(mean))
        active = (float(aux.top_k) if aux.valid_TK is None
                  else aux.valid_TK.sum(dim=1).float().mean().double())
        return {"entropy": ent, "maxvio_micro": maxvio, "active_per_token": active}


def load_stats_values(counts_E: torch.Tensor, micro_counts_E: Optional[torch.Tensor] = None,
                      bias_E: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`global_load_stats`' figures as one float64 vector on the counts' device (no host sync);
    `load_stats_from_values` reads them back from the host copy of that vector."""
    c = counts_E.detach().double()
    n = c.numel()
    total, mean, top = c.sum(), c.mean(), c.max()
    zero = torch.zeros_like(total)
    nan = torch.full_like(total, math.nan)
    parts = [c, torch.where(total != 0, c / total, zero),
             torch.where(mean > 0, top / mean, nan), torch.where(mean > 0, top / mean - 1.0, nan),
             (c == 0).sum().double(), _normalised_entropy(c, total, n)]
    if micro_counts_E is not None:
        m = micro_counts_E.detach().double()
        parts.append(torch.where(m.sum() != 0, m / m.sum(), torch.zeros_like(m)))
    if bias_E is not None:
        b = bias_E.detach().double().to(c.device)
        parts.append(b.max() - b.min())
    return torch.cat([x.reshape(-1) for x in parts])


def load_stats_from_values(v: list, num_experts: int, micro: bool, bias: bool) -> dict[str, Any]:
    """The statistics of one layer from the host list of its `load_stats_values`."""
    E = num_experts
    out: dict[str, Any] = {
        "tokens_per_expert": [int(x) for x in v[:E]],
        "frac_global": list(v[E:2 * E]),
        "max_over_mean": v[2 * E],
        "maxvio_global": v[2 * E + 1],
        "dead_experts": int(v[2 * E + 2]),
        # entropy of the load distribution / log E: 1.0 when perfectly balanced
        "load_entropy": v[2 * E + 3],
    }
    at = 2 * E + 4
    if micro:
        out["frac_micro"] = list(v[at:at + E])
        at += E
    if bias:
        out["bias_spread"] = v[at]
    return out


def load_stats_size(num_experts: int, micro: bool, bias: bool) -> int:
    return 2 * num_experts + 4 + (num_experts if micro else 0) + (1 if bias else 0)


def global_load_stats(counts_E: torch.Tensor, micro_counts_E: Optional[torch.Tensor] = None,
                      bias_E: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """Statistics of one layer's counts over the global batch of a step (one host copy)."""
    v = load_stats_values(counts_E, micro_counts_E, bias_E).tolist()
    return load_stats_from_values(v, counts_E.numel(), micro_counts_E is not None, bias_E is not None)


def _normalised_entropy(c: torch.Tensor, total: torch.Tensor, n: int) -> torch.Tensor:
    """Entropy of the distribution c / log n, 1.0 when n <= 1 or c is all zero (a 0-dim tensor)."""
    one = torch.ones_like(total)
    if n <= 1:
        return one
    q = c / c.sum()
    return torch.where(total == 0, one, -(q * torch.log(q.clamp_min(1e-30))).sum() / math.log(n))


def domain_specialisation(counts_DE: torch.Tensor) -> dict[str, Any]:
    """Expert specialisation from per-domain expert counts (D domains x E experts).

    mutual_information: I(domain; expert) in bits, from the joint distribution of
      (domain of the token, expert chosen), each routed (token, slot) pair counted once;
    normalized_mi: I / H(domain) (1.0 when the expert determines the domain);
    top_share: per domain, the share of its routed pairs that went to its most used expert.
    """
    j = counts_DE.detach().double().cpu()
    n = float(j.sum())
    if n == 0:
        return {"mutual_information": 0.0, "normalized_mi": 0.0, "top_share": [0.0] * j.shape[0]}
    pj = j / n
    pd, pe = pj.sum(1, keepdim=True), pj.sum(0, keepdim=True)
    nz = pj > 0
    mi = float((pj[nz] * torch.log2(pj[nz] / (pd @ pe)[nz])).sum())
    hd = float(-(pd[pd > 0] * torch.log2(pd[pd > 0])).sum())
    rows = j.sum(1)
    top = [float(j[d].max() / rows[d]) if rows[d] > 0 else 0.0 for d in range(j.shape[0])]
    return {"mutual_information": mi, "normalized_mi": mi / hd if hd > 0 else 0.0, "top_share": top}
