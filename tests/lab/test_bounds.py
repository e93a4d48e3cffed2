"""The CA gateway, the bridge and the name server against hostile clients, over real
sockets in the lab (issue 22): thousands of circuits, ten thousand subscriptions to one
PV, a client that never reads, UDP search floods, malformed bytes on every port, a
100,000-name PVA search. While each attack runs, real clients (libca, caproto, p4p) in
another pod are served; the attacked process's memory (RSS) is sampled and stays
bounded; what it refused it logs at a limited rate. The access rules (-ro and pvlist
DENY at the gateway, --read-only and pvlist at the bridge) hold under the attacks: a
denied name is never served, a put through a read-only gateway or bridge never reaches
the IOC (read back on the IOC's own loopback).

One IOC pod in sidecar position: a soft IOC on 127.0.0.1:15064, two gateways (one plain,
one -ro with a pvlist) and two bridges (one plain, one --read-only with a pvlist) on the
pod IP; one name server behind a ClusterIP; attackers and clients in pods on node n1.
The attacks are the hostile clients of ioc_testbed.lab.hostile. Figures are printed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ioc_operator.discovery.clientenv import NameService, name_service_env
from ioc_testbed.bridge_lab import pva_env
from ioc_testbed.lab import Lab, LabError, Pod, run_client
from ioc_testbed.lab.nameservice import LabNameService
from ioc_testbed.lab.netns import listening_ports

IOC_NODE, CLIENT_NODE = 0, 1
IOC_PORT = 15064
CLUSTER_IP = "198.19.0.53"
RO_PORT = 5070  # the -ro gateway
RO_PVA, RO_PVA_UDP = 5085, 5086  # the --read-only bridge
PVLIST = "B:.* ALLOW\nB:secret DENY\n"
DB = """\
record(ao, "$(P)value") { field(VAL, "1.5") field(PINI, "YES") }
record(ao, "$(P)secret") { field(VAL, "7") field(PINI, "YES") }
record(waveform, "$(P)wave") { field(FTVL, "DOUBLE") field(NELM, "20000") }
record(calc, "$(P)counter") {
    field(SCAN, ".1 second")
    field(INPA, "$(P)counter NPP")
    field(CALC, "A+1")
}
"""
IOC_ENV = {"EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1", "EPICS_CAS_SERVER_PORT": str(IOC_PORT),
           "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO", "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
           "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1", "EPICS_PVAS_SERVER_PORT": "15075",
           "EPICS_PVAS_BROADCAST_PORT": "15076", "EPICS_CA_MAX_ARRAY_BYTES": "1000000"}
LOOPBACK = {"EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CA_ADDR_LIST": f"127.0.0.1:{IOC_PORT}"}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def log_of(popen: subprocess.Popen[Any]) -> str:
    return Path(popen.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


@dataclass
class Site:
    lab: Lab
    pod: Pod
    ioc: subprocess.Popen[bytes]
    gateway: subprocess.Popen[bytes]
    gateway_ro: subprocess.Popen[bytes]
    bridge: subprocess.Popen[bytes]
    bridge_ro: subprocess.Popen[bytes]
    names: LabNameService
    client: Pod
    attackers: list[Pod]

    @property
    def ca_env(self) -> dict[str, str]:
        return {"EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CA_ADDR_LIST": f"{self.pod.ip}:5064",
                "EPICS_CA_MAX_ARRAY_BYTES": "1000000"}

    def attack(self, index: int, *args: str) -> subprocess.Popen[bytes]:
        return self.lab.spawn(self.attackers[index], [
            sys.executable, "-m", "ioc_testbed.lab.hostile", *args], {},
            stdin=subprocess.DEVNULL,
            log=self.lab.tmpdir / f"attack-{args[0]}-{len(self.lab.processes)}.log")

    def ioc_value(self, name: str) -> float:
        """Read on the IOC's own loopback, not through anything under test."""
        res = run_client(self.lab, self.pod, "pyepics", "get", "B:" + name, LOOPBACK,
                         timeout=5.0)
        assert res.ok, res.error
        return float(res.value("B:" + name))  # type: ignore[arg-type]


