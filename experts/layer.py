"""The MoE feed-forward layer: router -> dispatch -> experts -> combine."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from experts.backends import get_backend, recomputing
from experts.config import RouterConfig
from experts.dispatch import combine, permute, plan_dispatch
from experts.router import RouteContext, RouterOutput, get_router


@dataclass
class MoEAux:
    """Routing statistics a layer returns with its output (never kept in module state).

    probs_TE:  router probabilities (grad-carrying), for the load-balancing loss.
    logits_TE: router logits (grad-carrying), for the z-loss.
    counts_E:  tokens routed to each expert in this micro-batch (detached, int64).
    ids_TK, valid_TK: the routing decision (detached), for sequence-level LBL and statistics.
    batch_size: B, so that T = B * seq_len tokens can be split back into sequences.
    temperature, hard: the DTS gate's temperature and phase (None for other routers).
    """

    probs_TE: torch.Tensor
    logits_TE: torch.Tensor
    counts_E: torch.Tensor
    top_k: int
    ids_TK: Optional[torch.Tensor] = None
    valid_TK: Optional[torch.Tensor] = None
    batch_size: int = 1
    temperature: Optional[float] = None
    hard: Optional[bool] = None

    def active_per_token(self) -> float:
        if self.valid_TK is None:
            return float(self.top_k)
        return float(self.valid_TK.sum(dim=1).float().mean())

    def router_scalars(self) -> dict[str, float]:
        """The router's own per-step figures for the metrics (host values, no sync)."""
        if self.temperature is None:
            return {}
        return {"temperature": self.temperature, "dts_hard": float(bool(self.hard))}


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked tensors, so backends and sharding slice dim 0.

    `rows` (expert ids, ascending): materialize only these experts, as an expert-sharded rank does
    before `parallel.sharded_experts.shard_model` moves them into its store; row j of w1/w3/w2 is
    expert rows[j]. `reset_parameters` draws the full (E, ...) tensors from the same generator,
    one tensor at a time, and keeps the rows, so a rank holds the values of the full model's
    initialisation while never holding more than one full weight of one layer. Such a partial
    module has no forward.
    """

    def __init__(self, num_experts: int, d_model: int, d_expert: int, backend: str = "reference",
                 rows: Optional[Sequence[int]] = None):
        super().__init__()
        self.num_experts = num_experts
        self.rows = None if rows is None else [int(e) for e in rows]
        if self.rows is not None and (sorted(set(self.rows)) != self.rows or
                                      any(not 0 <= e < num_experts for e in self.rows)):
            raise ValueError(f"rows={rows}: expert ids must be ascending, distinct and in [0, {num_experts})")
        n = num_experts if self.rows is None else len(self.rows)
        self.w1 = nn.Parameter(torch.empty(n, d_model, d_expert))
        self.w3 = nn.Parameter(torch.empty(n, d_model, d_expert))
        self.w2 = nn.Parameter(torch.empty(n, d_expert, d_model))
        self.backend_name = backend
        self._backend = get_backend(backend)
        self.recompute = False  # activation checkpointing: redo the FFN in the backward pass
        for p in self.parameters():
            p.moeforge_expert = True  # tells parallel/ these are expert parameters

    @property
    def partial(self) -> bool:
        return self.rows is not None

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        for w, s in ((self.w1, std), (self.w3, std), (self.w2, out_std)):
            if self.rows is None:
                nn.init.normal_(w, std=s)
            else:  # the full tensor's draws (same shape, dtype, device), then only our rows
                full = torch.empty((self.num_experts, *w.shape[1:]), dtype=w.dtype, device=w.device)
                nn.init.normal_(full, std=s)
                w.copy_(full[self.rows])
                del full

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            raise RuntimeError(f"these experts hold only experts {self.rows} of {self.num_experts}: "
                               f"an expert strategy's store runs them (parallel.sharded_experts.shard_model)")
        # The backend needs host-side split sizes: the layer's one device->host copy. Rows past
        # their sum (an untrimmed plan's invalid slots) are not computed.
        backend = recomputing(self._backend) if self.recompute else self._backend
        counts = counts_E.tolist()
        return backend(x_ND[:sum(counts)], counts, self.w1, self.w3, self.w2)


class MoELayer(nn.Module):
    """Token-choice MoE feed-forward layer, dropless: top-k (softmax or sigmoid scores, with the
    optional auxiliary-loss-free bias) or EvoMoE's dense-to-sparse gate.

    `expert_bias` (E,) is a persistent buffer (so it is checkpointed) used only to choose the
    top-k; the trainer updates it after each optimizer step when aux-loss-free balancing is on.
    `routing_step` is the optimizer step the DTS gate's temperature follows; the trainer sets it.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, d_expert: int,
                 router: Optional[RouterConfig] = None, backend: str = "reference",
                 expert_rows: Optional[Sequence[int]] = None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.cfg = router or RouterConfig()
        self._router = get_router(self.cfg.kind)  # experts/router.py's registry
        if self._router.check is not None:
            self._router.check(self.cfg, top_k, num_experts)
        self.hard_top_k = self.cfg.dts.hard_top_k or top_k
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.experts = GroupedExperts(num_experts, d_model, d_expert, backend, rows=expert_rows)
        self.routing_step = 0

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)
        self.experts.reset_parameters(std, out_std)
        self.expert_bias.zero_()

    def route(self, x_TD: torch.Tensor) -> RouterOutput:
        if self.cfg.logits_fp32 and x_TD.dtype not in (torch.float32, torch.float64):
            logits_TE = F.linear(x_TD.float(), self.router.weight.float())  # grads flow back to bf16
        else:
            logits_TE = self.router(x_TD)
        # Always applied: a zero bias chooses exactly what no bias would, and testing it for zero
        # would cost a device->host sync per layer per forward.
        ctx = RouteContext(self.top_k, self.routing_step, self.training, self.expert_bias)
        return self._router.route(logits_TE, self.cfg, ctx)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        """
        1. Flatten tokens and route: weights and expert ids per token.
        2. Plan the dispatch: sort the T*K (token, slot) pairs by expert (no host sync).
        3. Run each expert on its rows.
        4. Combine: weighted sum of each token's K expert outputs, in token order.
        """
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        r = self.route(x_TD)
        plan = plan_dispatch(r.ids_TK, self.num_experts, r.valid_TK, trim=False)  # the experts cut the rows
        y_ND = self.experts(permute(x_TD, plan), plan.counts_E)
        out_TD = combine(y_ND, r.weights_TK, plan, B * T)
        aux = MoEAux(r.probs_TE, r.logits_TE, plan.counts_E.detach(), self.top_k, r.ids_TK.detach(),
                     r.valid_TK, B, r.temperature, r.hard)
        return out_TD.reshape(B, T, D), aux


def dense_moe_reference(layer: MoELayer, x_BTD: torch.Tensor) -> torch.Tensor:
    """Every expert applied to every token, weighted by the gate (0 for unchosen experts).

    A slow, independent check of the dispatch path; used by tests.
    """
    from experts.backends import swiglu

    B, T, D = x_BTD.shape
    x_TD = x_BTD.reshape(-1, D)
    r = layer.route(x_TD)
    gate_TE = torch.zeros_like(r.probs_TE).scatter(1, r.ids_TK, r.weights_TK)
    ex = layer.experts
    out = sum(gate_TE[:, e:e + 1].to(x_TD.dtype) * swiglu(x_TD, ex.w1[e], ex.w3[e], ex.w2[e])
              for e in range(layer.num_experts))
    return out.reshape(B, T, D)


def init_std_for_depth(std: float, num_layers: int) -> float:
    """Output projections scaled down with depth (GPT-2 style) to keep the residual stream stable."""
    return std / math.sqrt(2 * num_layers)
