"""Run EPICS clients inside lab namespaces with only the given environment.

Each call runs ``python -m ioc_testbed.lab.client`` via ``ip netns exec`` with a clean
environment (PATH, HOME, LANG plus the caller's EPICS_* settings) and parses its JSON line.
Every call is bounded: the client has its own watchdog and the runner a hard timeout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .netns import Lab, LabError, Node, Pod

__all__ = ["ClientCall", "ClientResult", "run_client", "run_clients"]

STARTUP_ALLOWANCE = 10.0  # seconds for interpreter and library start-up


@dataclass
class ClientResult:
    """The outcome of one client run."""

    lib: str
    op: str
    ok: bool
    error: str | None
    elapsed: float
    results: list[dict[str, Any]] = field(default_factory=list)
    returncode: int | None = None
    stderr: str = ""

    def found(self, pv: str) -> bool:
        """Whether ``pv`` succeeded in this run."""
        return any(r["pv"] == pv and r["ok"] for r in self.results)

    def value(self, pv: str | None = None) -> Any:
        """The value of ``pv`` (default: the first PV)."""
        for r in self.results:
            if pv is None or r["pv"] == pv:
                return r["value"]
        raise KeyError(pv)


@dataclass
class ClientCall:
    """Arguments of one `run_client` call, for `run_clients`."""

    where: str | Node | Pod
    lib: str
    op: str
    pvs: Sequence[str]
    env: Mapping[str, str] | None = None
    value: Any = None
    timeout: float = 3.0
    updates: int = 2


def run_client(
    lab: Lab,
    where: str | Node | Pod,
    lib: str,
    op: str,
    pvs: str | Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    value: Any = None,
    timeout: float = 3.0,
    updates: int = 2,
) -> ClientResult:
    """Run one client operation in a namespace and return its parsed result (bounded)."""
    names = [pvs] if isinstance(pvs, str) else list(pvs)
    argv = [
        sys.executable,
        "-m",
        "ioc_testbed.lab.client",
        "--lib",
        lib,
        "--op",
        op,
        "--timeout",
        str(timeout),
        "--updates",
        str(updates),
    ]
    for name in names:
        argv += ["--pv", name]
    if value is not None:
        argv += ["--value", str(value)]
    hard = 3 * timeout + 5 + STARTUP_ALLOWANCE
    try:
        proc = lab.exec(where, argv, env or {}, timeout=hard)
    except LabError as exc:
        return ClientResult(lib, op, False, str(exc), hard)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except ValueError:
                break
            return ClientResult(
                lib=lib,
                op=op,
                ok=bool(data.get("ok")),
                error=data.get("error"),
                elapsed=float(data.get("elapsed", 0.0)),
                results=list(data.get("results", [])),
                returncode=proc.returncode,
                stderr=proc.stderr[-2000:],
            )
    return ClientResult(
        lib,
        op,
        False,
        f"no JSON from client (rc {proc.returncode}): {proc.stderr[-2000:]}",
        0.0,
        returncode=proc.returncode,
        stderr=proc.stderr[-2000:],
    )


def run_clients(lab: Lab, calls: Sequence[ClientCall], parallel: int = 16) -> list[ClientResult]:
    """Run several client calls concurrently (each its own process); results in order."""
    if not calls:
        return []

    def one(call: ClientCall) -> ClientResult:
        return run_client(
            lab,
            call.where,
            call.lib,
            call.op,
            call.pvs,
            call.env,
            value=call.value,
            timeout=call.timeout,
            updates=call.updates,
        )

    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(calls)))) as pool:
        return list(pool.map(one, calls))
