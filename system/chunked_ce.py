"""Cross-entropy over a large vocabulary without an fp32 copy of the whole logits.

`F.cross_entropy(logits.float())` on bf16 logits of (N, V) keeps an fp32 copy and an fp32
log-softmax of the same size alive (at V = 152k and 64k tokens, ~40 GB each). Here the logits
stay in their dtype: the forward visits them `rows_per_chunk` rows at a time in fp32 and keeps
only each row's log-sum-exp; the backward recomputes each chunk's softmax from it and writes the
gradient in the logits' dtype. Labels equal to `IGNORE_INDEX` count for nothing, as in
`F.cross_entropy`'s mean. Numbers: docs/gpu.md, "Memory".
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_BYTES = 256 << 20  # the fp32 working set of one chunk


def rows_per_chunk(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * vocab))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, labels_N: torch.Tensor, rows: int) -> torch.Tensor:
        valid_N = labels_N != IGNORE_INDEX
        target_N = torch.where(valid_N, labels_N, torch.zeros_like(labels_N))
        lse_N = torch.empty(logits_NV.shape[0], dtype=torch.float32, device=logits_NV.device)
        total = torch.zeros((), dtype=torch.float32, device=logits_NV.device)
        for s in range(0, logits_NV.shape[0], rows):
            x = logits_NV[s:s + rows].float()
            lse = torch.logsumexp(x, dim=-1)
            picked = x.gather(1, target_N[s:s + rows, None]).squeeze(1)
            total += torch.where(valid_N[s:s + rows], lse - picked, 0.0).sum()
            lse_N[s:s + rows] = lse
        count = valid_N.sum()
        ctx.save_for_backward(logits_NV, target_N, valid_N, lse_N, count)
        ctx.rows = rows
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits_NV, target_N, valid_N, lse_N, count = ctx.saved_tensors
        grad_NV = torch.empty_like(logits_NV)
        scale = grad_out.float() / count
        for s in range(0, logits_NV.shape[0], ctx.rows):
            p = torch.exp(logits_NV[s:s + ctx.rows].float() - lse_N[s:s + ctx.rows, None])
            p.scatter_add_(1, target_N[s:s + ctx.rows, None], -torch.ones_like(p[:, :1]))
            p.mul_(torch.where(valid_N[s:s + ctx.rows, None], scale, 0.0))
            grad_NV[s:s + ctx.rows] = p.to(grad_NV.dtype)
        return grad_NV, None, None


def chunked_cross_entropy(logits_NV: torch.Tensor, labels_N: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 over the labels that are not IGNORE_INDEX."""
    return _ChunkedCrossEntropy.apply(logits_NV, labels_N, rows or rows_per_chunk(logits_NV.shape[-1]))
