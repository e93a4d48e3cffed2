"""Issue 21's controller side against the real API server and the real operator: the
CRD's new rules, a ClusterIP that survives delete and re-create, a taken address, an
explicit address change, and an existing ConfigMap whose content rolls the IOC."""

from __future__ import annotations

import pytest

from ioc_operator.allocation import clusterip
from ioc_operator.controller.kube import KubeError
from ioc_operator.render.names import FILES_HASH_ANNOTATION
from ioc_testbed.controlplane import SERVICE_CIDR

from support import IOC_API, condition, ioc_manifest, reconciled, wait_for


def service_ip(kube, namespace: str, name: str) -> str | None:
    svc = kube.get("v1", "Service", namespace, name)
    return (svc or {}).get("spec", {}).get("clusterIP")


def template_annotations(kube, namespace: str, name: str) -> dict[str, str]:
    sts = kube.get("apps/v1", "StatefulSet", namespace, name) or {}
    return ((sts.get("spec") or {}).get("template", {}).get("metadata") or {}).get(
        "annotations") or {}


@pytest.mark.parametrize("spec, words", [
    ({"config": {"files": {"st.cmd": "x"}, "configMap": "c"}},
     "set exactly one of files and configMap"),
    ({"config": {"files": {"a": "x" * 200000, "b": "x" * 100000}}}, "256 KiB in all"),
    ({"config": {"files": {"st cmd": "x"}}}, "keys must match"),
    ({"network": {"clusterIP": "198.19.1"}}, "spec.network.clusterIP"),
    ({"health": {"periodSeconds": 0}}, "spec.health.periodSeconds"),
])
def test_the_api_server_refuses_bad_new_fields(kube, namespace, spec, words):
    with pytest.raises(KubeError) as info:
        kube.create(ioc_manifest("bad", namespace, **spec))
    assert info.value.status == 422 and words in info.value.message


def test_a_recreated_ioc_keeps_its_cluster_ip(kube, operator, namespace):
    kube.create(ioc_manifest("keep", namespace))
    ioc = wait_for("reconcile", lambda: (i := reconciled(kube, namespace, "keep"))
                   and (i.get("status") or {}).get("endpoints") and i)
    first = service_ip(kube, namespace, "keep")
    assert first == clusterip.candidates(namespace, "keep", SERVICE_CIDR)[0]
    assert ioc["status"]["endpoints"]["ca"] == f"{first}:5064"
    kube.delete(IOC_API, "IOC", namespace, "keep")
    wait_for("Service collected", lambda: kube.get("v1", "Service", namespace, "keep") is None,
             timeout=60)
    kube.create(ioc_manifest("keep", namespace))
    wait_for("re-created with the same address",
             lambda: service_ip(kube, namespace, "keep") == first, timeout=60)


def test_a_taken_derived_address_falls_to_the_next_candidate(kube, operator, namespace):
    first, second = clusterip.candidates(namespace, "squeezed", SERVICE_CIDR)[:2]
    kube.create({"apiVersion": "v1", "kind": "Service",
                 "metadata": {"name": "squatter", "namespace": namespace},
                 "spec": {"clusterIP": first, "ports": [{"port": 80}]}})
    kube.create(ioc_manifest("squeezed", namespace))
    wait_for("reconcile", lambda: reconciled(kube, namespace, "squeezed"))
    assert service_ip(kube, namespace, "squeezed") == second


