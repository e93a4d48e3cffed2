"""The builtin CA gateway (ioc-ca-gateway) in sidecar position, end to end in the lab.

Each IOC pod runs a real CA server bound to 127.0.0.1:15064 (EPICS Base rsrv, caproto,
pcaspy/CAS) and the gateway on the pod IP, port 5064. A client pod on another node then
talks to the PVs through the gateway only, with libca (pyepics) via EPICS_CA_NAME_SERVERS
(TCP name server, empty address list) and via EPICS_CA_ADDR_LIST (UDP unicast), and with
caproto's client via EPICS_CA_ADDR_LIST (it ignores NAME_SERVERS). A second gateway in
the rsrv pod (port 5070) runs with -ro, a pvlist and a 1 s inactive timeout. A soft IOC
with 500 records behind freshly started gateways takes bursts of 500 names (issue 19,
item 9).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ioc_testbed import resource
from ioc_testbed.lab import EpicsServer, Lab, LabError, Pod, run_client, start_server
from ioc_testbed.lab.netns import listening_ports

IOC_NODE, CLIENT_NODE = 0, 1
GW_PORT, GW2_PORT, IOC_PORT = 5064, 5070, 15064
CLUSTER_IP = "198.19.0.64"
BIG = 20000  # elements of the big waveform: 160 kB, needs the extended CA header
IOC_ENV = {  # the IOC container's env in sidecar mode
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_SERVER_PORT": str(IOC_PORT),
    "EPICS_CA_SERVER_PORT": str(IOC_PORT),  # caproto's server reads only this one
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_CA_MAX_ARRAY_BYTES": "1000000",
}
PVLIST = """\
# served: everything but the string PV
EVALUATION ORDER ALLOW, DENY
.*            ALLOW
.*:str        DENY
"""

RICH_DB = """\
record(ai, "$(P)ai") {
    field(VAL, "9.5")
    field(EGU, "mA")
    field(PREC, "2")
    field(HOPR, "10")
    field(LOPR, "-10")
    field(HIHI, "9")
    field(HHSV, "MAJOR")
    field(PINI, "YES")
}
record(ao, "$(P)ao") {
    field(VAL, "1.5")
    field(EGU, "V")
    field(PREC, "3")
    field(HOPR, "100")
    field(LOPR, "-100")
    field(DRVH, "50")
    field(DRVL, "-50")
    field(PINI, "YES")
}
record(bo, "$(P)bo") {
    field(ZNAM, "Off")
    field(ONAM, "On")
    field(VAL, "1")
    field(PINI, "YES")
}
record(mbbo, "$(P)mbbo") {
    field(ZRST, "Off")
    field(ONST, "On")
    field(TWST, "Auto")
    field(VAL, "2")
    field(PINI, "YES")
}
record(waveform, "$(P)wave") {
    field(FTVL, "DOUBLE")
    field(NELM, "16")
    field(INP, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])
    field(PINI, "YES")
}
record(waveform, "$(P)big") {
    field(FTVL, "DOUBLE")
    field(NELM, "20000")
}
record(stringout, "$(P)str") {
    field(VAL, "hello gateway")
    field(PINI, "YES")
}
record(calc, "$(P)counter") {
    field(SCAN, ".1 second")
    field(INPA, "$(P)counter NPP")
    field(CALC, "A+1")
}
"""



CLIENT = r'''
"""Gateway checks from a client pod; prints JSON. argv: mode lib prefix [timeout]."""
import json
import os
import sys
import threading
import time

import numpy

MODE, LIB, PREFIX = sys.argv[1:4]
TIMEOUT = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0
BIG = 20000
KEYS = ("ai", "ao", "bo", "mbbo", "wave", "big", "str", "counter")
RESTORE = {"ao": 1.5, "mbbo": 2, "str": "hello gateway"}


def plain(value):
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not isinstance(
            value, str):  # numpy arrays, caproto's DbrStringArray
        return [plain(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


def wait_for(cond, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        time.sleep(0.01)
    return cond()


def emit(doc):
    sys.stdout.write(json.dumps(plain(doc)) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------ pyepics (libca)
def pyepics_channels(keys):
    from epics import ca
    chids = {k: ca.create_channel(PREFIX + k, connect=False, auto_cb=False) for k in keys}
    deadline = time.monotonic() + TIMEOUT
    ok = {k: bool(ca.connect_channel(c, timeout=max(0.05, deadline - time.monotonic())))
          for k, c in chids.items()}
    return ca, chids, ok


def pyepics_check():
    from epics import dbr
    ca, ch, connected = pyepics_channels(KEYS)
    out = {"connected": connected}
    if not all(connected.values()):
        return out
    get = lambda k, **kw: plain(ca.get(ch[k], timeout=TIMEOUT, **kw))
    out["value"] = {k: get(k) for k in ("ai", "ao", "bo", "mbbo", "wave", "str")}
    out["enum_string"] = get("mbbo", ftype=dbr.STRING)  # the IOC converts, not the client
    out["wave3"] = get("wave", count=3)
    out["native"] = {k: [dbr.Name(ca.field_type(ch[k])), ca.element_count(ch[k])] for k in KEYS}
    out["time"] = {k: ca.get_timevars(ch[k], timeout=TIMEOUT) for k in ("ai", "ao")}
    out["ctrl"] = {k: ca.get_ctrlvars(ch[k], timeout=TIMEOUT) for k in ("ai", "ao", "bo", "mbbo")}
    tw = ca.get_with_metadata(ch["wave"], ftype=dbr.TIME_DOUBLE, count=4, timeout=TIMEOUT)
    out["time_wave"] = {"value": tw["value"], "timestamp": tw["timestamp"]}
    out["write_access"] = {k: bool(ca.write_access(ch[k])) for k in ("ao", "str", "ai")}
    seen, ctrl_seen = [], []

    def on_counter(value=None, timestamp=None, **kw):
        seen.append((float(value), timestamp))

    def on_ao(**kw):
        ctrl_seen.append({k: kw.get(k) for k in ("value", "units", "precision")})

    # pyepics frees the C callback with the returned tuple: keep them
    out["_subs"] = [ca.create_subscription(ch["counter"], use_time=True, callback=on_counter),
                    ca.create_subscription(ch["ao"], use_ctrl=True, callback=on_ao)]
    wait_for(lambda: len(seen) >= 4 and ctrl_seen, TIMEOUT)
    out["puts"] = {}
    for key, value in (("ao", 4.25), ("mbbo", 1), ("str", "via libca")):
        ca.put(ch[key], value, wait=True, timeout=TIMEOUT)
        out["puts"][key] = get(key, ftype=dbr.STRING) if key == "mbbo" else get(key)
    ca.put(ch["big"], numpy.arange(BIG, dtype=float), wait=True, timeout=TIMEOUT)
    big = numpy.asarray(ca.get(ch["big"], timeout=TIMEOUT))
    out["puts"]["big"] = [len(big), float(big.sum())]
    wait_for(lambda: any(u["value"] == 4.25 for u in ctrl_seen), TIMEOUT)
    out["monitor"] = seen[:6]
    out["ctrl_monitor"] = ctrl_seen[-1:]
    del out["_subs"]
    for key, value in RESTORE.items():  # the next run starts from the same state
        ca.put(ch[key], value, wait=True, timeout=TIMEOUT)
    return out


def pyepics_readonly():
    ca, ch, connected = pyepics_channels(("ao",))
    out = {"connected": connected}
    if not connected["ao"]:
        return out
    before = float(ca.get(ch["ao"], timeout=TIMEOUT))
    out["write_access"] = bool(ca.write_access(ch["ao"]))
    try:
        ca.put(ch["ao"], before + 11.0, wait=True, timeout=TIMEOUT)
        out["put"] = "accepted"
    except Exception as exc:
        out["put"] = f"refused: {type(exc).__name__}: {exc}"
    out["before"], out["after"] = before, float(ca.get(ch["ao"], timeout=TIMEOUT))
    return out


def pyepics_connect():
    keys = sys.argv[5].split(",")
    _ca, _ch, connected = pyepics_channels(keys)
    return {"connected": connected}


def pyepics_watch():
    """Until stdin closes: print connection changes and counter updates as JSON lines."""
    from epics import ca
    name = PREFIX + "counter"
    state = {"last": 0.0}

    def on_conn(pvname=None, chid=None, conn=None):
        emit({"event": "conn", "ok": bool(conn), "t": time.time()})

    def on_value(value=None, **kw):
        if time.monotonic() - state["last"] > 0.3:  # a few lines per second is plenty
            state["last"] = time.monotonic()
            emit({"event": "value", "value": float(value), "t": time.time()})

    chid = ca.create_channel(name, connect=False, callback=on_conn, auto_cb=False)
    ca.connect_channel(chid, timeout=TIMEOUT)
    subscription = ca.create_subscription(chid, callback=on_value)
    sys.stdin.read()
    return subscription


# ------------------------------------------------------------------ caproto
def scalar(data):
    data = plain(data)
    return data[0] if isinstance(data, list) and len(data) == 1 else data


def writable(pv):
    return bool(int(pv.access_rights) & 2)


def caproto_pvs(keys):
    from caproto.threading.client import Context
    ctx = Context()
    pvs = dict(zip(keys, ctx.get_pvs(*[PREFIX + k for k in keys], timeout=TIMEOUT)))
    ok = {}
    deadline = time.monotonic() + TIMEOUT
    for k, pv in pvs.items():
        try:
            pv.wait_for_connection(timeout=max(0.05, deadline - time.monotonic()))
            ok[k] = True
        except Exception:
            ok[k] = False
    return ctx, pvs, ok


def caproto_check():
    _ctx, pv, connected = caproto_pvs(KEYS)
    out = {"connected": connected}
    if not all(connected.values()):
        return out
    out["value"] = {k: scalar(pv[k].read(timeout=TIMEOUT).data) for k in
                    ("ai", "ao", "bo", "mbbo", "wave", "str")}
    out["wave3"] = plain(pv["wave"].read(data_count=3, timeout=TIMEOUT).data)
    out["native"] = {k: [pv[k].channel.native_data_type.name, pv[k].channel.native_data_count]
                     for k in KEYS}
    t = pv["ai"].read(data_type="time", timeout=TIMEOUT).metadata
    out["time"] = {"ai": {"status": int(t.status), "severity": int(t.severity),
                          "timestamp": t.timestamp}}
    c = pv["ai"].read(data_type="control", timeout=TIMEOUT).metadata
    out["ctrl"] = {"ai": {"units": c.units, "precision": c.precision,
                          "upper_disp_limit": c.upper_disp_limit,
                          "lower_disp_limit": c.lower_disp_limit}}
    e = pv["mbbo"].read(data_type="control", timeout=TIMEOUT).metadata
    out["ctrl"]["mbbo"] = {"enum_strs": [s.decode() for s in e.enum_strings[:e.no_str]]}
    out["write_access"] = {k: writable(pv[k]) for k in ("ao", "str", "ai")}
    seen = []

    def on_counter(sub, response):
        seen.append((float(response.data[0]), response.metadata.timestamp))

    sub = pv["counter"].subscribe(data_type="time")
    sub.add_callback(on_counter)  # caproto holds callbacks weakly: on_counter stays in scope
    wait_for(lambda: len(seen) >= 4, TIMEOUT)
    out["monitor"] = seen[:6]
    out["puts"] = {}
    for key, value in (("ao", [4.75]), ("mbbo", [0]), ("str", ["via caproto"])):
        pv[key].write(value, wait=True, timeout=TIMEOUT)
        out["puts"][key] = scalar(pv[key].read(timeout=TIMEOUT).data)
    out["puts"]["mbbo_string"] = scalar(pv["mbbo"].read(data_type=0, timeout=TIMEOUT).data)
    pv["big"].write(numpy.arange(BIG, dtype=float) * 2, wait=True, timeout=TIMEOUT)
    big = numpy.asarray(pv["big"].read(timeout=TIMEOUT).data)
    out["puts"]["big"] = [len(big), float(big.sum())]
    for key, value in RESTORE.items():
        pv[key].write([value], wait=True, timeout=TIMEOUT)
    return out


def caproto_readonly():
    _ctx, pv, connected = caproto_pvs(("ao",))
    out = {"connected": connected}
    if not connected["ao"]:
        return out
    before = float(pv["ao"].read(timeout=TIMEOUT).data[0])
    out["write_access"] = writable(pv["ao"])
    try:  # caproto reports a refused put in the response status, not by raising
        status = pv["ao"].write([before + 11.0], wait=True, timeout=TIMEOUT).status
        out["put"] = "accepted" if status.success else f"refused: {status.name}"
    except Exception as exc:
        out["put"] = f"refused: {type(exc).__name__}: {exc}"
    out["before"], out["after"] = before, float(pv["ao"].read(timeout=TIMEOUT).data[0])
    return out


def caproto_connect():
    _ctx, _pv, connected = caproto_pvs(sys.argv[5].split(","))
    return {"connected": connected}


def caproto_watch():
    from caproto.threading.client import Context
    ctx = Context()
    state = {"last": 0.0}

    def on_conn(pv, conn_state):
        emit({"event": "conn", "ok": conn_state == "connected", "t": time.time()})

    def on_value(sub, response):
        if time.monotonic() - state["last"] > 0.3:
            state["last"] = time.monotonic()
            emit({"event": "value", "value": float(response.data[0]), "t": time.time()})

    (pv,) = ctx.get_pvs(PREFIX + "counter", connection_state_callback=on_conn)
    pv.subscribe().add_callback(on_value)
    sys.stdin.read()
    return on_conn, on_value  # caproto holds callbacks weakly


if __name__ == "__main__":
    watchdog = threading.Timer(6 * TIMEOUT + 60, lambda: os._exit(3))
    watchdog.daemon = True
    watchdog.start()
    try:
        result = globals()[f"{LIB}_{MODE}"]()
        if MODE != "watch":
            emit(result)
        code = 0
    except Exception as exc:
        import traceback
        traceback.print_exc()
        emit({"error": f"{type(exc).__name__}: {exc}", "connected": {}})
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # libca and caproto threads must not delay the exit
'''


# ---------------------------------------------------------------------------- helpers
@dataclass
class GatewayPod:
    """An IOC pod: the IOC on loopback, the gateway on the pod IP."""

    name: str
    pod: Pod
    ioc: EpicsServer
    gateway: subprocess.Popen[bytes]
    prefix: str


def name_server_env(pod: Pod, port: int = GW_PORT) -> dict[str, str]:
    return {"EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CA_ADDR_LIST": "",
            "EPICS_CA_NAME_SERVERS": f"{pod.ip}:{port}", "EPICS_CA_MAX_ARRAY_BYTES": "1000000"}


def addr_list_env(pod: Pod, port: int = GW_PORT) -> dict[str, str]:
    return {"EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CA_ADDR_LIST": f"{pod.ip}:{port}",
            "EPICS_CA_MAX_ARRAY_BYTES": "1000000"}


def wait_until(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := cond():
            return result
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_ioc(lab: Lab, pod: Pod, kind: str, prefix: str) -> EpicsServer:
    """Start one of this module's IOCs (rsrv database, caproto or pcaspy script)."""
    workdir = lab.tmpdir / "gateway-test"
    workdir.mkdir(exist_ok=True)
    if kind == "rsrv":
        db = workdir / "rich.db"
        db.write_text(RICH_DB)
        argv = [sys.executable, "-m", "epicscorelibs.ioc", "-m", f"P={prefix}", "-d", str(db)]
        lab_kind, protocols, stdin = "softioc-classic", ("ca", "pva"), subprocess.PIPE
    else:
        argv = [sys.executable, str(resource("iocs") / f"gateway_{kind}_ioc.py"), prefix]
        lab_kind, protocols, stdin = kind, ("ca",), subprocess.DEVNULL
    popen = lab.spawn(pod, argv, IOC_ENV, stdin=stdin, log=lab.tmpdir / f"ioc-{pod.name}.log")
    return EpicsServer(lab=lab, kind=lab_kind, prefix=prefix, ns=pod.ns, env=IOC_ENV,
                       popen=popen, protocols=protocols)


