"""The probe scheduler: one task per probed IOC, retargeted by events, bounded in number.

The probe itself is replaced by a coroutine here (the real one, a child process
reading real servers, is covered by tests/e2e (every example Reachable from the
operator's pod) and tests/integration/test_reachability.py); what is tested is the
scheduling.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from ioc_operator.controller.conditions import Cond
from ioc_operator.controller.reachability import (
    FIRST_SPREAD,
    MAX_BACKOFF,
    Prober,
    Target,
    first_delay,
    next_delay,
    run_probe,
    target,
)

ENV = {"EPICS_CA_ADDR_LIST": "198.18.0.2:5064", "EPICS_CA_AUTO_ADDR_LIST": "NO"}


def ioc(uid: str = "u1", pv: str | None = "X:HB", period: float | None = 0.01,
        env: dict[str, str] | None = None, generation: int = 1,
        ready: bool = True) -> dict[str, Any]:
    probe = {k: v for k, v in (("pv", pv), ("periodSeconds", period)) if v is not None}
    return {"metadata": {"namespace": "ns", "name": f"ioc-{uid}", "uid": uid,
                         "generation": generation},
            "spec": {"probe": probe},
            "status": {"clientEnv": ENV if env is None else env,
                       "conditions": [{"type": "Ready", "status": str(ready)}]}}


class Recorder:
    def __init__(self, fail_writes: int = 0, result: dict[str, Any] | None = None) -> None:
        self.probes: list[tuple[float, str, dict[str, str]]] = []
        self.writes: list[tuple[Target, dict[str, Any], Cond]] = []
        self.fail_writes = fail_writes
        self.result = {"ca": {"ok": True, "ms": 1.0}} if result is None else result
        self.running = 0
        self.most = 0
        self.delay = 0.0

    async def probe(self, pv: str, env: dict[str, str]) -> dict[str, Any]:
        self.probes.append((time.monotonic(), pv, env))
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.running -= 1
        return self.result

    def write(self, tgt: Target, status: dict[str, Any], cond: Cond) -> None:
        if self.fail_writes:
            self.fail_writes -= 1
            raise RuntimeError("API down")
        self.writes.append((tgt, status, cond))


async def until(what: str, check: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def test_target_from_an_ioc():
    t = target(ioc(period=7, generation=4))
    assert t == Target("ns", "ioc-u1", "u1", "X:HB", 7.0, tuple(sorted(ENV.items())))
    assert t.generation == 4
    assert target(ioc(pv=None)) is None
    assert target(ioc(period=None)).period == 30.0
    # the generation is not part of what is probed: a spec change elsewhere is no retarget
    assert target(ioc(generation=5)) == target(ioc(generation=6))
    assert target(ioc(env={})).env == ()


def test_delays():
    assert next_delay(30, 0) == 30
    assert [next_delay(10, f) for f in (1, 2, 3)] == [10, 20, 40]
    assert next_delay(30, 50) == MAX_BACKOFF
    spread = [first_delay(f"uid-{i}", 30) for i in range(200)]
    assert all(0 <= d < FIRST_SPREAD for d in spread)
    assert len({round(d, 2) for d in spread}) > 100  # spread out, not all at once
    assert first_delay("a", 0.5) < 0.5
    assert first_delay("a", 30) == first_delay("a", 30)


def test_probes_periodically_and_writes_the_condition():
    rec = Recorder()

    async def main() -> None:
        prober = Prober(rec.write, probe=rec.probe)
        prober.set("u1", target(ioc()))
        await until("three probes", lambda: len(rec.writes) >= 3)
        await prober.stop()

    asyncio.run(main())
    tgt, status, cond = rec.writes[0]
    assert tgt.name == "ioc-u1" and rec.probes[0][1:] == ("X:HB", ENV)
    assert status == {"reachability": {"ca": {"ok": True, "ms": 1.0}}}
    assert cond == Cond("Reachable", True, "Reachable",
                        "CA 1.0 ms (with the published client settings)")


def test_no_address_yet_writes_no_address_without_probing():
    rec = Recorder()

    async def main() -> None:
        prober = Prober(rec.write, probe=rec.probe)
        prober.set("u1", target(ioc(env={})))
        await until("a write", lambda: rec.writes)
        await prober.stop()

    asyncio.run(main())
    assert not rec.probes
    assert rec.writes[0][1] == {"reachability": None}
    assert rec.writes[0][2].reason == "NoAddress"


def test_a_changed_target_probes_at_once_and_an_unchanged_one_does_not():
    rec = Recorder()

    async def main() -> None:
        prober = Prober(rec.write, probe=rec.probe)
        prober.set("u1", target(ioc(period=100)))
        await until("first probe", lambda: rec.writes, timeout=FIRST_SPREAD + 1)
        prober.set("u1", target(ioc(period=100, generation=2)))  # status write echo
        await asyncio.sleep(0.2)
        assert len(rec.probes) == 1
        moved = {**ENV, "EPICS_CA_ADDR_LIST": "198.18.0.3:5064"}
        prober.set("u1", target(ioc(period=100, env=moved, generation=3)))
        await until("second probe", lambda: len(rec.writes) == 2, timeout=1)
        await prober.stop()

    asyncio.run(main())
    assert rec.probes[1][2]["EPICS_CA_ADDR_LIST"] == "198.18.0.3:5064"
    assert rec.writes[1][0].generation == 3


def test_failures_back_off():
    rec = Recorder(result={"ca": {"ok": False, "error": "TimeoutError"}})

    async def main() -> None:
        prober = Prober(rec.write, probe=rec.probe)
        prober.set("u1", target(ioc(period=0.05)))
        await until("first probe", lambda: rec.probes)
        await asyncio.sleep(0.5)
        await prober.stop()

    asyncio.run(main())
    # waits 0.05, 0.1, 0.2, 0.4 ...: at most 4 probes in 0.5 s (18 at the period)
    assert 2 <= len(rec.probes) <= 4, len(rec.probes)
    gaps = [b[0] - a[0] for a, b in zip(rec.probes, rec.probes[1:], strict=False)]
    assert gaps == sorted(gaps)
    assert rec.writes[-1][2].reason == "Unreachable"


def test_forget_stops_the_probe_and_a_failed_write_does_not():
    rec = Recorder(fail_writes=2)

    async def main() -> None:
        prober = Prober(rec.write, probe=rec.probe)
        prober.set("u1", target(ioc()))
        prober.set("u2", target(ioc(uid="u2")))
        assert len(prober) == 2
        await until("writes after two failures", lambda: len(rec.writes) >= 2)
        prober.forget("u1")
        prober.set("u2", target(ioc(uid="u2", pv=None)))  # probe removed from the spec
        assert len(prober) == 0
        count = len(rec.probes)
        await asyncio.sleep(0.1)
        assert len(rec.probes) == count
        await prober.stop()

    asyncio.run(main())


def test_probes_at_once_are_bounded():
    rec = Recorder()
    rec.delay = 0.05

    async def main() -> None:
        prober = Prober(rec.write, probe=rec.probe, concurrency=3)
        for i in range(12):
            prober.set(f"u{i}", target(ioc(uid=f"u{i}", period=0.02)))
        await until("every IOC probed", lambda: len({w[0].uid for w in rec.writes}) == 12,
                    timeout=FIRST_SPREAD + 2)
        await prober.stop()
        assert len(prober) == 0

    asyncio.run(main())
    assert rec.most == 3


def _probe_children() -> list[int]:
    """PIDs of this process's children that run the probe."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"ioc_operator.controller.probe" in cmd:
            found.append(int(entry.name))
    return found


