"""Routers: pure functions from router logits (and the step number) to weights and expert ids.

Every router returns a `RouterOutput`: per token the chosen experts' ids and combine weights
(`(T, K)`; K is fixed for top-k and dynamic for the DTS gate, with `valid_TK` marking the real
slots), the logits (z-loss) and the per-expert probabilities the load-balancing losses use.
Nothing here holds state: the aux-loss-free bias and the step are arguments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from experts.config import DTSConfig, RouterConfig


@dataclass
class RouterOutput:
    """What a router hands to dispatch, to the balancing losses and to the metrics.

    weights_TK:  combine weight of each chosen expert, (T, K), carries the gradient (0 on
                 invalid slots).
    ids_TK:      chosen expert ids, (T, K), int64.
    logits_TE:   raw router logits in fp32, (T, E) (z-loss).
    probs_TE:    per-token distribution over experts, (T, E), rows sum to 1 (LBL): the softmax,
                 or for sigmoid scores the scores normalised per token (DeepSeek-V3).
    valid_TK:    which slots are real, (T, K) bool; None means all (fixed top-k).
    temperature: the DTS gate's temperature at this step (None for other routers).
    hard:        whether the DTS gate routed with its hard top-k (None for other routers).
    """

    weights_TK: torch.Tensor
    ids_TK: torch.Tensor
    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    valid_TK: Optional[torch.Tensor] = None
    temperature: Optional[float] = None
    hard: Optional[bool] = None

    def active_per_token(self) -> torch.Tensor:
        """Mean number of experts each token is sent to (a 0-dim tensor)."""
        if self.valid_TK is None:
            return torch.tensor(float(self.ids_TK.shape[1]))
        return self.valid_TK.sum(dim=1).float().mean()


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def expert_scores(logits_TE: torch.Tensor, score: str) -> torch.Tensor:
    if score == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    if score == "sigmoid":
        return torch.sigmoid(logits_TE)
    raise ValueError(f"unknown router score {score!r}; expected 'softmax' or 'sigmoid'")


def group_limited_mask(select_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """DeepSeek-V3's node-limited routing: which experts each token may choose, (T, E) bool.

    The E experts form `n_group` contiguous groups; a group's score is the sum of its two
    largest selection scores (its largest when a group has one expert); each token keeps the
    `topk_group` best groups and may only choose experts inside them."""
    T, E = select_TE.shape
    if E % n_group:
        raise ValueError(f"n_group={n_group} does not divide num_experts={E}")
    per = E // n_group
    grouped = select_TE.view(T, n_group, per)
    group_TG = grouped.topk(min(2, per), dim=-1).values.sum(dim=-1)
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
    keep_TG.scatter_(1, group_TG.topk(topk_group, dim=-1).indices, True)
    return keep_TG.unsqueeze(-1).expand(T, n_group, per).reshape(T, E)


def topk_route(logits_TE: torch.Tensor, top_k: int, *, score: str = "softmax", normalize: bool = True,
               bias_E: Optional[torch.Tensor] = None, n_group: int = 1, topk_group: int = 1,
               scaling: float = 1.0) -> RouterOutput:
    """Token-choice top-k.

    The experts are chosen on `scores + bias` (the auxiliary-loss-free bias -- DeepSeek-V3's
    `e_score_correction_bias` -- never part of the gradient), within the `topk_group` best of
    `n_group` expert groups when n_group > 1 (`group_limited_mask`); the combine weights are the
    unbiased scores of the chosen experts, renormalised to sum to 1 when `normalize` and k > 1
    (with k = 1 normalising would make every weight 1 and cut the router off from the
    language-model gradient), then multiplied by `scaling` (DeepSeek-V3's routed_scaling_factor).
    """
    logits_TE = _at_least_fp32(logits_TE)  # routing decisions are precision-sensitive
    scores_TE = expert_scores(logits_TE, score)
    select_TE = scores_TE if bias_E is None else scores_TE.detach() + bias_E.detach().to(scores_TE.dtype)
    if n_group > 1:
        allowed_TE = group_limited_mask(select_TE.detach(), n_group, topk_group)
        select_TE = select_TE.masked_fill(~allowed_TE, float("-inf"))
    ids_TK = torch.topk(select_TE, top_k, dim=-1).indices
    weights_TK = scores_TE.gather(1, ids_TK)
    if normalize and top_k > 1:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    if scaling != 1.0:
        weights_TK = weights_TK * scaling
    if score == "softmax":
        probs_TE = scores_TE
    else:
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return RouterOutput(weights_TK, ids_TK, logits_TE, probs_TE)


def topk_then_softmax(logits_TE: torch.Tensor, top_k: int) -> RouterOutput:
    """The original Mixtral router: the k largest logits, then a softmax over those k only.

    Mathematically the same choice and weights as `topk_route(score="softmax", normalize=True)`
    (softmax over all, keep k, renormalise), which is what transformers' Mixtral computes and
    what we import Mixtral as; the two agree to float rounding (a test checks it)."""
    logits_TE = _at_least_fp32(logits_TE)
    top_TK, ids_TK = torch.topk(logits_TE, top_k, dim=-1)
    return RouterOutput(torch.softmax(top_TK, dim=-1), ids_TK, logits_TE, torch.softmax(logits_TE, dim=-1))


def topk_softmax(logits_TE: torch.Tensor, top_k: int, normalize: bool = True) -> RouterOutput:
    """Softmax over all experts, keep the k largest; optionally renormalise them to sum to 1."""
    return topk_route(logits_TE, top_k, score="softmax", normalize=normalize)


def dts_temperature(step: int, cfg: DTSConfig) -> float:
    """EvoMoE's temperature T(t): from t_max down to t_min over decay_steps, then flat."""
    t = max(int(step), 0)
    if cfg.schedule == "linear":
        return max(cfg.t_max - t * (cfg.t_max - cfg.t_min) / cfg.decay_steps, cfg.t_min)
    if cfg.schedule == "exponential":
        return max(cfg.t_max * math.exp(t * math.log(cfg.t_min / cfg.t_max) / cfg.decay_steps), cfg.t_min)
    raise ValueError(f"unknown DTS temperature schedule {cfg.schedule!r}")


def sample_gumbel(shape, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(U)), U ~ Uniform(0, 1), in fp32."""
    u = torch.rand(shape, device=device, dtype=torch.float32, generator=generator)
    tiny = torch.finfo(torch.float32).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))


def dts_route(logits_TE: torch.Tensor, step: int, cfg: DTSConfig, hard_top_k: int, *, training: bool,
              normalize: bool = True, gumbel_TE: Optional[torch.Tensor] = None,
              bias_E: Optional[torch.Tensor] = None) -> RouterOutput:
    """EvoMoE's dense-to-sparse gate.

    Dense phase (training and step < hard step): g = softmax((logits + gumbel) / T(step)); expert i
    is active for a token when g_i > threshold (the token's largest g is always active, so no token
    is ever dropped); combine weights = softmax(logits) on the active experts (not renormalised,
    as in EvoMoE). K is the largest number of active experts of any token in the batch; shorter
    rows are padded with invalid slots of weight 0.
    Sparse phase (step >= hard step, and always in evaluation): hard top-k on softmax(logits).
    `gumbel_TE` lets a caller (a test) fix the noise; otherwise it is sampled from torch's RNG.
    """
    logits_TE = _at_least_fp32(logits_TE)
    temperature = dts_temperature(step, cfg)
    if not training or step >= cfg.hard_step():
        out = topk_route(logits_TE, hard_top_k, score="softmax", normalize=normalize, bias_E=bias_E)
        out.temperature, out.hard = temperature, True
        return out
    if gumbel_TE is None:
        gumbel_TE = sample_gumbel(logits_TE.shape, device=logits_TE.device)
    with torch.no_grad():
        g_TE = torch.softmax((logits_TE + gumbel_TE.to(logits_TE.dtype)) / temperature, dim=-1)
        k_max = int((g_TE > cfg.threshold).sum(dim=-1).max().clamp_min(1))
        g_TK, ids_TK = torch.topk(g_TE, k_max, dim=-1)  # sorted: column 0 is each token's argmax
        valid_TK = g_TK > cfg.threshold
        valid_TK[:, 0] = True
    probs_TE = torch.softmax(logits_TE, dim=-1)
    weights_TK = probs_TE.gather(1, ids_TK) * valid_TK
    return RouterOutput(weights_TK, ids_TK, logits_TE, probs_TE, valid_TK, temperature, hard=False)


def expert_counts(ids_TK: torch.Tensor, num_experts: int, valid_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tokens routed to each expert, (E,), int64 (a token with k experts counts k times)."""
    flat = ids_TK.reshape(-1) if valid_TK is None else ids_TK[valid_TK]
    return torch.bincount(flat, minlength=num_experts)


def aux_free_bias_update(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's auxiliary-loss-free update: b_i + rate * sign(mean(c) - c_i).

    Under-loaded experts (c_i below the mean) get a larger bias, over-loaded ones a smaller.
    `counts_E` must be the global counts of the optimizer step, identical on every rank.
    """
    c = counts_E.to(torch.float64)
    return bias_E + rate * torch.sign(c.mean() - c).to(bias_E.dtype)


# -- the registry: router kind -> how a layer routes with it ----------------------------------------
@dataclass(frozen=True)
class RouteContext:
    """What a layer knows when it routes, besides its logits and its router config."""

    top_k: int
    step: int  # the optimizer step (the DTS temperature follows it)
    training: bool
    bias_E: Optional[torch.Tensor]  # the aux-loss-free bias (zeros when off)


@dataclass(frozen=True)
class Router:
    """A router kind: `route` decides; `check`, where a kind has one, refuses at build a config
    the kind cannot run."""

    route: Callable[[torch.Tensor, RouterConfig, RouteContext], RouterOutput]
    check: Optional[Callable[[RouterConfig, int, int], None]] = None  # (cfg, top_k, num_experts)


def _route_topk(logits_TE: torch.Tensor, cfg: RouterConfig, ctx: RouteContext) -> RouterOutput:
    return topk_route(logits_TE, ctx.top_k, score=cfg.score, normalize=cfg.normalize_topk, bias_E=ctx.bias_E,
                      n_group=cfg.n_group, topk_group=cfg.topk_group, scaling=cfg.routed_scaling_factor)


def _route_dts(logits_TE: torch.Tensor, cfg: RouterConfig, ctx: RouteContext) -> RouterOutput:
    return dts_route(logits_TE, ctx.step, cfg.dts, cfg.dts.hard_top_k or ctx.top_k, training=ctx.training,
                     normalize=cfg.normalize_topk, bias_E=ctx.bias_E)


def _check_dts(cfg: RouterConfig, top_k: int, num_experts: int) -> None:
    hard = cfg.dts.hard_top_k or top_k
    if not 1 <= hard <= num_experts:
        raise ValueError(f"dts.hard_top_k={hard} must be in [1, num_experts={num_experts}]")


ROUTERS: dict[str, Router] = {
    "topk": Router(_route_topk),
    "dts": Router(_route_dts, _check_dts),
}


def get_router(kind: str) -> Router:
    if kind not in ROUTERS:
        raise ValueError(f"unknown router kind {kind!r}; available: {sorted(ROUTERS)}")
    return ROUTERS[kind]
