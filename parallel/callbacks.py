"""Trainer callbacks: each per-step behaviour of the training loop in a class of its own.

`Trainer.train_step` is the order of operations of one optimizer step; everything else a step
does (MoE balancing bookkeeping, distillation, fault injection, replay metrics, the stop flag,
the progress report) is a `Callback`, called in the order of the trainer's callback list. A new
per-step behaviour is a new callback, not an edit to the step. The MoE balancing callback is
`parallel.moe_callback.MoEBalancing`.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


@dataclass
class StepContext:
    """One optimizer step as the callbacks see it: made by `train_step`, dropped after it."""

    step: int  # the update this step makes (1-based; the stage's state still says step - 1)
    stream_start: int  # the data stream's position before the step's batches were drawn
    moe_layers: list
    batches: list = field(default_factory=list)
    out: Any = None  # the current micro-batch's model output
    sums: dict[str, Any] = field(default_factory=dict)  # per-micro scalars (floats or 0-dim device tensors), reduced for logging
    tokens_local: int = 0  # this rank's tokens in the step
    loss_bad: Any = False  # some micro-batch's loss was not finite (a device bool tensor after the first)
    host: dict = field(default_factory=dict)  # callback -> its `host_values`, brought to the host (floats)
    lr: float = math.nan  # the rate this update used (a skipped one: would have used)
    grad_norm: Optional[float] = None
    skipped: bool = False  # the update was skipped (non-finite loss or gradient)
    step_counts_LE: Optional[torch.Tensor] = None  # the step's global expert counts, every rank the same


class Callback:
    """Hooks of one optimizer step, in the order they run; each defaults to doing nothing."""

    def begin_step(self, ctx: StepContext) -> None:
        """After the step's micro-batches are drawn, before the first forward."""

    def loss_inputs(self, ctx: StepContext, batch: dict) -> dict[str, Any]:
        """After a micro-batch's forward (`ctx.out`): keyword arguments for `training_loss`."""
        return {}

    def before_backward(self, ctx: StepContext, loss: torch.Tensor, parts: dict) -> tuple[torch.Tensor, dict]:
        """The micro-batch's loss and its logged parts, before the backward (may replace them)."""
        return loss, parts

    def after_micro_batch(self, ctx: StepContext) -> None:
        """After the micro-batch's backward (and, for the last one, the optimizer step)."""

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """After all micro-batches; `ctx.skipped` says whether the update was applied."""

    def stop_requested(self) -> bool:
        """True asks every rank to checkpoint and stop (ORed over ranks with the logging reduce)."""
        return False

    def checkpoint_requested(self) -> bool:
        """True asks every rank to checkpoint at this step's end and go on (a drain notice, a
        grow about to restart the workers; ORed over ranks with the logging reduce)."""
        return False

    def host_values(self, ctx: StepContext) -> Optional[torch.Tensor]:
        """A 1-D float64 device tensor of figures `step_metrics` needs on the host, or None. The
        trainer brings every callback's over with the logging reduce's result in one copy (one
        host sync a step for all of them) and puts the list in `ctx.host[self]`."""
        return None

    def step_metrics(self, ctx: StepContext) -> dict[str, Any]:
        """Figures added to the step's metric record (after the strategy's)."""
        return {}

    def on_log(self, rec: dict[str, Any]) -> None:
        """Rank 0, after a logged step's record went to the metric sinks."""

    def end_step(self, step: int) -> None:
        """Every rank, at the end of the step's loop iteration (after any checkpoint)."""


class Distillation(Callback):
    """A distill stage's teacher objective for each micro-batch (`jobs.teacher.TeacherSource`)."""

    def __init__(self, teacher):
        self.teacher = teacher

    def loss_inputs(self, ctx: StepContext, batch: dict) -> dict[str, Any]:
        return {"distill": self.teacher.objective(batch)}


class FaultInjection(Callback):
    """Failure testing: an Inf loss at the steps MOEFORGE_FAULT_NONFINITE lists, a crash after the
    step MOEFORGE_FAULT_AT_STEP names, MOEFORGE_FAULT_STEP_SLEEP_S seconds more per step (each
    read at each use, as the drills set them per run)."""

    def __init__(self, rank: int):
        self.rank = rank

    def before_backward(self, ctx: StepContext, loss: torch.Tensor, parts: dict) -> tuple[torch.Tensor, dict]:
        injected = maybe_inject_nonfinite(ctx.step, loss, self.rank)
        if injected is loss:
            return loss, parts
        return injected, {**parts, "loss": injected.detach()}

    def end_step(self, step: int) -> None:
        maybe_inject_fault(step)
        slow = os.environ.get("MOEFORGE_FAULT_STEP_SLEEP_S")  # drills: steps as slow as a big model's
        if slow:
            time.sleep(_seconds(slow))


class ReplayMetrics(Callback):
    """The replayed share of each step's samples and of the stage so far (exact, from the
    sampler), for continual stages with replay pools; counts kept in the stage state."""

    def __init__(self, stream, state_of: Callable[[], Any]):
        self.stream, self.state_of = stream, state_of  # state_of: the trainer's current StageState
        self.replay_ids = [i for i, n in enumerate(stream.sampler.domains) if n.startswith("replay/")]

    def step_metrics(self, ctx: StepContext) -> dict[str, Any]:
        state = self.state_of()
        doms, _ = self.stream.sampler.lookup_range(ctx.stream_start, self.stream.position)
        n_replay = int(sum((doms == i).sum() for i in self.replay_ids))
        state.drawn += len(doms)
        state.replay_drawn += n_replay
        return {"data/replay_fraction": n_replay / max(1, len(doms)),
                "data/replay_fraction_total": state.replay_drawn / max(1, state.drawn)}


class StopOnRequest(Callback):
    """A stop asked for on this rank (SIGTERM to a worker, Ctrl-C at the driver): polled at each
    step's end; the trainer then checkpoints on every rank and raises StagePreempted."""

    def __init__(self, requested: Callable[[], bool]):
        self.requested = requested

    def stop_requested(self) -> bool:
        return bool(self.requested())


class CheckpointOnRequest(Callback):
    """A checkpoint asked for without a stop (`jobs.elastic_ray`: a drain notice, a grow), polled
    on every rank at each step's end."""

    def __init__(self, requested: Callable[[], bool]):
        self.requested = requested

    def checkpoint_requested(self) -> bool:
        return bool(self.requested())


class ReportProgress(Callback):
    """Rank 0 hands each logged record to a reporter (a progress bar, the driver's progress actor)."""

    def __init__(self, on_step: Callable[[dict[str, Any]], None]):
        self.on_step = on_step

    def on_log(self, rec: dict[str, Any]) -> None:
        self.on_step(rec)


def _seconds(value: str) -> float:
    """A number of seconds, or `file:PATH`: the number in PATH (0 while PATH does not exist), so
    a drill can change it while the run goes on."""
    if not value.startswith("file:"):
        return float(value)
    try:
        return float(open(value[5:]).read().strip() or 0)
    except (OSError, ValueError):
        return 0.0


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
