"""Ctrl-C at the driver (`moeforge run`): the first one stops the job the way SIGTERM to a worker
does (every rank checkpoints at the next step boundary, exit code 3, the same command resumes);
a second one stops at once (exit code 130, resume from the latest checkpoint). SIGTERM to the
driver (`ray job stop`, `kill`) is the first Ctrl-C.

A terminal sends SIGINT to its foreground process group: the driver and an embedded Ray's own
processes, which block SIGINT; Ray Train's workers run in process groups of their own. So the
driver is the one to act: the handler only sets an event (it runs between two bytecodes of the
main thread, which may be inside Ray), and the progress thread (`jobs.progress.ProgressBar`)
passes the request to the stage's progress actor, which rank 0 reads with its step reports.
"""
from __future__ import annotations

import os
import signal
import threading

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a job stopped by Ctrl-C


class DriverInterrupt:
    """Context manager around a job's driver: installs the two-step Ctrl-C handler (main thread
    only; elsewhere it does nothing) and restores the previous one on exit."""

    def __init__(self):
        self.requested = threading.Event()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "DriverInterrupt":
        self.install()
        return self

    def install(self) -> None:
        """(Again) make these handlers current: ray.init installs its own SIGTERM handler (exit at
        once), so the driver calls this once Ray is up."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous = signal.signal(sig, self._on_signal)
                self._previous.setdefault(sig, previous)

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def _on_signal(self, signum, frame) -> None:
        if self.requested.is_set():
            for sig in self._previous:
                signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
            raise KeyboardInterrupt
        self.requested.set()
        name = b"Ctrl-C" if signum == signal.SIGINT else b"SIGTERM"
        # os.write, not print: the main thread may be inside a print to the same stream
        os.write(2, b"\n[moeforge] " + name + b": checkpointing at the next step, then stopping "
                    b"(Ctrl-C again stops now, without a checkpoint)\n")
