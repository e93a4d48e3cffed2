"""The table from the IOC objects' status: a read-only list and watch (kubernetes package).

What an IOC object gives the table (written by the operator, see models.py):

* ``spec.prefix``; ``spec.servers`` (implementations, for logs);
* ``status.endpoints.ca`` / ``.pva``: host:port clients connect to (the Service's
  ClusterIP, or the node's address in host mode) -- the address every answer carries;
* ``status.ports.pvaBroadcast``: the PVA UDP search port (the CA one is the CA port);
* ``status.mode``: host-mode endpoints are node addresses, reachable from outside;
* the ``Ready`` condition; ``metadata.creationTimestamp``: the older IOC wins a name
  two IOCs (in two namespaces) claim.

An IOC without endpoints (not reconciled yet, refused) is not in the table. Every event
is applied to the table on the event loop at once, so an IOC that moves is answered
with its new address as soon as the operator has written it. A watch that ends or
fails is re-listed, with a bounded backoff.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from .table import DEFAULT_PORTS, IOC, Endpoint, Table, TableError

__all__ = ["KubeWatch", "ioc_from_object"]

log = logging.getLogger("ioc_name_server.kubernetes")

GROUP, VERSION, PLURAL = "epics-operator.io", "v1alpha1", "iocs"
WATCH_SECONDS = 300  # server-side timeout of one watch request; then it is renewed
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0


def ioc_from_object(obj: dict[str, Any]) -> IOC | None:
    """The table entry of an IOC object, or None when it has no endpoint yet."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    endpoints = status.get("endpoints") or {}
    if not (endpoints.get("ca") or endpoints.get("pva")):
        return None
    ports = status.get("ports") or {}
    servers = spec.get("servers") or {}
    mode = status.get("mode") or (spec.get("network") or {}).get("mode") or "pod"
    conditions = status.get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    try:
        ca = Endpoint.parse(endpoints["ca"], DEFAULT_PORTS["ca"]) if endpoints.get("ca") else None
        pva = (Endpoint.parse(endpoints["pva"], DEFAULT_PORTS["pva"])
               if endpoints.get("pva") else None)
        pva_search = (Endpoint(pva.host, int(ports.get("pvaBroadcast")
                                             or DEFAULT_PORTS["pva_search"]))
                      if pva else None)
        return IOC(key=key, prefix=str(spec.get("prefix", "")), ca=ca, pva=pva,
                   pva_search=pva_search, created=str(meta.get("creationTimestamp") or ""),
                   ca_server=str((servers.get("ca") or {}).get("implementation", "")),
                   pva_server=str((servers.get("pva") or {}).get("implementation", "")),
                   external=mode == "host", ready=ready)
    except (TableError, ValueError, TypeError) as exc:
        log.warning("IOC %s: unusable status (%s); not answered for", key, exc)
        return None


class KubeWatch:
    """Lists and watches IOC objects (one thread per namespace, or one for the cluster)
    and applies them to the table on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, table: Table,
                 namespaces: list[str] | None, api_client: Any) -> None:
        self.loop = loop
        self.table = table
        self.namespaces = namespaces or [None]  # type: ignore[list-item]
        self.api_client = api_client
        self.synced = asyncio.Event()
        self._pending_sync = len(self.namespaces)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watches: list[Any] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        for ns in self.namespaces:
            thread = threading.Thread(target=self._run, args=(ns,), daemon=True,
                                      name=f"watch-{ns or 'cluster'}")
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for watch in self._watches:
                watch.stop()

    # ------------------------------------------------------------------ threads
    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        if not self._stop.is_set():
            self.loop.call_soon_threadsafe(fn, *args)

    def _run(self, namespace: str | None) -> None:
        from kubernetes import client, watch
        from kubernetes.client.exceptions import ApiException

        api = client.CustomObjectsApi(self.api_client)
        scope = f"namespace {namespace}" if namespace else "all namespaces"
        backoff = BACKOFF_FIRST
        first = True
        while not self._stop.is_set():
            try:
                if namespace:
                    listing = api.list_namespaced_custom_object(GROUP, VERSION, namespace,
                                                                PLURAL)
                else:
                    listing = api.list_cluster_custom_object(GROUP, VERSION, PLURAL)
                version = (listing.get("metadata") or {}).get("resourceVersion")
                self._call(self._replace, namespace, listing.get("items") or [], first)
                first = False
                backoff = BACKOFF_FIRST
                w = watch.Watch()
                with self._lock:
                    self._watches.append(w)
                try:
                    kwargs = {"resource_version": version, "timeout_seconds": WATCH_SECONDS,
                              "allow_watch_bookmarks": True}
                    if namespace:
                        stream = w.stream(api.list_namespaced_custom_object, GROUP, VERSION,
                                          namespace, PLURAL, **kwargs)
                    else:
                        stream = w.stream(api.list_cluster_custom_object, GROUP, VERSION,
                                          PLURAL, **kwargs)
                    for event in stream:
                        if self._stop.is_set():
                            break
                        kind = event.get("type")
                        obj = event.get("object") or {}
                        if kind == "ERROR":
                            log.info("watch of IOCs in %s: %s; listing again", scope,
                                     obj.get("message", obj))
                            break
                        if kind in ("ADDED", "MODIFIED"):
                            self._call(self._put, obj)
                        elif kind == "DELETED":
                            self._call(self._delete, obj)
                finally:
                    with self._lock:
                        self._watches.remove(w)
            except ApiException as exc:
                if exc.status == 410:  # our resourceVersion is too old: list again
                    continue
                log.warning("IOCs in %s: API error %s %s; retrying in %.0f s", scope,
                            exc.status, exc.reason, backoff)
                self._stop.wait(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
            except Exception as exc:
                if self._stop.is_set():
                    break
                log.warning("IOCs in %s: %s; retrying in %.0f s", scope, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)

    # ------------------------------------------------------------------ on the loop
    def _replace(self, namespace: str | None, items: list[dict[str, Any]],
                 first: bool) -> None:
        iocs = [i for i in (ioc_from_object(o) for o in items) if i is not None]
        scope = (lambda key: key.startswith(f"{namespace}/")) if namespace else None
        changed, removed = self.table.replace_all(iocs, scope=scope)
        log.info("IOCs in %s: %d listed, %d answerable (%d new or changed, %d removed)",
                 f"namespace {namespace}" if namespace else "all namespaces", len(items),
                 len(iocs), changed, removed)
        for prefix, holders in self.table.claims().items():
            log.warning("prefix %r is claimed by %s; the older one answers", prefix,
                        ", ".join(h.key for h in holders))
        if first:
            self._pending_sync -= 1
            if self._pending_sync <= 0:
                self.synced.set()

    def _put(self, obj: dict[str, Any]) -> None:
        ioc = ioc_from_object(obj)
        meta = obj.get("metadata") or {}
        key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        if ioc is None:
            if self.table.remove(key):
                log.info("IOC %s has no endpoint any more; not answered for", key)
            return
        old = self.table.get(key)
        if self.table.put(ioc) and (old is None or old.placement() != ioc.placement()):
            log.info("IOC %s: %s %s", key, "moved to" if old is not None else "new at",
                     " ".join(f"{p}={e}" for p, e in (("ca", ioc.ca), ("pva", ioc.pva)) if e))

    def _delete(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        if self.table.remove(key):
            log.info("IOC %s deleted", key)
