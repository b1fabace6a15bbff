"""The training loop of one stage, over a DeepSpeed-like engine and an expert strategy.

The engine is duck-typed (`__call__`, `backward`, `step`, `save_checkpoint`,
`load_checkpoint`, `get_lr`, `get_global_grad_norm`), so this module never imports
deepspeed; `parallel.engine` builds the real one. Everything that depends on how experts are
laid out over the ranks goes through the strategy (`parallel.strategy`): this loop has no
branch on it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from experts.stats import domain_specialisation
from parallel import dist as pdist
from parallel.balancing import stack_counts
from parallel.callbacks import (Callback, CheckpointOnRequest, Distillation, FaultInjection, ReplayMetrics,
                                ReportProgress, StepContext, StopOnRequest)
from parallel.moe_callback import MoEBalancing
from system.checkpoint import CheckpointManager, tag_for
from system.losses import lm_cross_entropy, training_loss
from system.metrics import MetricSink
from system.schedules import lr_phase


@dataclass
class StageState:
    """What, besides the engine's own state, a checkpoint must hold to resume exactly."""

    step: int = 0  # optimizer updates done in this stage
    tokens: int = 0  # training tokens consumed in this stage (all ranks)
    data_start: int = 0  # stream position at the start of the stage
    data: dict[str, Any] = field(default_factory=dict)  # stream state_dict
    drawn: int = 0  # samples drawn in this stage (all ranks)
    replay_drawn: int = 0  # of which from replay pools
    evals: list = field(default_factory=list)  # [(step, {domain: held-out loss})], step 0 first
    skipped: int = 0  # steps whose update was skipped (a non-finite loss or gradient)
    bad_streak: int = 0  # of which in a row, up to this step

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "data_start": self.data_start, "data": self.data,
                "drawn": self.drawn, "replay_drawn": self.replay_drawn, "evals": self.evals,
                "skipped": self.skipped, "bad_streak": self.bad_streak}


class TrainingDiverged(RuntimeError):
    """`max_bad_steps` steps in a row had a non-finite loss or gradient: the stage stops."""


class StagePreempted(Exception):
    """A stop was asked for (SIGTERM to a worker: `jobs.preemption`): the stage checkpointed at a
    step boundary and stopped; running the job again resumes from that checkpoint."""

    def __init__(self, step: int, checkpoint: str):
        super().__init__(f"preempted: checkpointed at step {step} ({checkpoint})")
        self.step, self.checkpoint = step, checkpoint


@dataclass
class TrainerHooks:
    """`on_step`: called on rank 0 after each logged step (e.g. a progress bar).
    `stop_requested`: polled on every rank at each step's end; when it is true on any rank, every
    rank checkpoints and the stage raises StagePreempted.
    `on_checkpoint`: called on rank 0 with the step of each checkpoint once it is committed.
    `checkpoint_requested`: polled on every rank at each step's end; true on any rank makes every
    rank checkpoint at that step and go on."""

    on_step: Optional[Callable[[dict[str, Any]], None]] = None
    stop_requested: Optional[Callable[[], bool]] = None
    on_checkpoint: Optional[Callable[[int], None]] = None
    checkpoint_requested: Optional[Callable[[], bool]] = None


