"""The CA-to-PVA bridge in the network lab: CA-only test IOCs on loopback, the bridge on
the pod IP, and a p4p probe client (used by tests/lab/test_bridge.py and
benchmarks/bench_bridge.py). Needs the lab (root); see docs/lab.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .lab.netns import Lab, LabError, Pod, listening_ports

__all__ = [
    "CAPROTO_IOC",
    "IOC_CA_PORT",
    "PCASPY_IOC",
    "PROBE",
    "ca_env",
    "probe",
    "pva_env",
    "start_bridge",
    "start_ioc",
]

IOC_CA_PORT = 15064  # sidecar mode: the IOC's CA server moved to loopback

# Both IOCs serve, under their prefix: temperature (double, units/limits/precision/alarm
# limits), count (long), label (string), mode (enum Off/On/Auto), wave (8 doubles),
# counter (+1 every 0.1 s) and alarm (double in a MAJOR/HIHI alarm). The caproto IOC also
# has short (DBR_INT), single (DBR_FLOAT) and chars (DBR_CHAR array). The pcaspy IOC also
# has fast (long: writing "go" = N makes it write 1, 2, 3, ... to fast as fast as it can
# for N seconds, then stop by itself: a CA put to a saturated IOC can wait for seconds).
# The caproto IOC has no such writer: caproto's server drops almost everything written
# in a tight loop (measured: 363 of ~87,000 updates reached a libca client in 4 s).
CAPROTO_IOC = '''\
"""caproto IOC for the bridge tests (CA only, bound by EPICS_CAS_INTF_ADDR_LIST)."""
import sys

from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.server import PVGroup, pvproperty, run


class BridgeIOC(PVGroup):
    temperature = pvproperty(
        value=1.5, dtype=float, precision=3, units="mm",
        lower_disp_limit=-20.0, upper_disp_limit=20.0,
        lower_ctrl_limit=-10.0, upper_ctrl_limit=10.0,
        lower_alarm_limit=-9.0, lower_warning_limit=-5.0,
        upper_warning_limit=5.0, upper_alarm_limit=9.0)
    count = pvproperty(value=7, dtype=int, units="counts",
                       lower_disp_limit=0, upper_disp_limit=100,
                       lower_ctrl_limit=0, upper_ctrl_limit=100)
    label = pvproperty(value="hello", dtype=ChannelType.STRING)
    mode = pvproperty(value="Off", dtype=ChannelType.ENUM, enum_strings=["Off", "On", "Auto"])
    wave = pvproperty(value=[float(i) for i in range(8)], dtype=float, max_length=8,
                      units="V", precision=2)
    short = pvproperty(value=-3, dtype=ChannelType.INT, units="steps")
    single = pvproperty(value=0.25, dtype=ChannelType.FLOAT, precision=2, units="A")
    chars = pvproperty(value=b"abc", dtype=ChannelType.CHAR, max_length=16)
    counter = pvproperty(value=0, dtype=int, read_only=True)
    # Its own alarm group: caproto shares one alarm per group and every write (the
    # counter's) re-evaluates it.
    alarm = pvproperty(value=12.0, dtype=float, alarm_group="alarmed")

    @counter.scan(period=0.1)
    async def counter(self, instance, async_lib):
        await instance.write(instance.value + 1)

    @alarm.startup
    async def alarm(self, instance, async_lib):
        await instance.alarm.write(status=AlarmStatus.HIHI,
                                   severity=AlarmSeverity.MAJOR_ALARM)


if __name__ == "__main__":
    ioc = BridgeIOC(prefix=sys.argv[1])
    print("caproto IOC serving", sorted(ioc.pvdb), flush=True)
    run(ioc.pvdb)
'''

PCASPY_IOC = '''\
"""pcaspy (CAS) IOC for the bridge tests (CA only, bound by EPICS_CAS_INTF_ADDR_LIST)."""
import sys
import time

from pcaspy import Alarm, Driver, Severity, SimpleServer

PVDB = {
    "temperature": {"type": "float", "prec": 3, "unit": "mm", "value": 1.5,
                    "lolim": -20.0, "hilim": 20.0, "lolo": -9.0, "low": -5.0,
                    "high": 5.0, "hihi": 9.0},
    "count": {"type": "int", "unit": "counts", "value": 7, "lolim": 0, "hilim": 100},
    "label": {"type": "string", "value": "hello"},
    "mode": {"type": "enum", "enums": ["Off", "On", "Auto"], "value": 0},
    "wave": {"type": "float", "count": 8, "prec": 2, "unit": "V",
             "value": [float(i) for i in range(8)]},
    "counter": {"type": "int", "value": 0},
    "alarm": {"type": "float", "value": 12.0},
    "fast": {"type": "int", "value": 0},
    "go": {"type": "int", "value": 0},
}
READ_ONLY = {"counter", "fast"}


class BridgeDriver(Driver):
    def write(self, reason, value):
        if reason in READ_ONLY:
            return False
        self.setParam(reason, value)
        self.updatePVs()
        return True


if __name__ == "__main__":
    server = SimpleServer()
    server.createPV(sys.argv[1], PVDB)
    driver = BridgeDriver()
    for reason in PVDB:  # pcas starts every PV in UDF/INVALID until it is written
        driver.setParamStatus(reason, Alarm.NO_ALARM, Severity.NO_ALARM)
    driver.setParamStatus("alarm", Alarm.HIHI_ALARM, Severity.MAJOR_ALARM)
    driver.updatePVs()
    print("pcaspy IOC running", flush=True)
    count, n, next_tick, stop_at = 0, 0, time.monotonic(), None
    while True:
        if driver.getParam("go") > 0 and stop_at is None:
            stop_at = time.monotonic() + driver.getParam("go")
        if stop_at is not None:
            for _ in range(16):
                n += 1
                driver.setParam("fast", n)
                driver.updatePVs()
            server.process(0)  # let CAS send and serve clients
            if time.monotonic() >= stop_at:
                stop_at = None
                driver.setParam("go", 0)
                driver.updatePVs()
        else:
            server.process(0.02)
        if time.monotonic() >= next_tick:
            next_tick += 0.1
            count += 1
            driver.setParam("counter", count)
            driver.updatePVs()
'''

# The probe runs in a client pod: a list of operations in, one JSON line out. p4p reads
# EPICS_PVA_* from its environment only.
PROBE = '''\
"""p4p probe for the bridge tests: python probe.py '<json list of operations>'."""
import json
import os
import sys
import threading
import time

import numpy
from p4p.client.thread import Context, Disconnected, TimeoutError


def plain(v):
    if isinstance(v, numpy.ndarray):
        return v.tolist()
    if isinstance(v, numpy.generic):
        return v.item()
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def snapshot(value):
    return {"id": value.getID(), "data": plain(value.todict())}


def run(ctx, op):
    name, kind, timeout = op["pv"], op["op"], op.get("timeout", 5.0)
    if kind == "get":
        return snapshot(ctx.get(name, timeout=timeout))
    if kind == "put":
        ctx.put(name, op["value"], timeout=timeout)
        return snapshot(ctx.get(name, timeout=timeout))
    if kind == "absent":
        try:
            ctx.get(name, timeout=timeout)
        except TimeoutError:
            return {"absent": True}
        return {"absent": False}
    if kind == "monitor":
        seen, done = [], threading.Event()

        def cb(v):
            seen.append(v if isinstance(v, Exception) else snapshot(v))
            if len([s for s in seen if isinstance(s, dict)]) >= op.get("updates", 3):
                done.set()

        sub = ctx.monitor(name, cb)
        done.wait(timeout)
        sub.close()
        return {"updates": [s for s in seen if isinstance(s, dict)]}
    if kind == "watch":  # monitor, recording disconnects, for at most op["seconds"]
        events, done = [], threading.Event()
        resumed = op.get("until_resumed")  # stop once this many values followed a disconnect

        def cb(v):
            stamp = round(time.monotonic(), 3)
            if isinstance(v, Disconnected):
                events.append([stamp, "disconnected", None])
            elif isinstance(v, Exception):
                events.append([stamp, type(v).__name__, str(v)])
            else:
                events.append([stamp, "value", plain(v.todict()["value"])])
            kinds = [e[1] for e in events]
            if resumed and "value" in kinds:
                cut = kinds.index("value")
                if "disconnected" in kinds[cut:]:
                    after = kinds[kinds.index("disconnected", cut):]
                    if after.count("value") >= resumed:
                        done.set()

        sub = ctx.monitor(name, cb, notify_disconnect=True)
        done.wait(op["seconds"])
        sub.close()
        return {"events": events}
    raise ValueError(kind)


def main():
    ops = json.loads(sys.argv[1])
    out = []
    with Context("pva", nt=False) as ctx:
        for op in ops:
            t0 = time.monotonic()
            try:
                res = {"ok": True, **run(ctx, op)}
            except Exception as exc:
                res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            res.update(op=op["op"], pv=op["pv"], elapsed=round(time.monotonic() - t0, 3))
            out.append(res)
    sys.stdout.write(json.dumps(out) + "\\n")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
'''


def _script(lab: Lab, name: str, text: str) -> Path:
    path = lab.tmpdir / name
    if not path.exists():
        path.write_text(text)
    return path


def ca_env(port: int = IOC_CA_PORT) -> dict[str, str]:
    """Sidecar mode's IOC environment: CA server on loopback only, on a moved port."""
    return {"EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1", "EPICS_CAS_SERVER_PORT": str(port),
            "EPICS_CA_SERVER_PORT": str(port)}  # caproto's server reads only this one