def start_gateway(lab: Lab, pod: Pod, port: int, *extra: str,
                  tag: str = "gw") -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "ioc_operator.gateways.ca_gateway", "-sip", pod.ip,
            "-sport", str(port), "-cip", "127.0.0.1", "-cport", str(IOC_PORT), "-v", *extra]
    return lab.spawn(pod, argv, {}, stdin=subprocess.DEVNULL,
                     log=lab.tmpdir / f"{tag}-{pod.name}-{port}.log")


def wait_gateway(proc: subprocess.Popen[bytes], port: int) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            log = Path(proc.log_path).read_text()  # type: ignore[attr-defined]
            raise LabError(f"gateway exited with {proc.returncode}:\n{log[-2000:]}")
        ports = listening_ports(proc.pid)
        return port in ports["tcp"] and port in ports["udp"]

    wait_until(ready, 20, f"the gateway on port {port}")


def run_script(lab: Lab, client: Pod, mode: str, lib: str, prefix: str, env: dict[str, str],
               timeout: float = 5.0, *extra: str) -> dict[str, Any]:
    """Run the client script once in the client pod; its JSON result."""
    script = lab.tmpdir / "gateway-test" / "client.py"
    argv = [sys.executable, str(script), mode, lib, prefix, str(timeout), *extra]
    proc = lab.exec(client, argv, env, timeout=6 * timeout + 70)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"{lib} {mode} {prefix}: no result (rc {proc.returncode}):\n"
                         f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _address(hex_address: str) -> tuple[str, int]:
    ip, port = hex_address.split(":")
    return ".".join(str(int(ip[i:i + 2], 16)) for i in (6, 4, 2, 0)), int(port, 16)


