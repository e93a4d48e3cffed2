"""The real operator (`ioc-operator run`, a subprocess) against the real API server."""

from __future__ import annotations

from typing import Any

import pytest

from ioc_operator.controller.kube import KubeError

from support import (
    IOC_API,
    condition,
    events_for,
    get_ioc,
    ioc_manifest,
    owned_by,
    reconciled,
    wait_for,
)


@pytest.mark.parametrize("mode", ["pod", "sidecar", "host"])
def test_each_mode_creates_owned_objects_and_status(kube, operator, namespace, mode):
    spec: dict[str, Any] = {"network": {"mode": mode}}
    if mode == "host":
        # No kubelet here: a Node object stands in so the IOC has a node address.
        node = f"node-{namespace}"
        kube.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
                     "status": {"addresses": [{"type": "InternalIP",
                                               "address": "198.18.0.11"}]}})
        spec["scheduling"] = {"nodeName": node}
        spec["network"]["ports"] = {"ca": 5070, "pvaServer": 5081, "pvaBroadcast": 5082}
    kube.create(ioc_manifest("ioc-a", namespace, **spec))
    ioc = wait_for("status", lambda: (i := reconciled(kube, namespace, "ioc-a"))
                   and (i["status"].get("endpoints") and i))
    sts = kube.get("apps/v1", "StatefulSet", namespace, "ioc-a")
    assert sts and owned_by(sts, ioc)
    assert sts["spec"]["replicas"] == 1
    svc = kube.get("v1", "Service", namespace, "ioc-a")
    status = ioc["status"]
    assert status["observedGeneration"] == ioc["metadata"]["generation"]
    assert status["mode"] == mode
    ready = condition(ioc, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "PodNotReady"  # no kubelet
    assert ready["lastTransitionTime"]
    if mode == "host":
        assert svc is None
        assert sts["spec"]["template"]["spec"]["hostNetwork"] is True
        assert status["endpoints"] == {"ca": "198.18.0.11:5070", "pva": "198.18.0.11:5081"}
        assert status["clientEnv"]["EPICS_PVA_NAME_SERVERS"] == "198.18.0.11:5081"
        assert status["node"] == node
    else:
        assert svc and owned_by(svc, ioc)
        ip = svc["spec"]["clusterIP"]
        assert ip.startswith("198.19.")
        assert status["endpoints"] == {"ca": f"{ip}:5064", "pva": f"{ip}:5075"}
        assert status["clientEnv"]["EPICS_CA_ADDR_LIST"] == ip
        assert status["clientEnv"]["EPICS_CA_NAME_SERVERS"] == f"{ip}:5064"
    cm = kube.get("v1", "ConfigMap", namespace, "ioc-a-pvagw")
    assert (cm is not None) == (mode == "sidecar")
    if cm:
        assert owned_by(cm, ioc)
    reasons = wait_for("events", lambda: {e["reason"] for e in
                                          events_for(kube, namespace, "ioc-a")} or None)
    assert "Applied" in reasons


def test_spec_update_rolls_the_workload(kube, operator, namespace):
    kube.create(ioc_manifest("ioc-b", namespace))
    wait_for("first reconcile", lambda: reconciled(kube, namespace, "ioc-b"))
    before = kube.get("apps/v1", "StatefulSet", namespace, "ioc-b")
    kube.request("PATCH", f"/apis/{IOC_API}/namespaces/{namespace}/iocs/ioc-b",
                 body={"spec": {"env": [{"name": "MOTOR_COUNT", "value": "8"}]}},
                 content_type="application/merge-patch+json")
    ioc = wait_for("second reconcile", lambda: (i := reconciled(kube, namespace, "ioc-b"))
                   and i["metadata"]["generation"] == 2 and i)
    after = kube.get("apps/v1", "StatefulSet", namespace, "ioc-b")
    assert after["metadata"]["generation"] > before["metadata"]["generation"]
    env = after["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "MOTOR_COUNT", "value": "8"} in env
    assert ioc["status"]["observedGeneration"] == 2


def test_deleted_owned_objects_are_recreated(kube, operator, namespace):
    kube.create(ioc_manifest("ioc-c", namespace))
    wait_for("reconcile", lambda: reconciled(kube, namespace, "ioc-c"))
    for api, kind in (("v1", "Service"), ("apps/v1", "StatefulSet")):
        old = kube.get(api, kind, namespace, "ioc-c")
        kube.delete(api, kind, namespace, "ioc-c")
        wait_for(f"{kind} recreated", lambda api=api, kind=kind, old=old: (
            (new := kube.get(api, kind, namespace, "ioc-c"))
            and new["metadata"]["uid"] != old["metadata"]["uid"]))


def test_drift_in_owned_fields_is_reverted(kube, operator, namespace):
    kube.create(ioc_manifest("ioc-d", namespace))
    wait_for("reconcile", lambda: reconciled(kube, namespace, "ioc-d"))
    path = f"/apis/apps/v1/namespaces/{namespace}/statefulsets/ioc-d"
    kube.request("PATCH", path, body={"spec": {"replicas": 3},
                                      "metadata": {"annotations": {"team": "vacuum"}}},
                 content_type="application/merge-patch+json")
    sts = wait_for("replicas reverted", lambda: (
        (s := kube.get("apps/v1", "StatefulSet", namespace, "ioc-d"))
        and s["spec"]["replicas"] == 1 and s))
    assert sts["metadata"]["annotations"]["team"] == "vacuum"  # not ours: left alone


def test_delete_collects_owned_objects_but_keeps_autosave(kube, operator, namespace):
    kube.create(ioc_manifest("ioc-e", namespace, autosave={"enabled": True}))
    wait_for("reconcile", lambda: reconciled(kube, namespace, "ioc-e"))
    assert kube.get("v1", "PersistentVolumeClaim", namespace, "ioc-e-autosave")
    kube.delete(IOC_API, "IOC", namespace, "ioc-e")
    wait_for("garbage collection", lambda: (
        kube.get("apps/v1", "StatefulSet", namespace, "ioc-e") is None
        and kube.get("v1", "Service", namespace, "ioc-e") is None), timeout=60)
    assert kube.get("v1", "PersistentVolumeClaim", namespace, "ioc-e-autosave")


def test_mode_change_prunes_the_service(kube, operator, namespace):
    kube.create(ioc_manifest("ioc-f", namespace))
    wait_for("reconcile", lambda: reconciled(kube, namespace, "ioc-f"))
    assert kube.get("v1", "Service", namespace, "ioc-f")
    kube.request("PATCH", f"/apis/{IOC_API}/namespaces/{namespace}/iocs/ioc-f",
                 body={"spec": {"network": {"mode": "host"}}},
                 content_type="application/merge-patch+json")
    wait_for("service pruned", lambda: kube.get("v1", "Service", namespace, "ioc-f") is None)
    sts = kube.get("apps/v1", "StatefulSet", namespace, "ioc-f")
    assert sts["spec"]["template"]["spec"]["hostNetwork"] is True


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"network": {"mode": "bridge"}}, 'Unsupported value: "bridge"'),
        ({"prefix": "has space"}, "spec.prefix"),
        ({"gateways": {"pva": {}}}, "gateways may only be set when network.mode is sidecar"),
        ({"network": {"ports": {"ca": 80}}}, "should be greater than or equal to 1024"),
        ({"servers": {"ca": {"enabled": False}, "pva": {"enabled": False}}},
         "an IOC must serve CA or PVA"),
        ({"network": {"mode": "host", "allowedNamespaces": ["ops"]}},
         "allowedNamespaces needs network.mode pod or sidecar"),
        # oversized input: refused at apply, naming the field
        ({"description": "x" * 1_000_000}, "spec.description: Too long"),
        ({"args": ["st.cmd", "x" * 5000]}, "spec.args[1]: Too long"),
        ({"env": [{"name": f"V{i}", "value": "1"} for i in range(101)]}, "spec.env: Too many"),
        ({"podLabels": {"k" * 400: "v"}},
         "spec.podLabels: Invalid value: keys may have at most"),
        ({"resources": {"limits": {"memory": "9" * 100}}},
         "spec.resources.limits.memory: Too long"),
        ({"gateways": {"ca": {"pvlist": "x" * 40000}}, "network": {"mode": "sidecar"}},
         "spec.gateways.ca.pvlist: Too long"),
    ],
)
def test_api_server_rejects_schema_violations(kube, namespace, spec, words):
    with pytest.raises(KubeError) as info:
        kube.create(ioc_manifest("bad", namespace, **spec))
    assert info.value.status == 422
    assert words in info.value.message


