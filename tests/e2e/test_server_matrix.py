"""Every server kind in every network mode it supports, on real nodes.

Five server kinds of the example image (EPICS Base soft IOC with rsrv + QSRV2 or
QSRV1, caproto, p4p, pcaspy) times three modes, less pcaspy in pod mode (refused: see
tests/unit/test_validation.py), as IOCs the operator runs, with the host-mode ones
spread over both nodes by the scheduler on the ports the operator gives them. Clients
in a pod know one directory each: the name service, the per-IOC lists, or the per-IOC
name servers alone (libca and p4p; caproto reads no NAME_SERVERS).
"""

from __future__ import annotations

from typing import Any

import pytest

from ioc_testbed.incluster import (
    LIBS,
    Cells,
    ClientPod,
    Kubectl,
    failed_cells,
    format_matrix,
    run_matrix,
)

from e2elib import apply_ready, directory_client

NAMESPACE = "e2e-matrix"
DB = "/epics/example/example.db"
SERVERS: dict[str, tuple[dict[str, Any], list[str]]] = {
    # kind: (spec.servers, args with {p} for the prefix)
    "spvxs": ({"ca": {"implementation": "rsrv"}, "pva": {"implementation": "pvxs"}},
              ["python", "-m", "pvxslibs.ioc", "-m", "P={p}", "-d", DB]),
    "sclassic": ({"ca": {"implementation": "rsrv"}, "pva": {"implementation": "classic"}},
                 ["python", "-m", "epicscorelibs.ioc", "-m", "P={p}", "-d", DB]),
    "caproto": ({"ca": {"implementation": "caproto"}, "pva": {"enabled": False}},
                ["python", "/epics/example/caproto_ioc.py", "{p}"]),
    "p4p": ({"ca": {"enabled": False}, "pva": {"implementation": "pvxs"}},
            ["python", "/epics/example/p4p_ioc.py", "{p}"]),
    "pcaspy": ({"ca": {"implementation": "pcas"}, "pva": {"enabled": False}},
               ["python", "/epics/example/pcaspy_ioc.py", "{p}"]),
}
MODES = {"spvxs": ("host", "pod", "sidecar"), "sclassic": ("host", "pod", "sidecar"),
         "caproto": ("host", "pod", "sidecar"), "p4p": ("host", "pod", "sidecar"),
         "pcaspy": ("host", "sidecar")}


def manifest(kind: str, mode: str) -> dict[str, Any]:
    """In sidecar mode every IOC gets the CA gateway (by default) and CA-only IOCs the
    CA-to-PVA bridge too, so p4p reaches them."""
    servers, args = SERVERS[kind]
    name = f"{kind}-{mode}"
    prefix = f"{name.upper().replace('-', '')}:"
    spec: dict[str, Any] = {
        "image": "ghcr.io/epics-operator/example-ioc:0.1.0",
        "args": [a.format(p=prefix) for a in args],
        "prefix": prefix, "servers": servers, "network": {"mode": mode},
    }
    if mode == "sidecar" and servers["pva"].get("enabled") is False:
        spec["gateways"] = {"bridge": {"enabled": True}}
    return {"apiVersion": "epics-operator.io/v1alpha1", "kind": "IOC",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


@pytest.fixture(scope="module")
def server_iocs(kubectl: Kubectl, operator: str) -> dict[str, dict[str, Any]]:
    return apply_ready(kubectl, NAMESPACE, [manifest(kind, mode) for kind, modes in
                                            MODES.items() for mode in modes], 240)


@pytest.fixture(scope="module", params=["name-service", "per-ioc", "name-servers-only"])
def matrix(request: pytest.FixtureRequest, kubectl: Kubectl,
           server_iocs: dict[str, dict[str, Any]]) -> tuple[str, Cells]:
    client: ClientPod = directory_client(kubectl, NAMESPACE, server_iocs, request.param)
    iocs, libs = server_iocs, LIBS
    if request.param == "name-servers-only":
        # The IOCs whose servers answer TCP name-server searches, and the clients that
        # make them.
        env = client.env()
        iocs = {n: i for n, i in server_iocs.items()
                if all(a in env.get(f"EPICS_{p.upper()}_NAME_SERVERS", "")
                       for p, a in (i["status"].get("endpoints") or {}).items())}
        libs = {"ca": ("pyepics",), "pva": ("p4p",)}
    cells = run_matrix(client, iocs, libs)
    print(f"\n{request.param}: {len(iocs)} IOCs\n" + format_matrix(cells, "server-mode"))
    return request.param, cells


def test_host_mode_iocs_get_their_own_ports_on_each_node(
        kubectl: Kubectl, server_iocs: dict[str, dict[str, Any]]) -> None:
    by_node: dict[str, list[int]] = {}
    for name, ioc in server_iocs.items():
        if ioc["spec"]["network"]["mode"] == "host":
            node = kubectl.get("pod", f"{name}-0", NAMESPACE)["spec"]["nodeName"]
            ports = ioc["status"]["ports"]
            by_node.setdefault(node, []).extend(
                [ports["ca"], ports["pvaServer"], ports["pvaBroadcast"]])
    assert sum(len(p) for p in by_node.values()) == 3 * 5
    for node, ports in by_node.items():
        assert len(ports) == len(set(ports)), (node, ports)


def test_every_cell(matrix: tuple[str, Cells]) -> None:
    kind, cells = matrix
    assert failed_cells(cells) == {}
    reached = {ioc for ioc, _, _ in cells}
    if kind == "name-servers-only":
        # rsrv, pcas and pvxs answer TCP name-server searches; caproto and QSRV1 only
        # behind the sidecar gateways (their IOCs' endpoints are not in NAME_SERVERS).
        assert {"spvxs-pod", "spvxs-host", "sclassic-sidecar", "caproto-sidecar",
                "p4p-pod", "pcaspy-host", "pcaspy-sidecar"} <= reached
        assert "caproto-pod" not in reached and "sclassic-pod" not in reached
    else:
        assert len(reached) == sum(len(m) for m in MODES.values())
