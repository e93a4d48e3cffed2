"""The CA-to-PVA bridge (ioc_operator.gateways.bridge) in the lab, as sidecar mode runs it:
a CA-only IOC on 127.0.0.1:15064 in a pod, the bridge on the pod IP (TCP 5075, UDP 5076),
and p4p clients in a pod on another node that know only the pod IP.

Two IOC pods: a caproto IOC behind a bridge with a short --inactive-timeout, and a pcaspy
(CAS) IOC behind a --read-only bridge with a --pvlist. Everything is real: servers,
clients, sockets.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ioc_operator.gateways.bridge_nt import POSIX_TIME_AT_EPICS_EPOCH
from ioc_testbed.bridge_lab import (
    IOC_CA_PORT,
    probe,
    pva_env,
    start_bridge,
    start_ioc,
)
from ioc_testbed.lab import Lab, Pod, run_client

IOC_NODE, CLIENT_NODE = 0, 1
NTSCALAR, NTARRAY, NTENUM = ("epics:nt/NTScalar:1.0", "epics:nt/NTScalarArray:1.0",
                             "epics:nt/NTEnum:1.0")
IDLE_TIMEOUT = 2.0  # the caproto bridge's --inactive-timeout
PVLIST = "CP:.* ALLOW\nCP:count DENY\n"


@dataclass
class Site:
    """One IOC pod: IOC and bridge processes, and the PV prefix."""

    pod: Pod
    kind: str
    prefix: str
    ioc: subprocess.Popen[bytes]
    bridge: subprocess.Popen[bytes]

    def pv(self, name: str) -> str:
        return self.prefix + name

    def bridge_log(self) -> str:
        path = self.bridge.log_path  # type: ignore[attr-defined]  # set by Lab.spawn
        return str(path.read_text(errors="replace"))


@pytest.fixture(scope="module")
def sites(lab: Lab) -> Iterator[dict[str, Site]]:
    out = {}
    pod = lab.add_pod(IOC_NODE, name="caproto-ioc")
    ioc = start_ioc(lab, pod, "caproto", "CT:")
    bridge = start_bridge(lab, pod, "-v", "--inactive-timeout", str(IDLE_TIMEOUT))
    out["caproto"] = Site(pod, "caproto", "CT:", ioc, bridge)
    pod = lab.add_pod(IOC_NODE, name="pcaspy-ioc")
    ioc = start_ioc(lab, pod, "pcaspy", "CP:")
    pvlist = lab.tmpdir / "bridge.pvlist"
    pvlist.write_text(PVLIST)
    bridge = start_bridge(lab, pod, "-v", "--read-only", "--pvlist", str(pvlist))
    out["pcaspy"] = Site(pod, "pcaspy", "CP:", ioc, bridge)
    lab.add_pod(CLIENT_NODE, name="client")
    yield out


@pytest.fixture(scope="module")
def client(lab: Lab, sites: dict[str, Site]) -> Pod:
    return lab.pods["client"]


def ok(results: list[dict[str, Any]], site: Site | None = None) -> dict[str, dict[str, Any]]:
    """Results by PV name, failing with every error (and the bridge's log) if any
    operation failed."""
    failed = [f"{r['op']} {r['pv']}: {r.get('error')}" for r in results if not r["ok"]]
    log = f"\nbridge log:\n{site.bridge_log()[-4000:]}" if site else ""
    assert not failed, "\n".join(failed) + log
    return {r["pv"]: r for r in results}


# ---------------------------------------------------------------------------- sockets
def _bound(pid: int) -> dict[str, set[tuple[str, int]]]:
    """(address, port) of the TCP listening and UDP sockets a process owns."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out: dict[str, set[tuple[str, int]]] = {"tcp": set(), "udp": set()}
    for proto in ("tcp", "udp"):
        with open(f"/proc/{pid}/net/{proto}") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[9] not in inodes or (proto == "tcp" and cols[3] != "0A"):
                    continue
                hex_ip, hex_port = cols[1].split(":")
                ip = ".".join(str(int(hex_ip[i:i + 2], 16)) for i in (6, 4, 2, 0))
                out[proto].add((ip, int(hex_port, 16)))
    return out


def test_sockets_bound_to_the_pod_ip_and_loopback(sites):
    for site in sites.values():
        bridge, ioc = _bound(site.bridge.pid), _bound(site.ioc.pid)
        assert bridge["tcp"] == {(site.pod.ip, 5075)}, "the bridge listens on the pod IP only"
        # pvxs binds every UDP search socket to the wildcard and keeps only searches sent
        # to the configured interface (udp_collector.cpp); see the next test.
        assert {s for s in bridge["udp"] if s[1] == 5076} == {("0.0.0.0", 5076)}
        # the IOC (pcas as well as caproto) serves CA on loopback only
        assert ioc["tcp"] == {("127.0.0.1", IOC_CA_PORT)}
        assert ("127.0.0.1", IOC_CA_PORT) in ioc["udp"]


def test_udp_searches_answered_only_on_the_interface(lab, sites):
    """A search sent to 127.0.0.1:5076 reaches the bridge's wildcard socket but is not
    answered; the same search to the pod IP is. (The probe runs in the IOC's pod, with its
    own beacon port moved off 5076 so only the bridge holds 5076 there.)"""
    site = sites["caproto"]
    base = {"EPICS_PVA_AUTO_ADDR_LIST": "NO", "EPICS_PVA_BROADCAST_PORT": "15076"}
    name = site.pv("temperature")
    lo = probe(lab, site.pod, {**base, "EPICS_PVA_ADDR_LIST": "127.0.0.1:5076"},
               [{"op": "absent", "pv": name, "timeout": 1.5}])
    pod_ip = probe(lab, site.pod, {**base, "EPICS_PVA_ADDR_LIST": f"{site.pod.ip}:5076"},
                   [{"op": "get", "pv": name}])
    assert ok(lo)[name]["absent"]
    assert ok(pod_ip)[name]["data"]["value"] == 1.5


# ---------------------------------------------------------------------------- get
@pytest.mark.parametrize("name_server", [True, False], ids=["name-server", "addr-list"])
def test_get_serves_normative_types(lab, sites, client, name_server):
    site = sites["caproto"]
    names = ["temperature", "count", "label", "mode", "wave", "alarm", "short", "single",
             "chars"]
    env = pva_env(site.pod.ip, name_server=name_server)
    res = ok(probe(lab, client, env, [{"op": "get", "pv": site.pv(n)} for n in names]), site)
    get = {n: res[site.pv(n)] for n in names}

    t = get["temperature"]
    assert t["id"] == NTSCALAR
    d = t["data"]
    assert d["value"] == 1.5
    assert d["alarm"] == {"severity": 0, "status": 0, "message": ""}
    assert d["timeStamp"]["secondsPastEpoch"] > POSIX_TIME_AT_EPICS_EPOCH + 30 * 365 * 86400
    assert abs(d["timeStamp"]["secondsPastEpoch"] - time.time()) < 3600
    assert d["display"]["units"] == "mm" and d["display"]["precision"] == 3
    assert (d["display"]["limitLow"], d["display"]["limitHigh"]) == (-20.0, 20.0)
    assert (d["control"]["limitLow"], d["control"]["limitHigh"]) == (-10.0, 10.0)
    assert d["valueAlarm"]["highAlarmLimit"] == 9.0
    assert d["valueAlarm"]["lowWarningLimit"] == -5.0

    c = get["count"]["data"]
    assert get["count"]["id"] == NTSCALAR and c["value"] == 7 and isinstance(c["value"], int)
    assert c["display"]["units"] == "counts" and c["control"]["limitHigh"] == 100

    assert get["label"]["id"] == NTSCALAR and get["label"]["data"]["value"] == "hello"
    mode = get["mode"]
    assert mode["id"] == NTENUM
    assert mode["data"]["value"] == {"index": 0, "choices": ["Off", "On", "Auto"]}
    assert mode["data"]["display"] == {"description": ""}
    wave = get["wave"]
    assert wave["id"] == NTARRAY and wave["data"]["value"] == [float(i) for i in range(8)]
    assert wave["data"]["display"]["units"] == "V" and wave["data"]["display"]["precision"] == 2
    alarm = get["alarm"]["data"]["alarm"]
    assert alarm == {"severity": 2, "status": 1, "message": "HIHI"}  # MAJOR, DEVICE
    assert get["short"]["data"]["value"] == -3
    assert get["single"]["data"]["value"] == 0.25
    assert get["single"]["data"]["display"]["units"] == "A"
    assert get["chars"]["id"] == NTARRAY and get["chars"]["data"]["value"] == [97, 98, 99]


def test_pcaspy_ioc_served(lab, sites, client):
    """pcas (Base 3.14 CAS) works bound to 127.0.0.1 in a /32 pod (it aborts when it binds
    the pod's interface: no broadcast address), and its PVs are bridged."""
    site = sites["pcaspy"]
    env = pva_env(site.pod.ip, name_server=True)
    res = ok(probe(lab, client, env, [
        {"op": "get", "pv": site.pv("temperature")}, {"op": "get", "pv": site.pv("mode")},
        {"op": "get", "pv": site.pv("wave")}, {"op": "get", "pv": site.pv("alarm")},
        {"op": "monitor", "pv": site.pv("counter"), "updates": 3}]))
    t = res[site.pv("temperature")]["data"]
    assert t["value"] == 1.5 and t["display"]["units"] == "mm"
    assert t["display"]["precision"] == 3
    assert t["valueAlarm"]["highAlarmLimit"] == 9.0
    assert res[site.pv("mode")]["data"]["value"]["choices"] == ["Off", "On", "Auto"]
    assert res[site.pv("wave")]["data"]["value"] == [float(i) for i in range(8)]
    assert res[site.pv("alarm")]["data"]["alarm"]["message"] == "HIHI"
    values = [u["data"]["value"] for u in res[site.pv("counter")]["updates"]]
    assert len(values) >= 3 and values == sorted(values)


# ---------------------------------------------------------------------------- put
def test_put_round_trip(lab, sites, client):
    site = sites["caproto"]
    env = pva_env(site.pod.ip, name_server=True)
    res = ok(probe(lab, client, env, [
        {"op": "put", "pv": site.pv("temperature"), "value": 2.5},
        {"op": "put", "pv": site.pv("count"), "value": 42},
        {"op": "put", "pv": site.pv("label"), "value": "world"},
        {"op": "put", "pv": site.pv("mode"), "value": {"value.index": 2}},
        {"op": "put", "pv": site.pv("wave"), "value": [1.0, 2.0, 3.0]},
    ]))
    # The probe reads back through the bridge right after each put...
    assert res[site.pv("temperature")]["data"]["value"] == 2.5
    assert res[site.pv("count")]["data"]["value"] == 42
    assert res[site.pv("label")]["data"]["value"] == "world"
    assert res[site.pv("mode")]["data"]["value"]["index"] == 2
    assert res[site.pv("wave")]["data"]["value"] == [1.0, 2.0, 3.0]
    # ...and the IOC itself has the values (CA from inside the IOC's pod).
    direct = run_client(lab, site.pod, "pyepics", "get",
                        [site.pv("temperature"), site.pv("count"), site.pv("label")],
                        {"EPICS_CA_ADDR_LIST": f"127.0.0.1:{IOC_CA_PORT}",
                         "EPICS_CA_AUTO_ADDR_LIST": "NO"})
    assert direct.ok, direct.error
    assert [direct.value(site.pv(n)) for n in ("temperature", "count", "label")] == \
        [2.5, 42, "world"]


def test_put_refused_by_the_ioc(lab, sites, client):
    """A PV the IOC does not let CA write (caproto read_only: no write access) refuses
    the PVA put with the reason, and keeps its value."""
    site = sites["caproto"]
    res = probe(lab, client, pva_env(site.pod.ip, name_server=True),
                [{"op": "put", "pv": site.pv("counter"), "value": -1}])
    assert not res[0]["ok"] and "no CA write access" in res[0]["error"]


def test_read_only_bridge_refuses_puts(lab, sites, client):
    site = sites["pcaspy"]
    before = ok(probe(lab, client, pva_env(site.pod.ip, name_server=True),
                      [{"op": "get", "pv": site.pv("temperature")}]))
    res = probe(lab, client, pva_env(site.pod.ip, name_server=True),
                [{"op": "put", "pv": site.pv("temperature"), "value": 3.5},
                 {"op": "get", "pv": site.pv("temperature")}])
    assert not res[0]["ok"] and "read-only" in res[0]["error"]
    assert res[1]["ok"] and res[1]["data"]["value"] == \
        before[site.pv("temperature")]["data"]["value"]


# ---------------------------------------------------------------------------- monitor
def test_monitor_receives_updates(lab, sites, client):
    site = sites["caproto"]
    for name_server in (True, False):
        res = ok(probe(lab, client, pva_env(site.pod.ip, name_server=name_server),
                       [{"op": "monitor", "pv": site.pv("counter"), "updates": 4}]))
        updates = res[site.pv("counter")]["updates"]
        values = [u["data"]["value"] for u in updates]
        stamps = [u["data"]["timeStamp"]["secondsPastEpoch"] * 1e9
                  + u["data"]["timeStamp"]["nanoseconds"] for u in updates]
        assert len(values) >= 4
        assert values == sorted(values) and len(set(values)) == len(values)
        assert stamps == sorted(stamps)
        assert updates[0]["data"]["display"]["form"]["choices"]  # first update: everything


# ---------------------------------------------------------------------------- absent
def test_names_the_ioc_lacks_are_not_answered(lab, sites, client):
    site = sites["caproto"]
    for name_server in (True, False):
        res = ok(probe(lab, client, pva_env(site.pod.ip, name_server=name_server), [
            {"op": "absent", "pv": site.pv("nothere"), "timeout": 1.5},
            {"op": "absent", "pv": "OTHER:ioc:value", "timeout": 1.5},
            {"op": "get", "pv": site.pv("temperature")}]))
        assert res[site.pv("nothere")]["absent"] and res["OTHER:ioc:value"]["absent"]
    # and a pvlist DENY hides a name the IOC has
    pcas = sites["pcaspy"]
    res = ok(probe(lab, client, pva_env(pcas.pod.ip, name_server=True), [
        {"op": "absent", "pv": pcas.pv("count"), "timeout": 1.5}]))
    assert res[pcas.pv("count")]["absent"]


# ---------------------------------------------------------------------------- lifecycle
def test_idle_channels_are_dropped_and_come_back(lab, sites, client):
    site = sites["caproto"]
    env = pva_env(site.pod.ip, name_server=True)
    ok(probe(lab, client, env, [{"op": "get", "pv": site.pv("single")}]))
    deadline = time.monotonic() + IDLE_TIMEOUT + 5
    while f"dropped CA channel {site.pv('single')}: idle" not in site.bridge_log():
        assert time.monotonic() < deadline, site.bridge_log()[-3000:]
        time.sleep(0.2)
    res = ok(probe(lab, client, env, [{"op": "get", "pv": site.pv("single")}]))
    assert res[site.pv("single")]["data"]["value"] == 0.25


def test_ioc_restart_disconnects_and_recovers(lab, sites, client):
    """A monitoring client sees the disconnect when the IOC stops; the bridge has the CA
    channel back within seconds of the IOC's return (then a new client gets the restarted
    counter at once), and the monitoring client resumes at its next search. pvxs schedules
    that search itself (observed 0.2 to ~13 s after the disconnect), so that wait is
    bounded generously."""
    site = sites["caproto"]
    env = pva_env(site.pod.ip, name_server=True)
    watched: dict[str, Any] = {}

    def watch() -> None:
        watched["res"] = probe(lab, client, env, [
            {"op": "watch", "pv": site.pv("counter"), "seconds": 40.0, "until_resumed": 3}],
            timeout=60.0)

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(2.0)  # the watcher is connected and receiving
    lab.stop(site.ioc)
    time.sleep(1.0)
    connected = f"CA channel {site.pv('counter')} connected"
    seen = site.bridge_log().count(connected)
    site.ioc = start_ioc(lab, site.pod, "caproto", site.prefix)
    restarted = time.monotonic()
    while site.bridge_log().count(connected) == seen:
        assert time.monotonic() - restarted < 5.0, site.bridge_log()[-3000:]
        time.sleep(0.05)
    reconnected = time.monotonic() - restarted
    fresh = ok(probe(lab, client, env, [{"op": "get", "pv": site.pv("counter")}]), site)
    watcher.join(timeout=60.0)
    events = ok(watched["res"], site)[site.pv("counter")]["events"]
    kinds = [e[1] for e in events]
    first_value = kinds.index("value")  # p4p reports "disconnected" before connecting too
    assert "disconnected" in kinds[first_value:], events
    cut = kinds.index("disconnected", first_value)
    before = [e[2] for e in events[:cut] if e[1] == "value"]
    after = [e for e in events[cut:] if e[1] == "value"]
    assert len(before) >= 3 and len(after) >= 3, events
    assert after[0][2] < before[-1], "the counter restarted with the IOC"
    assert fresh[site.pv("counter")]["data"]["value"] < before[-1]
    print(f"\nIOC restart: CA channel back {reconnected:.2f} s after the IOC listened again,"
          f" first update to the monitoring client {after[0][0] - restarted:.1f} s after")
    assert f"CA channel {site.pv('counter')} disconnected" in site.bridge_log()


def test_port_taken_is_an_error(lab, sites):
    """pvxs moves to a random TCP port when its own is taken; the bridge exits instead
    (a second bridge in the same pod)."""
    site = sites["caproto"]
    second = lab.spawn(site.pod, ["ioc-ca-pva-bridge", "--interface", site.pod.ip,
                                  "--ca-addr-list", f"127.0.0.1:{IOC_CA_PORT}"], {})
    try:
        code = second.wait(timeout=20)
    finally:
        lab.stop(second)
    log = second.log_path.read_text()  # type: ignore[attr-defined]
    assert code == 1 and "could not bind TCP" in log, log


def test_sigterm_stops_the_bridge_cleanly(lab, sites):
    site = sites["pcaspy"]
    start = time.monotonic()
    code = lab.stop(site.bridge, grace=5.0)
    assert code == 0 and time.monotonic() - start < 5.0
    assert "stopped" in site.bridge_log()


def test_own_names_answered_first_in_a_search_full_of_other_iocs_names(lab, client):
    """With per-IOC address lists a client's search batch carries every IOC's names.
    A fresh bridge waited for CA on the first ones, spent its search budget on them and
    answered its own name only at the client's next search, 6 s or more later when the
    client also has name servers (found on the real node: a p4p get of 5 IOCs' PVs timed
    out on the bridged one). With --prefix its own names come first."""
    pod = lab.add_pod(IOC_NODE, name="busy-bridge-ioc")
    ioc = start_ioc(lab, pod, "caproto", "BB:")
    bridge = start_bridge(lab, pod, "--prefix", "BB:")
    try:
        foreign = [f"OTHER{i}:value" for i in range(6)]
        # As the published directory has it: UDP address list and TCP name servers.
        env = {**pva_env(pod.ip, name_server=False),
               "EPICS_PVA_NAME_SERVERS": f"{pod.ip}:5075"}
        result = run_client(lab, client, "p4p", "get", [*foreign, "BB:temperature"], env,
                            timeout=3.0)
        own = next(r for r in result.results if r["pv"] == "BB:temperature")
        assert own["ok"], result
    finally:
        lab.stop(bridge)
        lab.stop(ioc)
