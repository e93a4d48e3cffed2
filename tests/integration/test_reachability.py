"""The probe reports Reachable from what it measures, without blocking others.

The IOC is in host mode on a Node whose address is 127.0.0.1, so the probe's packets
only ever go to loopback; nothing listens there, so the IOC is Unreachable.
"""

from __future__ import annotations

import time

from ioc_operator.controller.conditions import Cond
from ioc_operator.controller.reachability import reachable_condition

from support import IOC_API, wait_for


def test_unreachable_probe_is_a_condition_and_a_warning(kube, operator, namespace):
    node = f"lo-{namespace}"
    kube.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
                 "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}})
    kube.create({"apiVersion": IOC_API, "kind": "IOC",
                 "metadata": {"name": "probed", "namespace": namespace},
                 "spec": {"image": "registry.example/ioc:1", "prefix": "PRB:",
                          "network": {"mode": "host", "ports": {
                              "ca": 5991, "pvaServer": 5992, "pvaBroadcast": 5993}},
                          "scheduling": {"nodeName": node},
                          "probe": {"pv": "PRB:HEARTBEAT", "periodSeconds": 5}}})

    def reachable():
        ioc = kube.get(IOC_API, "IOC", namespace, "probed") or {}
        return next((c for c in (ioc.get("status") or {}).get("conditions") or []
                     if c["type"] == "Reachable"), None)

    # Not probed before it is Ready: a failed read then says nothing.
    cond = wait_for("Reachable NotReady", lambda: (c := reachable())
                    and c["reason"] == "NotReady" and c, timeout=30)
    assert cond["status"] == "Unknown"
    # No kubelet here: report the pod Ready as one would; nothing listens on its ports.
    pod = wait_for("the IOC's pod", lambda: kube.get("v1", "Pod", namespace, "probed-0"))
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    kube.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/probed-0/status",
                 body={"status": {"phase": "Running", "startTime": now, "conditions": [
                     {"type": t, "status": "True", "lastTransitionTime": now}
                     for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")]}},
                 content_type="application/merge-patch+json")
    assert pod["spec"]["nodeName"] == node
    cond = wait_for("Reachable condition", lambda: (c := reachable())
                    and c["status"] == "False" and c, timeout=60)
    assert cond["reason"] == "Unreachable"
    assert "CA failed" in cond["message"] and "PVA failed" in cond["message"]
    # the other conditions, written by the reconcile, are still there
    ioc = kube.get(IOC_API, "IOC", namespace, "probed")
    types = {c["type"] for c in ioc["status"]["conditions"]}
    assert {"Ready", "Reconciled", "PortConflict", "Reachable"} <= types
    assert set(ioc["status"]["reachability"]) == {"ca", "pva"}
    wait_for("Unreachable event", lambda: [e for e in kube.list("v1", "Event", namespace)
                                           if e["reason"] == "Unreachable"])
    # the operator keeps handling other IOCs meanwhile
    kube.create({"apiVersion": IOC_API, "kind": "IOC",
                 "metadata": {"name": "other", "namespace": namespace},
                 "spec": {"image": "registry.example/ioc:1", "prefix": "OTH:"}})
    wait_for("other reconciled", lambda: (kube.get(IOC_API, "IOC", namespace, "other") or {})
             .get("status", {}).get("endpoints"), timeout=10)


def test_reachable_condition_from_results():
    ok = reachable_condition({"ca": {"ok": True, "ms": 2.5}, "pva": {"ok": True, "ms": 4.0}})
    assert ok == Cond("Reachable", True, "Reachable",
                      "CA 2.5 ms; PVA 4.0 ms (with the published client settings)")
    bad = reachable_condition({"ca": {"ok": True, "ms": 1.0},
                               "pva": {"ok": False, "error": "TimeoutError: x"}})
    assert bad.status is False and bad.reason == "Unreachable"
    assert "PVA failed: TimeoutError: x" in bad.message
    assert reachable_condition({}).status is None


def test_the_finalizer_of_earlier_versions_is_removed(kube, operator, namespace):
    """Earlier versions ran the probe as a kopf daemon, which put a finalizer on probed
    IOCs; nothing needs one now, and an IOC left with it could not be deleted."""
    kube.create({"apiVersion": IOC_API, "kind": "IOC",
                 "metadata": {"name": "legacy", "namespace": namespace,
                              "finalizers": ["epics-operator.io/operator"]},
                 "spec": {"image": "registry.example/ioc:1", "prefix": "LEG:",
                          "probe": {"pv": "LEG:HEARTBEAT", "periodSeconds": 5}}})
    wait_for("finalizer removed", lambda: not (
        kube.get(IOC_API, "IOC", namespace, "legacy") or {"metadata": {"finalizers": [1]}}
    )["metadata"].get("finalizers"), timeout=20)
    kube.delete(IOC_API, "IOC", namespace, "legacy")
    wait_for("IOC deleted", lambda: kube.get(IOC_API, "IOC", namespace, "legacy") is None,
             timeout=10)
