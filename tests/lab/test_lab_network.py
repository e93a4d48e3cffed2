"""EPICS discovery on a broadcast-less, Calico-style network of namespaces.

Real servers (rsrv, QSRV1, QSRV2, caproto, p4p, pcaspy) and real clients (libca through
pyepics, caproto, p4p) run in separate network namespaces; see docs/lab.md.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from ioc_testbed.lab import Lab, LabError
from ioc_testbed.lab.clients import ClientCall, ClientResult, run_client, run_clients
from ioc_testbed.lab.netns import LAB_RANGE, LINK_LOCAL_GW, Pod, _list_netns, _pid_alive, run
from ioc_testbed.lab.servers import KINDS, EpicsServer, start_server

CA_ONLY = {"EPICS_CA_AUTO_ADDR_LIST": "NO"}
PVA_ONLY = {"EPICS_PVA_AUTO_ADDR_LIST": "NO"}
CLUSTER_IP = "198.19.0.10"
RSRV_QSRV2_PORTS = [
    ("tcp", 5064, 5064),
    ("udp", 5064, 5064),
    ("tcp", 5075, 5075),
    ("udp", 5076, 5076),
]
TIMEOUT = 3.0  # seconds per client phase
PV_SUFFIXES = ("value", "counter", "mode", "wave")


def _ca_unicast(addr: str) -> dict[str, str]:
    return {**CA_ONLY, "EPICS_CA_ADDR_LIST": addr}


def _pva_unicast(addr: str) -> dict[str, str]:
    return {**PVA_ONLY, "EPICS_PVA_ADDR_LIST": addr}


def _explain(results: list[ClientResult]) -> str:
    return "\n".join(f"{r.lib} {r.op}: ok={r.ok} {r.error} {r.stderr[-300:]}" for r in results)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def client_pod(lab: Lab) -> Pod:
    """A client pod on node n1 (not the IOC's node)."""
    return lab.add_pod(1, name="client")


@pytest.fixture(scope="module")
def ioc(lab: Lab) -> Iterator[tuple[Pod, EpicsServer]]:
    """An rsrv + QSRV2 IOC in a pod on n0, behind ClusterIP 198.19.0.10."""
    pod = lab.add_pod(0, name="ioc")
    server = start_server(lab, pod, "softioc-pvxs", "POD:")
    lab.add_service(CLUSTER_IP, RSRV_QSRV2_PORTS, pod.ip)
    yield pod, server
    lab.remove_service(CLUSTER_IP)
    server.stop()


@pytest.fixture(scope="module")
def every_kind(lab: Lab) -> Iterator[dict[str, tuple[str, EpicsServer]]]:
    """One server of each kind, each in its own pod (pcaspy: host network of n0)."""
    started: dict[str, tuple[str, EpicsServer]] = {}
    for kind in KINDS:
        if kind == "pcaspy":  # CAS needs an interface with a broadcast address (see below)
            where, ip = lab.nodes[0], lab.nodes[0].ip
        else:
            pod = lab.add_pod(0, name=f"kind-{kind}")
            where, ip = pod, pod.ip
        started[kind] = (ip, start_server(lab, where, kind, f"{kind.upper()}:", wait=False))
    for _ip, server in started.values():
        server.wait_ready()
    yield started
    for _ip, server in started.values():
        server.stop()


# ------------------------------------------------------------------------------ topology
def test_topology_is_calico_like(lab: Lab, client_pod: Pod) -> None:
    """Pods: /32 on eth0, default via 169.254.1.1 onlink; nodes: proxy ARP, forwarding."""
    addr = lab.exec(client_pod, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert f"inet {client_pod.ip}/32" in addr and " brd " not in addr
    routes = lab.exec(client_pod, ["ip", "-4", "route"]).stdout
    assert f"default via {LINK_LOCAL_GW} dev eth0 onlink" in routes
    node = client_pod.node
    sysctl = lab.exec(
        node,
        ["sysctl", "-n", "net.ipv4.ip_forward", f"net.ipv4.conf.{client_pod.host_if}.proxy_arp"],
    ).stdout.split()
    assert sysctl == ["1", "1"]
    node_routes = lab.exec(node, ["ip", "-4", "route"]).stdout
    assert "default" not in node_routes
    assert f"{client_pod.ip} dev {client_pod.host_if} scope link" in node_routes
    for other in lab.nodes:
        if other is not node:
            assert f"{other.pod_block} via {other.ip} dev eth0" in node_routes
    for ns in lab.netns:  # only lab addresses (and loopback) anywhere
        out = lab.exec(ns, ["ip", "-4", "-o", "addr"]).stdout
        for line in out.splitlines():
            ip = ipaddress.IPv4Address(line.split()[3].split("/")[0])
            assert ip.is_loopback or ip in LAB_RANGE, line
    # Unicast crosses nodes; nothing is L2-adjacent to the pod except its node.
    probe = [
        sys.executable,
        "-c",
        "import socket,sys; s=socket.create_connection((sys.argv[1], 9), timeout=2)",
    ]
    refused = lab.exec(client_pod, [*probe, lab.nodes[0].ip])
    assert "ConnectionRefused" in refused.stderr  # reached n0 and got a RST


# ------------------------------------------------------------------------------ server kinds
def test_every_server_kind_serves_its_pvs(
    lab: Lab, client_pod: Pod, every_kind: dict[str, tuple[str, EpicsServer]]
) -> None:
    """get (all four PVs), put+read back and monitor, unicast to the server's address."""
    calls: list[ClientCall] = []
    for ip, server in every_kind.values():
        libs = []
        if "ca" in server.protocols:
            libs += [("pyepics", _ca_unicast(ip)), ("caproto", _ca_unicast(ip))]
        if "pva" in server.protocols:
            libs += [("p4p", _pva_unicast(ip))]
        for lib, env in libs:
            pvs = [server.pv(s) for s in PV_SUFFIXES]
            calls += [
                ClientCall(client_pod, lib, "get", pvs, env, timeout=TIMEOUT),
                ClientCall(
                    client_pod, lib, "put", [server.pv("value")], env, value=4.25, timeout=TIMEOUT
                ),
                ClientCall(
                    client_pod, lib, "monitor", [server.pv("counter")], env, timeout=TIMEOUT
                ),
            ]
    results = run_clients(lab, calls)
    failed = [r for r in results if not r.ok]
    assert not failed, _explain(failed)
    for call, result in zip(calls, results, strict=True):
        if call.op == "get":
            values = [r["value"] for r in result.results]
            assert values[3] == [float(i) for i in range(8)], (call.lib, values)


def test_cas_server_aborts_without_a_broadcast_address(lab: Lab) -> None:
    """pcaspy's CAS (Base 3.14.12.8) needs an interface with a broadcast address: a /32 pod
    address has none, so it aborts with "server isnt attached to a network"."""
    pod = lab.add_pod(0, name="cas-in-pod")
    with pytest.raises(LabError, match="exited with -6") as info:  # SIGABRT
        start_server(lab, pod, "pcaspy", "CASPOD:", ready_timeout=10)
    # errlog prints from its own thread, so the message may be lost in the abort
    assert "attached to a network" in str(info.value) or "terminate" in str(info.value)


# ------------------------------------------------------------------------------ discovery
def test_broadcast_does_not_cross_pods(
    lab: Lab, client_pod: Pod, ioc: tuple[Pod, EpicsServer]
) -> None:
    """Default settings (auto address list) fail from another pod, work in the IOC's pod."""
    ioc_pod, server = ioc
    pv = server.pv("value")
    calls = [
        ClientCall(client_pod, "pyepics", "get", [pv], {}, timeout=TIMEOUT),
        ClientCall(client_pod, "caproto", "get", [pv], {}, timeout=TIMEOUT),
        ClientCall(client_pod, "p4p", "get", [pv], {}, timeout=TIMEOUT),
        ClientCall(ioc_pod, "pyepics", "get", [pv], {}, timeout=TIMEOUT),
        ClientCall(ioc_pod, "caproto", "get", [pv], {}, timeout=TIMEOUT),
    ]
    results = run_clients(lab, calls)
    remote, local = results[:3], results[3:]
    assert not any(r.ok for r in remote), _explain(remote)
    assert all(r.ok for r in local), _explain(local)
    # A pvxs client binds the PVA broadcast port (5076) for beacons, so in the server's own
    # namespace a unicast search lands on the client's socket or the server's (hash of the
    # client's address and port): one at a time (each client adds a socket), until one
    # succeeds, at most 16 tries (8 all missed once in CI: a fresh client is a coin toss,
    # and its retries keep their port, so they land where its first search did).
    local_pva: list[ClientResult] = []
    while len(local_pva) < 16 and not any(r.ok for r in local_pva):
        local_pva.append(run_client(lab, ioc_pod, "p4p", "get", pv, {}, timeout=1.0))
    assert any(r.ok for r in local_pva), _explain(local_pva)


@pytest.mark.parametrize(
    ("lib", "env"),
    [
        pytest.param("pyepics", _ca_unicast(CLUSTER_IP), id="ca-addr-list-libca"),
        pytest.param("caproto", _ca_unicast(CLUSTER_IP), id="ca-addr-list-caproto"),
        pytest.param(
            "pyepics",
            {**CA_ONLY, "EPICS_CA_NAME_SERVERS": f"{CLUSTER_IP}:5064"},
            id="ca-name-server-libca",
        ),
        pytest.param(
            "p4p",
            {**PVA_ONLY, "EPICS_PVA_NAME_SERVERS": f"{CLUSTER_IP}:5075"},
            id="pva-name-server-p4p",
        ),
        pytest.param("p4p", _pva_unicast(CLUSTER_IP), id="pva-addr-list-p4p"),
    ],
)
def test_clusterip_baseline(
    lab: Lab, client_pod: Pod, ioc: tuple[Pod, EpicsServer], lib: str, env: dict[str, str]
) -> None:
    """Hand-written settings through a ClusterIP (DNAT, no SNAT) from a pod on another node."""
    _pod, server = ioc
    calls = [
        ClientCall(
            client_pod, lib, "get", [server.pv(s) for s in PV_SUFFIXES], env, timeout=TIMEOUT
        ),
        ClientCall(client_pod, lib, "put", [server.pv("value")], env, value=7.5, timeout=TIMEOUT),
        ClientCall(client_pod, lib, "monitor", [server.pv("counter")], env, timeout=TIMEOUT),
    ]
    results = run_clients(lab, calls)
    assert all(r.ok for r in results), _explain(results)


def test_clusterip_rules_in_every_node(lab: Lab, ioc: tuple[Pod, EpicsServer]) -> None:
    """One DNAT rule per protocol and port in every node, from PREROUTING and OUTPUT."""
    pod, _server = ioc
    for node in lab.nodes:
        rules = lab.nat_rules(node)
        assert "-A PREROUTING -j LAB-SERVICES" in rules
        assert "-A OUTPUT -j LAB-SERVICES" in rules
        dnat = [r for r in rules if f"-d {CLUSTER_IP}/32" in r]
        assert len(dnat) == len(RSRV_QSRV2_PORTS)
        assert all("SNAT" not in r and "MASQUERADE" not in r for r in rules)
        assert any(f"--to-destination {pod.ip}:5076" in r and "-p udp" in r for r in dnat)
    # host-network client through the OUTPUT chain
    _pod, server = ioc
    res = run_client(
        lab,
        lab.nodes[1],
        "pyepics",
        "get",
        server.pv("value"),
        _ca_unicast(CLUSTER_IP),
        timeout=TIMEOUT,
    )
    assert res.ok, _explain([res])


# ------------------------------------------------------------------------------ host network
def test_host_network_iocs_sharing_ports_collide(lab: Lab, client_pod: Pod) -> None:
    """Two rsrv IOCs in one node namespace on UDP 5064: a unicast search to the node IP
    reaches one of them, so a client never finds both (reproduced within N runs)."""
    node = lab.nodes[2]
    a = start_server(lab, node, "softioc-pvxs", "HA:")
    b = start_server(lab, node, "softioc-pvxs", "HB:")
    try:
        assert 5064 in a.ports()["udp"] and 5064 in b.ports()["udp"]
        assert "share the same UDP port" in a.log() + b.log()
        pvs = [a.pv(), b.pv()]
        env = _ca_unicast(node.ip)
        calls = [ClientCall(client_pod, "pyepics", "get", pvs, env, timeout=2.0) for _ in range(10)]
        results = run_clients(lab, calls)
        found = [sum(r.found(pv) for pv in pvs) for r in results]
        assert any(n < 2 for n in found), f"collision not reproduced: {found}"
        assert all(n >= 1 for n in found), f"searches lost entirely: {found}"
    finally:
        a.stop()
        b.stop()


def test_host_network_iocs_with_their_own_ports(lab: Lab, client_pod: Pod) -> None:
    """Per-IOC CA and PVA ports plus host:port entries: both IOCs found every time."""
    node = lab.nodes[2]
    ports = {"HC:": (5164, 5175, 5176), "HD:": (5264, 5275, 5276)}
    servers = []
    try:
        for prefix, (ca, pva, bcast) in ports.items():
            env = {
                "EPICS_CAS_SERVER_PORT": str(ca),
                "EPICS_CA_SERVER_PORT": str(ca),
                "EPICS_PVAS_SERVER_PORT": str(pva),
                "EPICS_PVAS_BROADCAST_PORT": str(bcast),
            }
            servers.append(start_server(lab, node, "softioc-pvxs", prefix, env, wait=False))
        for server, (ca, pva, bcast) in zip(servers, ports.values(), strict=True):
            server.wait_ready()
            assert {ca, pva} <= server.ports()["tcp"]
            assert {ca, bcast} <= server.ports()["udp"]
        pvs = [s.pv() for s in servers]
        ca_list = " ".join(f"{node.ip}:{p[0]}" for p in ports.values())
        envs = {
            "pyepics": _ca_unicast(ca_list),
            "caproto": _ca_unicast(ca_list),
            "p4p-addr-list": _pva_unicast(" ".join(f"{node.ip}:{p[2]}" for p in ports.values())),
            "p4p-name-servers": {
                **PVA_ONLY,
                "EPICS_PVA_NAME_SERVERS": " ".join(f"{node.ip}:{p[1]}" for p in ports.values()),
            },
        }
        calls = [
            ClientCall(client_pod, name.split("-")[0], "get", pvs, env, timeout=TIMEOUT)
            for name, env in envs.items()
            for _ in range(4)
        ]
        results = run_clients(lab, calls)
        assert all(r.ok for r in results), _explain([r for r in results if not r.ok])
    finally:
        for server in servers:
            server.stop()


# ------------------------------------------------------------------------------ teardown
def _root_nat() -> str:
    return run(["iptables", "-w", "5", "-t", "nat", "-S"]).stdout


def test_teardown_leaves_nothing_behind() -> None:
    """Namespaces, processes (also ones a client left running) and rules all go."""
    nat_before = _root_nat()
    links_before = run(["ip", "-o", "link"]).stdout.count("\n")
    with pytest.raises(RuntimeError, match="boom"), Lab(nodes=2) as lab:
        pod = lab.add_pod(0)
        server = start_server(lab, pod, "caproto", "TD:")
        lab.add_service("198.19.0.99", [("udp", 5064, 5064)], pod.ip)
        # a detached process not tracked by the lab, like a spawned caRepeater
        lab.exec(pod, ["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 &"])
        names = lab.netns
        assert server.alive()
        raise RuntimeError("boom")
    assert lab.residue() == []
    assert not set(names) & set(_list_netns())
    assert server.popen.poll() is not None
    assert _root_nat() == nat_before
    assert run(["ip", "-o", "link"]).stdout.count("\n") == links_before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_teardown_on_signal(sig: signal.Signals) -> None:
    """A process holding a lab is interrupted: its namespaces and servers are removed."""
    script = (
        "import sys, time\n"
        "from ioc_testbed.lab import Lab\n"
        "from ioc_testbed.lab.servers import start_server\n"
        "with Lab(nodes=1) as lab:\n"
        "    s = start_server(lab, lab.add_pod(0), 'caproto', 'SIG:')\n"
        "    print(' '.join(lab.netns), s.pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()  # bounded by the 60 s sleep in the child
        names, server_pid = line[:-1], int(line[-1])
        assert set(names) <= set(_list_netns())
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert not set(names) & set(_list_netns())
    deadline = time.monotonic() + 5
    while _pid_alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(server_pid)
