"""The training objective: next-token cross-entropy (or the distillation objective) plus the MoE
auxiliary losses."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from experts.config import BalancingConfig
from experts.losses import load_balancing_loss, router_z_loss, sequence_balancing_loss
from system.chunked_ce import chunked_cross_entropy
from system.model import ModelOutput


def lm_cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in fp32. Low-precision logits go through `chunked_cross_entropy`
    (no fp32 copy of the whole (B, T, V)); fp32 ones through torch's own (no copy to avoid)."""
    logits_NV, labels_N = logits_BTV.reshape(-1, logits_BTV.shape[-1]), labels_BT.reshape(-1)
    if logits_NV.dtype in (torch.float32, torch.float64):
        return F.cross_entropy(logits_NV.float(), labels_N)
    return chunked_cross_entropy(logits_NV, labels_N)


def training_loss(out: ModelOutput, labels_BT: torch.Tensor, bal: BalancingConfig,
                  counts_override: Optional[Sequence[torch.Tensor]] = None, distill: Optional[dict] = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts (each detached, for logging).

    The LBL's scope follows `bal.lbl`: the layer's local counts (micro_batch), each sequence on
    its own (sequence), or `counts_override`, one (E,) tensor per MoE layer with the counts
    reduced over the global batch (global_batch; required then). With lbl "none" the
    micro-batch LBL is still reported (not added) so runs can be compared.
    Auxiliary terms are averaged over MoE layers, then scaled by their coefficients.
    """
    if distill is not None:
        # (1-alpha)*CE + alpha*T^2*D(teacher, student): `distill` holds the teacher and the
        # keyword arguments of system.distill.distillation_loss.
        from system.distill import distillation_loss
        total, dparts = distillation_loss(out.logits_BTV, labels_BT, **distill)
        parts = {k: (v.detach() if isinstance(v, torch.Tensor) else torch.tensor(float(v)))
                 for k, v in dparts.items() if k != "loss"}
    else:
        ce = lm_cross_entropy(out.logits_BTV, labels_BT)
        total = ce
        parts = {"ce": ce.detach()}
    if out.moe_aux:
        n = len(out.moe_aux)
        if bal.lbl == "global_batch" and counts_override is None:
            raise ValueError("global_batch LBL needs the global counts (counts_override); "
                             "see parallel.balancing")
        if bal.lbl == "sequence":
            lbl = sum(sequence_balancing_loss(a.probs_TE, a.ids_TK, a.batch_size, a.valid_TK)
                      for a in out.moe_aux) / n
        else:
            lbl = sum(load_balancing_loss(a.probs_TE, counts_override[i] if counts_override is not None
                                          else a.counts_E, a.top_k)
                      for i, a in enumerate(out.moe_aux)) / n
        z = sum(router_z_loss(a.logits_TE) for a in out.moe_aux) / n
        parts["lbl"], parts["z_loss"] = lbl.detach(), z.detach()
        if bal.lbl != "none" and bal.lbl_coeff > 0:
            total = total + bal.lbl_coeff * lbl
        if bal.z_loss_coeff > 0:
            total = total + bal.z_loss_coeff * z
    parts["loss"] = total.detach()
    return total, parts