def bound(pid: int) -> set[tuple[str, str, int]]:
    """(protocol, address, port) of the IPv4 TCP listeners and UDP sockets of ``pid``."""
    inodes = _socket_inodes(pid)
    out = set()
    for proto in ("tcp", "udp"):
        for line in Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] in inodes and (proto == "udp" or cols[3] == "0A"):
                out.add((proto, *_address(cols[1])))
    return out


def upstream_connections(pid: int) -> int:
    """Established TCP connections of ``pid`` to the IOC port (from /proc, no traffic)."""
    inodes = _socket_inodes(pid)
    count = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        remote_port = int(cols[2].rsplit(":", 1)[1], 16)
        if cols[9] in inodes and cols[3] == "01" and remote_port == IOC_PORT:
            count += 1
    return count


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def site(lab: Lab) -> Iterator[dict[str, Any]]:
    """IOC pods (rsrv, caproto, pcaspy, and a lab softioc-pvxs for restarts) with gateways,
    a second gateway (-ro, pvlist, 1 s inactive timeout) on the rsrv pod, a client pod."""
    (lab.tmpdir / "gateway-test").mkdir(exist_ok=True)
    (lab.tmpdir / "gateway-test" / "client.py").write_text(CLIENT)
    pvlist = lab.tmpdir / "gateway-test" / "pvlist"
    pvlist.write_text(PVLIST)
    pods = {kind: lab.add_pod(IOC_NODE, name=f"gw-{kind}") for kind in
            ("rsrv", "caproto", "pcaspy", "restart")}
    iocs = {kind: start_ioc(lab, pods[kind], kind, f"GW{kind.upper()}:")
            for kind in ("rsrv", "caproto", "pcaspy")}
    iocs["restart"] = start_server(lab, pods["restart"], "softioc-pvxs", "GWRESTART:",
                                   IOC_ENV, wait=False)
    for server in iocs.values():
        server.wait_ready(30)
    gateways = {kind: start_gateway(lab, pod, GW_PORT) for kind, pod in pods.items()}
    second = start_gateway(lab, pods["rsrv"], GW2_PORT, "-ro", "-pvlist", str(pvlist),
                           "-inactive_timeout", "1", tag="gw2")
    for proc in gateways.values():
        wait_gateway(proc, GW_PORT)
    wait_gateway(second, GW2_PORT)
    yield {
        "pods": {k: GatewayPod(k, pods[k], iocs[k], gateways[k], iocs[k].prefix) for k in pods},
        "second": second,
        "pvlist": pvlist,
        "client": lab.add_pod(CLIENT_NODE, name="gw-client"),
    }


