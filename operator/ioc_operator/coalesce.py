"""Run a blocking job per key in a thread pool, sharing runs that have not started yet.

A namespace's client directory is computed from all its IOCs: at a cold start each of
1,000 IOCs changes it once, and publishing 1,000 times is O(n^2) work that queued for
threads (each waiting call holding its IOC's event). A request made before the pending
run for its key has started is answered by that run, which reads its input (kopf's
index) only once it starts, so it includes every change made before the request.
Runs of a key can be spaced out in proportion to their cost: at 1,000 IOCs a
namespace's directory is ~190 KB, and written back to back through a cold start it
cost the API server and etcd that much per write (and every watcher that much per
event), while with a handful of IOCs a run takes milliseconds and needs no spacing.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from typing import Any


class Coalescer:
    def __init__(self, job: Callable[[Any], Any], executor: Executor | None = None,
                 duty: float = 1.0) -> None:
        """`duty` < 1 spaces a key's runs out so that they take at most that share of
        the time: after a run of d seconds the next one starts d * (1/duty - 1) seconds
        after it ended at the earliest. Requests made meanwhile share that next run."""
        self._job = job
        self._executor = executor
        self._rest = 1 / duty - 1
        self._pending: dict[Hashable, asyncio.Future[Any]] = {}
        self._next: dict[Hashable, float] = {}  # loop.time() a key's next run may start

    async def run(self, key: Hashable) -> Any:
        """`job(key)`'s result, from a run that starts after this call."""
        future = self._pending.get(key)
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._pending[key] = loop.create_future()
            wait = self._next.get(key, -math.inf) - loop.time()
            if wait > 0:
                loop.call_later(wait, self._submit, key, future, loop)
            else:
                self._submit(key, future, loop)
        return await asyncio.shield(future)  # one caller cancelled leaves the others

    def _submit(self, key: Hashable, future: asyncio.Future[Any],
                loop: asyncio.AbstractEventLoop) -> None:
        call = contextvars.copy_context().run
        loop.run_in_executor(self._executor, call, self._call, key, future, loop)

    def _call(self, key: Hashable, future: asyncio.Future[Any],
              loop: asyncio.AbstractEventLoop) -> None:
        self._pending.pop(key, None)  # first: later requests need a later run
        started = loop.time()
        result, error = None, None
        try:
            result = self._job(key)
        except BaseException as exc:  # handed to every waiter
            error = exc
        ended = loop.time()
        self._next[key] = ended + (ended - started) * self._rest  # before waking anyone
        loop.call_soon_threadsafe(_settle, future, result, error)

    def __len__(self) -> int:
        return len(self._pending)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
