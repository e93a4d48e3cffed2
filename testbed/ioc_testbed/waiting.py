"""Bounded waiting: the one poll loop of the test bed, its tests and benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """What was awaited did not happen in time (an AssertionError, so tests fail)."""


def wait_for(what: str, probe: Callable[[], T], timeout: float = 45.0,
             interval: float = 0.1) -> T:
    """Call `probe` until it returns something truthy and return that; bounded in time
    (and so in count). The last value seen goes into the error."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f} s waiting for {what}; "
                              f"last: {last!r}")
        time.sleep(interval)
