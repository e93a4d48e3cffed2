"""Reachability probes: one asyncio task per probed IOC, run by the operator itself.

Each task reads the IOC's probe PV in a child process (probe.py) with exactly the
client settings the IOC publishes, turns the result into the Reachable condition and
hands it to a writer. A kopf daemon would do the same, but kopf then keeps the whole
body of every IOC (probed or not) in memory for it: ~25 KB each with managedFields,
so 1,000 IOCs cost tens of MB. A task here remembers a few strings.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import os
import sys
import zlib
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from ioc_operator.controller.conditions import Cond

log = logging.getLogger(__name__)
PROBE_TIMEOUT = 3.0
MAX_BACKOFF = 300.0
# Probes at once: each is a Python process importing caproto and p4p (~0.3 s of CPU).
CONCURRENCY = 4
# The first probe of each IOC waits a share of this, so 1,000 IOCs seen at a cold
# start do not all start probing in the same second.
FIRST_SPREAD = 5.0


@dataclass(frozen=True)
class Target:
    """What a probe of one IOC needs to know; equal targets need no new probe."""

    namespace: str
    name: str
    uid: str
    pv: str
    period: float
    env: tuple[tuple[str, str], ...]
    # Probed only once the IOC is Ready: before that a failed read says nothing, and the
    # IOC becoming Ready (a changed target) probes at once.
    ready: bool = True
    # the newest generation seen, for the condition's observedGeneration
    generation: int | None = field(default=None, compare=False)


def target(body: dict[str, Any]) -> Target | None:
    """Pure: an IOC in, what to probe out (None: it asks for no probe)."""
    meta, spec = body["metadata"], body.get("spec") or {}
    probe = spec.get("probe") or {}
    if not probe.get("pv"):
        return None
    status = body.get("status") or {}
    env = status.get("clientEnv") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or [])
    return Target(meta["namespace"], meta["name"], meta["uid"], probe["pv"],
                  float(probe.get("periodSeconds") or 30), tuple(sorted(env.items())),
                  ready, meta.get("generation"))


NOT_READY = Cond("Reachable", None, "NotReady", "not probed until the IOC is Ready")


def reachable_condition(result: dict[str, Any]) -> Cond:
    """Pure: probe results in, the Reachable condition out."""
    if not result:
        return Cond("Reachable", None, "NoAddress", "no published address yet")
    parts = [f"{proto.upper()} {r['ms']} ms" if r.get("ok") else
             f"{proto.upper()} failed: {r.get('error')}" for proto, r in sorted(result.items())]
    ok = all(r.get("ok") for r in result.values())
    return Cond("Reachable", ok, "Reachable" if ok else "Unreachable",
                "; ".join(parts) + " (with the published client settings)")


def next_delay(period: float, failures: int) -> float:
    """Pure: the wait before the next probe; doubles per failure up to MAX_BACKOFF."""
    if failures == 0:
        return period
    return min(period * 2 ** min(failures - 1, 5), MAX_BACKOFF)


def first_delay(uid: str, period: float) -> float:
    """Pure: a stable share of FIRST_SPREAD (or of the period, if shorter) per IOC."""
    return (zlib.crc32(uid.encode()) % 1000) / 1000 * min(period, FIRST_SPREAD)


async def run_probe(pv: str, env: dict[str, str]) -> dict[str, Any]:
    """Run the probe in a child process with exactly the published settings (caproto
    and p4p read them from the environment), without blocking the event loop."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    args = [sys.executable, "-m", "ioc_operator.controller.probe", "--pv", pv,
            "--timeout", str(PROBE_TIMEOUT)]
    args += ["--ca"] if "EPICS_CA_ADDR_LIST" in env else []
    args += ["--pva"] if "EPICS_PVA_ADDR_LIST" in env else []
    proc = await asyncio.create_subprocess_exec(
        *args, env={**clean, **env}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=4 * PROBE_TIMEOUT + 10)
    except TimeoutError:
        return {"probe": {"ok": False, "error": "probe process timed out"}}
    finally:
        if proc.returncode is None:  # timed out, or the task was cancelled
            proc.kill()
    try:
        return json.loads(out.decode() or "{}")
    except ValueError:
        return {"probe": {"ok": False, "error": f"probe failed (exit {proc.returncode})"}}


# (target, status fields, condition) -> None; blocking, run in an executor thread
Writer = Callable[[Target, dict[str, Any], Cond], None]
Probe = Callable[[str, dict[str, str]], Any]  # async (pv, env) -> results


class Prober:
    """The probe tasks, one per IOC with a probe PV. Call `set` for every IOC event and
    `forget` when an IOC is gone; both run on the event loop."""

    def __init__(self, write: Writer, executor: Executor | None = None,
                 probe: Probe = run_probe, concurrency: int = CONCURRENCY) -> None:
        self._write = write
        self._executor = executor  # where the blocking writer runs
        self._probe = probe
        self._slots = asyncio.Semaphore(concurrency)
        self._targets: dict[str, Target] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def set(self, uid: str, new: Target | None) -> None:
        """The IOC's current target (None: no probe). A changed PV, period or address
        probes again now, not a period later."""
        if new is None:
            self.forget(uid)
            return
        old = self._targets.get(uid)
        self._targets[uid] = new
        if uid not in self._tasks:
            self._wake[uid] = asyncio.Event()
            self._tasks[uid] = asyncio.create_task(self._run(uid), name=f"probe {uid}")
        elif old != new:
            self._wake[uid].set()

    def forget(self, uid: str) -> None:
        self._targets.pop(uid, None)
        self._wake.pop(uid, None)
        task = self._tasks.pop(uid, None)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for uid in list(self._tasks):
            self.forget(uid)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _sleep(self, uid: str, delay: float) -> None:
        wake = self._wake[uid]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=delay)
        wake.clear()

    async def _run(self, uid: str) -> None:
        failures = 0
        written: Cond | None = None
        first = self._targets[uid]
        if first.ready:  # an IOC seen Ready at a cold start: spread the first probes
            await self._sleep(uid, first_delay(uid, first.period))
        while uid in self._targets:
            now = self._targets[uid]
            if not now.ready:
                if written != NOT_READY:
                    await self._report(now, {"reachability": None}, NOT_READY)
                    written = NOT_READY
                await self._sleep(uid, now.period)  # woken when it becomes Ready
                continue
            env = dict(now.env)
            async with self._slots:
                result = await self._probe(now.pv, env) if env else {}
            cond = reachable_condition(result)
            failures = 0 if cond.status else failures + 1
            await self._report(self._targets.get(uid, now),
                               {"reachability": dict(result) or None}, cond)
            written = cond
            await self._sleep(uid, next_delay(now.period, failures))

    async def _report(self, latest: Target, status: dict[str, Any], cond: Cond) -> None:
        loop = asyncio.get_running_loop()
        # in this task's context: kopf.event() needs the context variables kopf set
        write = functools.partial(contextvars.copy_context().run, self._write,
                                  latest, status, cond)
        try:
            await loop.run_in_executor(self._executor, write)
        except Exception as exc:  # whatever it was, the next probe writes again
            log.warning("reachability of %s/%s not written: %s",
                        latest.namespace, latest.name, exc)
