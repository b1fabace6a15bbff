"""Balancing losses: pure functions of router outputs and expert counts.

The counts are an argument, not computed here, so that the same function gives the
micro-batch loss (local counts) or, in a later stage, the global-batch loss (counts
all-reduced by a separate distributed step and passed in).
"""
from __future__ import annotations

import torch


def load_balancing_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch/GShard LBL without its coefficient: E * sum_i f_i * p_i.

    f_i = counts_i / (sum of counts) is the fraction of routed (token, slot) pairs that chose
    expert i (sum of counts = T*k for local counts); it is a constant (no gradient).
    p_i = mean over the local tokens of the router probability of expert i; it carries the
    gradient. Equal to 1.0 under perfectly uniform routing.
    """
    num_experts = probs_TE.shape[-1]
    counts_E = counts_E.detach().to(probs_TE.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    p_E = probs_TE.mean(dim=0)
    return num_experts * torch.sum(f_E * p_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss without its coefficient: mean_t logsumexp(logits_t)^2."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