def _spawn(lab: Lab, pod: Pod, argv: list[str], tag: str) -> subprocess.Popen[bytes]:
    return lab.spawn(pod, [sys.executable, "-m", *argv], {}, stdin=subprocess.DEVNULL,
                     log=lab.tmpdir / f"{tag}.log")


def _wait_tcp(popen: subprocess.Popen[Any], port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise LabError(f"exited: {log_of(popen)[-2000:]}")
        if port in listening_ports(popen.pid)["tcp"]:
            return
        time.sleep(0.05)
    raise LabError(f"not listening on {port}")


@pytest.fixture(scope="module")
def site(lab: Lab) -> Iterator[Site]:
    pod = lab.add_pod(IOC_NODE, name="bounds-ioc")
    db = lab.tmpdir / "bounds.db"
    db.write_text(DB)
    pvlist = lab.tmpdir / "bounds.pvlist"
    pvlist.write_text(PVLIST)
    ioc = lab.spawn(pod, [sys.executable, "-m", "epicscorelibs.ioc", "-m", "P=B:", "-d",
                          str(db)], IOC_ENV, log=lab.tmpdir / "bounds-ioc.log")
    _wait_tcp(ioc, IOC_PORT)
    gw = ["ioc_operator.gateways.ca_gateway", "-sip", pod.ip, "-cip", "127.0.0.1",
          "-cport", str(IOC_PORT), "-max_circuits", "400"]
    br = ["ioc_operator.gateways.bridge", "--interface", pod.ip, "--ca-addr-list",
          f"127.0.0.1:{IOC_PORT}", "--max-channels", "2000"]
    gateway = _spawn(lab, pod, gw, "gateway")
    gateway_ro = _spawn(lab, pod, [*gw, "-sport", str(RO_PORT), "-ro", "-pvlist", str(pvlist)],
                        "gateway-ro")
    bridge = _spawn(lab, pod, br, "bridge")
    bridge_ro = _spawn(lab, pod, [*br, "--server-port", str(RO_PVA), "--broadcast-port",
                                  str(RO_PVA_UDP), "--read-only", "--pvlist", str(pvlist)],
                       "bridge-ro")
    for popen, port in ((gateway, 5064), (gateway_ro, RO_PORT), (bridge, 5075),
                        (bridge_ro, RO_PVA)):
        _wait_tcp(popen, port)
    names = LabNameService(lab, node=IOC_NODE, cluster_ip=CLUSTER_IP, replicas=1,
                           args=["--max-circuits", "400"])
    names.set_iocs([{"name": "lab/bounds", "prefix": "B:", "ca": f"{pod.ip}:5064",
                     "pva": f"{pod.ip}:5075", "pvaSearch": f"{pod.ip}:5076"}])
    yield Site(lab, pod, ioc, gateway, gateway_ro, bridge, bridge_ro, names,
               lab.add_pod(CLIENT_NODE, name="bounds-client"),
               [lab.add_pod(CLIENT_NODE, name=f"attacker-{i}") for i in range(3)])


class Sampler:
    """Largest RSS of some processes while an attack runs (every 0.2 s)."""

    def __init__(self, procs: dict[str, subprocess.Popen[Any]]) -> None:
        self.procs = procs
        self.before = {k: rss_mb(p.pid) for k, p in procs.items()}
        self.peak = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for k, p in self.procs.items():
                if p.poll() is None:
                    self.peak[k] = max(self.peak[k], rss_mb(p.pid))

    def stop(self) -> dict[str, tuple[float, float]]:
        self._stop.set()
        self._thread.join(timeout=5)
        out = {k: (self.before[k], self.peak[k]) for k in self.procs}
        for k, (before, peak) in out.items():
            print(f"  {k}: RSS {before:.1f} MB before, {peak:.1f} MB at most during the attack")
        return out


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := cond():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def result_of(popen: subprocess.Popen[bytes], timeout: float = 90.0) -> dict[str, Any]:
    popen.wait(timeout=timeout)
    lines = [line for line in log_of(popen).splitlines() if line.startswith('{"attack"')]
    assert lines, log_of(popen)[-2000:]
    return dict(json.loads(lines[-1]))


def served(site: Site) -> None:
    """Real clients get what they ask for, through each process under test."""
    for lib in ("pyepics", "caproto"):
        res = run_client(site.lab, site.client, lib, "get", "B:value", site.ca_env,
                         timeout=10.0)
        assert res.ok, (lib, res.error, res.stderr[-1500:])
    res = run_client(site.lab, site.client, "pyepics", "monitor", "B:counter", site.ca_env,
                     timeout=10.0)
    assert res.ok, ("monitor", res.error)
    res = run_client(site.lab, site.client, "p4p", "get", "B:value",
                     pva_env(site.pod.ip, name_server=True), timeout=10.0)
    assert res.ok, ("p4p via the bridge", res.error)
    directory = name_service_env(NameService(CLUSTER_IP))
    for lib in ("pyepics", "p4p"):
        res = run_client(site.lab, site.client, lib, "get", "B:value", directory, timeout=10.0)
        assert res.ok, (lib, "via the name service", res.error)


def alive(site: Site) -> None:
    for name, popen in (("gateway", site.gateway), ("ro gateway", site.gateway_ro),
                        ("bridge", site.bridge), ("ro bridge", site.bridge_ro),
                        ("name server", site.names.replicas[0].popen)):
        assert popen.poll() is None, f"{name} died:\n{log_of(popen)[-3000:]}"


def warnings(popen: subprocess.Popen[Any], text: str) -> int:
    return sum(1 for line in log_of(popen).splitlines() if text in line)


# ------------------------------------------------------------------ the attacks
def test_thousands_of_circuits(site: Site):
    """3,000 circuits from one pod to each of the gateway, the name server and the
    bridge. The gateway and the name server take a quarter of their limit (400) from one
    host and close the rest at once; pvxs (the bridge) has no limit of its own and takes
    them, within the descriptor limit."""
    gw_fds = fds(site.gateway.pid)
    sampler = Sampler({"gateway": site.gateway, "bridge": site.bridge,
                       "name server": site.names.replicas[0].popen})
    attacks = [site.attack(0, "circuits", "--host", site.pod.ip, "--count", "3000",
                           "--seconds", "25"),
               site.attack(1, "circuits", "--host", CLUSTER_IP, "--count", "3000",
                           "--seconds", "25"),
               site.attack(2, "circuits", "--host", site.pod.ip, "--port", "5075",
                           "--count", "3000", "--seconds", "25")]
    for popen in attacks:
        wait_for(lambda p=popen: '"holding"' in log_of(p), 60, "the circuits to be open")
    held = fds(site.gateway.pid)
    served(site)
    alive(site)
    peaks = sampler.stop()
    results = [result_of(p) for p in attacks]
    print(f"  circuits: {results}; gateway descriptors {gw_fds} -> {held}")
    assert held <= gw_fds + 400 // 4 + 10  # its quarter, plus the test's own clients
    assert results[0]["connected"] - results[0]["closed_by_server"] <= 100
    assert warnings(site.gateway, "refused") <= 10  # 2,900 refusals, rate-limited lines
    for name, (before, peak) in peaks.items():
        assert peak < before + 100, (name, before, peak)


def test_ten_thousand_subscriptions_and_a_client_that_never_reads(site: Site):
    sampler = Sampler({"gateway": site.gateway})
    subs = site.attack(0, "subscribe", "--host", site.pod.ip, "--pv", "B:counter",
                       "--count", "10000", "--seconds", "20")
    lazy = site.attack(1, "never-read", "--host", site.pod.ip, "--pv", "B:wave",
                       "--count", "5000000", "--seconds", "20")
    wait_for(lambda: '"subscribed"' in log_of(subs), 30, "the subscriptions")
    wait_for(lambda: '"reading"' in log_of(lazy), 30, "the reads")
    time.sleep(3)
    served(site)
    alive(site)
    lazy_result, subs_result = result_of(lazy), result_of(subs)
    peaks = sampler.stop()
    stats = _stats(site.gateway)
    print(f"  {subs_result}; {lazy_result}; gateway counters {stats}")
    assert stats.get("subscriptions_refused", 0) >= 10000 - 256
    # each read is 16 bytes and answered with 160 kB; the gateway stopped reading
    assert lazy_result["reads_sent"] < 2_000_000 or lazy_result["closed_by_server"]
    before, peak = peaks["gateway"]
    assert peak < before + 150, (before, peak)  # 64 MiB queued at most, then closed


def test_udp_search_floods(site: Site):
    """Floods of searches for new names at the gateway, the bridge and the name server.
    Clients already connected keep their updates throughout (a libca monitor through the
    gateway, a p4p one through the bridge); new clients are served once it is over. On
    this shared 2-core machine the floods take the processes' CPU too: whether a new
    client gets in during a flood depends on that (see docs/ca-gateway.md)."""
    from concurrent.futures import ThreadPoolExecutor

    sampler = Sampler({"gateway": site.gateway, "bridge": site.bridge,
                       "name server": site.names.replicas[0].popen})
    with ThreadPoolExecutor(2) as pool:
        monitors = [pool.submit(run_client, site.lab, site.client, "pyepics", "monitor",
                                "B:counter", site.ca_env, timeout=40.0, updates=150),
                    pool.submit(run_client, site.lab, site.client, "p4p", "monitor",
                                "B:counter", pva_env(site.pod.ip, name_server=True),
                                timeout=40.0, updates=150)]
        time.sleep(3)  # connected and updating
        attacks = [site.attack(0, "udp-flood", "--host", site.pod.ip, "--pv", "B:flood",
                               "--count", "400000", "--seconds", "15"),
                   site.attack(1, "udp-flood", "--host", site.pod.ip, "--port", "5076",
                               "--proto", "pva", "--pv", "B:flood", "--count", "400000",
                               "--seconds", "15"),
                   site.attack(2, "udp-flood", "--host", CLUSTER_IP, "--pv", "B:flood",
                               "--count", "400000", "--seconds", "15")]
        results = [result_of(p) for p in attacks]
        during = _stats(site.gateway)
        for future in monitors:  # 150 updates at 10 Hz: through all of the floods
            res = future.result()
            assert res.ok and res.results[0]["updates"] >= 150, (res.lib, res.error)
    served(site)
    alive(site)
    peaks = sampler.stop()
    print(f"  floods: {results}; gateway {during}")
    assert during.get("lookups_refused", 0) + during.get("lookups_throttled", 0) \
        + during.get("datagrams_dropped", 0) > 0
    assert warnings(site.gateway, "search storm") + warnings(site.gateway, "dropped") <= 10
    for name, (before, peak) in peaks.items():
        assert peak < before + 150, (name, before, peak)


def test_malformed_bytes_on_every_port(site: Site):
    targets = [("ca", site.pod.ip, 5064, False), ("ca", site.pod.ip, 5064, True),
               ("pva", site.pod.ip, 5075, False), ("pva", site.pod.ip, 5076, True),
               ("ca", CLUSTER_IP, 5064, False), ("ca", CLUSTER_IP, 5064, True),
               ("pva", CLUSTER_IP, 5075, False), ("pva", CLUSTER_IP, 5076, True)]
    for i, (proto, host, port, udp) in enumerate(targets):
        attack = site.attack(i % 3, "junk", "--host", host, "--port", str(port), "--proto",
                             proto, "--count", "20", "--seconds", "20",
                             *(["--udp"] if udp else []), "--seed", str(i))
        res = result_of(attack)
        assert res["sent"] > 0, res
    alive(site)
    served(site)
    stats = _stats(site.gateway)
    print(f"  gateway {stats}; name server bad messages "
          f"{site.names.stats(0).get('bad_messages')}")
    assert stats.get("bad_messages", 0) > 0 and stats.get("bad_names", 0) > 0


def test_a_100000_name_pva_search(site: Site):
    """Over TCP (pvxs name-server search) to the bridge and the name server, then names
    with every byte value. The bridge bridges at most --max-channels (2,000 here) names
    at once: the rest are not looked up."""
    sampler = Sampler({"bridge": site.bridge, "name server": site.names.replicas[0].popen})
    attacks = [site.attack(0, "pva-search", "--host", site.pod.ip, "--port", "5075",
                           "--pv", "B:many", "--count", "100000", "--seconds", "10"),
               site.attack(1, "pva-search", "--host", CLUSTER_IP, "--port", "5075",
                           "--pv", "B:many", "--count", "100000", "--seconds", "10")]
    results = [result_of(p) for p in attacks]
    served(site)
    alive(site)
    peaks = sampler.stop()
    print(f"  {results}")
    assert "--max-channels" in log_of(site.bridge)  # it said what it refused
    for name, (before, peak) in peaks.items():
        assert peak < before + 200, (name, before, peak)


def test_read_only_and_pvlist_hold_under_attack(site: Site):
    """While searches flood and junk arrives: puts through the -ro gateway and the
    --read-only bridge never reach the IOC, and the denied name is never served."""
    flood = site.attack(0, "udp-flood", "--host", site.pod.ip, "--port", str(RO_PORT),
                        "--pv", "B:", "--count", "200000", "--seconds", "15")
    junk = site.attack(1, "junk", "--host", site.pod.ip, "--port", str(RO_PORT),
                       "--count", "10", "--seconds", "15")
    before = site.ioc_value("value"), site.ioc_value("secret")
    puts = site.attack(2, "put", "--host", site.pod.ip, "--port", str(RO_PORT), "--pv",
                       "B:value", "--deny", "B:secret", "--count", "200", "--value", "42")
    res = result_of(puts)
    print(f"  puts through the -ro gateway: {res}")
    assert res["created"] == {"B:value": True, "B:secret": False}
    assert "status ECA_NORMAL" not in res["answers"]["B:value"], res
    ro_env = {"EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CA_ADDR_LIST": f"{site.pod.ip}:{RO_PORT}"}
    for lib in ("pyepics", "caproto"):
        put = run_client(site.lab, site.client, lib, "put", "B:value", ro_env, value=43.0,
                         timeout=5.0)
        assert not put.ok or put.value("B:value") != 43.0, (lib, put.results)
        denied = run_client(site.lab, site.client, lib, "get", "B:secret", ro_env,
                            timeout=3.0)
        assert not denied.ok, (lib, "a denied name was served")
    bridge_env = {"EPICS_PVA_AUTO_ADDR_LIST": "NO", "EPICS_PVA_ADDR_LIST": "",
                  "EPICS_PVA_NAME_SERVERS": f"{site.pod.ip}:{RO_PVA}"}
    put = run_client(site.lab, site.client, "p4p", "put", "B:value", bridge_env, value=44.0,
                     timeout=5.0)
    assert not put.ok, put.results
    denied = run_client(site.lab, site.client, "p4p", "get", "B:secret", bridge_env,
                        timeout=3.0)
    assert not denied.ok, "the read-only bridge served a denied name"
    result_of(flood), result_of(junk)
    assert (site.ioc_value("value"), site.ioc_value("secret")) == before
    alive(site)


def _stats(popen: subprocess.Popen[Any], timeout: float = 5.0) -> dict[str, int]:
    import re
    import signal

    before = log_of(popen).count(" stats ")
    popen.send_signal(signal.SIGUSR1)
    text = wait_for(lambda: (t := log_of(popen)).count(" stats ") > before and t, timeout,
                    "the gateway's counters")
    line = text[text.rindex(" stats "):].splitlines()[0]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
