"""One reconcile at a time per IOC, and a way for the event loop to wait for it.

Reconciles and status writes run in handler threads and hold their IOC's lock. Events
on the IOC's own objects that arrive meanwhile are mostly echoes of that reconcile's
writes, recognisable only once it has recorded them (echoes.py), so they wait for the
lock. Waiting in a handler thread queued them behind every reconcile still to run (a
cold start queues 1,000), each holding its whole object: the operator's memory peak.
The event loop waits instead, on a future the releasing thread resolves.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager


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
