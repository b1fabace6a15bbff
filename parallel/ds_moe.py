"""The `deepspeed_moe` expert strategy: DeepSpeed's own MoE layer (`deepspeed.moe.layer.MoE`),
the GShard-style baseline, behind the interface of `experts.layer.MoELayer`.

`DeepSpeedMoELayer` wraps DeepSpeed's layer (its top-k softmax gate with capacity, two
all-to-alls over the expert-parallel group) around our SwiGLU expert; it creates DeepSpeed's
expert(-data)-parallel groups itself when torch.distributed is up (so it runs without an engine
and initialises its parameters per global expert), tags the expert parameters, and returns the
same `MoEAux` as MoELayer: the gate's logits recomputed from `gate.wg` so our LBL and z-loss
train it, DeepSpeed's `exp_counts` (before capacity drops) and the routes it ran; DeepSpeed's
own balancing loss is `aux.ds_l_aux`. `ds_moe_param_groups` builds the optimizer groups
DeepSpeed's ZeRO 1/2 need (ZeRO 3 is refused for native MoE). What DeepSpeed 0.19.8 does and
why each piece is here: docs/expert_parallel.md, "deepspeed_moe: what DeepSpeed does".
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from experts.backends import swiglu
from experts.config import RouterConfig
from experts.layer import MoEAux
from parallel import dist as pdist
from parallel.engine import param_groups


class SwiGLUExpert(nn.Module):
    """One SwiGLU FFN d_model -> d_expert -> d_model, weights in GroupedExperts' per-expert layout:
    w1, w3 (D, F), w2 (F, D); (silu(x @ w1) * (x @ w3)) @ w2 over the last dimension."""

    def __init__(self, d_model: int, d_expert: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(d_model, d_expert))
        self.w3 = nn.Parameter(torch.zeros(d_model, d_expert))
        self.w2 = nn.Parameter(torch.zeros(d_expert, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w1, self.w3, self.w2)


def _ds_moe_class():
    from deepspeed.moe.layer import MoE

    class _IdempotentMoE(MoE):
        """DeepSpeed's MoE whose `set_deepspeed_parallelism` may be called again (by the engine
        after this layer set the groups itself); DeepSpeed's own asserts on a second call."""

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            if self.deepspeed_moe.ep_group is None:
                super().set_deepspeed_parallelism(use_data_before_expert_parallel_)

    return _IdempotentMoE


def _init_deepspeed_comm() -> None:
    import deepspeed.comm as dscomm

    if not dscomm.is_initialized():
        dscomm.init_distributed(dist_backend=pdist.backend(), dist_init_required=False)