# ---------------------------------------------------------------------------- the checks
def check_full(result: dict[str, Any], kind: str, lib: str) -> None:
    """What every client must see through the gateway, whichever IOC serves the PVs."""
    where = f"{kind}/{lib}"
    assert all(result["connected"].values()), f"{where}: not connected {result['connected']}"
    values = result["value"]
    assert values["ai"] == pytest.approx(9.5), where
    assert values["ao"] == pytest.approx(1.5), where
    assert values["bo"] == 1 and values["mbbo"] == 2, where
    assert values["wave"] == [float(i) for i in range(16)], where
    assert values["str"] == "hello gateway", where
    if lib == "pyepics":
        assert result["enum_string"] == "Auto", f"{where}: DBR_STRING of an enum"
    assert result["wave3"] == [0.0, 1.0, 2.0], f"{where}: requested count not honoured"
    native = {k: v[0].upper() for k, v in result["native"].items()}
    assert native["ai"].endswith("DOUBLE") and native["mbbo"].endswith("ENUM"), where
    assert native["str"].endswith("STRING"), where
    assert result["native"]["wave"][1] == 16 and result["native"]["big"][1] == BIG, where
    # DBR_TIME: alarm status/severity and a fresh timestamp, straight from the IOC
    ai_time = result["time"]["ai"]
    assert ai_time["severity"] == 2 and ai_time["status"] == 3, f"{where}: {ai_time}"
    assert abs(ai_time["timestamp"] - time.time()) < 3600, where
    # DBR_CTRL: units, precision, limits, enum strings
    ai_ctrl = result["ctrl"]["ai"]
    assert ai_ctrl["units"] == "mA" and ai_ctrl["precision"] == 2, f"{where}: {ai_ctrl}"
    assert ai_ctrl["upper_disp_limit"] == 10 and ai_ctrl["lower_disp_limit"] == -10, where
    assert result["ctrl"]["mbbo"]["enum_strs"] == ["Off", "On", "Auto"], where
    # access rights come from the IOC: caproto's read_only ai is read-only for clients too
    assert result["write_access"] == {"ao": True, "str": True, "ai": kind != "caproto"}, where
    # monitor with DBR_TIME: increasing counter, increasing timestamps
    updates = result["monitor"]
    assert len(updates) >= 4, f"{where}: {len(updates)} monitor updates"
    values_seen = [v for v, _ in updates]
    assert values_seen == sorted(values_seen) and len(set(values_seen)) >= 3, where
    assert all(t2 >= t1 for (_, t1), (_, t2) in itertools.pairwise(updates)), where
    # puts with callback, read back; the big array needs the extended header both ways
    puts = result["puts"]
    if lib == "pyepics":
        assert puts["ao"] == pytest.approx(4.25) and puts["mbbo"] == "On", f"{where}: {puts}"
        assert puts["str"] == "via libca", where
        assert puts["big"] == [BIG, float(sum(range(BIG)))], where
        ctrl = result["ctrl_monitor"][-1]
        assert ctrl["value"] == pytest.approx(4.25) and ctrl["units"] == "V", f"{where}: {ctrl}"
        assert result["ctrl"]["bo"]["enum_strs"] == ["Off", "On"], where
        assert result["ctrl"]["ao"]["precision"] == 3, where
        assert result["time_wave"]["value"] == [0.0, 1.0, 2.0, 3.0], where
    else:
        assert puts["ao"] == pytest.approx(4.75) and puts["mbbo"] == 0, f"{where}: {puts}"
        assert puts["mbbo_string"] == "Off" and puts["str"] == "via caproto", f"{where}: {puts}"
        assert puts["big"] == [BIG, 2.0 * sum(range(BIG))], where


