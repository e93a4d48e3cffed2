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

from . import resource
from .lab.netns import Lab, LabError, Pod, listening_ports

__all__ = [
    "IOC_CA_PORT",
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
    script = resource("iocs") / f"bridge_{kind}_ioc.py"
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
