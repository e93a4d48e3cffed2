"""A small Kubernetes API layer: server-side apply, list, get, delete, status patch.

Raw requests over urllib3 with the credentials kopf's session uses (credentials.py),
so the operator needs no API discovery, no client models, and every error carries the
API server's own message. A kubernetes-package ApiClient works too (the tests use one).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import urllib3

from .config import FIELD_MANAGER

if TYPE_CHECKING:
    import kopf

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
}
CLUSTER_SCOPED = {"Node", "Namespace"}
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


class HttpApi:
    """The operator's HTTP client for the API server. `credentials` is called again
    when the server answers 401: a rotated service account token is read anew."""

    def __init__(self, credentials: Callable[[], kopf.ConnectionInfo],
                 pool_size: int = POOL_SIZE) -> None:
        self._credentials = credentials
        self._pool_size = pool_size
        self._lock = threading.Lock()
        self._connect()

    def _connect(self) -> None:
        info = self._credentials()
        # One kept-alive connection per handler thread (16) plus the resync and the
        # publisher: fewer, and connections are dropped and re-handshaken under load.
        # urllib3's default retries (as with the kubernetes package): a connection the
        # server closed is reopened; a POST or PATCH it may have read is not resent.
        options: dict[str, Any] = dict(maxsize=self._pool_size,
                                       ssl_context=info.as_ssl_context())
        if info.insecure:
            options["assert_hostname"] = False
        pool: urllib3.PoolManager = (urllib3.ProxyManager(info.proxy_url, **options)
                                     if info.proxy_url else urllib3.PoolManager(**options))
        self._state = (pool, info.server.rstrip("/"), info.as_http_headers())

    def send(self, method: str, url: str, query: list[tuple[str, str]], body: Any,
             content_type: str, timeout: float) -> tuple[int, str, bytes]:
        data = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):
            state = self._state
            pool, server, auth = state
            resp = pool.request(
                method, server + url + (f"?{urlencode(query)}" if query else ""),
                body=data, timeout=timeout,
                headers={**auth, "Content-Type": content_type, "Accept": "application/json"})
            if resp.status == 401 and attempt == 1:
                with self._lock:
                    if self._state is state:  # not renewed by another thread meanwhile
                        self._connect()
                continue
            break
        return resp.status, resp.reason or "", resp.data


class ClientLibraryApi:
    """The same requests through a kubernetes-package ApiClient."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client

    def send(self, method: str, url: str, query: list[tuple[str, str]], body: Any,
             content_type: str, timeout: float) -> tuple[int, str, bytes]:
        m, full_url, headers, data, _ = self.api_client.param_serialize(
            method=method, resource_path=url, query_params=query,
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body, auth_settings=["BearerToken"])
        resp = self.api_client.call_api(m, full_url, header_params=headers, body=data,
                                        _request_timeout=timeout)
        resp.read()
        return resp.status, str(resp.reason or ""), resp.data or b""


def load_client() -> HttpApi:
    """$KUBECONFIG when set, else in-cluster credentials, else ~/.kube/config."""
    from .credentials import load

    return HttpApi(load)


@dataclass
class Kube:
    api: Any  # HttpApi, or a kubernetes ApiClient (wrapped in ClientLibraryApi)
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if hasattr(self.api, "param_serialize"):
            self.api = ClientLibraryApi(self.api)

    def request(
        self,
        method: str,
        url: str,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        status, reason, raw = self.api.send(method, url, query or [], body, content_type,
                                            self.timeout)
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
