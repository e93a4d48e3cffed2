"""The operator's API layer (kube.py) on the real API server, with the kubernetes
package's ApiClient loaded as the operator loads it (kube.client)."""

from __future__ import annotations

import pytest

from ioc_operator.controller import kube as kube_module
from ioc_operator.controller.kube import Kube, KubeError

from support import IOC_API, ioc_manifest


@pytest.fixture
def kubeconfig_env(control_plane, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def test_requests_with_kubeconfig_credentials(kubeconfig_env, namespace):
    kube = Kube(kube_module.client())
    assert kube.request("GET", "/version")["gitVersion"].startswith("v1.")
    cm = {"apiVersion": "v1", "kind": "ConfigMap",
          "metadata": {"name": "http-api", "namespace": namespace}, "data": {"a": "1"}}
    assert kube.apply(cm)["data"] == {"a": "1"}
    assert kube.get("v1", "ConfigMap", namespace, "http-api")["data"] == {"a": "1"}
    with pytest.raises(KubeError) as err:  # the API server's own words come through
        kube.create(cm)
    assert err.value.status == 409 and "already exists" in err.value.message
    kube.delete("v1", "ConfigMap", namespace, "http-api")
    assert kube.get("v1", "ConfigMap", namespace, "http-api") is None


def test_a_status_patch_naming_another_uid_is_refused(kubeconfig_env, namespace):
    """The operator writes status without reading the IOC first; the uid in its patch
    keeps it from writing to a namesake created meanwhile."""
    kube = Kube(kube_module.client())
    ioc = kube.create(ioc_manifest("namesake", namespace))
    url = f"/apis/{IOC_API}/namespaces/{namespace}/iocs/namesake/status"
    with pytest.raises(KubeError) as err:
        kube.request("PATCH", url, body=[
            {"op": "test", "path": "/metadata/uid", "value": "not-its-uid"},
            {"op": "add", "path": "/status", "value": {"mode": "pod"}}],
            content_type="application/json-patch+json")
    assert err.value.status in (409, 422)
    assert not (kube.get(IOC_API, "IOC", namespace, "namesake") or {}).get("status")
    kube.request("PATCH", url, body=[
        {"op": "test", "path": "/metadata/uid", "value": ioc["metadata"]["uid"]},
        {"op": "add", "path": "/status", "value": {"mode": "pod"}}],
        content_type="application/json-patch+json")
    assert kube.get(IOC_API, "IOC", namespace, "namesake")["status"]["mode"] == "pod"