class DeepSpeedMoELayer(nn.Module):
    """DeepSpeed's MoE layer with MoELayer's interface: `forward(x_BTD) -> (y_BTD, MoEAux)`.

    The wrapped `deepspeed.moe.layer.MoE` is `self.moe` (so the engine finds it and treats its
    parameters as expert parameters); its gate's linear is `self.router`, its local experts
    (an `Experts` module holding `num_local_experts` SwiGLUExpert) `self.experts`.
    `cfg`, `expert_bias`, `routing_step` and `hard_top_k` exist because the trainer reads
    them; DeepSpeed's gate supports only top-k softmax routing (`cfg` must be the default
    kind/score; `expert_bias`, i.e. aux-loss-free balancing, is not applied).
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, d_expert: int, ep_size: int,
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 drop_tokens: bool = True, use_rts: bool = True, *, router: Optional[RouterConfig] = None,
                 top2_2nd_expert_sampling: bool = True, noisy_gate_policy: Optional[str] = None,
                 init_std: float = 0.02):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if ep_size < 1 or num_experts % ep_size:
            raise ValueError(f"num_experts={num_experts} must be divisible by ep_size={ep_size}")
        self.cfg = router or RouterConfig()
        if self.cfg.kind != "topk" or self.cfg.score != "softmax":
            raise ValueError("deepspeed_moe supports only router kind 'topk' with softmax scores "
                             f"(got kind={self.cfg.kind!r}, score={self.cfg.score!r})")
        dist_up = pdist.is_dist()
        if ep_size > 1:
            if not dist_up:
                raise RuntimeError("DeepSpeedMoELayer with ep_size > 1 must be constructed after "
                                   "torch.distributed.init_process_group (it creates the expert groups)")
            if pdist.world_size() % ep_size:
                raise ValueError(f"ep_size={ep_size} does not divide the world size {pdist.world_size()}")
        self.num_experts, self.top_k, self.ep_size = num_experts, top_k, ep_size
        self.num_local_experts = num_experts // ep_size
        self.hard_top_k = top_k
        self.routing_step = 0
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.moe = _ds_moe_class()(hidden_size=d_model, expert=SwiGLUExpert(d_model, d_expert),
                                   num_experts=num_experts, ep_size=ep_size, k=top_k,
                                   capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                                   min_capacity=min_capacity, noisy_gate_policy=noisy_gate_policy,
                                   drop_tokens=drop_tokens, use_rts=use_rts,
                                   top2_2nd_expert_sampling=top2_2nd_expert_sampling)
        for p in self.experts.parameters():
            p.moeforge_expert = True
        self._gate_out = None
        self.moe.deepspeed_moe.gate.register_forward_hook(self._capture_gate)
        if dist_up:
            self.create_expert_groups()
        self.reset_parameters(init_std, init_std)

    # --- MoELayer look-alike -------------------------------------------------------------
    @property
    def router(self) -> nn.Linear:
        return self.moe.deepspeed_moe.gate.wg

    @property
    def experts(self) -> nn.Module:
        return self.moe.deepspeed_moe.experts

    def enable_expert_recompute(self) -> None:
        """Activation checkpointing of the local experts' FFNs (DeepSpeed's all-to-alls around
        them are not redone)."""
        import torch.utils.checkpoint

        ex = self.experts
        plain = ex.forward

        def forward(inputs):
            if not torch.is_grad_enabled():
                return plain(inputs)
            return torch.utils.checkpoint.checkpoint(plain, inputs, use_reentrant=False)
        ex.forward = forward

    @property
    def group_name(self) -> str:
        return self.moe.expert_group_name

    def ep_rank(self) -> int:
        """This rank's position in its expert-parallel group (0 without groups, ep_size 1)."""
        g = self.moe.deepspeed_moe.ep_group
        return 0 if g is None else pdist.rank(g)

    def create_expert_groups(self) -> None:
        """Create DeepSpeed's expert(-data)-parallel groups if missing and hand the EP group to
        the layer. Collective (all ranks, same order); called at construction when
        torch.distributed is up; harmless again (the engine calls it via the MoE)."""
        if self.moe.deepspeed_moe.ep_group is None:
            _init_deepspeed_comm()
            self.moe.set_deepspeed_parallelism()

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        """Gate ~ N(0, std); expert w1, w3 ~ N(0, std), w2 ~ N(0, out_std), drawn for all E
        experts in global order (the same draws on every rank with the same seed) and sliced to
        the local ones, so the model matches a single-process one and local experts differ."""
        nn.init.normal_(self.router.weight, std=std)
        first = self.ep_rank() * self.num_local_experts
        local = self.experts.deepspeed_experts
        ref = local[0]
        E, (D, F_) = self.num_experts, ref.w1.shape
        w1 = torch.empty(E, D, F_, dtype=ref.w1.dtype).normal_(std=std)
        w3 = torch.empty(E, D, F_, dtype=ref.w3.dtype).normal_(std=std)
        w2 = torch.empty(E, F_, D, dtype=ref.w2.dtype).normal_(std=out_std)
        for i, ex in enumerate(local):
            ex.w1.copy_(w1[first + i])
            ex.w3.copy_(w3[first + i])
            ex.w2.copy_(w2[first + i])
        self.expert_bias.zero_()

    def _capture_gate(self, module, inputs, output) -> None:
        # sparse-route gate output: (l_aux, capacity, E, indices_KS (-1 = dropped),
        # locations_KS, gates_KS, exp_counts_E)
        self._gate_out = output

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        """
        1. DeepSpeed's MoE: gate -> capacity -> all-to-all -> local experts -> all-to-all -> combine.
        2. Recompute the gate logits for our z-loss/LBL; package DeepSpeed's routing as MoEAux.
        """
        if self.ep_size > 1:
            self.create_expert_groups()
        B, T, D = x_BTD.shape
        y_BTD, l_aux, exp_counts = self.moe(x_BTD)
        gate_out, self._gate_out = self._gate_out, None
        indices_KS, gates_KS = gate_out[3], gate_out[5]
        x_TD = x_BTD.reshape(B * T, D)
        logits_TE = F.linear(x_TD.float(), self.router.weight.float())
        probs_TE = torch.softmax(logits_TE, dim=-1)
        ids_TK = indices_KS.t().long()
        valid_TK = ids_TK >= 0
        aux = MoEAux(probs_TE, logits_TE, exp_counts.detach().to(torch.int64), self.top_k,
                     ids_TK.clamp_min(0).detach(), valid_TK, B, None)
        aux.ds_l_aux = l_aux  # DeepSpeed's GShard balancing loss (grad-carrying)
        aux.weights_TK = gates_KS.t()  # combine weights the layer used (0 on dropped routes)
        return y_BTD, aux


def ds_moe_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """`parallel.engine.param_groups`, with the expert groups split the way DeepSpeed needs.

    Dense groups keep their names (dense_decay, dense_no_decay). Each expert group becomes one
    group per DeepSpeed expert group name, `{"name": "ep_size_N", "moe": True, ...}` (ZeRO 1/2
    look the expert-data-parallel group up by `name`), with our name kept as
    `moeforge_name` (expert_decay, expert_no_decay). Groups left empty are dropped.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = param_groups(model, weight_decay)
    for g in groups:
        g["moeforge_name"] = g["name"]
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


def tokens_dropped(aux: MoEAux) -> int:
    """Routes over capacity in this micro-batch (host sync)."""
    return int(aux.counts_E.sum()) - int(aux.valid_TK.sum())


__all__ = ["DeepSpeedMoELayer", "SwiGLUExpert", "ds_moe_param_groups", "tokens_dropped"]
