"""What the event loop and the handler threads hand each other: IOC locks the loop can
wait on (ioclocks.py) and per-key coalesced jobs (coalesce.py). Real threads, real loop."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ioc_operator.controller.runner import Coalescer, IOCLocks


def test_the_loop_waits_for_a_lock_without_a_thread() -> None:
    locks = IOCLocks()
    taken, release = threading.Event(), threading.Event()

    def reconcile() -> None:
        with locks.hold("u1"):
            taken.set()
            release.wait(5)

    async def main() -> tuple[bool, bool, float]:
        thread = threading.Thread(target=reconcile)
        thread.start()
        assert taken.wait(5)
        assert locks.held("u1")
        waiter = asyncio.ensure_future(locks.released("u1", 5))
        await asyncio.sleep(0.05)
        still_waiting = not waiter.done()
        start = time.monotonic()
        release.set()
        ok = await waiter
        thread.join(5)
        return still_waiting, ok, time.monotonic() - start

    still_waiting, ok, waited = asyncio.run(main())
    assert still_waiting and ok
    assert waited < 1.0
    assert not locks.held("u1")


def test_a_free_or_unknown_lock_needs_no_wait_and_a_stuck_one_times_out() -> None:
    locks = IOCLocks()
    release = threading.Event()

    def stuck() -> None:
        with locks.hold("u2"):
            release.wait(5)

    async def main() -> tuple[bool, bool]:
        free = await locks.released("nobody", 0.01)
        thread = threading.Thread(target=stuck)
        thread.start()
        while not locks.held("u2"):
            await asyncio.sleep(0.001)
        timed_out = await locks.released("u2", 0.05)
        release.set()
        thread.join(5)
        return free, timed_out

    free, timed_out = asyncio.run(main())
    assert free is True
    assert timed_out is False


def test_forget_drops_only_free_locks() -> None:
    locks = IOCLocks()
    with locks.hold("a"):
        locks.forget("a")  # held: kept
        assert len(locks) == 1
    locks.forget("a")
    assert len(locks) == 0


def test_requests_made_before_a_run_starts_share_it() -> None:
    gate = threading.Event()
    runs: list[str] = []

    def job(key: str) -> int:
        runs.append(key)
        gate.wait(5)
        return len(runs)

    async def main() -> list[int]:
        with ThreadPoolExecutor(1) as pool:
            coalescer = Coalescer(job, pool)
            first = asyncio.ensure_future(coalescer.run("ns"))
            while not runs:  # the first run has started (and waits on the gate)
                await asyncio.sleep(0.001)
            # made after the first run started: these need (and share) a second one
            later = [asyncio.ensure_future(coalescer.run("ns")) for _ in range(5)]
            other = asyncio.ensure_future(coalescer.run("other"))
            await asyncio.sleep(0.02)
            gate.set()
            return [await first, *[await f for f in later], await other]

    results = asyncio.run(main())
    assert runs.count("ns") == 2
    assert runs.count("other") == 1
    assert results[0] == 1
    assert len(set(results[1:6])) == 1  # the five later callers got one run's answer


def test_a_failing_job_fails_every_caller_and_the_next_run_is_fresh() -> None:
    calls = 0

    def job(_key: str) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("API down")
        return "written"

    async def main() -> str:
        with ThreadPoolExecutor(1) as pool:
            coalescer = Coalescer(job, pool)
            with pytest.raises(RuntimeError, match="API down"):
                await coalescer.run("ns")
            return await coalescer.run("ns")

    assert asyncio.run(main()) == "written"
    assert calls == 2


def test_runs_of_a_key_are_spaced_by_their_cost_and_share_the_wait() -> None:
    starts: list[tuple[str, float]] = []

    def job(key: str) -> int:
        starts.append((key, time.monotonic()))
        time.sleep(0.1)  # a run's cost: at duty 0.1 the next waits 0.9 s after it
        return len(starts)

    async def main() -> list[int]:
        with ThreadPoolExecutor(1) as pool:
            coalescer = Coalescer(job, pool, duty=0.1)
            first = await coalescer.run("ns")
            # right after a run: these wait out its cost, and share one run
            waiting = await asyncio.gather(*[coalescer.run("ns") for _ in range(3)])
            other = await coalescer.run("other")  # another key: no wait
            return [first, *waiting, other]

    results = asyncio.run(main())
    assert [k for k, _ in starts] == ["ns", "ns", "other"]
    assert starts[1][1] - starts[0][1] >= 1.0  # 0.1 s run + 0.9 s rest
    assert starts[2][1] - starts[1][1] < 1.0  # 0.1 s run, no rest
    assert results == [1, 2, 2, 2, 3]
