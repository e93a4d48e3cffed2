"""kopf handlers: thin shells that call reconcile and report what it says."""

from __future__ import annotations

import datetime
import logging
import threading
from collections import defaultdict
from typing import Any

import kopf

from . import GROUP, PLURAL, VERSION
from .allocation import Allocation, HostIOC, allocate
from .config import OperatorConfig
from .directory import COMPONENT as DIRECTORY_COMPONENT
from .kube import Kube, KubeError, load_client
from .models import IOC
from .publish import DirectoryPublisher
from .reconcile import event_type, host_ioc, reconcile
from .render.names import MANAGED_BY

log = logging.getLogger(__name__)
MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
RETRY_DELAY = 5.0

RECHECK_ANNOTATION = f"{GROUP}/recheck-ports"

# One reconcile at a time per IOC: its own handlers and the watches on its children
# run on different kopf workers.
_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
# Host-port allocations made but maybe not yet seen in the index (status written after
# the handler returns), so two IOCs reconciled at once never pick the same port.
_claims: dict[str, HostIOC] = {}
_claims_lock = threading.Lock()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = 20  # INFO: Normal events reach `kubectl describe`
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix="kopf.epics-operator.io"
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kopf.epics-operator.io", key="last-handled-configuration"
    )
    settings.watching.server_timeout = 300
    memo.config = OperatorConfig.from_env()
    memo.kube = Kube(load_client())
    memo.directory = DirectoryPublisher(memo.kube, memo.config.directory_name)


def _allocator(memo: kopf.Memo, index: kopf.Index) -> Any:
    def allocator(_: IOC, body: dict[str, Any]) -> Allocation:
        me = host_ioc(body)
        with _claims_lock:
            others = {h.key: h for h in index.get("host", [])}
            others.update(_claims)
            others.pop(me.key, None)
            port_range = (memo.config.host_port_min, memo.config.host_port_max)
            allocation = allocate(me, others.values(), port_range)
            if not allocation.refused:
                p = allocation.ports
                _claims[me.key] = HostIOC(me.key, me.node, me.explicit,
                                          (p.ca, p.pva_server, p.pva_broadcast), me.created)
        return allocation
    return allocator


def _run(body: dict[str, Any], memo: kopf.Memo, host_iocs: kopf.Index) -> dict[str, Any]:
    """Reconcile, post events for condition changes, return the status to write."""
    uid = body["metadata"]["uid"]
    with _locks[uid]:
        try:
            outcome = reconcile(memo.kube, body, memo.config, _now(),
                                _allocator(memo, host_iocs))
        except KubeError as exc:
            raise kopf.TemporaryError(f"API error, retrying: {exc}", delay=RETRY_DELAY) from exc
    for cond in outcome.events:
        kopf.event(body, type=event_type(cond), reason=cond.reason, message=cond.message)
    before = set((body.get("status") or {}).get("portClashes") or [])
    if before != set(outcome.clashes):
        _recheck(memo, sorted(before | set(outcome.clashes)), body)
    return outcome.status


def _recheck(memo: kopf.Memo, keys: list[str], body: dict[str, Any]) -> None:
    """Make the other side of a port clash reconcile too, so both report it (and both
    clear it). An annotation change is an update kopf hands to that IOC's handler."""
    me = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
    for key in keys:
        namespace, name = key.split("/", 1)
        url = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"
        patch = {"metadata": {"annotations": {RECHECK_ANNOTATION: f"{me} {_now()}"}}}
        try:
            memo.kube.request("PATCH", url, body=patch,
                              content_type="application/merge-patch+json")
        except KubeError as exc:
            log.warning("could not ask IOC %s to recheck its ports: %s", key, exc)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def ioc_changed(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo,
                host_iocs: kopf.Index, **_: Any) -> None:
    patch.status.update(_run(dict(body), memo, host_iocs))


