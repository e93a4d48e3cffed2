"""Real EPICS test servers, started inside a lab namespace with a given environment.

Every server serves, under its PV prefix:

* ``<prefix>value``   writable double (ao-like), initial 1.5
* ``<prefix>counter`` read-only counter incrementing every 0.2 s (for monitors)
* ``<prefix>mode``    enum Off/On/Auto (mbbo-like)
* ``<prefix>wave``    8-element double waveform 0..7

Kinds: ``softioc-classic`` (EPICS Base rsrv CA + QSRV1 classic PVA), ``softioc-pvxs``
(rsrv + QSRV2/PVXS), ``caproto`` (CA), ``p4p`` (PVXS PVA) and ``pcaspy`` (CA).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import resource
from .netns import Lab, LabError, Node, Pod, listening_ports

__all__ = ["KINDS", "PV_NAMES", "EpicsServer", "describe", "start_server"]

PV_NAMES = ("value", "counter", "mode", "wave")

IOCS = resource("iocs")  # the example IOC image runs the same files (docker/)


@dataclass(frozen=True)
class _Kind:
    protocols: tuple[str, ...]
    module: str | None = None  # python -m <module> -m P=<prefix> -d iocs/example.db
    script: str | None = None  # python iocs/<script> <prefix>
    keep_stdin: bool = False  # the soft IOC's Python shell exits when stdin closes


KINDS: dict[str, _Kind] = {
    "softioc-classic": _Kind(("ca", "pva"), module="epicscorelibs.ioc", keep_stdin=True),
    "softioc-pvxs": _Kind(("ca", "pva"), module="pvxslibs.ioc", keep_stdin=True),
    "caproto": _Kind(("ca",), script="caproto_ioc.py"),
    "p4p": _Kind(("pva",), script="p4p_ioc.py"),
    "pcaspy": _Kind(("ca",), script="pcaspy_ioc.py"),
}


@dataclass
class EpicsServer:
    """A running EPICS server in a lab namespace, stopped by PID."""

    lab: Lab
    kind: str
    prefix: str
    ns: str
    env: dict[str, str]
    popen: subprocess.Popen[bytes]
    protocols: tuple[str, ...]
    ready_ports: dict[str, set[int]] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pv(self, name: str = "value") -> str:
        """Full name of one of the served PVs (``value``, ``counter``, ``mode``, ``wave``)."""
        return self.prefix + name

    def alive(self) -> bool:
        return self.popen.poll() is None

    def ports(self) -> dict[str, set[int]]:
        """TCP listening and UDP bound ports of the server process right now."""
        return listening_ports(self.pid)

    def log(self) -> str:
        """The server's combined stdout/stderr so far."""
        path: Path = self.popen.log_path  # type: ignore[attr-defined]
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 20.0) -> EpicsServer:
        """Wait (bounded) until the process listens with one TCP socket per protocol.

        Servers bind their sockets during start-up (rsrv and QSRV during iocInit), so a
        listening socket per protocol means searches can be answered. Raises LabError with
        the log tail if the process exits or the deadline passes.
        """
        deadline = time.monotonic() + timeout
        want_tcp = len(self.protocols)
        while time.monotonic() < deadline:
            if not self.alive():
                raise LabError(
                    f"{self.kind} server exited with {self.popen.returncode}:\n{self.log()[-2000:]}"
                )
            ports = self.ports()
            started = "IOC Running" in self.log() if self.kind.startswith("softioc") else True
            if started and len(ports["tcp"]) >= want_tcp and ports["udp"]:
                self.ready_ports = ports
                return self
            time.sleep(0.05)
        raise LabError(
            f"{self.kind} server not ready after {timeout}s (ports {self.ports()}):\n"
            f"{self.log()[-2000:]}"
        )

    def stop(self) -> int | None:
        """Stop the server by PID; returns its exit code."""
        return self.lab.stop(self.popen)


def start_server(
    lab: Lab,
    where: str | Node | Pod,
    kind: str,
    prefix: str,
    env: Mapping[str, str] | None = None,
    *,
    ready_timeout: float = 20.0,
    wait: bool = True,
) -> EpicsServer:
    """Start an EPICS server of ``kind`` in a namespace with only ``env`` (plus PATH etc.)."""
    try:
        spec = KINDS[kind]
    except KeyError:
        raise LabError(f"unknown server kind {kind!r}; choose from {sorted(KINDS)}") from None
    ns = where if isinstance(where, str) else where.ns
    tag = f"{kind}-{len(lab.processes)}"
    argv: list[str]
    if spec.module is not None:
        argv = [sys.executable, "-m", spec.module, "-m", f"P={prefix}",
                "-d", str(IOCS / "example.db")]
    else:
        argv = [sys.executable, str(IOCS / (spec.script or "")), prefix]
    full_env = dict(env or {})
    popen = lab.spawn(
        ns,
        argv,
        full_env,
        stdin=subprocess.PIPE if spec.keep_stdin else subprocess.DEVNULL,
        log=lab.tmpdir / f"{tag}.log",
    )
    server = EpicsServer(
        lab=lab,
        kind=kind,
        prefix=prefix,
        ns=ns,
        env=full_env,
        popen=popen,
        protocols=spec.protocols,
    )
    if wait:
        try:
            server.wait_ready(ready_timeout)
        except BaseException:
            server.stop()
            raise
    return server


def describe(server: EpicsServer) -> dict[str, Any]:
    """A JSON-friendly summary (for logs and reports)."""
    return {
        "kind": server.kind,
        "prefix": server.prefix,
        "ns": server.ns,
        "pid": server.pid,
        "ports": {k: sorted(v) for k, v in server.ports().items()},
    }
