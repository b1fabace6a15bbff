"""The one way tests wait: poll a condition until it holds, within a bound, or fail saying what
was awaited. Fixed sleeps are refused elsewhere in tests/ (`tests/test_suite_rules.py`): a sleep
long enough on a busy machine wastes time on an idle one, and a short one flakes."""
from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Awaitable, Callable, Optional, Union


class WaitTimeout(AssertionError):
    """The condition did not hold within the bound."""


def _pause(deadline: float, timeout: float, what: str, every: float,
           abort: Optional[Callable[[], Optional[str]]]) -> float:
    """How long to wait before the next look; raises once `abort` gives a reason or time is up."""
    why = abort() if abort is not None else None
    if why:
        raise AssertionError(f"{why} while waiting for {what}")
    left = deadline - time.monotonic()
    if left <= 0:
        raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
    return min(every, left)


def wait_until(cond: Callable[[], Any], timeout: float, what: str, *, every: float = 0.1,
               abort: Optional[Callable[[], Optional[str]]] = None) -> Any:
    """Call `cond` every `every` seconds until it returns something true, and return that.

    Raises WaitTimeout after `timeout` seconds, and AssertionError as soon as `abort` returns a
    reason (e.g. the process being watched has exited)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        time.sleep(_pause(deadline, timeout, what, every, abort))


async def await_until(cond: Callable[[], Union[Any, Awaitable[Any]]], timeout: float, what: str, *,
                      every: float = 0.1, abort: Optional[Callable[[], Optional[str]]] = None) -> Any:
    """`wait_until` for asyncio code: `cond` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(_pause(deadline, timeout, what, every, abort))


def exited(proc) -> Callable[[], Optional[str]]:
    """An `abort` for wait_until: the subprocess `proc` has ended."""
    return lambda: f"the process ended (rc {proc.returncode})" if proc.poll() is not None else None