def test_servers_bind_where_sidecar_mode_puts_them(site: dict[str, Any]):
    """Every IOC's CA server (rsrv, caproto, pcas) serves on 127.0.0.1:15064 only, even in
    a /32 pod without broadcast (pcas included); the gateway serves on the pod IP."""
    for kind, gp in site["pods"].items():
        sockets = bound(gp.ioc.pid)
        ca_sockets = {s for s in sockets if s[2] == IOC_PORT}
        assert ("tcp", "127.0.0.1", IOC_PORT) in ca_sockets, (kind, sockets)
        assert {addr for _, addr, _ in ca_sockets} == {"127.0.0.1"}, (kind, sockets)
        assert bound(gp.gateway.pid) >= {("tcp", gp.pod.ip, GW_PORT), ("udp", gp.pod.ip, GW_PORT)}


RUNS = (("pyepics", "name server"), ("pyepics", "address list"), ("caproto", "address list"))


def test_gets_puts_monitors_and_metadata_through_the_gateway(lab: Lab, site: dict[str, Any]):
    """rsrv, caproto and pcaspy IOCs on loopback, every client route through the gateway.

    The runs against one IOC are sequential (they put to the same PVs); the IOCs are
    checked in parallel.
    """
    client = site["client"]

    def runs_for(kind: str) -> list[tuple[str, str, dict[str, Any], float]]:
        gp: GatewayPod = site["pods"][kind]
        out = []
        for lib, route in RUNS:
            env = name_server_env(gp.pod) if route == "name server" else addr_list_env(gp.pod)
            start = time.monotonic()
            result = run_script(lab, client, "check", lib, gp.prefix, env)
            out.append((lib, route, result, time.monotonic() - start))
        return out

    kinds = ("rsrv", "caproto", "pcaspy")
    with ThreadPoolExecutor(max_workers=len(kinds)) as pool:
        results = dict(zip(kinds, pool.map(runs_for, kinds), strict=True))
    failures = []
    for kind, runs in results.items():
        for lib, route, result, seconds in runs:
            print(f"{kind:8} {lib:8} via {route:13} {seconds:5.1f} s  "
                  f"connected={all(result['connected'].values())}")
            try:
                check_full(result, kind, lib)
            except AssertionError as exc:
                failures.append(f"{kind} {lib} via {route}: {exc}\n{json.dumps(result)[:3000]}")
    assert not failures, "\n\n".join(failures)