class Trainer:
    def __init__(self, *, engine, model, strategy, stream, holdout_batches: Callable[[], dict[str, Sequence[dict]]],
                 stage, balancing, stage_name: str, sinks: Sequence[MetricSink], ckpt: CheckpointManager,
                 manifest_base: dict[str, Any], log_every: int = 1, hooks: TrainerHooks = TrainerHooks(),
                 teacher=None, domain_groups: Optional[dict[str, list[str]]] = None,
                 callbacks: Sequence[Callback] = ()):
        self.engine, self.model, self.stream = engine, model, stream
        self.holdout_batches = holdout_batches
        self.stage, self.bal, self.stage_name = stage, balancing, stage_name
        self.sinks, self.ckpt, self.manifest_base = list(sinks), ckpt, manifest_base
        self.log_every, self.hooks = log_every, hooks
        self.rank, self.world = pdist.rank(), pdist.world_size()
        sizes = getattr(getattr(getattr(stage, "parallel", None), "elastic", None), "sizes", None)
        self.requested_world = max(sizes) if sizes else self.world  # an elastic stage asks for its largest size
        self.state = StageState(data_start=stream.position, data=stream.state_dict())
        self.device = next(model.parameters()).device
        self.strategy = strategy  # parallel.strategy.ExpertStrategy
        self.teacher = teacher  # distill stages: jobs.teacher.TeacherSource
        self.stop_agreed = False  # every rank: a stop was requested on some rank this step
        self.save_agreed = False  # every rank: a checkpoint (without a stop) was requested this step
        self.domain_groups = domain_groups or {}  # {"new": [...], "old": [...]} for the cl/ metrics
        self.callbacks = self._default_callbacks() + list(callbacks)

    def _default_callbacks(self) -> list[Callback]:
        """The per-step behaviours, in the order their hooks run (their metrics in that order too)."""
        cbs: list[Callback] = []
        names = getattr(getattr(self.stream, "sampler", None), "domains", [])
        if any(n.startswith("replay/") for n in names):
            cbs.append(ReplayMetrics(self.stream, lambda: self.state))
        cbs.append(MoEBalancing(self.model, self.bal, self.device, self.stage.grad_accum_steps,
                                lambda: self.state.step))
        if self.teacher is not None:
            cbs.append(Distillation(self.teacher))
        cbs.append(FaultInjection(self.rank))
        if self.hooks.stop_requested is not None:
            cbs.append(StopOnRequest(self.hooks.stop_requested))
        if self.hooks.checkpoint_requested is not None:
            cbs.append(CheckpointOnRequest(self.hooks.checkpoint_requested))
        if self.hooks.on_step is not None:
            cbs.append(ReportProgress(self.hooks.on_step))
        return cbs

    # -- resume -------------------------------------------------------------------
    def resume(self, ckpt_dir) -> None:
        """Restore the engine, the strategy's experts and the stage state from a checkpoint,
        written at this world size or another (ZeRO 1/2 partitions are then reassembled:
        `parallel.zero_reshard`; expert files reshard by themselves)."""
        from parallel.zero_reshard import load_resharded_zero_state, saved_dp_world

        saved = saved_dp_world(ckpt_dir)
        if self.engine.zero_optimization_stage() in (1, 2) and saved and saved != self.world:
            if not self.strategy.reshardable_dense_state:
                raise ValueError(f"checkpoint {ckpt_dir} was written by {saved} ranks; the {self.strategy.name!r} "
                                 f"expert layout with ZeRO resumes only on that many ranks")
            client = self.ckpt.load(self.engine, ckpt_dir, load_optimizer_states=False)
            load_resharded_zero_state(self.engine, self.model, ckpt_dir)
            if self.rank == 0:
                print(f"[moeforge] {ckpt_dir}: ZeRO optimizer state of {saved} ranks resharded onto "
                      f"{self.world}", flush=True)
        else:
            client = self.ckpt.load(self.engine, ckpt_dir)
        self.strategy.load(ckpt_dir)
        st = client["moeforge"]
        self.state = StageState(**st)
        self.stream.load_state_dict(st["data"])

    # -- one optimizer step -------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """Run grad_accum_steps micro-batches and one optimizer update; return the step's metrics.
        What a step does besides forward, backward and update lives in `self.callbacks`."""
        t0 = time.perf_counter()
        ctx = StepContext(step=self.state.step + 1, stream_start=self.stream.position, moe_layers=self._moe_layers())
        self.strategy.begin_step(self.state.step)
        ctx.batches = [self.stream.next_microbatch() for _ in range(self.stage.grad_accum_steps)]
        self._each("begin_step", ctx)
        for micro, batch in enumerate(ctx.batches):
            self._micro_batch(ctx, batch, last=micro == len(ctx.batches) - 1)
        self._each("after_optimizer_step", ctx)
        means = self._reduce_for_logging(ctx)
        if ctx.step_counts_LE is not None:  # host values, from the logging sync
            self.strategy.observe(np.asarray(ctx.host["step_counts"], dtype=np.int64).reshape(ctx.step_counts_LE.shape))
        dt = time.perf_counter() - t0
        self._advance(ctx)
        return self._record(ctx, means, dt)

    def _micro_batch(self, ctx: StepContext, batch: dict, last: bool) -> None:
        """Forward, loss, backward; on the step's last micro-batch also the optimizer update."""
        # non_blocking: a pinned batch (the stream's pin_memory, on GPU) copies asynchronously
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        ctx.out = self.engine(ids)
        extra: dict[str, Any] = {}
        for cb in self.callbacks:
            extra.update(cb.loss_inputs(ctx, batch))
        loss, parts = training_loss(ctx.out, labels, self.bal, **extra)
        for cb in self.callbacks:
            loss, parts = cb.before_backward(ctx, loss, parts)
        bad = ~torch.isfinite(loss.detach())  # kept on the device: the optimizer step reads it with its flags
        ctx.loss_bad = bad if ctx.loss_bad is False else ctx.loss_bad | bad
        self.strategy.before_backward(last)
        self.engine.backward(loss)
        if last:  # the accumulation boundary: reduce, clip, update (or skip)
            # The rate this update uses (a skipped one: would have used), read before the
            # engine's step moves the scheduler on to the next update's rate.
            ctx.lr = float(self.engine.get_lr()[0])
            ctx.grad_norm, ctx.skipped = self.strategy.optimizer_step(self.engine, self.model, ctx.loss_bad)
        else:
            self.engine.step()
        for k, v in parts.items():  # device scalars summed there (float64, as the host floats were)
            ctx.sums[k] = ctx.sums.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else float(v))
        ctx.tokens_local += labels.numel()
        self._each("after_micro_batch", ctx)

    def _reduce_for_logging(self, ctx: StepContext) -> dict[str, float]:
        """The mean of each per-micro scalar over ranks and micro-batches, in one all-reduce that
        also carries the stop request (any rank's). Its result and every callback's and the
        strategy's `host_values` come to the host in one copy: the step's one logging sync."""
        keys = sorted(ctx.sums)
        stop = any(cb.stop_requested() for cb in self.callbacks)
        save = any([cb.checkpoint_requested() for cb in self.callbacks])  # each polled: a poll may be a barrier
        vals = [torch.as_tensor(ctx.sums[k]).to(self.device, torch.float64) if torch.is_tensor(ctx.sums[k])
                else torch.full((), float(ctx.sums[k]), dtype=torch.float64, device=self.device) for k in keys]
        vals.append(torch.full((), float(stop), dtype=torch.float64, device=self.device))
        vals.append(torch.full((), float(save), dtype=torch.float64, device=self.device))
        vec = pdist.all_reduce_sum(torch.stack(vals))
        parts = [torch.cat([vec[:-2] / (len(ctx.batches) * self.world), vec[-2:]])]
        owners = []
        if ctx.step_counts_LE is not None:  # the strategy's load predictor observes them on the host
            owners.append(("step_counts", ctx.step_counts_LE.numel()))
            parts.append(ctx.step_counts_LE.detach().to(self.device, torch.float64).reshape(-1))
        if ctx.grad_norm is None:  # the engine's norm (ZeRO 1/2): a device value, read here too
            norm = self.engine.get_global_grad_norm()
            if torch.is_tensor(norm):
                owners.append(("grad_norm", 1))
                parts.append(norm.detach().to(self.device, torch.float64).reshape(1))
            else:
                ctx.grad_norm = norm
        for owner in [*self.callbacks, self.strategy]:
            fn = getattr(owner, "host_values", None)
            t = fn(ctx) if fn is not None else None
            if t is not None:
                owners.append((owner, t.numel()))
                parts.append(t.detach().to(self.device, torch.float64).reshape(-1))
        host = torch.cat(parts).tolist()
        at = len(keys) + 2
        for owner, n in owners:
            ctx.host[owner] = host[at:at + n]
            at += n
        self.stop_agreed = host[len(keys)] > 0
        self.save_agreed = host[len(keys) + 1] > 0
        return dict(zip(keys, host[:len(keys)]))

    def _advance(self, ctx: StepContext) -> None:
        self.state.step += 1
        self.state.skipped += int(ctx.skipped)
        self.state.bad_streak = self.state.bad_streak + 1 if ctx.skipped else 0
        self.state.tokens += ctx.tokens_local * self.world
        self.state.data = self.stream.state_dict()

    def _record(self, ctx: StepContext, means: dict[str, float], dt: float) -> dict[str, Any]:
        grad_norm = ctx.host["grad_norm"][0] if "grad_norm" in ctx.host else ctx.grad_norm
        rec: dict[str, Any] = {
            "stage": self.stage_name, "step": self.state.step, "time": time.time(), **means,
            "lr": ctx.lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "tokens": self.state.tokens,
            "tokens_per_s": ctx.tokens_local * self.world / dt,
            "step_time_s": dt,
            "step_skipped": float(ctx.skipped),
            "skipped_steps": self.state.skipped,
            # the size this run got and the size asked for (an elastic stage runs smaller after a loss)
            "world_size": self.world, "requested_world_size": self.requested_world,
        }
        if self.strategy in ctx.host:
            rec.update(self.strategy.step_metrics(ctx.host[self.strategy]))
        else:
            rec.update(self.strategy.step_metrics())
        for cb in self.callbacks:
            rec.update(cb.step_metrics(ctx))
        return rec

    def _each(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def _moe_layers(self) -> list:
        fn = getattr(self.model, "moe_layers", None)
        return fn() if fn is not None else []

    # -- evaluation ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out cross-entropy per domain; batches are split over ranks, then summed.

        Also the expert specialisation per MoE layer (evaluation routes with the hard gate):
        each domain's expert distribution, the mutual information between domain and chosen
        expert, and each domain's share on its top expert.
        """
        self.model.eval()
        out: dict[str, Any] = {}
        all_batches = self.holdout_batches()
        domains = list(all_batches)
        dom_counts: list[torch.Tensor] = []  # per domain: (L, E)
        try:
            for domain, batches in all_batches.items():
                tot = torch.zeros(3, dtype=torch.float64)
                counts = None
                # Strategies with collectives in the forward need every rank in every forward:
                # ranks short of a batch repeat one and do not count it.
                n_rounds = -(-len(batches) // self.world) if self.strategy.joins_every_forward else None
                for i, b in self._eval_batches_of_rank(batches, n_rounds):
                    res = self.model(b["input_ids"].to(self.device))
                    if i is None:
                        continue
                    labels = b["labels"].to(self.device)
                    tot[0] += float(lm_cross_entropy(res.logits_BTV, labels)) * labels.numel()
                    tot[1] += labels.numel()
                    if self.teacher is not None:
                        tot[2] += float(self.teacher.eval_agreement(domain, b, res.logits_BTV)) * labels.numel()
                    local = stack_counts([a.counts_E for a in res.moe_aux]).cpu()
                    counts = local if counts is None else counts + local
                tot = pdist.all_reduce_sum(tot)
                if tot[1] > 0:
                    out[f"eval/{domain}/loss"] = float(tot[0] / tot[1])
                    if self.teacher is not None:
                        out[f"eval/{domain}/teacher_agreement"] = float(tot[2] / tot[1])
                n_layers = len(self._moe_layers())
                if counts is None:
                    e = self._moe_layers()[0].num_experts if n_layers else 0
                    counts = torch.zeros(n_layers, e, dtype=torch.int64)
                dom_counts.append(pdist.all_reduce_sum(counts))
        finally:
            self.model.train()
        if dom_counts and dom_counts[0].numel():
            counts_DLE = torch.stack(dom_counts)
            for i in range(counts_DLE.shape[1]):
                sp = domain_specialisation(counts_DLE[:, i])
                out[f"eval/moe/{i}/mutual_information"] = sp["mutual_information"]
                out[f"eval/moe/{i}/normalized_mi"] = sp["normalized_mi"]
                for d, dom in enumerate(domains):
                    c = counts_DLE[d, i].double()
                    out[f"eval/moe/{i}/top_share/{dom}"] = sp["top_share"][d]
                    out[f"eval/moe/{i}/frac/{dom}"] = (c / c.sum().clamp_min(1)).tolist()
        return out

    def _evaluate_and_track(self) -> dict[str, Any]:
        """Evaluate, append the per-domain losses to the stage's history and add the `cl/`
        metrics (forgetting, adaptation, stability gap; see `system.continual`)."""
        from system.continual import continual_metrics

        out = self.evaluate()
        losses = {k.split("/")[1]: v for k, v in out.items()
                  if k.startswith("eval/") and k.endswith("/loss") and k.count("/") == 2}
        self.state.evals.append([self.state.step, losses])
        if self.domain_groups:
            out.update(continual_metrics(self.state.evals, self.domain_groups))
        return out

    def _eval_batches_of_rank(self, batches: Sequence[dict], n_rounds: Optional[int]):
        mine = [(i, b) for i, b in enumerate(batches) if i % self.world == self.rank]
        yield from mine
        if n_rounds is not None and batches:
            for _ in range(n_rounds - len(mine)):
                yield None, batches[0]

    # -- checkpoint ---------------------------------------------------------------
    def save(self) -> None:
        manifest = {**self.manifest_base, "stage": self.stage_name, "step": self.state.step,
                    "tokens": self.state.tokens, "data_start": self.state.data_start,
                    "data_position": self.stream.position, "world_size": self.world,
                    "final": self.state.step >= self.stage.steps,
                    # Both of the next update (a metric line's `lr` is its own update's rate);
                    # e.g. "constant": a later stage may continue from here without re-warming
                    "lr_phase": lr_phase(self.stage.lr_schedule, self.state.step, self.stage.steps),
                    "lr": float(self.engine.get_lr()[0])}
        self.ckpt.on_commit = self.hooks.on_checkpoint  # rank 0, once the checkpoint is committed
        self.ckpt.save(self.engine, self.state.step, {"moeforge": self.state.to_dict()}, manifest,
                       extra=self.strategy.save)
        if self.save_agreed:  # a requested checkpoint is committed before anyone acts on it
            self.ckpt.settle()

    def _stop_diverged(self, step: int) -> None:
        from system.checkpoint import latest_checkpoint

        n = self.state.bad_streak
        self.ckpt.finish()  # every rank agreed on the stop: a checkpoint in flight is committed first
        last = latest_checkpoint(self.ckpt.root)
        raise TrainingDiverged(
            f"stage {self.stage_name}: {n} steps in a row (steps {step - n + 1}-{step}) had a non-finite loss or "
            f"gradient, each update skipped (max_bad_steps {self.stage.max_bad_steps}); the weights are those of "
            f"step {step - n}; last good checkpoint: {last if last is not None else 'none yet'}")

    # -- the loop -----------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until the stage's step count; checkpoint every N steps and at the end."""
        self.model.train()
        last: dict[str, Any] = {}
        if self.stage.eval_every and self.state.step == 0 and not self.state.evals:
            # The starting point every continual metric is measured from.
            rec = {"stage": self.stage_name, "step": 0, "time": time.time(), **self._evaluate_and_track()}
            if self.rank == 0:
                for s in self.sinks:
                    s.log(rec)
        try:
            while self.state.step < self.stage.steps:
                rec = self.train_step()
                step = self.state.step
                if self.stage.eval_every and step % self.stage.eval_every == 0:
                    rec.update(self._evaluate_and_track())
                if step % self.log_every == 0 or step == self.stage.steps:
                    if self.rank == 0:
                        for s in self.sinks:
                            s.log(rec)
                        self._each("on_log", rec)
                if self.state.bad_streak >= self.stage.max_bad_steps:
                    self._stop_diverged(step)
                due = step % self.stage.checkpoint_every == 0 or step == self.stage.steps
                if due or self.stop_agreed or self.save_agreed:
                    self.save()
                if self.stop_agreed and step < self.stage.steps:
                    self.ckpt.finish()  # an asynchronous write is committed before the stop
                    raise StagePreempted(step, str(self.ckpt.root / tag_for(step)))
                self._each("end_step", step)
                last = rec
            self.ckpt.finish()  # every rank: the last checkpoint committed (raises if a write failed)
        except BaseException:
            self.ckpt.abort()  # no collective: this rank's writes end, rank 0 commits if it can
            raise
        return last
