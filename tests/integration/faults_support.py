"""Helpers for the fault tests: IOC manifests, the converged-state check, timing.

`problems()` is the whole invariant the fault tests assert after every fault: the IOCs
are exactly the expected ones, each is reconciled at its current generation with an
address, each has exactly one StatefulSet (labelled with its name, controlled by it),
no StatefulSet is left for an IOC that is gone, host-mode IOCs sharing a node bind
distinct ports, and the directory ConfigMap lists exactly the IOCs' endpoints.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from ioc_operator.controller.kube import Kube, KubeError
from ioc_testbed.waiting import wait_for

from support import IOC_API

IOC_LABEL = "epics-operator.io/ioc"
MANAGED = "app.kubernetes.io/managed-by=ioc-operator"
DIRECTORY = "epics-client-env"
MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
POLL = 0.2
GC = "garbage collector: "


def ioc(name: str, namespace: str, mode: str = "pod", node: str | None = None,
        **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"image": "registry.example/ioc:1", "prefix": f"{name.upper()}:",
                            "network": {"mode": mode}, **spec}
    if mode == "host":
        body.setdefault("scheduling", {})["nodeName"] = node
    return {"apiVersion": IOC_API, "kind": "IOC",
            "metadata": {"name": name, "namespace": namespace}, "spec": body}


def ioc_url(namespace: str, name: str) -> str:
    return f"/apis/{IOC_API}/namespaces/{namespace}/iocs/{name}"


def patch_spec(kube: Kube, namespace: str, name: str, spec: dict[str, Any]) -> None:
    kube.request("PATCH", ioc_url(namespace, name), body={"spec": spec}, content_type=MERGE)


def make_node(kube: Kube, name: str, address: str) -> None:
    assert address.startswith(("198.18.", "198.19.")), "lab addresses only (198.18.0.0/15)"
    kube.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                 "status": {"addresses": [{"type": "InternalIP", "address": address}]}})


def delete_quietly(kube: Kube, api: str, kind: str, namespace: str | None, name: str) -> None:
    with contextlib.suppress(KubeError):
        kube.delete(api, kind, namespace, name)


# ------------------------------------------------------------------ the invariant


def _entry(address: str, port: int, default: int) -> str:
    return address if port == default else f"{address}:{port}"


def expected_directory(iocs: Iterable[dict[str, Any]]) -> tuple[set[str], set[str]]:
    """EPICS_CA_ADDR_LIST and EPICS_PVA_ADDR_LIST entries from the IOCs' status.endpoints
    (the address) and status.ports (the PVA search port)."""
    ca: set[str] = set()
    pva: set[str] = set()
    for item in iocs:
        status = item.get("status") or {}
        endpoints = status.get("endpoints") or {}
        if endpoints.get("ca"):
            address, port = endpoints["ca"].rsplit(":", 1)
            ca.add(_entry(address, int(port), 5064))
        if endpoints.get("pva"):
            address = endpoints["pva"].rsplit(":", 1)[0]
            pva.add(_entry(address, status["ports"]["pvaBroadcast"], 5076))
    return ca, pva


def _used_ports(item: dict[str, Any]) -> set[tuple[int, str]]:
    spec, status = item["spec"], item.get("status") or {}
    ports = status.get("ports") or {}
    servers = spec.get("servers") or {}
    used: set[tuple[int, str]] = set()
    if (servers.get("ca") or {}).get("enabled", True):
        used |= {(ports["ca"], "TCP"), (ports["ca"], "UDP")}
    if (servers.get("pva") or {}).get("enabled", True):
        used |= {(ports["pvaServer"], "TCP"), (ports["pvaBroadcast"], "UDP")}
    return used


def problems(kube: Kube, namespace: str, expected: set[str]) -> list[str]:
    """Everything that is not yet as it must be; [] once converged."""
    out: list[str] = []
    iocs = kube.list(IOC_API, "IOC", namespace)
    present = {i["metadata"]["name"] for i in iocs}
    if present != expected:
        out.append(f"IOCs {sorted(present ^ expected)[:5]} present/absent wrongly")
    live = [i for i in iocs if not i["metadata"].get("deletionTimestamp")]
    for item in live:
        meta, status = item["metadata"], item.get("status") or {}
        reconciled = next((c for c in status.get("conditions") or []
                           if c["type"] == "Reconciled"), None)
        if not (reconciled and reconciled["status"] == "True"
                and reconciled.get("observedGeneration") == meta["generation"]
                and status.get("observedGeneration") == meta["generation"]):
            out.append(f"{meta['name']} not reconciled at generation {meta['generation']}")
        elif not status.get("endpoints") or status.get("mode") != item["spec"]["network"][
                "mode"]:
            out.append(f"{meta['name']} has no endpoints for mode {status.get('mode')}")
    by_ioc: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for sts in kube.list("apps/v1", "StatefulSet", namespace, MANAGED):
        by_ioc[sts["metadata"]["labels"].get(IOC_LABEL, "?")].append(sts)
    uids = {i["metadata"]["name"]: i["metadata"]["uid"] for i in live}
    for name, uid in uids.items():
        workloads = by_ioc.get(name, [])
        if len(workloads) != 1:
            out.append(f"{name} has {len(workloads)} StatefulSets")
        elif not any(ref.get("uid") == uid and ref.get("controller") for ref in
                     workloads[0]["metadata"].get("ownerReferences") or []):
            out.append(f"{name}'s StatefulSet is not controlled by it")
    strays = sorted(set(by_ioc) - set(uids))
    if strays:  # the garbage collector's job (kube-controller-manager), not the operator's
        out.append(f"{GC}StatefulSets of IOCs that are gone: {strays[:5]}")
    # host ports: distinct among the host-mode IOCs of one node
    seen: dict[tuple[str, int, str], str] = {}
    for item in live:
        if item["spec"]["network"]["mode"] != "host" or not (item.get("status") or {}).get(
                "ports") or (item.get("status") or {}).get("mode") != "host":
            continue
        node = item["spec"].get("scheduling", {}).get("nodeName") or "*"
        for port, proto in _used_ports(item):
            key = (node, port, proto)
            if key in seen:
                out.append(f"host port {port}/{proto} of {item['metadata']['name']} "
                           f"also used by {seen[key]}")
            seen[key] = item["metadata"]["name"]
    cm = kube.get("v1", "ConfigMap", namespace, DIRECTORY)
    if not live:
        if cm is not None and cm["data"].get("EPICS_CA_ADDR_LIST"):
            out.append(f"directory left with {cm['data']['EPICS_CA_ADDR_LIST']!r}")
        return out
    if cm is None:
        return [*out, "no directory"]
    ca, pva = expected_directory(live)
    for var, want in (("EPICS_CA_ADDR_LIST", ca), ("EPICS_PVA_ADDR_LIST", pva)):
        entries = cm["data"].get(var, "").split()
        if len(entries) != len(set(entries)):
            out.append(f"{var} lists an entry twice")
        if set(entries) != want:
            out.append(f"{var}: missing {sorted(want - set(entries))[:3]}, "
                       f"extra {sorted(set(entries) - want)[:3]}")
    return out


def converge(kube: Kube, namespace: str, expected: Iterable[str], what: str,
             timeout: float = 60.0, since: float | None = None) -> float:
    """Wait (bounded in time and count) until `problems` is empty; print and return the
    time from `since` (default: now) until the operator's part held for good. The
    garbage collector's part (objects of deleted IOCs) is timed and printed apart."""
    start = time.monotonic() if since is None else since
    wanted = set(expected)
    deadline = time.monotonic() + timeout
    last: list[str] = ["not checked"]
    operator_done: float | None = None
    report = time.monotonic() + 10
    for _ in range(int(timeout / POLL) + 2):
        try:
            last = problems(kube, namespace, wanted)
        except KubeError as exc:  # e.g. the API server is still starting
            last = [f"API: {exc}"]
        now = time.monotonic()
        if any(not p.startswith(GC) for p in last):
            operator_done = None
        elif operator_done is None:
            operator_done = now
        if last and now > report:  # a slow convergence says what it waits for
            print(f"fault {what}: after {now - start:.0f} s still {last[:3]}")
            report += 10
        if not last:
            took = operator_done - start if operator_done is not None else now - start
            print(f"fault {what}: converged in {took:.1f} s")
            if now - operator_done > 1.0:
                print(f"fault {what}: garbage collector done in {now - start:.1f} s")
            return took
        if now > deadline:
            break
        time.sleep(POLL)
    raise AssertionError(f"fault {what}: not converged after {timeout:.0f} s: {last[:8]}")


def wait_until(what: str, probe: Any, timeout: float = 30.0,
               since: float | None = None) -> tuple[Any, float]:
    """wait_for, also returning the seconds since `since` (default: now)."""
    start = time.monotonic() if since is None else since
    value = wait_for(what, probe, timeout, interval=0.05)
    return value, time.monotonic() - start


# ----------------------------------------------------- the renderer's strategies


def render_properties() -> ModuleType:
    """tests/unit/test_render_properties.py (the hypothesis strategies), loaded by path
    under its own name so the integration directory needs nothing on sys.path."""
    name = "ioc_render_property_strategies"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "unit" / "test_render_properties.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
