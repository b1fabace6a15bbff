"""Ctrl-C at the driver (`moeforge run`): the first one stops the job the way SIGTERM to a worker
does (every rank checkpoints at the next step boundary, exit code 3, the same command resumes);
a second one stops at once (exit code 130, resume from the latest checkpoint).

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
        self._previous = None

    def __enter__(self) -> "DriverInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False

    def _on_sigint(self, signum, frame) -> None:
        if self.requested.is_set():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested.set()
        # os.write, not print: the main thread may be inside a print to the same stream
        os.write(2, b"\n[moeforge] Ctrl-C: checkpointing at the next step, then stopping "
                    b"(Ctrl-C again stops now, without a checkpoint)\n")