def test_semantic_error_is_a_condition_and_warning_and_applies_nothing(kube, operator,
                                                                        namespace):
    kube.create(ioc_manifest("ioc-g", namespace, network={"requireNameServers": True},
                             servers={"pva": {"implementation": "classic"}}))
    ioc = wait_for("condition", lambda: reconciled(kube, namespace, "ioc-g"))
    ready = condition(ioc, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "spec.network.requireNameServers" in ready["message"]
    warnings = wait_for("warning event", lambda: [
        e for e in events_for(kube, namespace, "ioc-g") if e["type"] == "Warning"])
    assert "spec.network.requireNameServers" in warnings[0]["message"]
    assert kube.get("apps/v1", "StatefulSet", namespace, "ioc-g") is None
    assert kube.get("v1", "Service", namespace, "ioc-g") is None


def test_duplicate_prefix_is_refused_until_the_older_ioc_gives_it_up(kube, operator,
                                                                    namespace):
    kube.create(ioc_manifest("first", namespace, prefix="BL07:"))
    wait_for("first reconciled", lambda: reconciled(kube, namespace, "first"))
    kube.create(ioc_manifest("second", namespace, prefix="BL07:"))
    ioc = wait_for("second refused", lambda: reconciled(kube, namespace, "second"))
    cond = condition(ioc, "Reconciled")
    assert cond["status"] == "False" and cond["reason"] == "DuplicatePrefix"
    assert "'BL07:' is also the prefix of the older IOC first" in cond["message"]
    warnings = wait_for("warning event", lambda: [
        e for e in events_for(kube, namespace, "second") if e["reason"] == "DuplicatePrefix"])
    assert warnings[0]["type"] == "Warning"
    assert kube.get("apps/v1", "StatefulSet", namespace, "second") is None
    assert condition(get_ioc(kube, namespace, "first"), "Reconciled")["status"] == "True"
    # another namespace may use the prefix; here, deleting the older IOC frees it
    kube.delete(IOC_API, "IOC", namespace, "first")
    wait_for("second applied", lambda: (condition(get_ioc(kube, namespace, "second"),
                                                  "Reconciled") or {}).get("reason") == "Applied")
    assert kube.get("apps/v1", "StatefulSet", namespace, "second") is not None


def test_object_refused_by_api_server_is_not_half_applied(kube, operator, namespace):
    """A bad affinity passes the IOC schema (it is free-form) but the StatefulSet is
    refused: the dry run catches it before the Service is created."""
    kube.create(ioc_manifest("ioc-h", namespace, scheduling={
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "zone", "operator": "Sideways", "values": ["a"]}]}]}}}}))
    ioc = wait_for("condition", lambda: reconciled(kube, namespace, "ioc-h"))
    cond = condition(ioc, "Reconciled")
    assert cond["status"] == "False" and cond["reason"] == "Rejected"
    assert "StatefulSet ioc-h" in cond["message"] and "Sideways" in cond["message"]
    assert kube.get("v1", "Service", namespace, "ioc-h") is None


