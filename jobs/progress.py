"""Live progress from the rank-0 worker to the driver, through a small named Ray actor; the
same actor carries the workers' `[moeforge]` messages to the driver's console (`jobs.console`)."""
from __future__ import annotations

import threading
import time
from typing import Any, Optional

import ray

PROGRESS_KEYS = ("stage", "step", "loss", "tokens_per_s", "lr")


class ProgressState:
    """The state behind `ProgressActor` (a plain class: its rules are tested without Ray)."""

    def __init__(self):
        self._last: Optional[dict[str, Any]] = None
        self._messages: list[str] = []
        self._stop = False
        self._saves = 0  # checkpoints asked for without a stop (`jobs.elastic_ray`), counted
        self._taken: dict[int, int] = {}  # request number -> the step its checkpoint was taken at

    def update(self, rec: dict[str, Any]) -> tuple[bool, int]:
        """Record rank 0's step; the answer: whether the driver asked the stage to stop, and
        the number of the checkpoint request not yet taken (0: none)."""
        self._last = rec
        return self.stop_flag()

    def stop_flag(self) -> tuple[bool, int]:
        # a request already taken is not handed out again: a group restarted after a grow
        # starts a fresh reporter that must not checkpoint (and hold) for the old request
        return self._stop, (self._saves if self._saves and self._saves not in self._taken else 0)

    def request_checkpoint(self) -> int:
        """A checkpoint at rank 0's next step boundary (a grow is coming); returns its number."""
        self._saves += 1
        return self._saves

    def checkpoint_taken(self, number: int, step: int) -> None:
        """Rank 0: the checkpoint asked for as `number` is committed, at `step`."""
        self._taken[number] = step

    def taken(self, number: int) -> Optional[int]:
        return self._taken.get(number)

    def request_stop(self) -> None:
        """The driver's Ctrl-C (`jobs.interrupt`): rank 0 learns it from its next step report."""
        self._stop = True

    def last(self) -> Optional[dict[str, Any]]:
        return self._last

    def say(self, line: str) -> None:
        self._messages.append(line)

    def poll(self) -> tuple[Optional[dict[str, Any]], list[str]]:
        """The last progress record and the messages since the previous poll."""
        out, self._messages = self._messages, []
        return self._last, out

    def sync(self) -> None:
        """Returns once every call made before it by the same caller has run."""


ProgressActor = ray.remote(num_cpus=0)(ProgressState)


def progress_reporter(actor_name: Optional[str], namespace: Optional[str]) -> Optional["StepReporter"]:
    """The worker's on_step hook (None when no driver is listening)."""
    if not actor_name:
        return None
    try:
        handle = ray.get_actor(actor_name, namespace=namespace)
    except ValueError:
        return None
    return StepReporter(handle)


class StepReporter:
    """Sends each step's progress to the driver's actor without waiting, and reads the driver's
    stop request from the answer to an earlier report once it has arrived (never blocks)."""

    ASK_EVERY_S = 1.0  # between logged steps, ask the actor at most this often

    def __init__(self, handle):
        self.handle = handle
        self._pending = None
        self._stop = False
        self._saves = self._saved = 0  # the open checkpoint request seen / the last acted on
        self._asked = time.monotonic()

    def __call__(self, rec: dict[str, Any]) -> None:
        self._check()
        ref = self.handle.update.remote({k: rec[k] for k in PROGRESS_KEYS if k in rec})
        if self._pending is None:
            self._pending, self._asked = ref, time.monotonic()

    def _check(self) -> None:
        if self._pending is not None and not self._stop:
            ready, _ = ray.wait([self._pending], timeout=0)
            if ready:
                try:
                    stop, self._saves = ray.get(ready[0])
                except ray.exceptions.RayError:  # the driver's actor is gone: nothing asked
                    stop = False
                self._stop, self._pending = bool(stop), None

    def stop_requested(self) -> bool:
        self._check()
        if self._pending is None and not self._stop and time.monotonic() - self._asked > self.ASK_EVERY_S:
            self._pending, self._asked = self.handle.stop_flag.remote(), time.monotonic()
        return self._stop

    def checkpoint_requested(self) -> bool:
        """True once for each checkpoint the driver asked for and no rank 0 has taken yet
        (read from the answers above)."""
        self._check()
        if self._saves > self._saved:
            self._saved, self._hold = self._saves, True
            return True
        return False

    HOLD_S = 120.0  # how long rank 0 waits at a grow's checkpoint for the restart

    def hold_if_growing(self, step: int) -> None:
        """After the checkpoint a grow asked for (`jobs.elastic_ray`): wait here for Ray Train to
        restart the workers, so no step past the checkpoint is trained and then lost. Rank 0
        waiting holds every rank at its next collective; without a restart training goes on."""
        if not getattr(self, "_hold", False):
            return
        self._hold = False
        self.handle.checkpoint_taken.remote(self._saved, step)  # the controller restarts after it
        print(f"[moeforge] checkpoint of step {step} taken for a grow: waiting for the restart", flush=True)
        time.sleep(self.HOLD_S)


def message_forwarder(actor_name: Optional[str], namespace: Optional[str], rank: int):
    """(forward(line), sync()) for a worker's captured output (None, None without a driver)."""
    if not actor_name:
        return None, None
    try:
        handle = ray.get_actor(actor_name, namespace=namespace)
    except ValueError:
        return None, None
    tag = "" if rank == 0 else f"(rank {rank}) "

    def forward(line: str) -> None:
        handle.say.remote(tag + line if tag else line)  # fire and forget; in order per caller

    def sync() -> None:
        ray.get(handle.sync.remote(), timeout=30)

    return forward, sync


class ProgressBar:
    """Polls the actor from a driver thread: prints the workers' messages and, when enabled,
    draws a tqdm bar for one stage."""

    def __init__(self, actor, stage: str, total_steps: int, enabled: bool = True,
                 stop: Optional[threading.Event] = None):
        self.actor, self.stage, self.total, self.enabled = actor, stage, total_steps, enabled
        self.stop_event, self._stop_sent = stop, False  # the driver's Ctrl-C (jobs.interrupt)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self.total, desc=f"stage {self.stage}", unit="step", dynamic_ncols=True) \
            if self.enabled else None
        say = bar.write if bar is not None else (lambda m: print(m, flush=True))
        try:
            while True:
                stopping = self._stop.wait(0.5)
                if self.stop_event is not None and self.stop_event.is_set() and not self._stop_sent:
                    self.actor.request_stop.remote()
                    self._stop_sent = True
                try:
                    rec, messages = ray.get(self.actor.poll.remote(), timeout=10)
                except Exception:  # the driver may be shutting down; the bar is best effort
                    rec, messages = None, []
                for m in messages:
                    say(m)
                if bar is not None and rec and rec.get("stage") == self.stage and rec["step"] != bar.n:
                    bar.n = rec["step"]
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                    lr=f"{rec['lr']:.2e}", refresh=False)
                    bar.refresh()
                if stopping:
                    break
        finally:
            if bar is not None:
                bar.close()