def test_libca_7_through_the_name_server(lab: Lab, site: dict[str, Any]):
    """libca from EPICS 7.0 (epicscorelibs) too, not only pyepics' bundled 3.16 libca."""
    for kind in ("rsrv", "caproto", "pcaspy"):
        gp: GatewayPod = site["pods"][kind]
        env = name_server_env(gp.pod)
        for op, pv in (("get", "wave"), ("monitor", "counter")):
            res = run_client(lab, site["client"], "pyepics-base7", op, gp.prefix + pv, env)
            assert res.ok, (kind, op, res.error, res.stderr)
        assert res.results[0]["updates"] >= 2


def test_through_a_cluster_ip(lab: Lab, site: dict[str, Any]):
    """How clients reach it in a cluster: a Service (DNAT, no SNAT) in front of the pod.
    Search replies say "use the sender's address", which conntrack maps back."""
    gp: GatewayPod = site["pods"]["rsrv"]
    lab.add_service(CLUSTER_IP, [("tcp", GW_PORT, GW_PORT), ("udp", GW_PORT, GW_PORT)],
                    gp.pod.ip)
    try:
        routes = {
            "pyepics": {"EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CA_ADDR_LIST": "",
                        "EPICS_CA_NAME_SERVERS": f"{CLUSTER_IP}:{GW_PORT}"},
            "caproto": {"EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CA_ADDR_LIST": CLUSTER_IP},
        }
        for lib, env in routes.items():
            for op, pv in (("get", "ai"), ("monitor", "counter")):
                res = run_client(lab, site["client"], lib, op, gp.prefix + pv, env)
                assert res.ok, (lib, op, res.error, res.stderr)
    finally:
        lab.remove_service(CLUSTER_IP)


def test_read_only_gateway_refuses_puts(lab: Lab, site: dict[str, Any]):
    gp: GatewayPod = site["pods"]["rsrv"]
    client = site["client"]
    routes = (("pyepics", name_server_env(gp.pod, GW2_PORT)),
              ("caproto", addr_list_env(gp.pod, GW2_PORT)))
    for lib, env in routes:
        result = run_script(lab, client, "readonly", lib, gp.prefix, env)
        assert result["connected"] == {"ao": True}, (lib, result)
        assert result["write_access"] is False, (lib, result)
        assert result["put"].startswith("refused"), (lib, result)
        assert result["after"] == result["before"], (lib, result)
    # the same PV is writable through the pod's normal gateway
    result = run_script(lab, client, "connect", "pyepics", gp.prefix,
                        name_server_env(gp.pod), 5.0, "ao")
    assert result["connected"] == {"ao": True}


