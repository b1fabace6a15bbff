"""Live progress from the rank-0 worker to the driver, through a small named Ray actor."""
from __future__ import annotations

import threading
from typing import Any, Optional

import ray

PROGRESS_KEYS = ("stage", "step", "loss", "tokens_per_s", "lr")


@ray.remote(num_cpus=0)
class ProgressActor:
    def __init__(self):
        self._last: Optional[dict[str, Any]] = None

    def update(self, rec: dict[str, Any]) -> None:
        self._last = rec

    def last(self) -> Optional[dict[str, Any]]:
        return self._last


def progress_reporter(actor_name: Optional[str], namespace: Optional[str]):
    """A callable for the worker's on_step hook (None when no driver is listening)."""
    if not actor_name:
        return None
    try:
        handle = ray.get_actor(actor_name, namespace=namespace)
    except ValueError:
        return None

    def report(rec: dict[str, Any]) -> None:
        handle.update.remote({k: rec[k] for k in PROGRESS_KEYS if k in rec})  # fire and forget

    return report


class ProgressBar:
    """Polls the actor from a driver thread and draws a tqdm bar for one stage."""

    def __init__(self, actor, stage: str, total_steps: int, enabled: bool = True):
        self.actor, self.stage, self.total, self.enabled = actor, stage, total_steps, enabled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self.total, desc=f"stage {self.stage}", unit="step", dynamic_ncols=True)
        try:
            while True:
                stopping = self._stop.wait(1.0)
                try:
                    rec = ray.get(self.actor.last.remote(), timeout=10)
                except Exception:  # the driver may be shutting down; the bar is best effort
                    rec = None
                if rec and rec.get("stage") == self.stage:
                    bar.n = rec["step"]
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                    lr=f"{rec['lr']:.2e}", refresh=False)
                    bar.refresh()
                if stopping:
                    break
        finally:
            bar.close()
