"""The MoE balancing bookkeeping of a training step, as one trainer callback.

Per step: the DTS gate's routing step; for global-batch LBL the count buffer (`running`: each
micro-batch's counts all-reduced as it goes; `exact`: a no-grad routing pre-pass over the step's
micro-batches first) whose counts the loss uses; the step's global counts (every rank the same);
the aux-loss-free bias update after an applied update; the per-layer load statistics and the
router's own figures (the DTS temperature and phase) for the metric record.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from experts.router import aux_free_bias_update
from experts.stats import load_stats_from_values, load_stats_size, load_stats_values, local_routing_scalars
from parallel.balancing import GlobalCountBuffer, reduce_counts, stack_counts
from parallel.callbacks import Callback, StepContext


class MoEBalancing(Callback):
    def __init__(self, model, bal, device: torch.device, n_micro: int, routing_step: Callable[[], int]):
        self.model, self.bal, self.device, self.n_micro = model, bal, device, n_micro
        self.routing_step = routing_step  # the optimizer steps done (the DTS temperature follows it)
        self.gbuf: Optional[GlobalCountBuffer] = None
        self.local_LE: Optional[torch.Tensor] = None  # the current micro-batch's counts
        self.sum_local_LE: Optional[torch.Tensor] = None  # this rank's counts over the step
        self.router_scalars: list = []  # the last micro-batch's router figures per layer (host values)

    def begin_step(self, ctx: StepContext) -> None:
        fn = getattr(self.model, "set_routing_step", None)
        if fn is not None:
            fn(self.routing_step())
        self.local_LE = self.sum_local_LE = None
        self.gbuf = GlobalCountBuffer(self.n_micro, self.bal.global_accumulation) \
            if self.bal.lbl == "global_batch" else None
        if self.gbuf is not None and self.gbuf.mode == "exact" and ctx.moe_layers:
            self.gbuf.set_total(self._routing_prepass(ctx.batches))

    def loss_inputs(self, ctx: StepContext, batch: dict) -> dict[str, Any]:
        self.local_LE = stack_counts([a.counts_E for a in ctx.out.moe_aux])
        if self.gbuf is None or not ctx.out.moe_aux:
            return {}
        return {"counts_override": list(self.gbuf.add(reduce_counts(self.local_LE)))}

    def after_micro_batch(self, ctx: StepContext) -> None:
        for i, a in enumerate(ctx.out.moe_aux):
            for k, v in local_routing_scalars(a).items():
                ctx.sums[f"moe/{i}/{k}"] = ctx.sums.get(f"moe/{i}/{k}", 0.0) + v
        self.sum_local_LE = self.local_LE if self.sum_local_LE is None else self.sum_local_LE + self.local_LE
        self.router_scalars = [a.router_scalars() for a in ctx.out.moe_aux]

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """The step's global counts (from the buffer when global-batch LBL reduced them already,
        else one all-reduce), then the aux-free bias moves with them unless the update was skipped."""
        if not ctx.moe_layers:
            return
        ctx.step_counts_LE = self.gbuf.finish_step() if self.gbuf is not None else reduce_counts(self.sum_local_LE)
        if self.bal.aux_free and not ctx.skipped:
            self._update_expert_bias(ctx.moe_layers, ctx.step_counts_LE)

    def host_values(self, ctx: StepContext) -> Optional[torch.Tensor]:
        """Every layer's load statistics (`experts.stats.load_stats_values`), one vector."""
        if not ctx.moe_layers:
            return None
        return torch.cat([load_stats_values(ctx.step_counts_LE[i], self.local_LE[i],
                                            layer.expert_bias if self.bal.aux_free else None)
                          for i, layer in enumerate(ctx.moe_layers)])

    def step_metrics(self, ctx: StepContext) -> dict[str, Any]:
        rec: dict[str, Any] = {}
        values, at = ctx.host.get(self, []), 0
        for i, layer in enumerate(ctx.moe_layers):
            E = ctx.step_counts_LE.shape[1]
            n = load_stats_size(E, True, self.bal.aux_free)
            stats = load_stats_from_values(values[at:at + n], E, True, self.bal.aux_free)
            at += n
            rec.update({f"moe/{i}/{k}": v for k, v in stats.items()})
            rec.update({f"moe/{i}/{k}": v for k, v in self.router_scalars[i].items()})
        return rec

    @torch.no_grad()
    def _routing_prepass(self, batches: Sequence[dict]) -> torch.Tensor:
        """Exact global-batch counts of a step: route every micro-batch without gradients, sum
        over micro-batches and ranks. The RNG state is restored so the training pass draws the
        same random numbers (the DTS gate's Gumbel noise) and routes identically."""
        cpu_state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        total = None
        for batch in batches:
            out = self.model(batch["input_ids"].to(self.device))
            local = stack_counts([a.counts_E for a in out.moe_aux])
            total = local if total is None else total + local
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        return reduce_counts(total)

    @torch.no_grad()
    def _update_expert_bias(self, layers: list, step_counts_LE: torch.Tensor) -> None:
        for layer, c in zip(layers, step_counts_LE):
            layer.expert_bias.copy_(aux_free_bias_update(layer.expert_bias, c.to(layer.expert_bias.device),
                                                         self.bal.bias_update_rate))
