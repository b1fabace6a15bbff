"""The MoE feed-forward layer: router -> dispatch -> experts -> combine."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from experts.backends import get_backend
from experts.dispatch import combine, permute, plan_dispatch
from experts.router import RouterOutput, topk_softmax


@dataclass
class MoEAux:
    """Routing statistics a layer returns with its output (never kept in module state).

    probs_TE:  router probabilities (grad-carrying), for the load-balancing loss.
    logits_TE: router logits (grad-carrying), for the z-loss.
    counts_E:  tokens routed to each expert in this micro-batch (detached, int64).
    """

    probs_TE: torch.Tensor
    logits_TE: torch.Tensor
    counts_E: torch.Tensor
    top_k: int


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked tensors, so backends and sharding slice dim 0."""

    def __init__(self, num_experts: int, d_model: int, d_expert: int, backend: str = "reference"):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_expert))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, d_expert))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_expert, d_model))
        self.backend_name = backend
        self._backend = get_backend(backend)
        for p in self.parameters():
            p.moeforge_expert = True  # tells parallel/ these are expert parameters

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1, std=std)
        nn.init.normal_(self.w3, std=std)
        nn.init.normal_(self.w2, std=out_std)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # The backend needs host-side split sizes; one small device->host copy per layer.
        return self._backend(x_ND, counts_E.tolist(), self.w1, self.w3, self.w2)


class MoELayer(nn.Module):
    """Token-choice top-k MoE feed-forward layer, dropless."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, d_expert: int,
                 normalize_topk: bool = True, backend: str = "reference"):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts, self.top_k, self.normalize_topk = num_experts, top_k, normalize_topk
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = GroupedExperts(num_experts, d_model, d_expert, backend)

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)
        self.experts.reset_parameters(std, out_std)

    def route(self, x_TD: torch.Tensor) -> RouterOutput:
        return topk_softmax(self.router(x_TD), self.top_k, self.normalize_topk)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        """
        1. Flatten tokens and route: weights and expert ids per token.
        2. Plan the dispatch: sort the T*K (token, slot) pairs by expert.
        3. Run each expert on its rows.
        4. Combine: weighted sum of each token's K expert outputs, in token order.
        """
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        r = self.route(x_TD)
        plan = plan_dispatch(r.ids_TK, self.num_experts)
        y_ND = self.experts(permute(x_TD, plan), plan.counts_E)
        out_TD = combine(y_ND, r.weights_TK, plan, B * T)
        aux = MoEAux(r.probs_TE, r.logits_TE, plan.counts_E.detach(), self.top_k)
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