def test_pvlist_deny_hides_a_pv(lab: Lab, site: dict[str, Any]):
    gp: GatewayPod = site["pods"]["rsrv"]
    client = site["client"]
    for lib, env in (("pyepics", name_server_env(gp.pod, GW2_PORT)),
                     ("pyepics", addr_list_env(gp.pod, GW2_PORT)),
                     ("caproto", addr_list_env(gp.pod, GW2_PORT))):
        result = run_script(lab, client, "connect", lib, gp.prefix, env, 2.0, "ao,str")
        assert result["connected"] == {"ao": True, "str": False}, (lib, env, result)
    # the normal gateway of the same pod serves it, and never answers for unknown names
    result = run_script(lab, client, "connect", "pyepics", gp.prefix, name_server_env(gp.pod),
                        2.0, "str,nosuch")
    assert result["connected"] == {"str": True, "nosuch": False}


def test_idle_upstream_channel_is_dropped(lab: Lab, site: dict[str, Any]):
    """-inactive_timeout 1: once the last client is gone the channel is cleared on the
    IOC, and the idle circuit to the IOC is closed too."""
    gp: GatewayPod = site["pods"]["rsrv"]
    second: subprocess.Popen[bytes] = site["second"]
    log_path = Path(second.log_path)  # type: ignore[attr-defined]
    result = run_script(lab, site["client"], "connect", "pyepics", gp.prefix,
                        name_server_env(gp.pod, GW2_PORT), 5.0, "wave")
    assert result["connected"] == {"wave": True}
    gone = time.monotonic()
    wait_until(lambda: f"dropping idle upstream channel {gp.prefix}wave" in log_path.read_text(),
               6, "the idle channel to be dropped")
    dropped_after = time.monotonic() - gone
    wait_until(lambda: upstream_connections(second.pid) == 0, 6,
               "the idle upstream circuit to close")
    print(f"idle channel dropped {dropped_after:.1f} s after the client left")
    assert second.poll() is None


def _watch(lab: Lab, client: Pod, lib: str, prefix: str,
           env: dict[str, str]) -> subprocess.Popen[bytes]:
    script = lab.tmpdir / "gateway-test" / "client.py"
    return lab.spawn(client, [sys.executable, str(script), "watch", lib, prefix, "5"], env,
                     log=lab.tmpdir / f"watch-{lib}-{len(lab.processes)}.log")


