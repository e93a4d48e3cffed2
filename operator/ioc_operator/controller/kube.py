"""The operator's Kubernetes API layer: server-side apply, list, get, delete, status patch.

Raw REST paths through the `kubernetes` package's ApiClient (its credentials, TLS,
connection pool and token refresh), so the operator needs no API discovery and no
client model classes, and every error carries the API server's own message.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import kubernetes.client
import kubernetes.config

from ioc_operator.model.config import FIELD_MANAGER

# The kinds the operator writes, and their REST plurals.
PLURALS = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "StatefulSet": "statefulsets",
    "NetworkPolicy": "networkpolicies",
    "Pod": "pods",
    "Node": "nodes",
    "Namespace": "namespaces",
    "Event": "events",
    "IOC": "iocs",
    "ServiceCIDR": "servicecidrs",
}
CLUSTER_SCOPED = {"Node", "Namespace", "ServiceCIDR"}
POOL_SIZE = 24


class KubeError(Exception):
    """An API error: `status` is the HTTP code, `message` the API server's words."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def invalid(self) -> bool:
        """The object itself was refused (the user's input), not a passing fault.
        Server-side apply answers 500 when it cannot merge an object (e.g. a list key
        twice): that is the object's fault too, and retrying cannot help."""
        return self.status in (400, 422) or (
            self.status == 500 and "failed to create typed patch object" in self.message)


def path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [base]
    if namespace and kind not in CLUSTER_SCOPED:
        parts.append(f"namespaces/{namespace}")
    parts.append(PLURALS[kind])
    if name:
        parts.append(name)
    return "/".join(parts)


def client(pool_size: int = POOL_SIZE) -> kubernetes.client.ApiClient:
    """An ApiClient with the credentials kopf's login (`kopf.login_via_client`) finds, in
    the same order: the pod's service account, else $KUBECONFIG or ~/.kube/config."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        # $KUBECONFIG now, not as it was when the package was imported
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None,
                                           client_configuration=configuration)
    # One kept-alive connection per handler thread plus the resync and the publisher:
    # fewer, and connections are dropped and re-handshaken under load.
    configuration.connection_pool_maxsize = pool_size
    return kubernetes.client.ApiClient(configuration)


@dataclass
class Kube:
    api: kubernetes.client.ApiClient
    timeout: float = 30.0

    def request(
        self,
        method: str,
        url: str,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        m, full_url, headers, data, _ = self.api.param_serialize(
            method=method, resource_path=url, query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body, auth_settings=["BearerToken"])
        resp = self.api.call_api(m, full_url, header_params=headers, body=data,
                                 _request_timeout=self.timeout)
        resp.read()
        status, reason, raw = resp.status, str(resp.reason or ""), resp.data or b""
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:  # e.g. "404 page not found" for a resource not served yet
            payload = raw.decode(errors="replace").strip()
        if status >= 400:
            message = payload.get("message", "") if isinstance(payload, dict) else str(payload)
            why = payload.get("reason", "") if isinstance(payload, dict) else ""
            raise KubeError(status, why or reason, message)
        return payload

    def apply(self, obj: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        """Server-side apply: the operator owns exactly the fields it renders."""
        meta = obj["metadata"]
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        if dry_run:
            query.append(("dryRun", "All"))
        url = path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        return self.request("PATCH", url, query, obj, "application/apply-patch+yaml")

    def patch(self, obj: dict[str, Any], body: dict[str, Any], content_type: str,
              dry_run: bool = False) -> dict[str, Any]:
        """A patch of another type (not apply) to the object `obj` names."""
        meta = obj["metadata"]
        query = [("fieldManager", FIELD_MANAGER)] + ([("dryRun", "All")] if dry_run else [])
        url = path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        return self.request("PATCH", url, query, body, content_type)

    def get(self, api_version: str, kind: str, namespace: str | None,
            name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path(api_version, kind, namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str | None,
             label_selector: str | None = None) -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector)] if label_selector else []
        return self.request("GET", path(api_version, kind, namespace), query)["items"]

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str,
               uid: str | None = None) -> None:
        """Delete; with `uid`, only that incarnation (never a namesake created since)."""
        body = {"preconditions": {"uid": uid}} if uid else None
        try:
            self.request("DELETE", path(api_version, kind, namespace, name), body=body)
        except KubeError as exc:
            if exc.status not in (404, 409):
                raise

    def patch_status(self, api_version: str, kind: str, namespace: str, name: str,
                     status: dict[str, Any]) -> dict[str, Any]:
        url = path(api_version, kind, namespace, name) + "/status"
        return self.request("PATCH", url, body={"status": status},
                            content_type="application/merge-patch+json")

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return self.request("POST", path(obj["apiVersion"], obj["kind"], meta.get("namespace")),
                            body=obj)
