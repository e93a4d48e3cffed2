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

from ioc_operator.allocation import prefixes
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
from ioc_operator.render import names, render, resolve_ports

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
                   prefixes.REASON,
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


def reconcile(kube: Kube, body: dict[str, Any], config: OperatorConfig,
              allocator: Allocator | None = None, memory: IOCMemory | None = None,
              prefix_taken_by: str | None = None,
              children: list[Child] | None = None) -> Outcome:
    """Bring the objects of one IOC in line with its spec. Raises KubeError only for
    passing faults (the caller retries); a user's mistake becomes a condition.
    `memory` receives the mark of each object as soon as it is applied (echoes.py) and
    the digest of the render. `prefix_taken_by`: an older IOC of the namespace with the
    same PV prefix. `children`: the IOC's prunable objects (None: list them)."""
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
        objects = render(ioc, config, allocation.ports if allocation else None)
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
            o for o in objects if o["kind"] in REFUSABLE]:
        try:
            patch = _dry_run(kube, obj)
        except KubeError as exc:
            if not exc.invalid:
                raise
            where = f"{obj['kind']} {obj['metadata']['name']}"
            return _refused(kube, body, "Rejected", f"{where}: {exc.message}")
        if patch:
            reclaim[_key(obj)] = patch

    results = []
    for obj in objects:
        results.append(_apply(kube, obj, reclaim.get(_key(obj))))
        memory.written[echoes.key(results[-1])] = echoes.mark(results[-1])
    memory.applied = digest
    _prune(kube, ioc, objects, children)
    observed = _observe(kube, ioc, results)
    return _outcome(ioc, observed, generation, allocation)


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
    pod = pods[0] if pods else None
    if pod:
        observed.node = pod.get("spec", {}).get("nodeName")
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
             allocation: Allocation | None) -> Outcome:
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
    elif not observed.ready:
        ready = Cond("Ready", False, "PodNotReady", "waiting for the IOC pod to be ready")
    else:
        ready = Cond("Ready", True, "Running", "the IOC is running")
    conds = [Cond("Reconciled", True, "Applied", f"generation {generation} applied"), ready]
    if spec.network.mode == NetworkMode.HOST:
        conds.append(
            Cond("PortConflict", True, "ExplicitPortClash",
                 f"explicit host port(s) also requested by {', '.join(clashes)}; the older "
                 "IOC keeps them") if clashes else
            Cond("PortConflict", False, "NoConflict", "host ports are unique on the node"))
    return Outcome(status=status, conditions=conds, clashes=clashes,
                   evicts=allocation.evicts if allocation else ())


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
