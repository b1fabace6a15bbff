"""Elastic stages on Ray Train: no work lost on the events Ray announces.

* A grow (a node came back: Ray Train restarts the worker group at a larger size, at most every
  `parallel.elastic.monitor_interval_s`): `CheckpointBeforeGrow`, a controller callback, asks
  rank 0 through the stage's progress actor for a checkpoint at the next step boundary and holds
  the restart until that checkpoint is committed, so the larger group resumes at that step.
* A drain (`ray.train.get_preemption_info()`: a node hosting a worker is being preempted): every
  rank checkpoints at the next step boundary and rank 0 holds there until the node has gone; the
  restart without it resumes at that step (`DrainNotice`).
* An abrupt loss falls back to the last periodic checkpoint (at most `checkpoint_every` steps
  trained again), then the stage continues at the size the live nodes allow (`jobs.elastic`).

Ray Train sizes the group from its autoscaling coordinator's view of the nodes, which the
coordinator refreshes every 20 s on its own: `FreshClusterView` asks it to refresh at each
monitor interval and whenever the group failed or must be placed again, so a lost node stops
counting as soon as Ray has declared it dead and a returned one counts within the interval.
"""
from __future__ import annotations

import time
from pathlib import Path

from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback


def latest_step(checkpoints: Path) -> int:
    """The step of the stage's committed `latest` checkpoint (0: none)."""
    try:
        return int((Path(checkpoints) / "latest").read_text().strip().rsplit("_", 1)[-1])
    except (OSError, ValueError):
        return 0


class CheckpointBeforeGrow(ControllerCallback, WorkerGroupCallback):
    """Before Ray Train restarts a running, healthy worker group at a larger size, a checkpoint
    at the next step boundary (waited for up to `timeout_s`, then the restart goes on anyway)."""

    def __init__(self, actor_name: str, namespace: str, checkpoints: str, timeout_s: float = 300.0):
        self.actor_name, self.namespace = actor_name, namespace
        self.checkpoints, self.timeout_s = checkpoints, timeout_s
        self.running = 0  # workers of the group in training (0: none, or it failed)

    def after_worker_group_start(self, worker_group) -> None:
        self.running = len(worker_group.get_workers())

    def after_worker_group_poll_status(self, worker_group_status) -> None:
        if getattr(worker_group_status, "errors", None):
            self.running = 0  # a failing group will not checkpoint: restart without waiting

    def before_worker_group_shutdown(self, worker_group) -> None:
        self.running = 0

    def before_controller_execute_resize_decision(self, resize_decision) -> None:
        if not self.running or resize_decision.num_workers <= self.running:
            return
        import ray

        deadline = time.monotonic() + self.timeout_s
        try:  # the checkpoint asked for, not a periodic one that lands meanwhile
            actor = ray.get_actor(self.actor_name, namespace=self.namespace)
            number = ray.get(actor.request_checkpoint.remote(), timeout=30)
            step = None
            while step is None and time.monotonic() < deadline:
                step = ray.get(actor.taken.remote(number), timeout=30)
                if step is None:
                    time.sleep(0.2)
        except Exception as e:  # the actor is gone: the stage is ending anyway
            print(f"[moeforge] grow to {resize_decision.num_workers} workers without a checkpoint first: {e}",
                  flush=True)
            return
        while step is not None and time.monotonic() < deadline and latest_step(Path(self.checkpoints)) < step:
            time.sleep(0.2)  # committed (rank 0 reports it once `latest` names it)
        print(f"[moeforge] growing from {self.running} to {resize_decision.num_workers} workers at the "
              f"checkpoint of step {step}", flush=True)


class DrainNotice:
    """A worker's poll of Ray Train's preemption notice (`ray.train.get_preemption_info`, a
    barrier: every rank calls it once per step, at the same point): true once, at the first
    step after a notice arrives, so every rank checkpoints there. Then rank 0 holds (`hold`):
    the steps it would train before the node goes would be lost with it, and the restart
    without that node resumes at this checkpoint. It holds until the notice's deadline (plus
    `SLACK_S`: the node may go a little late), `HOLD_S` without a deadline, at most `MAX_HOLD_S`;
    a node still there after that (a drain called off) and training goes on."""

    HOLD_S, SLACK_S, MAX_HOLD_S = 120.0, 30.0, 900.0

    def __init__(self):
        self.info = None
        self._hold = False

    def __call__(self) -> bool:
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None or self.info is not None:
            return False
        self.info, self._hold = info, True
        print(f"[moeforge] drain notice (nodes {info.preempted_node_ids}, ranks {info.preempted_ranks}, "
              f"deadline {info.deadline_ms} ms): checkpointing at this step", flush=True)
        return True

    def hold_s(self, now_s: float) -> float:
        deadline = getattr(self.info, "deadline_ms", None)
        wait = self.HOLD_S if deadline is None else deadline / 1000.0 - now_s + self.SLACK_S
        return max(0.0, min(wait, self.MAX_HOLD_S))

    def hold(self, step: int) -> None:
        """Rank 0, after the checkpoint the notice asked for is committed."""
        if not self._hold:
            return
        self._hold = False
        wait = self.hold_s(time.time())
        print(f"[moeforge] checkpoint of step {step} taken for a drain: holding up to {wait:.0f} s for the "
              "node to go", flush=True)
        time.sleep(wait)


class FreshClusterView(ControllerCallback, WorkerGroupCallback):
    """Keeps the autoscaling coordinator's node view (what elastic sizing counts) no older than
    `interval_s` while the group runs, and refreshed before each attempt to place it."""

    COORDINATOR = ("AutoscalingCoordinator", "AutoscalingCoordinator")  # Ray's actor name, namespace

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.last = time.monotonic()
        self.warned = False

    def refresh(self) -> None:
        import ray

        self.last = time.monotonic()
        try:  # recompute=True runs the coordinator's tick now (ray.nodes(), reservations)
            name, namespace = self.COORDINATOR
            actor = ray.get_actor(name, namespace=namespace)
            ray.get(actor.get_reserved_resources.remote("moeforge-cluster-view", recompute=True), timeout=10)
        except Exception as e:  # an older or newer Ray: its own 20 s refresh still works
            if not self.warned:
                self.warned = True
                print(f"[moeforge] cannot refresh Ray's view of the cluster ({type(e).__name__}: {e}); "
                      "resizes follow Ray's own refresh", flush=True)

    def after_worker_group_poll_status(self, worker_group_status) -> None:
        if getattr(worker_group_status, "errors", None) or time.monotonic() - self.last >= self.interval_s:
            self.refresh()

    def after_controller_state_update(self, previous_state, current_state) -> None:
        if type(current_state).__name__ in ("RestartingState", "ReschedulingState", "ResizingState"):
            self.refresh()  # the next decision sizes the group: from the nodes alive now