def pva_env(address: str, *, name_server: bool) -> dict[str, str]:
    """A PVA client's discovery settings for one bridge: by TCP name server or UDP."""
    if name_server:
        return {"EPICS_PVA_NAME_SERVERS": f"{address}:5075", "EPICS_PVA_ADDR_LIST": "",
                "EPICS_PVA_AUTO_ADDR_LIST": "NO"}
    return {"EPICS_PVA_ADDR_LIST": address, "EPICS_PVA_AUTO_ADDR_LIST": "NO"}


def _wait_listening(popen: subprocess.Popen[Any], tcp: int, what: str,
                    timeout: float = 20.0) -> None:
    """Wait (bounded) until the process listens on TCP ``tcp``; its log tail if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            log = Path(popen.log_path).read_text(errors="replace")  # type: ignore[attr-defined]
            raise LabError(f"{what} exited with {popen.returncode}:\n{log[-2000:]}")
        if tcp in listening_ports(popen.pid)["tcp"]:
            return
        time.sleep(0.05)
    raise LabError(f"{what} not listening on TCP {tcp} after {timeout} s")


def start_ioc(lab: Lab, pod: Pod, kind: str, prefix: str,
              port: int = IOC_CA_PORT) -> subprocess.Popen[bytes]:
    """A CA-only IOC (``caproto`` or ``pcaspy``) bound to 127.0.0.1:``port`` in ``pod``."""
    text = {"caproto": CAPROTO_IOC, "pcaspy": PCASPY_IOC}[kind]
    script = _script(lab, f"bridge_{kind}_ioc.py", text)
    popen = lab.spawn(pod, [sys.executable, str(script), prefix], ca_env(port),
                      stdin=subprocess.DEVNULL,
                      log=lab.tmpdir / f"{kind}-ioc-{pod.name}-{len(lab.processes)}.log")
    _wait_listening(popen, port, f"{kind} IOC")
    return popen


def start_bridge(lab: Lab, pod: Pod, *flags: str, ca_port: int = IOC_CA_PORT,
                 env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The bridge (the ``ioc-ca-pva-bridge`` console script) on the pod IP, as the
    operator's sidecar runs it; returns once it listens on TCP 5075."""
    argv = ["ioc-ca-pva-bridge", "--interface", pod.ip, "--server-port", "5075",
            "--broadcast-port", "5076", "--ca-addr-list", f"127.0.0.1:{ca_port}", *flags]
    popen = lab.spawn(pod, argv, dict(env or {}), stdin=subprocess.DEVNULL,
                      log=lab.tmpdir / f"bridge-{pod.name}-{len(lab.processes)}.log")
    _wait_listening(popen, 5075, "bridge")
    return popen


def probe(lab: Lab, pod: Pod, env: Mapping[str, str], ops: Sequence[dict[str, Any]],
          timeout: float = 60.0) -> list[dict[str, Any]]:
    """Run the p4p probe in ``pod`` with only ``env``; one result dict per operation."""
    script = _script(lab, "bridge_probe.py", PROBE)
    proc = lab.exec(pod, [sys.executable, str(script), json.dumps(list(ops))], env,
                    timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("["):
            results: list[dict[str, Any]] = json.loads(line)
            return results
    raise LabError(f"probe printed no result (rc {proc.returncode}): {proc.stderr[-2000:]}")
