"""The training loop of one stage, over a DeepSpeed-like engine.

The engine is duck-typed (`__call__`, `backward`, `step`, `save_checkpoint`,
`load_checkpoint`, `get_lr`, `get_global_grad_norm`), so this module never imports
deepspeed; `parallel.engine` builds the real one.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from parallel import dist as pdist
from system.checkpoint import CheckpointManager
from system.losses import lm_cross_entropy, training_loss
from system.metrics import MetricSink, load_stats


@dataclass
class StageState:
    """What, besides the engine's own state, a checkpoint must hold to resume exactly."""

    step: int = 0  # optimizer updates done in this stage
    tokens: int = 0  # training tokens consumed in this stage (all ranks)
    data_start: int = 0  # stream position at the start of the stage
    data: dict[str, Any] = field(default_factory=dict)  # stream state_dict

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "data_start": self.data_start, "data": self.data}


def maybe_inject_fault(step: int) -> None:
    """Crash on purpose after `step` when MOEFORGE_FAULT_AT_STEP says so (failure testing).

    With MOEFORGE_FAULT_ONCE=PATH the fault fires only while PATH does not exist (it is
    created first), so a restarted worker group runs on.
    """
    at = os.environ.get("MOEFORGE_FAULT_AT_STEP")
    if not at or int(at) != step:
        return
    once = os.environ.get("MOEFORGE_FAULT_ONCE")
    if once:
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
        except FileExistsError:
            return
    raise RuntimeError(f"moeforge: injected fault after step {step} (MOEFORGE_FAULT_AT_STEP)")


@dataclass
class TrainerHooks:
    """Called on rank 0 after each logged step (e.g. a progress bar)."""

    on_step: Optional[Callable[[dict[str, Any]], None]] = None


class Trainer:
    def __init__(self, *, engine, model, stream, holdout_batches: Callable[[], dict[str, Sequence[dict]]],
                 stage, balancing, stage_name: str, sinks: Sequence[MetricSink], ckpt: CheckpointManager,
                 manifest_base: dict[str, Any], log_every: int = 1, hooks: TrainerHooks = TrainerHooks()):
        self.engine, self.model, self.stream = engine, model, stream
        self.holdout_batches = holdout_batches
        self.stage, self.bal, self.stage_name = stage, balancing, stage_name
        self.sinks, self.ckpt, self.manifest_base = list(sinks), ckpt, manifest_base
        self.log_every, self.hooks = log_every, hooks
        self.rank, self.world = pdist.rank(), pdist.world_size()
        self.state = StageState(data_start=stream.position, data=stream.state_dict())
        self.device = next(model.parameters()).device

    # -- resume -------------------------------------------------------------------
    def resume(self, ckpt_dir) -> None:
        client = self.ckpt.load(self.engine, ckpt_dir)
        st = client["moeforge"]
        self.state = StageState(**st)
        self.stream.load_state_dict(st["data"])

    # -- one optimizer step -------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """Run grad_accum_steps micro-batches and one optimizer update; return the step's metrics."""
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        counts: Optional[list[torch.Tensor]] = None
        n_micro = self.stage.grad_accum_steps
        tokens_local = 0
        grad_norm = None
        for micro in range(n_micro):
            batch = self.stream.next_microbatch()
            ids = batch["input_ids"].to(self.device)
            labels = batch["labels"].to(self.device)
            out = self.engine(ids)
            loss, parts = training_loss(out, labels, self.bal)
            self.engine.backward(loss)
            if micro == n_micro - 1:
                grad_norm = self._grad_norm_before_step()
            self.engine.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            layer_counts = [a.counts_E.cpu() for a in out.moe_aux]
            counts = layer_counts if counts is None else [c + n for c, n in zip(counts, layer_counts)]
            tokens_local += labels.numel()
        # Reduce for logging only: the mean of each loss part over ranks and micro-batches,
        # the expert counts summed over the global batch.
        keys = sorted(sums)
        vec = pdist.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        vec /= n_micro * self.world
        counts = [pdist.all_reduce_sum(c) for c in (counts or [])]
        dt = time.perf_counter() - t0
        self.state.step += 1
        self.state.tokens += tokens_local * self.world
        self.state.data = self.stream.state_dict()
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        rec: dict[str, Any] = {
            "stage": self.stage_name, "step": self.state.step, "time": time.time(),
            **{k: float(v) for k, v in zip(keys, vec.tolist())},
            "lr": float(self.engine.get_lr()[0]),
            "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "tokens": self.state.tokens,
            "tokens_per_s": tokens_local * self.world / dt,
            "step_time_s": dt,
        }
        rec.update(load_stats(counts))
        return rec

    def _grad_norm_before_step(self) -> Optional[float]:
        """The global gradient norm before clipping, where the grads are whole on every rank.

        Without ZeRO, DeepSpeed has all-reduced the gradients in the boundary `backward`, so
        each rank holds the full averaged gradient; with ZeRO the engine reports the norm itself.
        """
        if self.engine.zero_optimization_stage() != 0:
            return None
        sq = sum(float(p.grad.float().pow(2).sum()) for p in self.model.parameters() if p.grad is not None)
        return math.sqrt(sq)

    # -- evaluation ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out cross-entropy per domain; batches are split over ranks, then summed."""
        self.model.eval()
        out: dict[str, float] = {}
        try:
            for domain, batches in self.holdout_batches().items():
                tot = torch.zeros(2, dtype=torch.float64)
                for i, b in enumerate(batches):
                    if i % self.world != self.rank:
                        continue
                    labels = b["labels"].to(self.device)
                    logits = self.model(b["input_ids"].to(self.device)).logits_BTV
                    tot[0] += float(lm_cross_entropy(logits, labels)) * labels.numel()
                    tot[1] += labels.numel()
                tot = pdist.all_reduce_sum(tot)
                if tot[1] > 0:
                    out[f"eval/{domain}/loss"] = float(tot[0] / tot[1])
        finally:
            self.model.train()
        return out

    # -- checkpoint ---------------------------------------------------------------
    def save(self) -> None:
        manifest = {**self.manifest_base, "stage": self.stage_name, "step": self.state.step,
                    "tokens": self.state.tokens, "data_start": self.state.data_start,
                    "data_position": self.stream.position, "world_size": self.world,
                    "final": self.state.step >= self.stage.steps}
        self.ckpt.save(self.engine, self.state.step, {"moeforge": self.state.to_dict()}, manifest)

    # -- the loop -----------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until the stage's step count; checkpoint every N steps and at the end."""
        self.model.train()
        last: dict[str, Any] = {}
        while self.state.step < self.stage.steps:
            rec = self.train_step()
            step = self.state.step
            if self.stage.eval_every and step % self.stage.eval_every == 0:
                rec.update(self.evaluate())
            if step % self.log_every == 0 or step == self.stage.steps:
                if self.rank == 0:
                    for s in self.sinks:
                        s.log(rec)
                    if self.hooks.on_step:
                        self.hooks.on_step(rec)
            if step % self.stage.checkpoint_every == 0 or step == self.stage.steps:
                self.save()
            maybe_inject_fault(step)
            last = rec
        return last
