"""A quiet console: the driver shows the stage banner, the progress bar and moeforge's own
messages; Ray's and DeepSpeed's chatter goes to the run's log files.

In a worker, `capture_output` sends the process's stdout and stderr (file descriptors 1 and 2,
so C++ and subprocess output too) to `RUN/logs/STAGE/rank{R}.log`, and forwards each line that
starts with `[moeforge]` to the driver through the stage's progress actor (other ranks' lines
carry their rank). The driver (`jobs.progress.ProgressBar`) prints them above the bar. With
`moeforge run --verbose` nothing is captured and Ray streams every worker's output as usual.
"""
from __future__ import annotations

import io
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

PREFIX = "[moeforge]"


class _Tee(io.TextIOBase):
    """A text stream writing to the log file and forwarding moeforge's lines."""

    def __init__(self, file, forward: Optional[Callable[[str], None]]):
        self._file, self._forward, self._buf = file, forward, ""

    def write(self, s: str) -> int:
        self._file.write(s)
        self._file.flush()
        if self._forward is not None:
            self._buf += s
            while "\n" in self._buf:
                line, self._buf = self._buf.split("\n", 1)
                if line.startswith(PREFIX):
                    try:
                        self._forward(line)
                    except Exception:  # the driver may be gone; the log file has the line
                        pass
        return len(s)

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return "utf-8"


@contextmanager
def capture_output(log_file: Path, forward: Optional[Callable[[str], None]]) -> Iterator[None]:
    """Redirect this process's output into `log_file` (appending) while inside the block."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    f = open(log_file, "a", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    os.dup2(f.fileno(), 1)
    os.dup2(f.fileno(), 2)
    sys.stdout, sys.stderr = _Tee(f, forward), _Tee(f, forward)
    try:
        yield
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            sys.stdout, sys.stderr = saved_streams
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
            f.close()
