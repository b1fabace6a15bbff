"""Cross-entropy on bf16 logits in row chunks (system/chunked_ce.py): the loss and the gradient of
torch's fp32 cross-entropy on the upcast logits, ignored labels included, with a chunk size that
leaves a remainder; and the peak of live tensor storage during forward + backward far below the
fp32-copy path's (system/memory_tracker.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from system.chunked_ce import IGNORE_INDEX, chunked_cross_entropy
from system.losses import lm_cross_entropy
from system.memory_tracker import peak_live_bytes


def _case(N=37, V=301, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * 3).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[2, 11, 30]] = IGNORE_INDEX
    return logits, labels


def test_chunked_equals_torchs_fp32_cross_entropy_value_and_gradient():
    logits, labels = _case()
    ref_in = logits.float().requires_grad_()
    ref = F.cross_entropy(ref_in, labels)
    ref.backward()
    x = logits.clone().requires_grad_()
    got = chunked_cross_entropy(x, labels, rows=8)  # 37 rows: 4 full chunks and a remainder
    (got * 2.0).backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref.detach(), rtol=1e-6, atol=1e-6)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), (2.0 * ref_in.grad).to(torch.bfloat16).float(), rtol=0, atol=1e-3)
    assert torch.all(x.grad[[2, 11, 30]] == 0)
    # the trainer's entry point takes the chunked path for bf16 and torch's for fp32
    torch.testing.assert_close(lm_cross_entropy(logits[None], labels[None]), ref.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(lm_cross_entropy(logits.float()[None], labels[None]), F.cross_entropy(logits.float(), labels))


def test_chunked_needs_a_fraction_of_the_memory():
    logits, labels = _case(N=512, V=8192, seed=1)

    def old():
        x = logits.clone().requires_grad_()
        F.cross_entropy(x.float(), labels).backward()

    def new():
        x = logits.clone().requires_grad_()
        chunked_cross_entropy(x, labels, rows=32).backward()

    bf16_logits = logits.numel() * 2
    peak_old, peak_new = peak_live_bytes(old), peak_live_bytes(new)
    # old: the bf16 input copy and its grad, an fp32 copy, an fp32 log-softmax, an fp32 grad
    assert peak_old > 4 * bf16_logits
    # new: the bf16 input copy and its grad, plus one chunk's fp32 work
    assert peak_new < 2.5 * bf16_logits and peak_new < peak_old / 2
