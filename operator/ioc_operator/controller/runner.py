"""The operator's one concurrency story: kopf's event loop decides, threads do API work.

Measured, not assumed (docs/benchmarks.md): the operator's client is the `kubernetes`
package, which is synchronous. Its asyncio sibling would make everything a coroutine,
but kopf imports every Kubernetes client installed, to recognise its objects:
kubernetes_asyncio beside kubernetes took kopf's import from 59 to 91 MB of RSS (77 MB
with kubernetes_asyncio alone), against a 150 MB budget at 1,000 IOCs. So:

- Everything that only reads memory runs on kopf's event loop: kopf's indexes, and the
  classification of every watch event (events.py). Most events end there.
- Everything that calls the API server runs in `Runner.threads` (kopf's handler pool,
  sized here): reconciles, status writes, rechecks, the resync. A sync kopf handler is
  already in that pool; an async one hands work over with `Runner.call`, which keeps
  the handler's context (kopf's logger and event posting need it).
- One reconcile at a time per IOC: `Runner.locks`. Reconciles and status writes hold
  their IOC's lock in a thread; events on the IOC's objects that arrive meanwhile are
  mostly the echoes of that reconcile's writes, recognisable only once it has recorded
  them (the operator's memory, state.py), so they wait for the lock, on the event loop
  (`IOCLocks.released`: a future the releasing thread resolves), holding no thread.
  Waiting in a thread queued them behind every reconcile still to run (a cold start
  queues 1,000), each holding its whole object: once the operator's memory peak.
- A namespace's directory is published by `Runner.publishing`: one thread of its own
  (so the cluster directory's writes keep their order, and publishes never queue
  behind reconciles), requests coalesced per namespace, runs spaced by their cost.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
import threading
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")
# Sync handlers and API work: they mostly wait on the API server, so more threads than
# cores keep one slow burst from queueing the rest.
THREADS = 16
# A namespace's directory publishes take at most this share of the time: a burst of IOC
# changes shares writes (at 1,000 IOCs each is ~190 KB), a lone change goes out at once.
PUBLISH_DUTY = 0.1


class Runner:
    """The threads, the per-IOC locks and the coalesced directory publishes."""

    def __init__(self, publish: Callable[[str], bool], threads: int = THREADS,
                 duty: float = PUBLISH_DUTY) -> None:
        self.threads = ThreadPoolExecutor(threads, thread_name_prefix="handler")
        self.locks = IOCLocks()
        self._publisher = ThreadPoolExecutor(1, thread_name_prefix="directory")
        self.publishing = Coalescer(publish, self._publisher, duty)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a handler thread, with the caller's context."""
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self.threads, call)

    async def publish(self, namespace: str) -> bool:
        """Publish the namespace's directory in a run that starts after this call."""
        return bool(await self.publishing.run(namespace))

    def shutdown(self) -> None:
        self._publisher.shutdown(wait=False, cancel_futures=True)
        self.threads.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------ per-IOC locks
# Reconciles and status writes run in threads and hold their IOC's lock; the event
# loop waits for one on a future the releasing thread resolves, no thread needed.

def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():  # a waiter that timed out has cancelled it
        future.set_result(None)


class IOCLocks:
    """Per-IOC locks held by threads; `released` awaits one from the event loop."""

    def __init__(self) -> None:
        self._guard = threading.Lock()  # makes "locked?" and "wait for it" one step
        self._locks: dict[str, threading.Lock] = {}
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop,
                                            asyncio.Future[None]]]] = {}

    @contextmanager
    def hold(self, uid: str) -> Iterator[None]:
        """Hold `uid`'s lock (blocking: call from a thread, never the event loop)."""
        with self._guard:
            lock = self._locks.setdefault(uid, threading.Lock())
        lock.acquire()
        try:
            yield
        finally:
            with self._guard:
                lock.release()
                waiters = self._waiters.pop(uid, [])
            for loop, future in waiters:
                loop.call_soon_threadsafe(_wake, future)

    def held(self, uid: str) -> bool:
        lock = self._locks.get(uid)
        return lock is not None and lock.locked()

    async def released(self, uid: str, timeout: float) -> bool:
        """Wait until no thread holds `uid`'s lock; False if one still does after
        `timeout` seconds. (Another thread may take it right after: a snapshot.)"""
        loop = asyncio.get_running_loop()
        with self._guard:
            lock = self._locks.get(uid)
            if lock is None or not lock.locked():
                return True
            future: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(uid, []).append((loop, future))
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return False
        return True

    def forget(self, uid: str) -> None:
        """Drop the lock of an IOC that is gone (unless a thread still holds it)."""
        with self._guard:
            lock = self._locks.get(uid)
            if lock is not None and not lock.locked():
                del self._locks[uid]

    def __len__(self) -> int:
        return len(self._locks)


# ------------------------------------------------------------------ coalescing
# A namespace's client directory is computed from all its IOCs: at a cold start each of
# 1,000 IOCs changes it once, and publishing 1,000 times is O(n^2) work. A request made
# before the pending run for its key has started is answered by that run, which reads
# its input (kopf's index) only once it starts, so it includes every change made before
# the request. Runs of a key are spaced out in proportion to their cost: at 1,000 IOCs a
# namespace's directory is ~190 KB, which written back to back through a cold start cost
# the API server and etcd that much per write (and every watcher that much per event),
# while with a handful of IOCs a run takes milliseconds and needs no spacing.

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
