"""The distributed step of global-batch load balancing: reduce expert counts over the global batch.

Kept apart from the loss: the pure LBL (`experts.losses.load_balancing_loss`) takes counts as an
argument; this module produces the counts it is given.

Per micro-batch, the (L, E) counts of every MoE layer are summed over all data-parallel ranks
(one all-reduce of L*E integers) and added to a buffer that lives for one optimizer step:
* `running` accumulation: micro-batch m's loss uses the buffer after adding m (micro-batches
  1..m of this step), as Megatron-Core's global aux loss does;
* `exact` accumulation: the whole step's counts are gathered first (`set_total`), so every
  micro-batch uses the counts of the entire global batch.
`finish_step` checks that the buffer advanced once per micro-batch (a buffer that never advances
silently turns global-batch LBL into micro-batch LBL) and resets it for the next step.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from parallel import dist as pdist


def stack_counts(counts_per_layer: Sequence[torch.Tensor]) -> torch.Tensor:
    """(L, E) int64 from one (E,) tensor per MoE layer, on their device (NCCL reduces on the GPU)."""
    if not counts_per_layer:
        return torch.zeros(0, 0, dtype=torch.int64)
    return torch.stack([c.detach().to(torch.int64) for c in counts_per_layer])


def reduce_counts(counts_LE: torch.Tensor, group=None) -> torch.Tensor:
    """Sum (L, E) expert counts over the data-parallel ranks (all ranks by default)."""
    if not pdist.is_dist() or counts_LE.numel() == 0:
        return counts_LE.clone()
    out = counts_LE.clone()
    return pdist.all_reduce_(out, "sum", group)


class GlobalCountBuffer:
    """Expert counts of the global batch of one optimizer step (see module docstring)."""

    def __init__(self, micro_batches_per_step: int, mode: str = "running"):
        if mode not in ("running", "exact"):
            raise ValueError(f"global count accumulation {mode!r} is not 'running' or 'exact'")
        self.micro_batches_per_step = micro_batches_per_step
        self.mode = mode
        self.seen: Optional[torch.Tensor] = None  # sum of reduced counts of the micro-batches so far
        self.total: Optional[torch.Tensor] = None  # exact mode: the whole step's counts, known first
        self.micro = 0

    def set_total(self, reduced_total_LE: torch.Tensor) -> None:
        self.total = reduced_total_LE.clone()

    def add(self, reduced_LE: torch.Tensor) -> torch.Tensor:
        """Record one micro-batch's reduced counts; return the counts its loss should use."""
        self.seen = reduced_LE.clone() if self.seen is None else self.seen + reduced_LE
        self.micro += 1
        if self.mode == "exact":
            if self.total is None:
                raise RuntimeError("exact global-batch counts: set_total was not called for this step")
            return self.total
        return self.seen

    def finish_step(self) -> torch.Tensor:
        """The step's global counts; checks the buffer advanced once per micro-batch, then resets."""
        if self.micro != self.micro_batches_per_step:
            raise RuntimeError(f"global-batch counts: {self.micro} micro-batches recorded in a step of "
                               f"{self.micro_batches_per_step}")
        if self.mode == "exact" and not torch.equal(self.seen, self.total):
            raise RuntimeError("global-batch counts: the routing pre-pass counted differently from the "
                               "training pass (non-deterministic routing?)")
        out = self.seen
        self.seen, self.total, self.micro = None, None, 0
        return out
