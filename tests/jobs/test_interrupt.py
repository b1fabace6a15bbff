"""The driver's two-step stop (jobs.interrupt), with real signals to this process: the first
SIGINT or SIGTERM only asks for a checkpointed stop, a second one raises KeyboardInterrupt, and
the previous handlers come back on exit. (A real run's Ctrl-C: tests/jobs/test_run_record_ray.py.)"""
from __future__ import annotations

import os
import signal

import pytest

from jobs.interrupt import DriverInterrupt


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_first_signal_asks_second_stops(capfd, first):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt):
        with DriverInterrupt() as stop:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what ray.init does to SIGTERM ...
            stop.install()  # ... and what the driver does once Ray is up
            os.kill(os.getpid(), first)
            assert stop.requested.is_set()
            err = capfd.readouterr().err
            assert err.count("checkpointing at the next step") == 1
            assert ("Ctrl-C" if first == signal.SIGINT else "SIGTERM") in err
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before
