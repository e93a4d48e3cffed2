"""The `control_plane` fixture is a real Kubernetes control plane, not a mock."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ioc_testbed.controlplane import ControlPlane, pinned_version
from ioc_testbed.waiting import wait_for

T = TypeVar("T")

PROBE_GROUP = "probe.test.io"
PROBE_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"widgets.{PROBE_GROUP}"},
    "spec": {
        "group": PROBE_GROUP,
        "scope": "Namespaced",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["x"],
                                "properties": {"x": {"type": "string", "enum": ["a", "b"]}},
                            }
                        },
                    }
                },
            }
        ],
    },
}


def widget(name: str, x: str) -> dict[str, object]:
    return {
        "apiVersion": f"{PROBE_GROUP}/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"x": x},
    }


def test_version_is_pinned(control_plane: ControlPlane) -> None:
    expected = pinned_version()
    assert expected, "tests/controlplane/go.mod pins no k8s.io/kubernetes version"
    version = control_plane.version()
    assert version["gitVersion"] == expected
    assert version["major"] == "1"
    assert version["minor"] == expected.split(".")[1]
    kubectl = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert kubectl["clientVersion"]["gitVersion"] == expected
    assert kubectl["serverVersion"]["gitVersion"] == expected


def test_crd_schema_is_enforced(
    control_plane: ControlPlane, api_client: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    manifest = tmp_path / "widgets.json"
    manifest.write_text(json.dumps(PROBE_CRD))
    assert control_plane.apply_crds([manifest]) == [
        f"customresourcedefinition.apiextensions.k8s.io/widgets.{PROBE_GROUP}"
    ]
    custom = client.CustomObjectsApi(api_client)
    args = (PROBE_GROUP, "v1", namespace, "widgets")
    custom.create_namespaced_custom_object(*args, widget("good", "a"))
    with pytest.raises(ApiException) as info:
        custom.create_namespaced_custom_object(*args, widget("bad", "c"))
    assert info.value.status == 422
    status = json.loads(info.value.body)
    assert 'Unsupported value: "c"' in status["message"]
    causes = {(c["field"], c["reason"]) for c in status["details"]["causes"]}
    assert ("spec.x", "FieldValueNotSupported") in causes


def test_garbage_collector_deletes_dependents(api_client: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    owner = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    ref = client.V1OwnerReference(
        api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
    )
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="dependent", owner_references=[ref])),
    )
    core.delete_namespaced_config_map("owner", namespace)

    def dependent_gone() -> bool:
        try:
            core.read_namespaced_config_map("dependent", namespace)
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    wait_for("the garbage collector to delete the dependent ConfigMap", dependent_gone)


def test_statefulset_controller_creates_pod(api_client: client.ApiClient, namespace: str) -> None:
    labels = {"app": "probe"}
    statefulset = client.V1StatefulSet(
        metadata=client.V1ObjectMeta(name="probe"),
        spec=client.V1StatefulSetSpec(
            replicas=1,
            service_name="probe",
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    containers=[client.V1Container(name="c", image="registry.invalid/none:1")]
                ),
            ),
        ),
    )
    client.AppsV1Api(api_client).create_namespaced_stateful_set(namespace, statefulset)
    core = client.CoreV1Api(api_client)

    def pod() -> client.V1Pod | None:
        pods = core.list_namespaced_pod(namespace, label_selector="app=probe").items
        return pods[0] if pods else None

    created = wait_for("the StatefulSet controller to create pod probe-0", pod)
    assert created.metadata.name == "probe-0"
    assert created.metadata.owner_references[0].kind == "StatefulSet"
    assert created.status.phase == "Pending"  # no kubelet


def test_rbac_denies_service_account(
    control_plane: ControlPlane, api_client: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="nobody"))
    )
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600)
    )
    token = core.create_namespaced_service_account_token("nobody", namespace, request).status.token

    configuration = client.Configuration()
    configuration.host = control_plane.server
    assert control_plane.pki is not None
    configuration.ssl_ca_cert = str(control_plane.pki.ca.cert)
    configuration.api_key = {"authorization": f"Bearer {token}"}
    configuration.proxy = None
    with client.ApiClient(configuration) as as_sa:
        review = client.AuthenticationV1Api(as_sa).create_self_subject_review(
            client.V1SelfSubjectReview()
        )
        assert review.status.user_info.username == f"system:serviceaccount:{namespace}:nobody"
        with pytest.raises(ApiException) as info:
            client.CoreV1Api(as_sa).list_namespaced_secret(namespace)
    assert info.value.status == 403
    assert "cannot list resource" in info.value.body
