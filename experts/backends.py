"""Expert compute backends: apply each expert's SwiGLU FFN to its contiguous block of rows.

Every backend takes rows already sorted by expert and the per-expert row counts, and the
stacked expert weights w1, w3: (E, D, F) and w2: (E, F, D).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

ExpertBackend = Callable[[torch.Tensor, list[int], torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def swiglu(x_ND: torch.Tensor, w1_DF: torch.Tensor, w3_DF: torch.Tensor, w2_FD: torch.Tensor) -> torch.Tensor:
    return (F.silu(x_ND @ w1_DF) * (x_ND @ w3_DF)) @ w2_FD


def reference_backend(x_ND: torch.Tensor, counts: list[int], w1_EDF: torch.Tensor,
                      w3_EDF: torch.Tensor, w2_EFD: torch.Tensor) -> torch.Tensor:
    """Loop over experts; the plain, obviously-correct implementation."""
    # unbind, not w[e]: indexing would give each expert a zero-filled gradient of the whole
    # stacked tensor in backward (3*E full-size buffers a step); unbind stacks them once.
    w1s, w3s, w2s = w1_EDF.unbind(0), w3_EDF.unbind(0), w2_EFD.unbind(0)
    outs = []
    for e, rows in enumerate(torch.split(x_ND, counts, dim=0)):
        if rows.shape[0] == 0:
            continue
        outs.append(swiglu(rows, w1s[e], w3s[e], w2s[e]))
    if not outs:
        return x_ND.new_zeros(0, w2_EFD.shape[-1])
    return torch.cat(outs, dim=0)


BACKENDS: dict[str, ExpertBackend] = {"reference": reference_backend}


def get_backend(name: str) -> ExpertBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown expert backend {name!r}; available: {sorted(BACKENDS)}")
    return BACKENDS[name]
