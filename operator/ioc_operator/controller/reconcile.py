"""One reconcile of one IOC: render, dry-run, apply, prune, observe, compute status.

Kept apart from kopf so it reads top to bottom and can be called from the IOC's own
handlers and from the watches on the objects it owns. What it remembers of the IOC
(digest, echo marks) goes into the IOC's `IOCMemory` (state.py).

Requests per reconcile, for a pod-mode IOC seen for the first time: a dry run of the
StatefulSet, the apply of the Service and of the StatefulSet, and (the caller) one
status patch. Objects to prune come from kopf's index of the IOC's children, not a
LIST per kind; the pods are listed only once the StatefulSet says it has some.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ioc_operator.allocation import clusterip, prefixes
from ioc_operator.allocation.hostports import Allocation, PortRangeExhausted
from ioc_operator.controller import drift, echoes
from ioc_operator.controller.conditions import Cond
from ioc_operator.controller.kube import Kube, KubeError
from ioc_operator.controller.state import IOCMemory
from ioc_operator.discovery import clientenv
from ioc_operator.model.config import OperatorConfig
from ioc_operator.model.errors import IOCValidationError
from ioc_operator.model.ioc import IOC, NetworkMode
from ioc_operator.model.validation import check_config, parse_ioc
from ioc_operator.render import instance, names, render, resolve_ports
from ioc_operator.render.service import service

log = logging.getLogger(__name__)

# Kinds the operator may delete again when an IOC no longer renders them (PVCs: never).
PRUNABLE = (("v1", "Service"), ("v1", "ConfigMap"), ("networking.k8s.io/v1", "NetworkPolicy"))
# Kinds the API server may refuse for what the model cannot see: free-form Kubernetes
# content (affinity, volumes, env sources in the StatefulSet) and immutable fields
# (a StatefulSet's claim templates and selector, a PVC's spec). The others are made of
# validated fields only. These are dry-run before anything is written.
REFUSABLE = {"StatefulSet", "PersistentVolumeClaim"}
# An IOC's prunable objects as kopf's index knows them: (kind, name, uid).
Child = tuple[str, str, str]
FAILURE_REASONS = {"InvalidSpec", "Rejected", "PortConflict", "ExplicitPortClash",
                   prefixes.REASON, "ClusterIPTaken", "ConfigMissing", "CrashLoop",
                   "PortRangeExhausted", "Unreachable"}
Allocator = Callable[[IOC, dict[str, Any]], Allocation]


@dataclass
class Outcome:
    """What a reconcile wants written: status fields, and the conditions it owns (the
    writer merges them into the IOC's current conditions; a change is an event)."""

    status: dict[str, Any]
    conditions: list[Cond] = field(default_factory=list)
    clashes: tuple[str, ...] = ()  # IOCs asking for one of this IOC's explicit host ports
    evicts: tuple[str, ...] = ()  # IOCs that must give up an allocated port to this one


@dataclass
class Observed:
    address: str | None = None
    node: str | None = None
    ready: bool = False
    missing_config: str | None = None  # the ConfigMap spec.config.configMap names
    ioc_container: dict[str, Any] | None = None  # the IOC container's status in its pod


def reconcile(kube: Kube, body: dict[str, Any], config: OperatorConfig,
              allocator: Allocator | None = None, memory: IOCMemory | None = None,
              prefix_taken_by: str | None = None,
              children: list[Child] | None = None,
              service_cidr: str | None = None) -> Outcome:
    """Bring the objects of one IOC in line with its spec. Raises KubeError only for
    passing faults (the caller retries); a user's mistake becomes a condition.
    `memory` receives the mark of each object as soon as it is applied (echoes.py) and
    the digest of the render. `prefix_taken_by`: an older IOC of the namespace with the
    same PV prefix. `children`: the IOC's prunable objects (None: list them).
    `service_cidr`: the cluster's Service range, where new Services get an address
    derived from the IOC's name (None: Kubernetes chooses)."""
    memory = memory if memory is not None else IOCMemory()
    meta = body.get("metadata", {})
    generation = meta.get("generation")
    allocation = None
    try:
        ioc = parse_ioc(body)
        if prefix_taken_by:
            return _refused(kube, body, prefixes.REASON, (
                f"spec.prefix: {ioc.spec.prefix!r} is also the prefix of the older IOC "
                f"{prefix_taken_by} in this namespace; clients would find its PVs twice"))
        if ioc.spec.network.mode == NetworkMode.HOST and allocator:
            allocation = allocator(ioc, body)
            if allocation.refused:
                return _refused(kube, body, "PortConflict",
                                f"spec.network.ports: {allocation.refused}",
                                allocation.clashes)
        check_config(ioc, config)
        explicit_ip = ioc.spec.network.cluster_ip
        if explicit_ip and service_cidr and not clusterip.contains(service_cidr, explicit_ip):
            raise IOCValidationError("spec.network.clusterIP", (
                f"{explicit_ip} is outside the cluster's Service range {service_cidr}"))
        mounted, missing = _mounted_config(kube, ioc)
        candidates = _ip_candidates(ioc, children, service_cidr)
        objects = render(ioc, config, allocation.ports if allocation else None,
                         mounted_config_hash=mounted,
                         cluster_ip=candidates[0] if candidates else None)
    except IOCValidationError as exc:
        return _refused(kube, body, "InvalidSpec", str(exc))
    except PortRangeExhausted as exc:
        return _refused(kube, body, "PortRangeExhausted", str(exc))

    # Dry-run everything first, so an object the API server refuses (a bad affinity, an
    # immutable field) leaves every object as it was: nothing half-applied. Objects
    # identical to the last ones applied passed already.
    digest = _digest(objects)
    reclaim: dict[str, dict[str, Any]] = {}  # ports edited by hand: see drift.py
    for obj in [] if memory.applied == digest else [
            o for o in objects if o["kind"] in REFUSABLE or _asks_for_address(o, ioc)]:
        try:
            patch = _dry_run(kube, obj)
        except KubeError as exc:
            if not exc.invalid:
                raise
            if obj["kind"] == "Service" and _address_changed(exc):
                continue  # a new explicit clusterIP: the apply re-creates the Service
            where = f"{obj['kind']} {obj['metadata']['name']}"
            reason = "ClusterIPTaken" if _address_taken(exc) else "Rejected"
            return _refused(kube, body, reason, f"{where}: {exc.message}")
        if patch:
            reclaim[_key(obj)] = patch

    results = []
    notes: list[str] = []
    # The Service first: an explicit address another Service holds is found only by
    # the real apply (a dry run does not allocate), and then nothing else is written.
    for obj in sorted(objects, key=lambda o: o["kind"] != "Service"):
        if obj["kind"] == "Service":
            try:
                results.append(_apply_service(kube, ioc, obj, candidates[1:], notes,
                                              reclaim.get(_key(obj))))
            except KubeError as exc:
                if not _address_taken(exc):
                    raise
                return _refused(kube, body, "ClusterIPTaken", (
                    f"spec.network.clusterIP: {exc.message}; choose a free address in "
                    f"{service_cidr or 'the Service range'}, or leave it unset"))
        else:
            results.append(_apply(kube, obj, reclaim.get(_key(obj))))
        memory.written[echoes.key(results[-1])] = echoes.mark(results[-1])
    memory.applied = digest
    _prune(kube, ioc, objects, children)
    observed = _observe(kube, ioc, results)
    if missing:
        observed.missing_config = missing
    return _outcome(ioc, observed, generation, allocation, notes)


def _mounted_config(kube: Kube, ioc: IOC) -> tuple[str | None, str | None]:
    """The content hash of the ConfigMap spec.config.configMap names, and its name when
    it does not exist (the pod waits for it)."""
    config = ioc.spec.config
    if config is None or config.config_map is None:
        return None, None
    found = kube.get("v1", "ConfigMap", ioc.metadata.namespace, config.config_map)
    if found is None:
        return None, config.config_map
    content = {**(found.get("data") or {}),
               **{f"binary:{k}": v for k, v in (found.get("binaryData") or {}).items()}}
    return instance.files_hash(content), None


def _ip_candidates(ioc: IOC, children: list[Child] | None,
                   service_cidr: str | None) -> list[str]:
    """Addresses a new Service of the IOC asks for, best first; none for an existing
    Service (it keeps its address) or when the range is unknown."""
    spec = ioc.spec
    if spec.network.mode == NetworkMode.HOST or spec.network.cluster_ip or not service_cidr:
        return []
    name = names.service_name(ioc)
    if children is not None and any(k == "Service" and n == name for k, n, _ in children):
        return []
    return clusterip.candidates(ioc.metadata.namespace, ioc.metadata.name, service_cidr)


def _asks_for_address(obj: dict[str, Any], ioc: IOC) -> bool:
    return obj["kind"] == "Service" and bool(ioc.spec.network.cluster_ip)


def _address_taken(exc: KubeError) -> bool:
    return exc.invalid and "already allocated" in exc.message


def _address_changed(exc: KubeError) -> bool:
    return exc.invalid and "may not change once set" in exc.message


def _apply_service(kube: Kube, ioc: IOC, obj: dict[str, Any], more: list[str],
                   notes: list[str], reclaim: dict[str, Any] | None) -> dict[str, Any]:
    """Apply the Service. A derived address another Service holds: the next candidate,
    then Kubernetes' choice. An existing Service with another address: it keeps it
    (derived) or is re-created (a new spec.network.clusterIP). Bounded: each step
    drops a candidate or the address."""
    explicit = ioc.spec.network.cluster_ip
    recreated = False
    for _ in range(len(more) + 3):
        try:
            return _apply(kube, obj, reclaim)  # hand-edited ports: drift.py
        except KubeError as exc:
            if _address_taken(exc) and not explicit:
                obj = service(ioc, resolve_ports(ioc.spec), more.pop(0) if more else None)
                if not more and "clusterIP" not in obj["spec"]:
                    notes.append("the ClusterIPs derived from its name are held by other "
                                 "Services: Kubernetes chose one, which a re-created IOC "
                                 "will not get back")
            elif _address_changed(exc) and explicit and not recreated:
                log.info("re-creating Service %s for spec.network.clusterIP %s",
                         obj["metadata"]["name"], explicit)
                kube.delete("v1", "Service", ioc.metadata.namespace, obj["metadata"]["name"])
                recreated = True
            elif _address_changed(exc) and not explicit:
                obj = service(ioc, resolve_ports(ioc.spec), None)
            else:
                raise
            reclaim = None  # applied already, or about the Service just deleted
    return _apply(kube, obj, None)


def _key(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _dry_run(kube: Kube, obj: dict[str, Any]) -> dict[str, Any] | None:
    """Dry-run the apply of `obj`. If the live object's hand-edited ports are what makes
    it invalid, dry-run their replacement instead and return that patch."""
    try:
        kube.apply(obj, dry_run=True)
        return None
    except KubeError as exc:
        if not exc.invalid:
            raise
        meta = obj["metadata"]
        patch = drift.reclaim_patch(
            kube.get(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"]), obj)
        if patch is None:
            raise
    kube.patch(obj, patch, drift.STRATEGIC, dry_run=True)
    return patch


def _apply(kube: Kube, obj: dict[str, Any], reclaim: dict[str, Any] | None) -> dict[str, Any]:
    if reclaim:
        log.info("replacing hand-edited ports of %s", _key(obj))
        kube.patch(obj, reclaim, drift.STRATEGIC)
    try:
        return kube.apply(obj)
    except KubeError as exc:
        # The dry run was skipped (render unchanged) or the edit came after it.
        meta = obj["metadata"]
        patch = drift.reclaim_patch(kube.get(
            obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"]), obj) if (
            exc.invalid and not reclaim) else None
        if patch is None:
            raise
    log.info("replacing hand-edited ports of %s", _key(obj))
    kube.patch(obj, patch, drift.STRATEGIC)
    return kube.apply(obj)


def _digest(objects: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(objects, sort_keys=True).encode()).hexdigest()


def _refused(kube: Kube, body: dict[str, Any], reason: str, message: str,
             clashes: tuple[str, ...] = ()) -> Outcome:
    """Keep what runs; say why the new spec was not applied and what runs instead. Both
    conditions say the same, so the refusal is one event."""
    meta = body.get("metadata", {})
    # A list, as elsewhere: the operator's RBAC grants no get on StatefulSets.
    found = kube.list("apps/v1", "StatefulSet", meta.get("namespace"),
                      f"{names.IOC_LABEL}={meta.get('name', '')}")
    applied = (body.get("status") or {}).get("observedGeneration")
    text = f"{message} ({what_runs(found, meta.get('uid'), applied)})"
    conds = [Cond("Reconciled", False, reason, text), Cond("Ready", False, reason, text)]
    return Outcome(status={"portClashes": list(clashes) or None}, conditions=conds,
                   clashes=clashes)


def what_runs(statefulsets: list[dict[str, Any]], uid: str | None,
              applied: int | None) -> str:
    """What keeps running while a new spec is refused, as the IOC's StatefulSet (among
    `statefulsets`) shows it. `applied`: the generation last applied (observedGeneration)."""
    sts = next((s for s in statefulsets if _controlled_by(s, uid)
                and not s["metadata"].get("deletionTimestamp")), None)
    if sts is None:
        if applied is None:
            return "nothing runs: no configuration of this IOC has been applied yet"
        return "the IOC does not run: its StatefulSet is gone"
    which = f"the last applied configuration (generation {applied})" if applied else (
        "the last applied configuration")
    if (sts.get("spec") or {}).get("replicas") == 0:
        return f"{which} stays in place, suspended"
    return f"{which} keeps running"


def _controlled_by(obj: dict[str, Any], uid: str | None) -> bool:
    return any(ref.get("uid") == uid and ref.get("controller")
               for ref in obj["metadata"].get("ownerReferences") or [])


def _prune(kube: Kube, ioc: IOC, keep: list[dict[str, Any]],
           children: list[Child] | None) -> None:
    """Delete objects this IOC rendered before but no longer does (e.g. its Service
    after a switch to host mode). Only objects whose controller is this IOC."""
    wanted = {(o["kind"], o["metadata"]["name"]) for o in keep}
    if children is not None:
        versions = dict((kind, api) for api, kind in PRUNABLE)
        for kind, name, uid in children:
            if (kind, name) not in wanted and kind in versions:
                log.info("pruning %s %s", kind, name)
                kube.delete(versions[kind], kind, ioc.metadata.namespace, name, uid=uid)
        return
    selector = f"{names.IOC_LABEL}={ioc.metadata.name}"
    for api_version, kind in PRUNABLE:
        for item in kube.list(api_version, kind, ioc.metadata.namespace, selector):
            item_meta = item["metadata"]
            if _controlled_by(item, ioc.metadata.uid) and (kind, item_meta["name"]) not in wanted:
                log.info("pruning %s %s", kind, item_meta["name"])
                kube.delete(api_version, kind, ioc.metadata.namespace, item_meta["name"],
                            uid=item_meta.get("uid"))


def _node_address(kube: Kube, node_name: str) -> str | None:
    node = kube.get("v1", "Node", None, node_name)
    for addr in (node or {}).get("status", {}).get("addresses", []):
        if addr.get("type") == "InternalIP":
            return addr.get("address")
    return None


def _observe(kube: Kube, ioc: IOC, applied: list[dict[str, Any]]) -> Observed:
    by_kind = {o["kind"]: o for o in applied}
    sts_status = by_kind["StatefulSet"].get("status") or {}
    observed = Observed(ready=(sts_status.get("readyReplicas") or 0) >= 1)
    # No pod before the StatefulSet controller reports one: at a cold start, none of
    # 1,000 new IOCs needs the LIST. Its status event later reconciles again.
    pods = kube.list("v1", "Pod", ioc.metadata.namespace,
                     f"{names.IOC_LABEL}={ioc.metadata.name}") if sts_status.get(
        "replicas") else []
    # A terminating pod is on its way out (after a node move it may wait for a node
    # that is gone): the IOC's address is where its next pod goes.
    pod = next((p for p in pods if not p["metadata"].get("deletionTimestamp")), None)
    if pod:
        observed.node = pod.get("spec", {}).get("nodeName")
        observed.ioc_container = next(
            (c for c in (pod.get("status") or {}).get("containerStatuses") or []
             if c.get("name") == "ioc"), {})  # {}: the pod has no container status yet
    if ioc.spec.network.mode == NetworkMode.HOST:
        host_ip = (pod or {}).get("status", {}).get("hostIP")
        node_name = observed.node or ioc.spec.scheduling.node_name
        observed.address = host_ip or (_node_address(kube, node_name) if node_name else None)
        observed.node = node_name
    else:
        cluster_ip = by_kind["Service"].get("spec", {}).get("clusterIP")
        observed.address = cluster_ip if cluster_ip and cluster_ip != "None" else None
    return observed


def _outcome(ioc: IOC, observed: Observed, generation: int | None,
             allocation: Allocation | None, notes: list[str] | None = None) -> Outcome:
    spec = ioc.spec
    ports = resolve_ports(spec, allocation.ports if allocation else None)
    clashes = allocation.clashes if allocation else ()
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "mode": spec.network.mode.value,
        "node": observed.node,
        "ports": ports.as_dict(),
        "endpoints": None,
        "clientEnv": None,
        "portClashes": list(clashes) or None,
    }
    if observed.address:
        status["endpoints"] = clientenv.endpoints(spec, observed.address, ports)
        status["clientEnv"] = clientenv.for_ioc(spec, observed.address, ports).env()

    if spec.suspend:
        ready = Cond("Ready", False, "Suspended", "spec.suspend is true: the IOC is stopped")
    elif not observed.address:
        what = "a node" if spec.network.mode == NetworkMode.HOST else "a ClusterIP"
        ready = Cond("Ready", False, "WaitingForAddress", f"waiting for {what}")
    elif observed.missing_config:
        ready = Cond("Ready", False, "ConfigMissing", (
            f"spec.config.configMap: ConfigMap {observed.missing_config} does not exist in "
            f"namespace {ioc.metadata.namespace}; the IOC starts once it does"))
    elif not observed.ready:
        ready = Cond("Ready", False, *_not_ready(ioc, observed.ioc_container))
    else:
        ready = Cond("Ready", True, "Running",
                     "the IOC is running" + _restarts(observed.ioc_container))
    applied = "; ".join([f"generation {generation} applied", *(notes or [])])
    conds = [Cond("Reconciled", True, "Applied", applied), ready]
    if spec.network.mode == NetworkMode.HOST:
        conds.append(
            Cond("PortConflict", True, "ExplicitPortClash",
                 f"explicit host port(s) also requested by {', '.join(clashes)}; the older "
                 "IOC keeps them") if clashes else
            Cond("PortConflict", False, "NoConflict", "host ports are unique on the node"))
    return Outcome(status=status, conditions=conds, clashes=clashes,
                   evicts=allocation.evicts if allocation else ())


def _not_ready(ioc: IOC, status: dict[str, Any] | None) -> tuple[str, str]:
    """Why the pod is not ready, from the IOC container's status: starting (its
    startup probe may take spec.health.startupSeconds), or failing its probes."""
    if not status:
        return "PodNotReady", ("waiting for the IOC pod" if status is None else
                               "waiting for the IOC pod to start")
    waiting = (status.get("state") or {}).get("waiting") or {}
    if waiting.get("reason") == "CrashLoopBackOff":
        return "CrashLoop", "the IOC container keeps exiting" + _restarts(status)
    if status.get("started") is False:
        return "Starting", (
            f"the IOC is starting (allowed {ioc.spec.health.startup_seconds} s by "
            "spec.health.startupSeconds)" + _restarts(status))
    return "PodNotReady", "the IOC fails its readiness probe" + _restarts(status)


def _restarts(status: dict[str, Any] | None) -> str:
    """`; restarted N times (last: ...)` when the kubelet restarted the IOC container
    (a failed liveness probe, a crash, an out-of-memory kill)."""
    count = (status or {}).get("restartCount") or 0
    if not count:
        return ""
    last = ((status or {}).get("lastState") or {}).get("terminated") or {}
    why = f" (last exit: {last.get('reason', 'unknown')}, code {last.get('exitCode')})" if (
        last) else ""
    return f"; restarted {count} time{'s' if count != 1 else ''}{why}"


def event_type(cond: Cond) -> str:
    return "Warning" if cond.reason in FAILURE_REASONS else "Normal"



def event_report(changed: list[Cond]) -> tuple[str, str, str] | None:
    """One event for the condition changes of one status write: (type, reason,
    message). A Warning if any change is a failure, with that change's reason; else
    the first change's reason (Reconciled comes first: a new IOC's event says Applied).
    One event, not one per condition: each is a request, and a cold start writes 1,000."""
    if not changed:
        return None
    first = next((c for c in changed if event_type(c) == "Warning"), changed[0])
    rest = [f"{c.type} {c.status_text}: {c.message}" for c in changed if c is not first]
    message = "; ".join([first.message, *rest])
    return event_type(first), first.reason, message
