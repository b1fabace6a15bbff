"""Balancing losses: pure functions of router outputs and expert counts.

The counts are an argument, not computed here, so that the same function gives the
micro-batch loss (local counts) or the global-batch loss (counts all-reduced over the
data-parallel ranks and accumulated over micro-batches by `parallel.balancing`, passed in).
"""
from __future__ import annotations

from typing import Optional

import torch


def load_balancing_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, top_k: int = 1) -> torch.Tensor:
    """Switch/GShard LBL without its coefficient: E * sum_i f_i * p_i.

    f_i = counts_i / (sum of counts) is the fraction of routed (token, slot) pairs that chose
    expert i (sum of counts = T*k for local top-k counts); it is a constant (no gradient).
    p_i = mean over the local tokens of the router probability of expert i; it carries the
    gradient. Equal to 1.0 under perfectly uniform routing. `top_k` is kept for callers; the
    normalisation by the counts' sum already accounts for it.
    """
    num_experts = probs_TE.shape[-1]
    counts_E = counts_E.detach().to(probs_TE.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    p_E = probs_TE.mean(dim=0)
    return num_experts * torch.sum(f_E * p_E)


def sequence_counts(ids_TK: torch.Tensor, num_experts: int, batch_size: int,
                    valid_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tokens routed to each expert within each sequence, (B, E), int64."""
    T, K = ids_TK.shape
    seq_TK = torch.arange(T, device=ids_TK.device).div(T // batch_size, rounding_mode="floor")
    flat = (seq_TK.unsqueeze(1) * num_experts + ids_TK)
    if valid_TK is not None:
        flat = flat[valid_TK]
    return torch.bincount(flat.reshape(-1), minlength=batch_size * num_experts).view(batch_size, num_experts)


def sequence_balancing_loss(probs_TE: torch.Tensor, ids_TK: torch.Tensor, batch_size: int,
                            valid_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sequence-level LBL (DeepSeek-V2/V3's sequence-wise balance loss) without its coefficient:
    the LBL computed on each sequence alone (its own f_i and p_i), averaged over sequences."""
    T, E = probs_TE.shape
    if T % batch_size:
        raise ValueError(f"sequence LBL: {T} tokens do not split into {batch_size} sequences")
    counts_BE = sequence_counts(ids_TK, E, batch_size, valid_TK).to(probs_TE.dtype)
    f_BE = counts_BE / counts_BE.sum(dim=1, keepdim=True).clamp_min(1.0)
    p_BE = probs_TE.view(batch_size, T // batch_size, E).mean(dim=1)
    return E * (f_BE * p_BE).sum(dim=1).mean()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss without its coefficient: mean_t logsumexp(logits_t)^2."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
