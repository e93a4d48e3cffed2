"""Every example on real nodes, reached from a client pod with only the directory.

The matrix: for each example IOC and each protocol it serves, the client pod (on the
other node than the host-mode IOCs, started with `envFrom: epics-client-env` and
nothing else) gets, puts and monitors a PV with libca (pyepics), caproto and p4p.
"""

from __future__ import annotations

from typing import Any

import pytest

from ioc_testbed.incluster import (
    NAME_SERVICE_IP,
    Cells,
    ClientPod,
    Kubectl,
    condition,
    failed_cells,
    format_matrix,
    run_matrix,
)

from e2elib import EXAMPLES_NS, HOST_NODE


@pytest.fixture(scope="session")
def matrix(client: ClientPod, example_iocs: dict[str, dict[str, Any]]) -> Cells:
    cells = run_matrix(client, example_iocs)
    print(f"\n{client.name}:\n" + format_matrix(cells))
    return cells


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


def test_every_cell_of_the_matrix(matrix: Cells) -> None:
    """Every IOC serving a library's protocol answers get, put and monitor."""
    assert failed_cells(matrix) == {}


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
