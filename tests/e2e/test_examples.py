"""Every example on real nodes, reached from a client pod with only the directory.

The matrix: for each example IOC and each protocol it serves, the client pod (on the
other node than the host-mode IOCs, started with `envFrom: epics-client-env` and
nothing else) gets, puts and monitors a PV with libca (pyepics), caproto and p4p.
"""

from __future__ import annotations

from typing import Any

import pytest

from support import (
    EXAMPLES_NS,
    HOST_NODE,
    NAME_SERVICE_IP,
    ClientPod,
    Kubectl,
    condition,
    protocols,
)

LIBS = {"ca": ("pyepics", "caproto"), "pva": ("p4p",)}
OPS = ("get", "put", "monitor")
PV_OF_OP = {"get": "value", "put": "value", "monitor": "counter"}


@pytest.fixture(scope="session")
def matrix(client: ClientPod, example_iocs: dict[str, dict[str, Any]]
           ) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Every cell, run once: (ioc, lib, op) -> that PV's result. One client process per
    (lib, op) reads all IOCs' PVs, as a real client would."""
    cells: dict[tuple[str, str, str], dict[str, Any]] = {}
    for proto, libs in LIBS.items():
        iocs = {n: i for n, i in example_iocs.items() if proto in protocols(i)}
        for lib in libs:
            for op in OPS:
                pvs = {f"{i['spec']['prefix']}{PV_OF_OP[op]}": n for n, i in iocs.items()}
                value = 4.25 if op == "put" else None
                result = client.run(lib, op, list(pvs), value=value)
                by_pv = {r["pv"]: r for r in result.get("results", [])}
                for pv, name in pvs.items():
                    cells[(name, lib, op)] = by_pv.get(pv) or {"ok": False,
                                                               "error": result.get("error")}
    print(f"\n{client.name}:\n" + format_matrix(cells))
    return cells


def format_matrix(cells: dict[tuple[str, str, str], dict[str, Any]]) -> str:
    iocs = sorted({k[0] for k in cells})
    columns = [(lib, op) for libs in LIBS.values() for lib in libs for op in OPS]
    header = ["IOC"] + [f"{lib} {op}" for lib, op in columns]
    rows = [header]
    for ioc in iocs:
        row = [ioc]
        for lib, op in columns:
            cell = cells.get((ioc, lib, op))
            row.append("-" if cell is None else ("ok" if cell["ok"] else "FAIL"))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                     for r in rows)


def test_every_example_ioc_is_ready_with_running_containers(
        kubectl: Kubectl, example_iocs: dict[str, dict[str, Any]]) -> None:
    for name in example_iocs:
        pod = kubectl.get("pod", f"{name}-0", EXAMPLES_NS)
        assert pod is not None, name
        statuses = pod["status"]["containerStatuses"]
        assert statuses and all(s["ready"] and "running" in s["state"] for s in statuses), (
            name, statuses)
        assert pod["spec"]["nodeName"] in ("beamline-01", "beamline-02")


def test_two_host_mode_iocs_share_a_node_on_their_own_ports(
        kubectl: Kubectl, example_iocs: dict[str, dict[str, Any]]) -> None:
    host = {n: i for n, i in example_iocs.items() if i["spec"]["network"]["mode"] == "host"}
    assert len(host) >= 2
    nodes = {kubectl.get("pod", f"{n}-0", EXAMPLES_NS)["spec"]["nodeName"] for n in host}
    assert nodes == {HOST_NODE}
    ports = [i["status"]["ports"]["ca"] for i in host.values()]
    assert len(set(ports)) == len(ports), ports
    node_ip = kubectl.json("get", "node", HOST_NODE)["status"]["addresses"][0]["address"]
    for ioc in host.values():
        assert ioc["status"]["endpoints"]["ca"].startswith(f"{node_ip}:")


def test_the_client_pod_knows_only_the_directory(client: ClientPod) -> None:
    env = client.env()
    assert env["EPICS_CA_AUTO_ADDR_LIST"] == "NO"
    assert env["EPICS_PVA_AUTO_ADDR_LIST"] == "NO"
    assert env["EPICS_CA_ADDR_LIST"] and env["EPICS_PVA_ADDR_LIST"]
    if client.name == "client-name-service":  # one address for everything
        assert {v.split(":")[0] for k, v in env.items() if k.endswith(
            ("_ADDR_LIST", "_NAME_SERVERS")) and "_AUTO_" not in k} == {NAME_SERVICE_IP}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("lib", [lib for libs in LIBS.values() for lib in libs])
def test_matrix_cell(matrix: dict[tuple[str, str, str], dict[str, Any]],
                     example_iocs: dict[str, dict[str, Any]], lib: str, op: str) -> None:
    """Every IOC serving this library's protocol answers this operation."""
    proto = next(p for p, libs in LIBS.items() if lib in libs)
    wanted = [n for n, i in example_iocs.items() if proto in protocols(i)]
    assert wanted
    failed = {n: matrix[(n, lib, op)].get("error") for n in wanted
              if not matrix[(n, lib, op)]["ok"]}
    assert failed == {}


def test_every_example_ioc_is_reachable_from_the_operator_pod(
        kubectl: Kubectl, example_iocs: dict[str, dict[str, Any]]) -> None:
    """The operator (in its pod, with the published settings) probes each IOC."""
    from ioc_testbed.waiting import wait_for

    def reachable() -> dict[str, str] | None:
        iocs = kubectl.json("-n", EXAMPLES_NS, "get", "iocs")["items"]
        states = {i["metadata"]["name"]: condition(i, "Reachable").get("status", "?")
                  for i in iocs}
        return states if all(s == "True" for s in states.values()) else None

    wait_for("every example IOC Reachable", reachable, timeout=90, interval=1.0)
