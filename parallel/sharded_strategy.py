"""`ep` and `fssdp`: experts sharded over the ranks in an `ExpertStore`, outside DeepSpeed.

The engine holds the dense parameters only; the store has its own AdamW with the same
hyper-parameters. Clipping uses the global norm of both (dense counted once, experts summed over
ranks): under ZeRO 0 we clip both ourselves; under ZeRO 1/2 we set DeepSpeed's clip threshold
for the step so that its own coefficient, computed from the dense norm, is the global one
(`_matching_threshold`; docs/expert_parallel.md, "After the backward pass").
"""
from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from parallel import dist as pdist
from parallel.numerics import any_rank_flag, local_dense_nonfinite_flag, skip_dense_update
from parallel.expert_strategy import ExpertStrategy


class ShardedStrategy(ExpertStrategy):
    """`ep` and `fssdp` (`self.name`): the model's experts in an `ExpertStore` after `prepare`;
    a model without MoE layers falls back to the replicated behaviour."""

    engine_holds_experts = False  # the store keeps fp32 expert masters outside DeepSpeed

    def __init__(self, parallel, ep_size: int, grad_clip: float, rank_nodes=None):
        super().__init__(parallel, ep_size, grad_clip, rank_nodes)
        self.name = parallel.expert_strategy
        self.groups = None
        self.store = None
        self.lr = 0.0
        self.last_norm: Optional[float] = None
        self.expert_sharding = 0  # the level in force after `prepare`

    # -- building -----------------------------------------------------------------------------
    def expert_groups(self):
        """The EP x DP groups (made once: a collective over the world)."""
        if self.groups is None:
            from parallel.groups import build_expert_groups

            self.groups = build_expert_groups(self.ep_size or pdist.world_size(), self.rank_nodes,
                                              self.parallel.fssdp.ranks_per_node)
        return self.groups

    def moe_factory(self):
        """With `build_owned_only` (the stage runner sets it), each rank's
        MoE layers materialize only the experts it owns at the start (`GroupedExperts.rows`), with
        the full model's initial values; otherwise the full layers (a loader fills them)."""
        if not self.build_owned_only:
            return None
        from system.model import default_moe_layer

        def make(cfg, experts):
            E = cfg.num_experts
            return default_moe_layer(cfg, experts, expert_rows=[e for e in range(E) if self.owns_initially(0, e, E)])

        return make

    def owns_initially(self, moe_layer: int, expert: int, num_experts: int) -> bool:
        from parallel.placement import Ownership  # the store's initial (classic EP) ownership

        g = self.expert_groups()
        return int(Ownership.even(1, num_experts, g.ep_size).owner_LE[0, expert]) == g.local_rank

    def prepare(self, model: nn.Module) -> None:
        """Every rank built (and initialised) the same full model; each keeps the experts it owns."""
        from parallel.placement import FSSDPPlanConfig
        from parallel.sharded_experts import shard_model

        super().prepare(model)
        groups = self.expert_groups()
        f = self.parallel.fssdp
        cfg = FSSDPPlanConfig(window=f.window, overlap_budget=f.overlap_budget, memory_cap=f.memory_cap,
                              reshard_every=f.reshard_every, rematerialize=f.rematerialize,
                              sprs_overlap=f.sprs_overlap,
                              ranks_per_node=f.ranks_per_node, link_gbps=f.link_gbps, tolerance=f.tolerance)
        self.store = shard_model(model, self.name, cfg, groups=groups)
        level = getattr(self.parallel, "expert_sharding", 0)
        self.expert_sharding = self.store.enable_sharding(level) if self.store is not None else 0
        if level and not self.expert_sharding and pdist.rank() == 0:
            print(f"[moeforge] parallel.expert_sharding: {level} has no effect with one expert-parallel group "
                  f"(expert_parallel_size = world size): nothing to shard over", flush=True)
        if self.store is not None and pdist.rank() == 0 and groups.num_groups > 1:
            print(f"[moeforge] {self.name}: {groups.describe()}", flush=True)

    def configure(self, ds_config: dict[str, Any]) -> dict[str, Any]:
        if self.store is not None and self.parallel.zero_stage == 0:
            ds_config["gradient_clipping"] = 0.0  # we clip dense and expert grads together
        return ds_config

    def attach(self, engine, optimizer_cfg) -> None:
        super().attach(engine, optimizer_cfg)
        if self.store is not None:
            o = optimizer_cfg
            self.store.build_optimizer(o.lr, o.betas, o.eps, o.weight_decay)
            if getattr(engine, "bfloat16_enabled", lambda: False)():
                self.store.comm_dtype = torch.bfloat16  # copies travel in the training dtype
                self.store.set_working_dtype(torch.bfloat16)  # sharded: bf16 weights, fp32 masters
        self.zero = engine.zero_optimization_stage()

    # -- the step -----------------------------------------------------------------------------
    @property
    def joins_every_forward(self) -> bool:
        return self.store is not None  # tokens travel by all-to-all in every MoE forward

    @property
    def sharded_checkpoint(self) -> bool:
        return self.store is not None  # a model without MoE layers has nothing sharded

    def begin_step(self, step: int) -> None:
        if self.store is not None:
            self.store.begin_iteration(step)

    def before_backward(self, final: bool) -> None:
        if self.store is not None:
            self.store.arm_reduce(final)

    def optimizer_step(self, engine, model: nn.Module, local_bad: bool = False) -> tuple[Optional[float], bool]:
        if self.store is None:
            return super().optimizer_step(engine, model, local_bad)
        self.store.reduce_grads()  # SparseReduceScatter copies -> owners, average over ranks
        self.lr = float(engine.get_lr()[0])  # the LR this step uses (the scheduler moves in step())
        # One host sync for the step's decisions: the any-rank non-finite flag, the experts' squared
        # norm (summed over ranks: non-finite when any expert's gradient is) and, under ZeRO 0,
        # each dense gradient's squared norm, brought over together.
        sq = self._expert_sq_tensor()
        dev = sq.device
        bad = local_dense_nonfinite_flag(engine, model, dev).to(dev) | ~torch.isfinite(sq)
        if torch.is_tensor(local_bad):
            bad = bad | local_bad.to(dev)
        elif local_bad:
            bad = torch.ones_like(bad)
        dense = [p.grad.double().pow(2).sum().to(dev) for p in model.parameters() if p.grad is not None] \
            if self.zero == 0 else []
        budget = self.store.budget_to_agree()  # the next iteration's overlap budget, read here too
        extra = [] if budget is None else [budget[1].to(dev, torch.float64)]
        # ZeRO 1/2: the global norm and what DeepSpeed's clip threshold is searched from, read too
        zero_norm = self._zero_norm_parts(engine, sq) if self.zero else None
        if zero_norm is not None:
            extra.append(zero_norm[2].to(dev))
        host = torch.cat([any_rank_flag(bad).to(dev), sq.reshape(1), *extra,
                          *[d.reshape(1) for d in dense]]).tolist()
        if budget is not None:
            self.store.set_agreed(budget[0], int(host.pop(2)))
        zero_host = [host.pop(2) for _ in range(4)] if zero_norm is not None else None
        if host[0] > 0:
            skip_dense_update(engine, model)
            self.store.discard_grads()
            return math.nan, True
        expert_sq = host[1]
        if self.zero == 0:
            norm = self._clip_zero0(model, expert_sq, sum(host[2:]))
        else:
            norm = self._set_zero_threshold(engine, zero_norm, zero_host)
        engine.step()
        self.store.step(self.lr, self.coef(self.last_norm))
        return norm, False

    def _expert_sq_tensor(self) -> torch.Tensor:
        sq = self.store.grad_sq_norm()
        if pdist.is_dist():
            for g in self.store.norm_groups():  # the EP group (and the EDP group when sharded)
                pdist.all_reduce_(sq, "sum", g)
        return sq

    def _expert_sq(self) -> float:
        return float(self._expert_sq_tensor())

    def coef(self, norm: Optional[float]) -> float:
        if not self.grad_clip or norm is None or not norm > self.grad_clip:
            return 1.0
        return self.grad_clip / (norm + 1e-6)

    def _clip_zero0(self, model: nn.Module, expert_sq: float, dense_sq: Optional[float] = None) -> float:
        if dense_sq is None:
            dense_sq = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
        norm = (dense_sq + expert_sq) ** 0.5
        self.last_norm = norm
        coef = self.coef(norm)
        if coef < 1.0:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm

    def _zero_norm_parts(self, engine, expert_sq: torch.Tensor):
        """ZeRO 1/2, on the device: (dense norm, global norm, [global norm, wanted clip, wanted
        multiplier, threshold estimate] as float64) for one read with the step's flag."""
        opt = engine.optimizer
        dense = opt.scaled_global_norm()
        total = torch.sqrt(dense.double() ** 2 + expert_sq.to(dense.device)).to(dense.dtype)
        return dense, total, _threshold_inputs(dense, total, opt.loss_scale, self.grad_clip or 1.0)

    def _set_zero_threshold(self, engine, parts, host: list) -> float:
        """ZeRO 1/2: the global norm, and DeepSpeed's clip threshold for this step."""
        dense, _total, _ = parts
        self.last_norm = host[0]
        if self.grad_clip:
            engine.optimizer.clip_grad = _threshold_from(dense, engine.optimizer.loss_scale, self.grad_clip, *host[1:])
        return self.last_norm

    def observe(self, step_counts_LE: torch.Tensor) -> None:
        if self.store is not None:
            self.store.observe(step_counts_LE)

    def host_values(self, ctx=None) -> Optional[torch.Tensor]:
        """The step's bytes moved, summed over ranks on the device: the trainer brings them to
        the host with its logging reduce (`step_metrics(values)`)."""
        st = self.store
        if st is None:
            return None
        host = torch.tensor([float(v) for v in st.comm.as_dict().values()], dtype=torch.float64)
        if st.device.type == "cuda":
            host = host.pin_memory()
        return pdist.all_reduce_sum(host.to(st.device, non_blocking=True))

    def step_metrics(self, values: Optional[list] = None) -> dict[str, float]:
        """Bytes moved (all ranks), the straggler ratio (busiest rank's expert rows / mean,
        averaged over layers and micro-batches), copies and memory; `ep/...` for ep and fssdp.
        `values`: `host_values` already on the host (else they are fetched here)."""
        st = self.store
        if st is None:
            return {}
        names = st.comm.as_dict()
        if values is None:
            values = self.host_values().tolist()
        mem = st.memory()
        out = {f"ep/bytes_{k}": float(v) for k, v in zip(names, values)}
        out.update({"ep/straggler": st.straggler_ratio(), "ep/copies": float(len(st.plan.copies())),
                    "ep/expert_bytes_rank": float(mem["param_bytes"] + mem["optimizer_bytes"]),
                    "ep/peak_copies_rank": float(mem["peak_copies"]), "ep/reshards": float(st.reshards),
                    "ep/overlap_budget": float(st.t_budget),
                    "ep/sprs_in_backward": float(st.sprs_in_backward)})
        return out

    # -- checkpoints and export ------------------------------------------------------------------
    def save(self, ckpt_dir: Path) -> None:
        if self.store is not None:
            self.store.save(ckpt_dir)

    def load(self, ckpt_dir: Path) -> None:
        if self.store is not None:
            self.store.load(ckpt_dir)

    @torch.no_grad()
    def full_expert_weights(self, model: nn.Module) -> dict[int, tuple[torch.Tensor, ...]]:
        if self.store is None:
            return super().full_expert_weights(model)
        return {layer: self.store.full_layer(layer) for layer in range(self.store.L)}


