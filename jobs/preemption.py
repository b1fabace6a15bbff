"""Preemption: SIGTERM to a worker checkpoints the stage at the next step boundary and ends the
job cleanly, so that running it again resumes with no lost step.

SIGTERM is what Kubernetes (and KubeRay), spot-instance reclamation and a node drain send before
killing a process. Ray's own handler makes a worker exit at once; `PreemptibleTorchConfig` (a Ray
Train backend config: torch.distributed set up as `TorchConfig` does) replaces it in every worker
process, from the process's main thread, by `install_sigterm_handler`: the first SIGTERM only sets
a flag. The trainer folds the flag into the all-reduce it already does every step, so all ranks
agree on the same step; every rank then saves the checkpoint and returns, rank 0 records
PREEMPTED.json, and the driver stops with exit code 3 (`StagePreempted`) instead of running the
next stage. A second SIGTERM falls through to Ray's handler (immediate exit).

The checkpoint is written within one step plus one checkpoint's time of the signal: keep that
below the platform's grace period (Kubernetes: terminationGracePeriodSeconds, 30 s by default).
"""
from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

from ray.train.backend import Backend
from ray.train.torch import TorchConfig

from parallel.trainer import StagePreempted  # noqa: F401  (raised by the trainer, handled here)

_requested = threading.Event()
_training = threading.Event()  # set while a stage trains in this process (`training()`)


_announced = threading.Event()


def stop_requested() -> bool:
    """Polled by the trainer (in the training thread) at each step's end. The announcement is
    printed here, not in the signal handler: the handler runs inside Ray's task loop on the main
    thread, where nothing may talk to Ray (the console forwards printed lines to an actor)."""
    if not _requested.is_set():
        return False
    if not _announced.is_set():
        _announced.set()
        print("[moeforge] SIGTERM: checkpointing at the next step boundary, then stopping "
              "(a second SIGTERM exits now)", flush=True)
    return True


def install_sigterm_handler() -> None:
    """In a Ray Train worker's main thread: the first SIGTERM asks for a checkpoint and a clean
    stop at the next step boundary; a second one exits through the previous handler."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        if _requested.is_set() or not _training.is_set():  # a second one, or not training: exit
            signal.signal(signal.SIGTERM, previous)
            if callable(previous):
                previous(signum, frame)
            return
        _requested.set()  # only this: see stop_requested

    _requested.clear()
    _announced.clear()
    signal.signal(signal.SIGTERM, on_sigterm)


class training:
    """Context manager around a stage's training in a worker: SIGTERM defers only inside it."""

    def __enter__(self):
        _training.set()
        return self

    def __exit__(self, *exc):
        _training.clear()
        return False


class _PreemptibleBackend(Backend):
    """Ray Train's torch backend, plus the SIGTERM handler in every worker."""

    def __init__(self):
        self._torch = TorchConfig().backend_cls()
        self.share_cuda_visible_devices = getattr(self._torch, "share_cuda_visible_devices", False)

    def on_start(self, worker_group, backend_config) -> None:
        self._torch.on_start(worker_group, backend_config)
        worker_group.execute(install_sigterm_handler)  # runs in each worker's main thread

    def on_training_start(self, worker_group, backend_config) -> None:
        self._torch.on_training_start(worker_group, backend_config)

    def on_shutdown(self, worker_group, backend_config) -> None:
        self._torch.on_shutdown(worker_group, backend_config)


class PreemptibleTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return _PreemptibleBackend


def record_preempted(path: Path, step: int, checkpoint: str) -> None:
    from system.checkpoint import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"step": step, "checkpoint": checkpoint}))
