"""Dropless dispatch: group (token, slot) pairs by expert, and scatter results back.

Nothing is ever dropped: every expert receives every token routed to it, however many.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class DispatchPlan:
    """A permutation that sorts the T*K routed copies of the tokens by expert.

    token_idx_N: for each row of the sorted layout, the source token index, (N,), N = number of
                 valid (token, slot) pairs (T*K for fixed top-k).
    slot_idx_N:  for each sorted row, its flat index into the (T, K) routing tables, (N,).
    counts_E:    rows per expert in the sorted layout, (E,).
    """

    token_idx_N: torch.Tensor
    slot_idx_N: torch.Tensor
    counts_E: torch.Tensor


def plan_dispatch(ids_TK: torch.Tensor, num_experts: int, valid_TK: Optional[torch.Tensor] = None,
                  trim: bool = True) -> DispatchPlan:
    """Stable sort of the flattened expert ids, so order within an expert follows the tokens.

    Invalid slots (`valid_TK` False: the DTS gate's padding) sort last under a sentinel id and
    are cut off (`trim`: a host sync for their number), so no expert computes them. With
    `trim=False` they stay at the end: the expert computation cuts its rows to sum(counts_E)
    once it has the counts on the host anyway, and `combine` follows its output's length.
    """
    flat_ids = ids_TK.reshape(-1)
    if valid_TK is not None:
        flat_ids = torch.where(valid_TK.reshape(-1), flat_ids, torch.full_like(flat_ids, num_experts))
    slot_idx_N = torch.argsort(flat_ids, stable=True)
    # scatter_add, not bincount: CUDA's bincount reads the ids' range on the host (a sync)
    counts_E = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat_ids.device).scatter_add_(
        0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int64))[:num_experts]
    if valid_TK is not None and trim:
        slot_idx_N = slot_idx_N[: int(counts_E.sum())]
    token_idx_N = torch.div(slot_idx_N, ids_TK.shape[1], rounding_mode="floor")
    return DispatchPlan(token_idx_N, slot_idx_N, counts_E)


def permute(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Rows of x in expert order, one per (token, slot): (N, D)."""
    return x_TD.index_select(0, plan.token_idx_N)


def combine(y_ND: torch.Tensor, weights_TK: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """Weighted sum of each token's expert outputs back in token order: (T, D), in y's dtype.

    Accumulated in fp32 (at least) and deterministically: each weighted row goes back to its
    (token, slot) place (unique indices, no atomic adds) and each token's K slots are summed in
    slot order; unused slots (the DTS gate's padding) stay zero. For K <= 2 the sum is bit for bit
    the old index_add's (two terms add the same in either order)."""
    acc = torch.promote_types(y_ND.dtype, torch.float32)
    N = y_ND.shape[0]
    slot_idx_N = plan.slot_idx_N[:N]  # an untrimmed plan: its valid rows only
    w_N = weights_TK.reshape(-1).index_select(0, slot_idx_N).to(acc)
    K = weights_TK.shape[1]
    # each (token, slot) takes its row, unused slots the zero row N: a gather, whose backward
    # keeps only the index (an index_copy into zeros would keep the fp32 rows)
    src_S = torch.full((num_tokens * K,), N, dtype=torch.long, device=y_ND.device).index_copy_(
        0, slot_idx_N, torch.arange(N, device=y_ND.device))
    slots_SD = _WeightedRows.apply(y_ND, w_N.unsqueeze(-1)).index_select(0, src_S)
    return slots_SD.view(num_tokens, K, -1).sum(dim=1).to(y_ND.dtype)


class _WeightedRows(torch.autograd.Function):
    """y.to(w.dtype) * w, and a zero row after them, keeping y in its own dtype for the backward:
    autograd would keep the fp32 copy of bf16 rows (twice their bytes, per MoE layer, until the
    backward). The backward runs autograd's own ops, so the same bits."""

    @staticmethod
    def forward(ctx, y_ND, w_N1):
        ctx.save_for_backward(y_ND, w_N1)
        out = y_ND.new_empty((y_ND.shape[0] + 1, y_ND.shape[1]), dtype=w_N1.dtype)
        torch.mul(y_ND.to(w_N1.dtype), w_N1, out=out[:-1])
        out[-1].zero_()
        return out

    @staticmethod
    def backward(ctx, g_ND):
        y_ND, w_N1 = ctx.saved_tensors
        g_ND = g_ND[:-1]
        grad_y = (g_ND * w_N1).to(y_ND.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (g_ND * y_ND.to(w_N1.dtype)).sum(-1, keepdim=True) if ctx.needs_input_grad[1] else None
        return grad_y, grad_w