def _events(proc: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
    text = Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_ioc_restart_disconnects_and_clients_reconnect(lab: Lab, site: dict[str, Any]):
    gp: GatewayPod = site["pods"]["restart"]
    client = site["client"]
    watchers = {
        "pyepics via name server": _watch(lab, client, "pyepics", gp.prefix,
                                          name_server_env(gp.pod)),
        "pyepics via address list": _watch(lab, client, "pyepics", gp.prefix,
                                           addr_list_env(gp.pod)),
        "caproto via address list": _watch(lab, client, "caproto", gp.prefix,
                                           addr_list_env(gp.pod)),
    }
    try:
        for name, proc in watchers.items():
            wait_until(lambda p=proc: any(e["event"] == "value" for e in _events(p)), 15,
                       f"{name}: first update")
        gp.ioc.stop()
        stopped = time.time()
        for name, proc in watchers.items():
            wait_until(lambda p=proc: any(e["event"] == "conn" and not e["ok"]
                                          for e in _events(p)), 10, f"{name}: disconnect")
        ioc = start_server(lab, gp.pod, "softioc-pvxs", gp.prefix, IOC_ENV)
        site["pods"]["restart"].ioc = ioc
        started = time.time()
        for name, proc in watchers.items():
            def back(p: subprocess.Popen[bytes] = proc) -> float | None:
                for e in _events(p):
                    if e["event"] == "value" and e["t"] > started:
                        return float(e["t"])
                return None

            t_back = wait_until(back, 30, f"{name}: updates after the restart")
            print(f"{name}: updates again {t_back - started:.1f} s after the IOC restarted "
                  f"({started - stopped:.1f} s down)")
    finally:
        for proc in watchers.values():
            lab.stop(proc)
    assert gp.gateway.poll() is None, "the gateway must survive its IOC restarting"


BURST = 500  # names read at once, as in issue 19 item 9 (a 500-PV IOC)
SMALL_SEND_BUFFER = "4096 4096 4096"  # net.ipv4.tcp_wmem of one client pod (per netns)


@pytest.fixture(scope="module")
def burst(lab: Lab) -> Iterator[dict[str, Any]]:
    """A soft IOC with BURST records on loopback (sidecar position, no gateway yet), a
    client pod, and a client pod whose TCP send buffers are 4 kB."""
    workdir = lab.tmpdir / "gateway-test"
    workdir.mkdir(exist_ok=True)
    db = workdir / "burst.db"
    db.write_text("".join(f'record(ao, "$(P)v{i}") {{ field(VAL, "{i}") }}\n'
                          for i in range(BURST)))
    pod = lab.add_pod(IOC_NODE, name="gw-burst")
    popen = lab.spawn(pod, [sys.executable, "-m", "epicscorelibs.ioc", "-m", "P=BURST:",
                            "-d", str(db)], IOC_ENV, stdin=subprocess.PIPE,
                      log=lab.tmpdir / "ioc-burst.log")
    EpicsServer(lab=lab, kind="softioc-classic", prefix="BURST:", ns=pod.ns, env=IOC_ENV,
                popen=popen, protocols=("ca", "pva")).wait_ready(30)
    names = workdir / "burst-names"
    names.write_text("\n".join(f"BURST:v{i}" for i in range(BURST)))
    small = lab.add_pod(CLIENT_NODE, name="gw-small-buf")
    lab.exec(small, ["sysctl", "-w", f"net.ipv4.tcp_wmem={SMALL_SEND_BUFFER}"], {}, timeout=10)
    yield {"pod": pod, "names": names, "client": lab.add_pod(CLIENT_NODE, name="gw-burst-c"),
           "small": small}


def fresh_gateway(lab: Lab, pod: Pod, tag: str) -> subprocess.Popen[bytes]:
    """A gateway that has never looked anything up (no -v: its log must not slow it)."""
    argv = [sys.executable, "-m", "ioc_operator.gateways.ca_gateway", "-sip", pod.ip,
            "-sport", str(GW_PORT), "-cip", "127.0.0.1", "-cport", str(IOC_PORT)]
    proc = lab.spawn(pod, argv, {}, stdin=subprocess.DEVNULL,
                     log=lab.tmpdir / f"{tag}-{pod.name}.log")
    wait_gateway(proc, GW_PORT)
    return proc


def test_a_fresh_gateway_answers_a_burst_of_searches_in_few_datagrams(lab: Lab,
                                                                     burst: dict[str, Any]):
    """Issue 19 item 9. Names the gateway had to look up were answered one datagram each
    (500 for 500 names): caproto's threading client sends one create-channel write per
    reply datagram, and its UDP receive buffer dropped ~100 of the 500 (RcvbufErrors),
    names it then connected only after its timeout. rsrv, and the gateway for names it
    already knew, answer each search datagram with one or two."""
    def probe() -> dict[str, Any]:
        proc = lab.exec(burst["client"], [
            sys.executable, "-m", "ioc_testbed.lab.ca_search_probe",
            "--to", f"{burst['pod'].ip}:{GW_PORT}", "--names-from", str(burst["names"])],
            {}, timeout=30)
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))

    gateway = fresh_gateway(lab, burst["pod"], "gw-fresh")
    try:
        fresh = probe()  # every name looked up upstream first
        warm = probe()  # every name cached
    finally:
        lab.stop(gateway)
    print(f"fresh gateway: {fresh}; warm: {warm}")
    for result in (fresh, warm):
        assert result["answered"] == BURST, result
        # measured: fresh 13-16, warm 17, rsrv 12-17 for 9 request datagrams; before: 500
        assert result["reply_datagrams"] <= BURST // 10, result
        assert result["largest"] > 1, result


def test_caproto_reads_a_burst_through_a_fresh_gateway_with_small_send_buffers(
        lab: Lab, burst: dict[str, Any]):
    """Issue 19 item 9: caproto's threading client writes each batch of create-channel
    requests with sendall() on a non-blocking socket (caproto/threading/client.py), so a
    full send buffer raises BlockingIOError and kills its search-results thread: every
    name not yet created stays unconnected. 4 kB send buffers make that deterministic:
    before the fix 20 of 20 runs failed (5-129 of 500 read); directly from the IOC 0 of
    20; now 0 of 20 (and 0 of 20 with 8 kB)."""
    env = {"EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CA_ADDR_LIST": burst["pod"].ip}
    names = burst["names"].read_text().split()
    for run in range(2):
        gateway = fresh_gateway(lab, burst["pod"], f"gw-small-{run}")
        try:
            res = run_client(lab, burst["small"], "caproto", "get", names, env, timeout=5.0)
        finally:
            lab.stop(gateway)
        read = sum(1 for r in res.results if r["ok"])
        assert read == BURST, f"run {run}: {read}/{BURST} read\n{res.stderr}"


def test_gateway_exits_cleanly_on_sigterm(lab: Lab, site: dict[str, Any]):
    second: subprocess.Popen[bytes] = site["second"]
    assert second.poll() is None
    start = time.monotonic()
    assert lab.stop(second, grace=5.0) == 0  # SIGTERM
    assert time.monotonic() - start < 3
    assert "stopping" in Path(second.log_path).read_text()  # type: ignore[attr-defined]