def _ds_clip(dense: torch.Tensor, loss_scale, threshold: float) -> torch.Tensor:
    """DeepSpeed's ZeRO clip coefficient for a norm and threshold (stage_1_and_2's formula)."""
    return torch.clamp(((dense / loss_scale) + 1e-6) / threshold, min=1.0)


def _ds_multiplier(dense: torch.Tensor, loss_scale, threshold: float) -> torch.Tensor:
    """What DeepSpeed multiplies the gradient partitions by: 1 / (clip x loss scale)."""
    return 1. / (_ds_clip(dense, loss_scale, threshold) * loss_scale)


def _threshold_inputs(dense: torch.Tensor, total: torch.Tensor, loss_scale, max_norm: float) -> torch.Tensor:
    """[global norm, wanted clip, wanted multiplier, estimate of the threshold] (float64, on the
    device): everything the threshold search needs from the norms, for one host read."""
    want_clip = _ds_clip(total, loss_scale, max_norm)
    num = (dense / loss_scale) + 1e-6
    return torch.stack([total.double(), want_clip.double(), _ds_multiplier(total, loss_scale, max_norm).double(),
                        num.double() / want_clip.double()])


def _f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _bits_f32(b: int) -> float:
    return struct.unpack("<f", struct.pack("<i", b))[0]


