"""Rate-limited logging: a hostile or broken peer must not flood the log."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """At most one line per key every `period` seconds; the next line that gets through
    says how many were held back. Keys are bounded (least recently used dropped)."""

    def __init__(self, logger: logging.Logger, period: float = 10.0, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.period = period
        self.max_keys = max_keys
        self.clock = clock
        self._last: OrderedDict[Hashable, list[float | int]] = OrderedDict()

    def log(self, level: int, key: Hashable, msg: str, *args: object,
            exc_info: bool = False) -> bool:
        if not self.logger.isEnabledFor(level):
            return False
        now = self.clock()
        entry = self._last.get(key)
        if entry is not None and now - entry[0] < self.period:
            entry[1] += 1
            return False
        held = int(entry[1]) if entry is not None else 0
        self._last[key] = [now, 0]
        self._last.move_to_end(key)
        while len(self._last) > self.max_keys:
            self._last.popitem(last=False)
        if held:
            msg += f" ({held} more like this in the last {self.period:.0f} s)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def info(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, key, msg, *args)

    def debug(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.DEBUG, key, msg, *args)
