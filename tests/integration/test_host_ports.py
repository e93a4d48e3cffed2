"""Host-network port allocation on the real API server: unique, recorded, stable."""

from __future__ import annotations

import time
from typing import Any

from ioc_operator.controller.kube import Kube

from support import IOC_API, wait_for


def host_ioc(name: str, namespace: str, node: str, **network: Any) -> dict[str, Any]:
    return {"apiVersion": IOC_API, "kind": "IOC",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"image": "registry.example/ioc:1", "prefix": f"{name.upper()}:",
                     "network": {"mode": "host", **network},
                     "scheduling": {"nodeName": node}}}


def ports_of(kube: Kube, ns: str, name: str) -> tuple[int, int, int] | None:
    ioc = kube.get(IOC_API, "IOC", ns, name)
    status = (ioc or {}).get("status") or {}
    if status.get("mode") != "host" or status.get("observedGeneration") != ioc[
            "metadata"]["generation"]:
        return None
    p = status["ports"]
    return (p["ca"], p["pvaServer"], p["pvaBroadcast"])


def sts_env(kube: Kube, ns: str, name: str) -> dict[str, str]:
    sts = kube.get("apps/v1", "StatefulSet", ns, name)
    return {e["name"]: e.get("value") for e in
            sts["spec"]["template"]["spec"]["containers"][0]["env"]}


def condition(kube: Kube, ns: str, name: str, ctype: str) -> dict[str, Any] | None:
    ioc = kube.get(IOC_API, "IOC", ns, name) or {}
    return next((c for c in (ioc.get("status") or {}).get("conditions") or []
                 if c["type"] == ctype), None)


def test_unique_ports_on_one_node_survive_operator_restart(kube, operator, namespace):
    node = f"p-{namespace}"
    kube.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
                 "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.31"}]}})
    names = [f"h{i}" for i in range(4)]
    for name in names:  # created together: allocations race in the operator
        kube.create(host_ioc(name, namespace, node))
    before = {n: wait_for(n, lambda n=n: ports_of(kube, namespace, n)) for n in names}
    flat = [p for ports in before.values() for p in ports]
    assert len(flat) == len(set(flat)), before
    assert 5065 not in flat  # the CA repeater's port
    assert (5064, 5075, 5076) in before.values()  # the first one gets the defaults
    for name, (ca, pva, bcast) in before.items():
        env = sts_env(kube, namespace, name)
        assert (env["EPICS_CAS_SERVER_PORT"], env["EPICS_PVAS_SERVER_PORT"],
                env["EPICS_PVAS_BROADCAST_PORT"]) == (str(ca), str(pva), str(bcast))

    operator.stop(kill=True)
    operator.start()
    # a new IOC after the restart must avoid every recorded port
    kube.create(host_ioc("h9", namespace, node))
    new = wait_for("h9", lambda: ports_of(kube, namespace, "h9"), timeout=60)
    assert not set(new) & set(flat)
    for name in names:  # and nobody moved
        assert ports_of(kube, namespace, name) == before[name]
        kube.request("PATCH", f"/apis/{IOC_API}/namespaces/{namespace}/iocs/{name}",
                     body={"spec": {"description": "touched"}},
                     content_type="application/merge-patch+json")
    for name in names:
        assert wait_for(name, lambda n=name: ports_of(kube, namespace, n)) == before[name]


def test_explicit_port_clash_is_reported_on_both(kube, operator, namespace):
    node = f"q-{namespace}"
    kube.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
                 "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.32"}]}})
    kube.create(host_ioc("first", namespace, node, ports={"ca": 5900}))
    wait_for("first", lambda: ports_of(kube, namespace, "first"))
    kube.create(host_ioc("second", namespace, node, ports={"ca": 5900}))
    refused = wait_for("second refused", lambda: (c := condition(
        kube, namespace, "second", "Reconciled")) and c["reason"] == "PortConflict" and c)
    assert "spec.network.ports" in refused["message"] and "first" in refused["message"]
    assert kube.get("apps/v1", "StatefulSet", namespace, "second") is None
    clash = wait_for("first told", lambda: (c := condition(
        kube, namespace, "first", "PortConflict")) and c["status"] == "True" and c)
    assert "second" in clash["message"]
    warnings = wait_for("events", lambda: {e["involvedObject"]["name"] for e in kube.list(
        "v1", "Event", namespace) if e["type"] == "Warning"} >= {"first", "second"})
    assert warnings
    # the second one moves to a free port: both clear
    kube.request("PATCH", f"/apis/{IOC_API}/namespaces/{namespace}/iocs/second",
                 body={"spec": {"network": {"ports": {"ca": 5901}}}},
                 content_type="application/merge-patch+json")
    wait_for("second applied", lambda: ports_of(kube, namespace, "second"))
    wait_for("first cleared", lambda: (c := condition(
        kube, namespace, "first", "PortConflict")) and c["status"] == "False")


def test_a_port_clash_clears_as_soon_as_the_other_ioc_is_deleted(kube, operator, namespace):
    """Nothing else reconciles the other side of a clash when one IOC is deleted: the
    refused IOC stayed refused, naming the deleted one, until someone edited it."""
    node = f"r-{namespace}"
    kube.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
                 "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.33"}]}})
    # created in one second: the name decides which is older (first, second, third)
    for name in ("first", "second", "third"):
        kube.create(host_ioc(name, namespace, node, ports={"ca": 5910}))
        wait_for(f"{name} reconciled", lambda n=name: condition(kube, namespace, n, "Reconciled"))
    for name in ("second", "third"):
        assert condition(kube, namespace, name, "Reconciled")["reason"] == "PortConflict"
    assert "first" in condition(kube, namespace, "second", "Reconciled")["message"]
    wait_for("first told of both", lambda: all(n in (condition(
        kube, namespace, "first", "PortConflict") or {}).get("message", "")
        for n in ("second", "third")))

    # a refused IOC goes: the holder stops naming it at once
    kube.delete(IOC_API, "IOC", namespace, "third")
    start = time.monotonic()
    wait_for("first forgets third", lambda: "third" not in (
        condition(kube, namespace, "first", "PortConflict") or {}).get("message", "third"))
    assert time.monotonic() - start < 2.0
    assert "second" in condition(kube, namespace, "first", "PortConflict")["message"]

    # the holder goes: the next IOC runs on the port at once, and nobody names first
    kube.delete(IOC_API, "IOC", namespace, "first")
    start = time.monotonic()
    wait_for("second applied", lambda: condition(
        kube, namespace, "second", "Reconciled")["reason"] == "Applied")
    assert time.monotonic() - start < 2.0  # the "within a second", with slack
    assert ports_of(kube, namespace, "second")[0] == 5910
    assert kube.get("apps/v1", "StatefulSet", namespace, "second")
    status = kube.get(IOC_API, "IOC", namespace, "second")["status"]
    assert not status.get("portClashes")
    assert condition(kube, namespace, "second", "PortConflict")["status"] == "False"