_WINDOW = 32  # float32 steps either side of the estimate that one read covers


def _threshold_from(dense: torch.Tensor, loss_scale, max_norm: float, want_clip: float, want: float,
                    guess: float) -> float:
    """The smallest float32 threshold whose DeepSpeed multiplier reaches `want` (or its
    neighbour below, whichever is nearer). The multipliers of the `_WINDOW` float32 thresholds
    either side of the estimate are computed with DeepSpeed's own ops (a host scalar threshold,
    as DeepSpeed passes it) and read at once; when the answer is not inside that window (not
    seen in practice), a bisection over +-2^16 float32 steps reads one multiplier a probe."""
    if want_clip == 1.0:
        return math.inf  # no clipping: DeepSpeed's coefficient becomes max(0, 1) = 1
    bits = _f32_bits(guess)
    lo0, hi0 = max(1, bits - (1 << 16)), bits + (1 << 16)  # positive float32s order as their bits
    cand = range(max(lo0, bits - _WINDOW), bits + _WINDOW + 1)
    mults = torch.stack([_ds_multiplier(dense, loss_scale, _bits_f32(b)) for b in cand]).tolist()
    first = next((i for i, m in enumerate(mults) if m >= want), None)
    if first is not None and (first > 0 or cand[0] == lo0):  # the window brackets the answer
        got = {b: m for b, m in zip(cand, mults)}
        lo = cand[first]
        mult = lambda b: got[b] if b in got else float(_ds_multiplier(dense, loss_scale, _bits_f32(b)))  # noqa: E731
    else:
        mult = lambda b: float(_ds_multiplier(dense, loss_scale, _bits_f32(b)))  # noqa: E731
        lo, hi = lo0, hi0
        while lo < hi:  # the smallest threshold whose multiplier reaches `want`
            mid = (lo + hi) // 2
            if mult(mid) >= want:
                hi = mid
            else:
                lo = mid + 1
    best = min((lo, lo - 1), key=lambda b: abs(mult(b) - want))
    return _bits_f32(best)


def _matching_threshold(dense: torch.Tensor, total: torch.Tensor, loss_scale, max_norm: float) -> float:
    """A threshold at which the multiplier DeepSpeed derives from the dense norm equals, bit for
    bit, the one the global norm gives at `max_norm`. DeepSpeed's division rounds the threshold
    to float32 and the multiplier grows with the threshold, so a search over the float32
    thresholds near (dense + 1e-6) / clip finds the smallest one reaching the wanted multiplier;
    when no float32 threshold gives it exactly, the nearest multiplier is taken (one ulp off)."""
    _total, want_clip, want, guess = _threshold_inputs(dense, total, loss_scale, max_norm).tolist()
    return _threshold_from(dense, loss_scale, max_norm, want_clip, want, guess)
