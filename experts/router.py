"""Routers: pure functions from router logits to (weights, expert ids) per token."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RouterOutput:
    """What a router hands to dispatch and to the balancing losses.

    weights_TK: combine weight of each chosen expert, (T, K), carries the gradient.
    ids_TK:     chosen expert ids, (T, K), int64.
    logits_TE:  raw router logits in fp32, (T, E) (z-loss uses them).
    probs_TE:   router probabilities over all experts, (T, E) (LBL uses them).
    """

    weights_TK: torch.Tensor
    ids_TK: torch.Tensor
    logits_TE: torch.Tensor
    probs_TE: torch.Tensor


def topk_softmax(logits_TE: torch.Tensor, top_k: int, normalize: bool = True) -> RouterOutput:
    """Softmax over all experts, keep the k largest; optionally renormalise them to sum to 1."""
    logits_TE = logits_TE.float()  # routing decisions are precision-sensitive; always fp32
    probs_TE = torch.softmax(logits_TE, dim=-1)
    weights_TK, ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    if normalize and top_k > 1:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return RouterOutput(weights_TK, ids_TK, logits_TE, probs_TE)


def expert_counts(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert, (E,), int64 (a token with k experts counts k times)."""
    return torch.bincount(ids_TK.reshape(-1), minlength=num_experts)