def test_an_explicit_address_taken_is_a_condition_and_a_change_recreates(
        kube, operator, namespace):
    first, second, third = clusterip.candidates(namespace, "pinned", SERVICE_CIDR)[:3]
    kube.create({"apiVersion": "v1", "kind": "Service",
                 "metadata": {"name": "holder", "namespace": namespace},
                 "spec": {"clusterIP": third, "ports": [{"port": 80}]}})
    kube.create(ioc_manifest("pinned", namespace, network={"clusterIP": third}))
    ioc = wait_for("refusal", lambda: reconciled(kube, namespace, "pinned"))
    cond = condition(ioc, "Reconciled")
    assert cond["status"] == "False" and cond["reason"] == "ClusterIPTaken", cond
    assert "already allocated" in cond["message"]
    assert kube.get("v1", "Service", namespace, "pinned") is None
    assert kube.get("apps/v1", "StatefulSet", namespace, "pinned") is None  # nothing applied
    path = f"/apis/{IOC_API}/namespaces/{namespace}/iocs/pinned"
    kube.request("PATCH", path, body={"spec": {"network": {"clusterIP": second}}},
                 content_type="application/merge-patch+json")
    wait_for("applied at the free address", lambda: service_ip(kube, namespace, "pinned")
             == second)
    kube.request("PATCH", path, body={"spec": {"network": {"clusterIP": first}}},
                 content_type="application/merge-patch+json")
    wait_for("Service re-created at the new address",
             lambda: service_ip(kube, namespace, "pinned") == first)
    ioc = wait_for("status", lambda: (i := reconciled(kube, namespace, "pinned"))
                   and i["status"].get("endpoints", {}).get("ca") == f"{first}:5064" and i)
    assert condition(ioc, "Reconciled")["status"] == "True"


def test_an_address_outside_the_service_range_is_refused(kube, operator, namespace):
    kube.create(ioc_manifest("outside", namespace, network={"clusterIP": "198.18.0.9"}))
    ioc = wait_for("refusal", lambda: reconciled(kube, namespace, "outside"))
    cond = condition(ioc, "Reconciled")
    assert cond["reason"] == "InvalidSpec" and "outside the cluster's Service range" in (
        cond["message"])


def test_an_existing_configmap_is_mounted_and_its_content_rolls_the_ioc(
        kube, operator, namespace):
    kube.create(ioc_manifest("cfg", namespace, config={"configMap": "cfg-files"}))
    ioc = wait_for("waiting for the ConfigMap", lambda: (
        i := reconciled(kube, namespace, "cfg")) and condition(i, "Ready")["reason"]
        == "ConfigMissing" and i)
    assert "ConfigMap cfg-files does not exist" in condition(ioc, "Ready")["message"]
    kube.create({"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": "cfg-files", "namespace": namespace,
                              "labels": {"epics-operator.io/config": "true"}},
                 "data": {"st.cmd": "iocInit()\n"}})
    first = wait_for("hash on the template", lambda: template_annotations(
        kube, namespace, "cfg").get(FILES_HASH_ANNOTATION))
    kube.request("PATCH", f"/api/v1/namespaces/{namespace}/configmaps/cfg-files",
                 body={"data": {"st.cmd": "dbl\niocInit()\n"}},
                 content_type="application/merge-patch+json")
    wait_for("a new hash rolls the pod", lambda: template_annotations(
        kube, namespace, "cfg").get(FILES_HASH_ANNOTATION) not in (None, first))


def test_inline_files_are_a_configmap_owned_by_the_ioc(kube, operator, namespace):
    kube.create(ioc_manifest("inline", namespace,
                             config={"files": {"st.cmd": "iocInit()\n"}}))
    wait_for("reconcile", lambda: reconciled(kube, namespace, "inline"))
    cm = kube.get("v1", "ConfigMap", namespace, "inline-config")
    assert cm["data"] == {"st.cmd": "iocInit()\n"}
    sts = kube.get("apps/v1", "StatefulSet", namespace, "inline")
    assert sts["spec"]["podManagementPolicy"] == "Parallel"


def test_kubectl_explain_documents_the_new_fields(control_plane):
    def explain(field: str) -> str:
        return " ".join(control_plane.kubectl("explain", f"iocs.{field}").stdout.split())

    assert "/epics/ioc/config" in explain("spec.config")
    assert "256 KiB in all" in explain("spec.config.files")
    assert "hung IOC" in explain("spec.health.pv")
    assert "Default: 60" in explain("spec.health.restartAfterSeconds")
    assert "SYS_NICE" in explain("spec.securityContext")
    assert "fsGroup" in explain("spec.podSecurityContext")
    assert "wait for a device" in explain("spec.initContainers")
    assert "EPICS ports" in explain("spec.extraContainers")
    assert "re-created IOC gets the same one" in explain("spec.network.clusterIP")
