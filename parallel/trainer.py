"""The training loop of one stage, over a DeepSpeed-like engine and an expert strategy.

The engine is duck-typed (`__call__`, `backward`, `step`, `save_checkpoint`,
`load_checkpoint`, `get_lr`, `get_global_grad_norm`), so this module never imports
deepspeed; `parallel.engine` builds the real one. Everything that depends on how experts are
laid out over the ranks goes through the strategy (`parallel.strategy`): this loop has no
branch on it.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from experts.router import aux_free_bias_update, dts_temperature
from experts.stats import domain_specialisation, global_load_stats, local_routing_scalars
from parallel import dist as pdist
from parallel.balancing import GlobalCountBuffer, reduce_counts, stack_counts
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


def maybe_inject_nonfinite(step: int, loss: torch.Tensor, rank: int) -> torch.Tensor:
    """An Inf loss on purpose at the steps MOEFORGE_FAULT_NONFINITE lists (e.g. "3,4"), on rank
    MOEFORGE_FAULT_NONFINITE_RANK (default 0): numerics-guard testing."""
    at = os.environ.get("MOEFORGE_FAULT_NONFINITE")
    if not at or step not in {int(x) for x in at.split(",") if x.strip()}:
        return loss
    if rank != int(os.environ.get("MOEFORGE_FAULT_NONFINITE_RANK", "0")):
        return loss
    return loss * math.inf


@dataclass
class TrainerHooks:
    """`on_step`: called on rank 0 after each logged step (e.g. a progress bar).
    `stop_requested`: polled on every rank at each step's end; when it is true on any rank, every
    rank checkpoints and the stage raises StagePreempted."""

    on_step: Optional[Callable[[dict[str, Any]], None]] = None
    stop_requested: Optional[Callable[[], bool]] = None


class Trainer:
    def __init__(self, *, engine, model, strategy, stream, holdout_batches: Callable[[], dict[str, Sequence[dict]]],
                 stage, balancing, stage_name: str, sinks: Sequence[MetricSink], ckpt: CheckpointManager,
                 manifest_base: dict[str, Any], log_every: int = 1, hooks: TrainerHooks = TrainerHooks(),
                 teacher=None, domain_groups: Optional[dict[str, list[str]]] = None):
        self.engine, self.model, self.stream = engine, model, stream
        self.holdout_batches = holdout_batches
        self.stage, self.bal, self.stage_name = stage, balancing, stage_name
        self.sinks, self.ckpt, self.manifest_base = list(sinks), ckpt, manifest_base
        self.log_every, self.hooks = log_every, hooks
        self.rank, self.world = pdist.rank(), pdist.world_size()
        self.state = StageState(data_start=stream.position, data=stream.state_dict())
        self.device = next(model.parameters()).device
        self.strategy = strategy  # parallel.strategy.ExpertStrategy
        self.teacher = teacher  # distill stages: jobs.teacher.TeacherSource
        self.stop_agreed = False  # every rank: a stop was requested on some rank this step
        self.domain_groups = domain_groups or {}  # {"new": [...], "old": [...]} for the cl/ metrics
        names = getattr(getattr(stream, "sampler", None), "domains", [])
        self._replay_ids = [i for i, n in enumerate(names) if n.startswith("replay/")]

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

        Global-batch LBL: each micro-batch's per-layer expert counts are all-reduced over the
        data-parallel ranks and accumulated in `GlobalCountBuffer` (the thin distributed step);
        the result is passed into the pure loss. With `global_accumulation: exact` a no-grad
        routing pass over the step's micro-batches comes first (same RNG stream replayed).
        After the update, aux-loss-free biases move with the step's global counts.
        """
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        n_micro = self.stage.grad_accum_steps
        tokens_local = 0
        grad_norm = None
        moe = self._moe_layers()
        self._set_routing_step(self.state.step)
        self.strategy.begin_step(self.state.step)
        pos0 = self.stream.position
        batches = [self.stream.next_microbatch() for _ in range(n_micro)]
        gbuf = GlobalCountBuffer(n_micro, self.bal.global_accumulation) if self.bal.lbl == "global_batch" else None
        if gbuf is not None and gbuf.mode == "exact" and moe:
            gbuf.set_total(self._routing_prepass(batches))
        step_counts_local = None
        micro_last = None
        loss_bad = skipped = False
        for micro, batch in enumerate(batches):
            # non_blocking: a pinned batch (the stream's pin_memory, on GPU) copies asynchronously
            ids = batch["input_ids"].to(self.device, non_blocking=True)
            labels = batch["labels"].to(self.device, non_blocking=True)
            out = self.engine(ids)
            local = stack_counts([a.counts_E for a in out.moe_aux])
            override = None
            if gbuf is not None and out.moe_aux:
                override = list(gbuf.add(reduce_counts(local)))
            distill = self.teacher.objective(batch) if self.teacher is not None else None
            loss, parts = training_loss(out, labels, self.bal, counts_override=override, distill=distill)
            injected = maybe_inject_nonfinite(self.state.step + 1, loss, self.rank)
            if injected is not loss:
                loss, parts = injected, {**parts, "loss": injected.detach()}
            loss_bad = loss_bad or not math.isfinite(float(loss.detach()))
            self.strategy.before_backward(micro == n_micro - 1)
            self.engine.backward(loss)
            if micro == n_micro - 1:  # the accumulation boundary: reduce, clip, update (or skip)
                # The rate this update uses (a skipped one: would have used), read before the
                # engine's step moves the scheduler on to the next update's rate.
                lr = float(self.engine.get_lr()[0])
                grad_norm, skipped = self.strategy.optimizer_step(self.engine, self.model, loss_bad)
            else:
                self.engine.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            for i, a in enumerate(out.moe_aux):
                for k, v in local_routing_scalars(a).items():
                    sums[f"moe/{i}/{k}"] = sums.get(f"moe/{i}/{k}", 0.0) + v
            step_counts_local = local if step_counts_local is None else step_counts_local + local
            micro_last = local
            tokens_local += labels.numel()
        # The step's global counts: from the buffer when global-batch LBL reduced them already,
        # else one all-reduce. Every rank gets the same counts (the aux-free bias needs that).
        if gbuf is not None and moe:
            step_counts = gbuf.finish_step()
        elif moe:
            step_counts = reduce_counts(step_counts_local)
        else:
            step_counts = None
        if step_counts is not None and self.bal.aux_free and not skipped:
            self._update_expert_bias(step_counts)
        if step_counts is not None:
            self.strategy.observe(step_counts)
        # Reduce for logging only: the mean of each loss part and routing scalar over ranks
        # and micro-batches.
        # The stop request rides along as the last element (no collective of its own).
        keys = sorted(sums)
        stop = self.hooks.stop_requested is not None and self.hooks.stop_requested()
        vec = pdist.all_reduce_sum(torch.tensor([sums[k] for k in keys] + [float(stop)], dtype=torch.float64))
        self.stop_agreed = bool(vec[-1] > 0)
        vec = vec[:-1] / (n_micro * self.world)
        dt = time.perf_counter() - t0
        self.state.step += 1
        self.state.skipped += int(skipped)
        self.state.bad_streak = self.state.bad_streak + 1 if skipped else 0
        self.state.tokens += tokens_local * self.world
        self.state.data = self.stream.state_dict()
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        rec: dict[str, Any] = {
            "stage": self.stage_name, "step": self.state.step, "time": time.time(),
            **{k: float(v) for k, v in zip(keys, vec.tolist())},
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "tokens": self.state.tokens,
            "tokens_per_s": tokens_local * self.world / dt,
            "step_time_s": dt,
            "step_skipped": float(skipped),
            "skipped_steps": self.state.skipped,
        }
        rec.update(self.strategy.step_metrics())
        if self._replay_ids:
            rec.update(self._replay_metrics(pos0, self.stream.position))
        for i, layer in enumerate(moe):
            stats = global_load_stats(step_counts[i], micro_last[i],
                                      layer.expert_bias if self.bal.aux_free else None)
            rec.update({f"moe/{i}/{k}": v for k, v in stats.items()})
            if layer.cfg.kind == "dts":
                rec[f"moe/{i}/temperature"] = dts_temperature(layer.routing_step, layer.cfg.dts)
                rec[f"moe/{i}/dts_hard"] = float(layer.routing_step >= layer.cfg.dts.hard_step())
        return rec

    def _replay_metrics(self, start: int, stop: int) -> dict[str, float]:
        """The replayed share of the step's samples (all ranks; exact, from the sampler) and of
        the stage so far."""
        doms, _ = self.stream.sampler.lookup_range(start, stop)
        n_replay = int(sum((doms == i).sum() for i in self._replay_ids))
        self.state.drawn += len(doms)
        self.state.replay_drawn += n_replay
        return {"data/replay_fraction": n_replay / max(1, len(doms)),
                "data/replay_fraction_total": self.state.replay_drawn / max(1, self.state.drawn)}

    def _moe_layers(self) -> list:
        fn = getattr(self.model, "moe_layers", None)
        return fn() if fn is not None else []

    def _set_routing_step(self, step: int) -> None:
        fn = getattr(self.model, "set_routing_step", None)
        if fn is not None:
            fn(step)

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
    def _update_expert_bias(self, step_counts_LE: torch.Tensor) -> None:
        for layer, c in zip(self._moe_layers(), step_counts_LE):
            layer.expert_bias.copy_(aux_free_bias_update(layer.expert_bias, c.to(layer.expert_bias.device),
                                                         self.bal.bias_update_rate))

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
        self.ckpt.save(self.engine, self.state.step, {"moeforge": self.state.to_dict()}, manifest,
                       extra=self.strategy.save)

    def _stop_diverged(self, step: int) -> None:
        from system.checkpoint import latest_checkpoint

        n = self.state.bad_streak
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
        while self.state.step < self.stage.steps:
            rec = self.train_step()
            step = self.state.step
            if self.stage.eval_every and step % self.stage.eval_every == 0:
                rec.update(self._evaluate_and_track())
            if step % self.log_every == 0 or step == self.stage.steps:
                if self.rank == 0:
                    for s in self.sinks:
                        s.log(rec)
                    if self.hooks.on_step:
                        self.hooks.on_step(rec)
            if self.state.bad_streak >= self.stage.max_bad_steps:
                self._stop_diverged(step)
            due = step % self.stage.checkpoint_every == 0 or step == self.stage.steps
            if due or self.stop_agreed:
                self.save()
            if self.stop_agreed and step < self.stage.steps:
                raise StagePreempted(step, str(self.ckpt.root / tag_for(step)))
            maybe_inject_fault(step)
            last = rec
        return last
