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

from .netns import Lab, LabError, Node, Pod, listening_ports

__all__ = ["KINDS", "PV_NAMES", "EpicsServer", "describe", "start_server"]

PV_NAMES = ("value", "counter", "mode", "wave")

SOFTIOC_DB = """\
record(ao, "$(P)value") {
    field(VAL, "1.5")
    field(PREC, "3")
    field(PINI, "YES")
}
record(calc, "$(P)counter") {
    field(SCAN, ".2 second")
    field(INPA, "$(P)counter NPP")
    field(CALC, "A+1")
}
record(mbbo, "$(P)mode") {
    field(ZRST, "Off")
    field(ONST, "On")
    field(TWST, "Auto")
    field(VAL, "0")
    field(PINI, "YES")
}
record(waveform, "$(P)wave") {
    field(FTVL, "DOUBLE")
    field(NELM, "8")
    field(INP, [0, 1, 2, 3, 4, 5, 6, 7])
    field(PINI, "YES")
}
"""

CAPROTO_IOC = '''\
"""caproto asyncio IOC for the lab (CA only)."""
import sys

from caproto import ChannelType
from caproto.server import PVGroup, pvproperty, run


class LabIOC(PVGroup):
    value = pvproperty(value=1.5, dtype=float, precision=3)
    counter = pvproperty(value=0, dtype=int, read_only=True)
    mode = pvproperty(value="Off", dtype=ChannelType.ENUM, enum_strings=["Off", "On", "Auto"])
    wave = pvproperty(value=[float(i) for i in range(8)], dtype=float, max_length=8)

    @counter.scan(period=0.2)
    async def counter(self, instance, async_lib):
        await instance.write(instance.value + 1)


if __name__ == "__main__":
    ioc = LabIOC(prefix=sys.argv[1])
    print("caproto IOC serving", sorted(ioc.pvdb), flush=True)
    run(ioc.pvdb)
'''

PCASPY_IOC = '''\
"""pcaspy (CAS) server for the lab (CA only)."""
import sys
import time

from pcaspy import Driver, SimpleServer

PVDB = {
    "value": {"type": "float", "prec": 3, "value": 1.5},
    "counter": {"type": "int", "value": 0},
    "mode": {"type": "enum", "enums": ["Off", "On", "Auto"], "value": 0},
    "wave": {"type": "float", "count": 8, "value": [float(i) for i in range(8)]},
}


class LabDriver(Driver):
    def write(self, reason, value):
        if reason == "counter":
            return False
        self.setParam(reason, value)
        self.updatePVs()
        return True


if __name__ == "__main__":
    server = SimpleServer()
    server.createPV(sys.argv[1], PVDB)
    driver = LabDriver()
    print("pcaspy server running", flush=True)
    count, next_tick = 0, time.monotonic()
    while True:
        server.process(0.05)
        if time.monotonic() >= next_tick:
            next_tick += 0.2
            count += 1
            driver.setParam("counter", count)
            driver.updatePVs()
'''

P4P_IOC = '''\
"""p4p (PVXS) server for the lab (PVA only)."""
import sys
import time

from p4p.nt import NTEnum, NTScalar
from p4p.server import Server
from p4p.server.thread import SharedPV


class Writable:
    def put(self, pv, op):
        pv.post(op.value())
        op.done()


prefix = sys.argv[1]
pvs = {
    prefix + "value": SharedPV(nt=NTScalar("d"), initial=1.5, handler=Writable()),
    prefix + "counter": SharedPV(nt=NTScalar("i"), initial=0),
    prefix + "mode": SharedPV(
        nt=NTEnum(), initial={"index": 0, "choices": ["Off", "On", "Auto"]}, handler=Writable()
    ),
    prefix + "wave": SharedPV(nt=NTScalar("ad"), initial=[float(i) for i in range(8)]),
}
with Server(providers=[pvs]):
    print("p4p server running", flush=True)
    count = 0
    while True:
        time.sleep(0.2)
        count += 1
        pvs[prefix + "counter"].post(count)
'''


@dataclass(frozen=True)
class _Kind:
    protocols: tuple[str, ...]
    module: str | None = None  # python -m <module> -m P=<prefix> -d <db>
    script: str | None = None  # python <script> <prefix>
    keep_stdin: bool = False  # the soft IOC's Python shell exits when stdin closes


KINDS: dict[str, _Kind] = {
    "softioc-classic": _Kind(("ca", "pva"), module="epicscorelibs.ioc", keep_stdin=True),
    "softioc-pvxs": _Kind(("ca", "pva"), module="pvxslibs.ioc", keep_stdin=True),
    "caproto": _Kind(("ca",), script=CAPROTO_IOC),
    "p4p": _Kind(("pva",), script=P4P_IOC),
    "pcaspy": _Kind(("ca",), script=PCASPY_IOC),
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
    workdir = lab.tmpdir / "servers"
    workdir.mkdir(exist_ok=True)
    tag = f"{kind}-{len(lab.processes)}"
    argv: list[str]
    if spec.module is not None:
        db = workdir / "lab.db"
        if not db.exists():
            db.write_text(SOFTIOC_DB)
        argv = [sys.executable, "-m", spec.module, "-m", f"P={prefix}", "-d", str(db)]
    else:
        script = workdir / f"{kind.replace('-', '_')}_ioc.py"
        if not script.exists():
            script.write_text(spec.script or "")
        argv = [sys.executable, str(script), prefix]
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
