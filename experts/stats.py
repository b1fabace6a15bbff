"""Routing statistics for the metrics: pure functions of counts, router outputs and biases.

Names follow methods.md: f_i is expert i's share of the routed (token, slot) pairs;
MaxVio = max_i c_i / mean(c) - 1; an expert is dead when it received no token.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from experts.layer import MoEAux


def local_routing_scalars(aux: MoEAux) -> dict[str, float]:
    """Per-micro-batch quantities, to be averaged over micro-batches and ranks.

    entropy:          mean over tokens of the entropy (nats) of the router distribution;
    maxvio_micro:     MaxVio of this micro-batch's counts;
    active_per_token: experts each token was sent to (dynamic under the DTS gate).
    """
    with torch.no_grad():
        p = aux.probs_TE.detach().float()
        ent = float(-(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1).mean())
        c = aux.counts_E.double()
        mean = float(c.mean())
        return {"entropy": ent, "maxvio_micro": (float(c.max()) / mean - 1.0) if mean > 0 else 0.0,
                "active_per_token": aux.active_per_token()}


def global_load_stats(counts_E: torch.Tensor, micro_counts_E: Optional[torch.Tensor] = None,
                      bias_E: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """Statistics of one layer's counts over the global batch of a step."""
    c = counts_E.detach().double().cpu()
    total, mean = float(c.sum()), float(c.mean())
    out: dict[str, Any] = {
        "tokens_per_expert": [int(x) for x in c.tolist()],
        "frac_global": [float(x) / total if total else 0.0 for x in c.tolist()],
        "max_over_mean": float(c.max()) / mean if mean > 0 else math.nan,
        "maxvio_global": float(c.max()) / mean - 1.0 if mean > 0 else math.nan,
        "dead_experts": int((c == 0).sum()),
        # entropy of the load distribution / log E: 1.0 when perfectly balanced
        "load_entropy": _normalised_entropy(c),
    }
    if micro_counts_E is not None:
        m = micro_counts_E.detach().double().cpu()
        out["frac_micro"] = [float(x) / float(m.sum()) if float(m.sum()) else 0.0 for x in m.tolist()]
    if bias_E is not None:
        b = bias_E.detach().double().cpu()
        out["bias_spread"] = float(b.max() - b.min())
    return out


def _normalised_entropy(c: torch.Tensor) -> float:
    n = c.numel()
    if n <= 1 or float(c.sum()) == 0:
        return 1.0
    q = c / c.sum()
    return float(-(q * torch.log(q.clamp_min(1e-30))).sum()) / math.log(n)


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