def _differs(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """A null in a merge patch deletes; compare what the status would become."""
    return any(old.get(k) != v for k, v in new.items())


def _owner_ioc(body: kopf.Body) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == "IOC" and ref.get("apiVersion", "").startswith(GROUP):
            return ref.get("name")
    return None


def _child_event(body: kopf.Body, memo: kopf.Memo, logger: Any,
                 host_iocs: kopf.Index) -> None:
    """An owned object changed or vanished: reconcile its IOC (recreates, reverts drift,
    refreshes readiness). Server-side apply of unchanged objects writes nothing."""
    name = _owner_ioc(body)
    namespace = body.get("metadata", {}).get("namespace")
    if not name:
        return
    ioc = memo.kube.get(f"{GROUP}/{VERSION}", "IOC", namespace, name)
    if ioc is None or ioc["metadata"].get("deletionTimestamp"):
        return  # the garbage collector is removing it
    try:
        status = _run(ioc, memo, host_iocs)
    except kopf.TemporaryError as exc:
        logger.warning("reconcile of IOC %s/%s deferred: %s", namespace, name, exc)
        return
    if _differs(status, ioc.get("status") or {}):
        try:
            memo.kube.patch_status(f"{GROUP}/{VERSION}", "IOC", namespace, name, status)
        except KubeError as exc:
            if exc.status != 404:
                raise
            # Deleted meanwhile: anything re-applied since carries its uid as owner,
            # so the garbage collector removes it.
            logger.debug("IOC %s/%s vanished during reconcile", namespace, name)


@kopf.on.event("apps", "v1", "statefulsets", labels=MANAGED)
@kopf.on.event("", "v1", "services", labels=MANAGED)
@kopf.on.event("", "v1", "configmaps", labels=MANAGED)
def owned_object_event(body: kopf.Body, memo: kopf.Memo, logger: Any,
                       client_envs: kopf.Index, host_iocs: kopf.Index, **_: Any) -> None:
    labels = body.get("metadata", {}).get("labels") or {}
    if labels.get("app.kubernetes.io/component") == DIRECTORY_COMPONENT:
        namespace = body["metadata"]["namespace"]
        memo.directory.forget(namespace)  # changed or deleted by hand: write it again
        _publish(memo, client_envs, namespace)
        return
    _child_event(body, memo, logger, host_iocs)


@kopf.index(GROUP, VERSION, PLURAL)
def host_iocs(body: kopf.Body, spec: kopf.Spec, **_: Any) -> dict[str, Any] | None:
    """Host-mode IOCs of the whole cluster: host ports are per node, not namespace."""
    if (spec.get("network") or {}).get("mode") != "host":
        return None
    return {"host": host_ioc(dict(body))}


@kopf.index(GROUP, VERSION, PLURAL)
def client_envs(namespace: str, name: str, status: kopf.Status, **_: Any) -> dict[str, Any]:
    """Each IOC's published client settings, by namespace."""
    return {namespace: (name, dict(status.get("clientEnv") or {}))}


def _publish(memo: kopf.Memo, index: kopf.Index, namespace: str) -> None:
    entries = list(index.get(namespace, []))
    try:
        memo.directory.publish(namespace, [env for _, env in entries] if entries else None)
        cluster_ns = memo.config.cluster_directory_namespace
        if cluster_ns:
            everything = [env for ns in index for _, env in index[ns]]
            memo.directory.publish(cluster_ns, everything,
                                   name=f"{memo.config.directory_name}-cluster")
    except KubeError as exc:
        # e.g. the namespace is being deleted; the next IOC event publishes again.
        log.warning("client directory of %s not written: %s", namespace, exc)


@kopf.on.event(GROUP, VERSION, PLURAL)
def ioc_event(event: kopf.RawEvent, namespace: str, name: str, spec: kopf.Spec,
              memo: kopf.Memo, client_envs: kopf.Index, **_: Any) -> None:
    """Any IOC change (status included) or deletion: refresh its namespace's directory,
    and release its host ports once it is gone or no longer in host mode."""
    if event.get("type") == "DELETED" or (spec.get("network") or {}).get("mode") != "host":
        with _claims_lock:
            _claims.pop(f"{namespace}/{name}", None)
    _publish(memo, client_envs, namespace)