def test_operator_restart_converges_without_duplicates(kube, operator, namespace):
    operator.stop(kill=True)
    for i in range(5):
        kube.create(ioc_manifest(f"ioc-r{i}", namespace))
    operator.start()
    for i in range(5):
        wait_for(f"ioc-r{i}", lambda i=i: reconciled(kube, namespace, f"ioc-r{i}"), timeout=60)
    # kill it again straight after it has started on a new change, and restart
    kube.request("PATCH", f"/apis/{IOC_API}/namespaces/{namespace}/iocs/ioc-r0",
                 body={"spec": {"args": ["st.cmd"]}},
                 content_type="application/merge-patch+json")
    operator.stop(kill=True)
    operator.start()
    wait_for("ioc-r0 generation 2", lambda: (i := reconciled(kube, namespace, "ioc-r0"))
             and i["metadata"]["generation"] == 2, timeout=60)
    selector = "app.kubernetes.io/managed-by=ioc-operator"
    sts = kube.list("apps/v1", "StatefulSet", namespace, selector)
    svcs = kube.list("v1", "Service", namespace, selector)
    assert sorted(s["metadata"]["name"] for s in sts) == [f"ioc-r{i}" for i in range(5)]
    assert sorted(s["metadata"]["name"] for s in svcs) == [f"ioc-r{i}" for i in range(5)]


def test_network_policy_applied_and_pruned(kube, operator, namespace):
    kube.create(ioc_manifest("ioc-np", namespace,
                             network={"allowedNamespaces": [namespace, "ops"]}))
    ioc = wait_for("reconcile", lambda: reconciled(kube, namespace, "ioc-np"))
    policy = wait_for("policy", lambda: kube.get("networking.k8s.io/v1", "NetworkPolicy",
                                                 namespace, "ioc-np"))
    assert owned_by(policy, ioc)
    ports = {(p["protocol"], p["port"]) for p in policy["spec"]["ingress"][0]["ports"]}
    assert ports == {("TCP", 5064), ("UDP", 5064), ("TCP", 5075), ("UDP", 5076)}
    kube.request("PATCH", f"/apis/{IOC_API}/namespaces/{namespace}/iocs/ioc-np",
                 body={"spec": {"network": {"allowedNamespaces": None}}},
                 content_type="application/merge-patch+json")
    wait_for("policy pruned", lambda: kube.get("networking.k8s.io/v1", "NetworkPolicy",
                                               namespace, "ioc-np") is None)
