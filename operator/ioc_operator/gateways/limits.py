"""Bounds shared by the network-facing processes (CA gateway, name server): how many
TCP circuits one process holds, how many of them one client host may take, and how
many file descriptors there are for them."""

from __future__ import annotations

import logging
import resource
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable

__all__ = ["Buckets", "CircuitLimit", "descriptors"]

log = logging.getLogger("ioc_operator.limits")

HOST_SHARE = 4  # one client host may hold at most 1/HOST_SHARE of the circuits
FD_RESERVE = 64  # descriptors kept for listeners, upstream circuits, probes and logs


def descriptors() -> int:
    """File descriptors this process may open, after raising the soft limit to the hard
    one (every client circuit takes one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class CircuitLimit:
    """Counts circuits by client host: at most ``total`` (lowered to what the descriptor
    limit leaves), a host at most a HOST_SHARE-th of them, so one client opening
    thousands of circuits leaves room for the others."""

    def __init__(self, total: int, what: str = "circuits", fd_share: int = 1) -> None:
        # fd_share: how many such limits share this process's descriptors
        usable = max(1, (descriptors() - FD_RESERVE) // fd_share)
        if usable < total:
            log.warning("%s: %d lowered to %d (%d file descriptors)", what, total, usable,
                        descriptors())
        self.total = min(total, usable)
        self.per_host = max(1, self.total // HOST_SHARE)
        self.hosts: Counter[str] = Counter()
        self.count = 0

    def admit(self, host: str) -> str:
        """Take a circuit from ``host``; why not ("" when taken)."""
        if self.count >= self.total:
            return f"{self.count} circuits open"
        if self.hosts[host] >= self.per_host:
            return f"{self.hosts[host]} circuits open from {host}"
        self.hosts[host] += 1
        self.count += 1
        return ""

    def release(self, host: str) -> None:
        self.count -= 1
        self.hosts[host] -= 1
        if self.hosts[host] <= 0:
            del self.hosts[host]


class Buckets:
    """A token bucket per client (address), for requests that are cheap to refuse but
    dear to serve; the least recently seen clients are forgotten past ``max_keys``."""

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()

    def take(self, key: Hashable, n: float = 1.0) -> bool:
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [self.burst, now]
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] < n:
            return False
        bucket[0] -= n
        return True
