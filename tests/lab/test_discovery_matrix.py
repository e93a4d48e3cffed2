"""The claim, end to end: IOCs rendered by the operator, run in a broadcast-less lab, are
reached by real clients that know only what the operator publishes.

Every supported cell of server kind x network mode x client library is tried with get,
put and monitor, once with the namespace's whole directory and once with only its
NAME_SERVERS entries (for the servers the directory lists there). Cells the operator
does not support are refused by the renderer with a message, never skipped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from ioc_operator.directory import directory_env
from ioc_operator.errors import IOCValidationError
from ioc_operator.render import parse_ioc, render_all
from ioc_testbed.lab import Lab
from ioc_testbed.lab.clients import ClientCall, run_clients
from ioc_testbed.lab.runner import LabRunner, RunningIOC

SERVERS = {
    "softioc-pvxs": {"ca": {"implementation": "rsrv"}, "pva": {"implementation": "pvxs"}},
    "softioc-classic": {"ca": {"implementation": "rsrv"}, "pva": {"implementation": "classic"}},
    "caproto": {"ca": {"implementation": "caproto"}, "pva": {"enabled": False}},
    "p4p": {"ca": {"enabled": False}, "pva": {"implementation": "pvxs"}},
    "pcaspy": {"ca": {"implementation": "pcas"}, "pva": {"enabled": False}},
}
SUPPORTED = {
    "softioc-pvxs": ("host", "pod", "sidecar"),
    "softioc-classic": ("host", "pod", "sidecar"),
    "caproto": ("host", "pod", "sidecar"),
    "p4p": ("host", "pod", "sidecar"),
    "pcaspy": ("host", "sidecar"),
}
UNSUPPORTED = {  # (server, mode): the words of the refusal
    ("pcaspy", "pod"): "network.mode: host",
}
IOC_NODE, CLIENT_NODE, HOST_NODE = 0, 1, 2
CA_LIBS, PVA_LIBS = ("pyepics", "caproto"), ("p4p",)


def manifest(server: str, mode: str) -> dict[str, Any]:
    """In sidecar mode every IOC gets the CA gateway (by default) and CA-only IOCs also
    the CA-to-PVA bridge, so p4p reaches them too."""
    name = f"{server}-{mode}".replace("softioc-", "s")
    spec = {"image": "lab", "prefix": f"{name.upper()}:", "servers": SERVERS[server],
            "network": {"mode": mode}}
    if mode == "sidecar" and SERVERS[server]["pva"].get("enabled") is False:
        spec["gateways"] = {"bridge": {"enabled": True}}
    return {"apiVersion": "epics-operator.io/v1alpha1", "kind": "IOC",
            "metadata": {"name": name, "namespace": "lab"}, "spec": spec}


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Iterator[tuple[list[RunningIOC], float]]:
    start = time.monotonic()
    iocs = [parse_ioc(manifest(server, mode))
            for server, modes in SUPPORTED.items() for mode in modes]
    runner = LabRunner(lab)
    running = []
    for rendered in render_all(iocs):
        host = rendered.ioc.spec.network.mode.value == "host"
        running.append(runner.run(rendered, HOST_NODE if host else IOC_NODE))
    yield running, time.monotonic() - start


def test_unsupported_cells_are_refused_with_a_reason():
    for (server, mode), words in UNSUPPORTED.items():
        with pytest.raises(IOCValidationError, match=words):
            parse_ioc(manifest(server, mode))
    cells = {(s, m) for s, modes in SUPPORTED.items() for m in modes} | set(UNSUPPORTED)
    assert len(cells) == len(SERVERS) * 3  # every cell is either supported or refused


def test_host_mode_iocs_share_one_node_on_their_own_ports(cluster):
    running, _ = cluster
    host = [r for r in running if r.mode == "host"]
    assert len(host) == 5 and len({r.where.ns for r in host}) == 1
    bound = [p for r in host for p in r.server.ports().get("tcp", set())]
    assert len(bound) == len(set(bound)), "two host-mode IOCs bound one TCP port"


def calls_for(lab: Lab, running: list[RunningIOC], env: dict[str, str], protocol: str,
              only: set[str] | None = None) -> list[tuple[str, ClientCall]]:
    client = lab.pods["client"]
    serving = [r for r in running if (r.client_env.get(f"EPICS_{protocol}_ADDR_LIST") is not None)
               and (only is None or r.ioc.metadata.name in only)]
    libs = CA_LIBS if protocol == "CA" else PVA_LIBS
    if protocol == "CA" and only is not None:
        libs = ("pyepics",)  # caproto's client ignores EPICS_CA_NAME_SERVERS
    calls = []
    # 10 s: a first search through a gateway or the bridge is answered only once the
    # gateway found the name upstream, and clients back off between searches (pvxs:
    # 1, 2, 4 s); once in about 20 matrix runs a first get needed more than 5 s, and
    # under a loaded CI machine a first monitor through pvagw more than 10 s.
    for lib in libs:
        for op, pv in (("get", "value"), ("put", "value"), ("monitor", "counter")):
            pvs = [r.server.pv(pv) for r in serving]
            calls.append((protocol, ClientCall(client, lib, op, pvs, env,
                                               value=2.5 if op == "put" else None,
                                               timeout=15.0 if op == "monitor" else 10.0)))
    return calls


def test_discovery_matrix(lab, cluster):
    running, setup_seconds = cluster
    lab.add_pod(CLIENT_NODE, name="client")
    directory = directory_env(r.client_env for r in running)
    ca_ns = {k: v for k, v in directory.items() if k.startswith("EPICS_CA_")
             and k != "EPICS_CA_ADDR_LIST"} | {"EPICS_CA_ADDR_LIST": ""}
    pva_ns = {k: v for k, v in directory.items() if k.startswith("EPICS_PVA_")
              and k != "EPICS_PVA_ADDR_LIST"} | {"EPICS_PVA_ADDR_LIST": ""}
    listed = {proto: {r.ioc.metadata.name for r in running
                      if f"EPICS_{proto}_NAME_SERVERS" in r.client_env} for proto in ("CA", "PVA")}
    plan = ([("directory", *c) for c in calls_for(lab, running, directory, "CA")]
            + [("directory", *c) for c in calls_for(lab, running, directory, "PVA")]
            + [("name servers", *c) for c in calls_for(lab, running, ca_ns, "CA", listed["CA"])]
            + [("name servers", *c)
               for c in calls_for(lab, running, pva_ns, "PVA", listed["PVA"])])
    start = time.monotonic()
    results = run_clients(lab, [c for _, _, c in plan], parallel=6)
    elapsed = time.monotonic() - start

    rows, failures = [], []
    by_name = {r.ioc.metadata.name: r for r in running}
    for (settings, protocol, call), res in zip(plan, results, strict=True):
        for pv in call.pvs:
            name = next(n for n, r in by_name.items() if pv.startswith(r.ioc.spec.prefix))
            r = by_name[name]
            entry = next((x for x in res.results if x["pv"] == pv), None)
            ok = bool(entry and entry["ok"])
            rows.append((r.server.kind, r.mode, protocol, call.lib, call.op, settings, ok,
                         entry["elapsed"] if entry else res.elapsed))
            if not ok:
                failures.append(f"{r.server.kind}/{r.mode} {call.lib} {call.op} via {settings}: "
                                f"{(entry or {}).get('error') or res.error}")
    print(f"\nlab set-up {setup_seconds:.1f} s, {len(results)} client runs in {elapsed:.1f} s")
    print(f"{'server':16} {'mode':8} {'proto':5} {'client':8} {'op':8} {'settings':13} "
          f"{'result':6} seconds")
    for row in sorted(rows):
        print(f"{row[0]:16} {row[1]:8} {row[2]:5} {row[3]:8} {row[4]:8} {row[5]:13} "
              f"{'ok' if row[6] else 'FAIL':6} {row[7]:.2f}")
    assert not failures, "\n".join(failures)
    # every supported cell was tried with every client of its protocols
    cells = {(row[0], row[1], row[3]) for row in rows}
    assert {(k, m) for k, m, _ in cells} == {
        (s, m) for s, modes in SUPPORTED.items() for m in modes}
