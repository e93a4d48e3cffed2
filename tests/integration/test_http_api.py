"""The operator's own HTTP client (kube.HttpApi) on the real API server, with the
credentials credentials.py reads from the control plane's kubeconfig."""

from __future__ import annotations

import dataclasses

import pytest

from ioc_operator import credentials
from ioc_operator.kube import HttpApi, Kube, KubeError


@pytest.fixture
def kubeconfig_env(control_plane, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(proxy, raising=False)


def test_requests_with_kubeconfig_credentials(kubeconfig_env, namespace):
    kube = Kube(HttpApi(credentials.load))
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


def test_a_401_reads_the_credentials_again_and_retries_once(kubeconfig_env):
    """A rotated token: the first credentials are refused, the re-read ones work."""
    good = credentials.load()
    stale = dataclasses.replace(good, certificate_data=None, private_key_data=None,
                                token="expired")
    handed = [stale, good]
    calls = []

    def source():
        calls.append(1)
        return handed[min(len(calls), len(handed)) - 1]

    kube = Kube(HttpApi(source))
    assert kube.request("GET", "/api/v1/namespaces/default")["metadata"]["name"] == "default"
    assert len(calls) == 2

    refused = Kube(HttpApi(lambda: stale))  # still refused after the re-read: an error
    with pytest.raises(KubeError) as err:
        refused.request("GET", "/api/v1/namespaces/default")
    assert err.value.status == 401