def test_the_real_probe_process_is_killed_when_its_task_is_cancelled():
    # 127.0.0.1:9 (discard): nothing answers, so the probe would wait its timeout
    env = {"EPICS_CA_ADDR_LIST": "127.0.0.1:9", "EPICS_CA_AUTO_ADDR_LIST": "NO"}

    async def main() -> tuple[dict[str, Any], list[int], list[int]]:
        empty = await run_probe("X:HB", {})  # no address: nothing to read
        task = asyncio.create_task(run_probe("X:HB", env))
        deadline = time.monotonic() + 10
        while not _probe_children() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        running = _probe_children()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.3)
        return empty, running, _probe_children()

    empty, running, after = asyncio.run(main())
    assert empty == {}
    assert running, "the probe process never started"
    assert not after, f"probe processes left behind: {after}"


def test_an_ioc_is_probed_only_once_ready_and_then_at_once():
    """Probing before the pod runs reported Unreachable for IOCs that were fine a
    second later (seen in the demo on real nodes)."""
    async def scenario() -> None:
        rec = Recorder()
        prober = Prober(rec.write, probe=rec.probe)
        prober.set("u1", target(ioc(period=30, ready=False)))
        await until("the NotReady condition", lambda: rec.writes)
        await asyncio.sleep(0.05)
        assert rec.probes == []
        assert [(w[2].status, w[2].reason) for w in rec.writes] == [(None, "NotReady")]
        start = time.monotonic()
        prober.set("u1", target(ioc(period=30, ready=True)))
        await until("a probe", lambda: rec.probes)
        assert rec.probes[0][0] - start < 0.5  # at once, not a period or a spread later
        await until("Reachable", lambda: rec.writes[-1][2].status is True)
        await prober.stop()

    asyncio.run(scenario())
