"""The operator's work, one method per kind of event; handlers.py only routes kopf's
events here. One `Operator` lives in kopf's memo: its state (state.py), its runner
(threads, locks, publishes: runner.py), its API client, directory publisher and prober.

Methods named `..._sync` run in a handler thread (they call the API); the others run
on the event loop and decide with events.py whether a thread is needed at all.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any, cast

import kopf
import urllib3

from ioc_operator import GROUP, PLURAL, VERSION
from ioc_operator.allocation import prefixes
from ioc_operator.allocation.hostports import Allocation, host_ioc
from ioc_operator.allocation.prefixes import PrefixHolder
from ioc_operator.controller import bookkeeping, events, reachability, resync, servicerange
from ioc_operator.controller.conditions import Cond, merge_conditions, transitions
from ioc_operator.controller.kube import Kube, KubeError
from ioc_operator.controller.metrics import OperatorMetrics
from ioc_operator.controller.publish import DirectoryPublisher
from ioc_operator.controller.reconcile import Child, event_report, reconcile
from ioc_operator.controller.runner import Runner
from ioc_operator.controller.state import OperatorState
from ioc_operator.metrics import CollectorRegistry
from ioc_operator.model.config import OperatorConfig
from ioc_operator.model.ioc import IOC

log = logging.getLogger(__name__)
IOC_API = f"{GROUP}/{VERSION}"
RETRY_DELAY = 5.0
# How long a child event waits for its IOC's reconcile before it queues for a thread.
LOCK_WAIT = 60.0
# Tries of a directory publish that fails, RETRY_DELAY apart (a minute in all).
PUBLISH_TRIES = 12
# kopf's indexes, as the handlers receive them (key -> values).
Index = Mapping[Any, Any]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Operator:
    def __init__(self, kube: Kube, config: OperatorConfig,
                 registry: CollectorRegistry | None = None) -> None:
        self.kube = kube
        self.config = config
        self.state = OperatorState()
        # Prometheus metrics, in `registry` (the one `ioc-operator run --metrics-port`
        # serves) or one of their own
        self.metrics = OperatorMetrics(self.state, registry)
        self.directory = DirectoryPublisher(kube, config.directory_name, config)
        self.envs: Index = {}  # kopf's client_envs index, set by the startup handler
        self.runner = Runner(self._publish)
        self._service_cidr: str | None = None  # "": not found (see service_cidr)
        self.prober = reachability.Prober(self._write_reachability, self.runner.threads)

    def service_cidr(self) -> str | None:
        """The Service range new IOC Services take a derived ClusterIP from: the
        operator's setting, else the cluster's `kubernetes` ServiceCIDR (read once)."""
        if self.config.service_cidr:
            return self.config.service_cidr
        if self._service_cidr is None:
            self._service_cidr = servicerange.detect(self.kube) or ""
        return self._service_cidr or None

    # ------------------------------------------------------------ IOC changes

    def ioc_changed_sync(self, body: dict[str, Any], host_iocs: Index, ioc_prefixes: Index,
                         children: Index) -> None:
        """kopf's resume/create/update of an IOC: reconcile it unless the event is stale."""
        memory = self.state.ioc(body["metadata"]["uid"])
        seen = bookkeeping.inputs(body)
        if events.stale(memory.handled, seen):
            log.debug("generation %s of %s already reconciled", seen[0],
                      body["metadata"]["name"])
            return
        self._run(body, host_iocs, ioc_prefixes, children)
        memory.handled = seen

    def _run(self, body: dict[str, Any], host_iocs: Index, ioc_prefixes: Index,
             children: Index) -> None:
        """Reconcile one IOC, write its status, and ask the other side of a changed port
        clash to reconcile too."""
        meta = body["metadata"]
        uid = meta["uid"]
        owner = prefixes.taken_by(prefixes.holder(body),
                                  self._prefix_holders(ioc_prefixes, meta["namespace"]))
        memory = self.state.ioc(uid)
        metrics = self.metrics
        with self.runner.locks.hold(uid):
            memory.reconciled = True
            started = time.perf_counter()
            result, reason = "error", "Unexpected"
            try:
                outcome = reconcile(self.kube, body, self.config,
                                    self._allocator(host_iocs), memory, owner,
                                    _children(children, uid), self.service_cidr())
                # kopf's bookkeeping goes in the same write as the outcome (bookkeeping.py)
                status = {**outcome.status, bookkeeping.FIELD: bookkeeping.mark(body)}
                self._write_status(body, status, outcome.conditions)
                refusal = next((c for c in outcome.conditions
                                if c.type == "Reconciled" and c.status is False), None)
                result, reason = ("refused", refusal.reason) if refusal else ("applied", "")
            except KubeError as exc:
                reason = "APIError"
                raise kopf.TemporaryError(f"API error, retrying: {exc}",
                                          delay=RETRY_DELAY) from exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:  # API unreachable
                reason = "APIUnreachable"
                raise kopf.TemporaryError(f"API unreachable, retrying: {exc}",
                                          delay=RETRY_DELAY) from exc
            finally:
                metrics.reconcile_seconds.observe(time.perf_counter() - started)
                metrics.reconciles.labels(result).inc()
                if reason:
                    metrics.errors.labels(reason).inc()
        before = (body.get("status") or {}).get("portClashes") or []
        if recheck := events.recheck_after(before, outcome.clashes, outcome.evicts):
            self.recheck_sync(recheck, body)

    def _allocator(self, host_iocs: Index) -> Any:
        def allocator(_: IOC, body: dict[str, Any]) -> Allocation:
            indexed = [h for h in list(host_iocs.get("host", []))
                       if h.uid not in self.state.gone]
            return self.state.claims.allocate(
                host_ioc(body), indexed, (self.config.host_port_min, self.config.host_port_max))
        return allocator

    def _prefix_holders(self, index: Index, namespace: str) -> list[PrefixHolder]:
        return [h for h in list(index.get(namespace, [])) if h.uid not in self.state.gone]

    def _write_status(self, body: dict[str, Any], status: dict[str, Any],
                      conds: list[Cond], read: bool = False) -> None:
        """Merge `conds` into the IOC's conditions and write, if anything changed; post
        one event for the changes. Callers hold the IOC's lock, so the reconcile and the
        probe, which own different conditions, never drop each other's. The current
        status is the one this process last wrote, else the body's: no GET, unless
        `read` (the body is only a name: the probe's writer)."""
        meta = body["metadata"]
        memory = self.state.ioc(meta["uid"])
        old = memory.status
        if old is None:
            if read:
                fresh = self.kube.get(IOC_API, "IOC", meta["namespace"], meta["name"])
                if fresh is None or fresh["metadata"]["uid"] != meta["uid"]:
                    return  # deleted meanwhile
                body = fresh
            old = dict(body.get("status") or {})
        current = old.get("conditions") or []
        # observedGeneration: the generation this outcome was computed from, not the newest
        new = {**status, "conditions": merge_conditions(
            current, conds, meta.get("generation"), _now())}
        merged = {k: v for k, v in {**old, **new}.items() if v is not None}
        if merged != {k: v for k, v in old.items() if v is not None}:
            try:
                # The whole status, after a test of the uid: a namesake created meanwhile
                # fails the test (a uid in a merge patch of status would be ignored).
                self.kube.request(
                    "PATCH", f"/apis/{IOC_API}/namespaces/{meta['namespace']}/{PLURAL}/"
                    f"{meta['name']}/status",
                    body=[{"op": "test", "path": "/metadata/uid", "value": meta["uid"]},
                          {"op": "add", "path": "/status", "value": merged}],
                    content_type="application/json-patch+json")
            except KubeError as exc:
                if exc.status not in (404, 409, 422):
                    raise
                self.state.forget(meta["uid"])  # gone, or replaced by a namesake
                return
        memory.status = merged
        memory.generation = meta.get("generation")
        if report := event_report(transitions(current, conds)):
            kind, reason, message = report
            kopf.event(kopf.Body(cast(kopf.RawBody, _event_target(body))), type=kind, reason=reason,
                       message=message)

    def recheck_sync(self, keys: list[str], body: dict[str, Any] | None) -> None:
        """Make the other side of a port clash or prefix reconcile too: an annotation
        change is an update kopf hands to that IOC's handler. `body`: the IOC that asks
        (None: the resync, for IOCs deleted unseen)."""
        me = (f"{body['metadata']['namespace']}/{body['metadata']['name']}"
              if body else "resync")
        for key in keys:
            namespace, name = key.split("/", 1)
            url = f"/apis/{IOC_API}/namespaces/{namespace}/{PLURAL}/{name}"
            # A fresh token each time: an unchanged value would be no update at all.
            patch = {"metadata": {"annotations": {
                bookkeeping.RECHECK_ANNOTATION: f"{me} {uuid.uuid4().hex}"}}}
            try:
                self.kube.request("PATCH", url, body=patch,
                                  content_type="application/merge-patch+json")
            except KubeError as exc:
                if exc.status != 404:  # gone: nothing left to recheck
                    log.warning("could not ask IOC %s to recheck: %s", key, exc)

    # ------------------------------------------------------------ child events

    def child_settled(self, body: Mapping[str, Any], event_type: str | None,
                      ioc_states: Index) -> bool:
        owner = events.owner_ioc(body)
        if owner is None:
            return True
        name, uid = owner
        namespace = body.get("metadata", {}).get("namespace")
        known = list(ioc_states.get((namespace, name), []))
        memory = self.state.peek(uid)
        reported = (events.ioc_state(memory.generation, memory.status)
                    if memory is not None and memory.status is not None else None)
        return events.child_settled(
            body, event_type, known[0] if known else None, reported,
            memory.written if memory else None, bool(memory and memory.reconciled))

    async def child_event(self, body: dict[str, Any], event_type: str | None,
                          host_iocs: Index, ioc_prefixes: Index, ioc_states: Index,
                          children: Index, logger: Any) -> None:
        """An owned object changed or vanished. Most such events are settled on the
        loop; the rest reconcile their IOC in a thread."""
        owner = events.owner_ioc(body)
        if owner is None:
            return
        # A reconcile in flight records its writes before we compare.
        if await self.runner.locks.released(owner[1], LOCK_WAIT) and self.child_settled(
                body, event_type, ioc_states):
            return
        await self.runner.call(self._child_event_sync, body, event_type, host_iocs,
                               ioc_prefixes, ioc_states, children, logger)

    def _child_event_sync(self, body: dict[str, Any], event_type: str | None,
                          host_iocs: Index, ioc_prefixes: Index, ioc_states: Index,
                          children: Index, logger: Any) -> None:
        """`child_settled` could not tell (its IOC's reconcile was still running, or the
        IOC is not known): ask the API server, and reconcile the IOC (recreates, reverts
        drift, refreshes readiness). Server-side apply of unchanged objects writes
        nothing."""
        name, uid = events.owner_ioc(body) or ("", "")
        with self.runner.locks.hold(uid):
            pass  # a reconcile in flight records its writes before we compare
        if self.child_settled(body, event_type, ioc_states):
            return
        namespace = body.get("metadata", {}).get("namespace")
        ioc = self.kube.get(IOC_API, "IOC", namespace, name)
        if ioc is None or ioc["metadata"].get("deletionTimestamp"):
            return  # the garbage collector is removing it
        memory = self.state.peek(uid)
        if events.nothing_to_do(body, event_type, ioc, events.is_echo(
                memory.written if memory else None, body, event_type)):
            return
        try:
            self._run(ioc, host_iocs, ioc_prefixes, children)
        except kopf.TemporaryError as exc:
            logger.warning("reconcile of IOC %s/%s deferred: %s", namespace, name, exc)

    async def directory_event(self, body: dict[str, Any], event_type: str | None) -> None:
        """A directory ConfigMap changed: unless it is our own write coming back, it was
        changed or deleted by hand, so write it again."""
        if not events.is_own_directory(body, self.config.directory_name):
            return  # someone else's, e.g. a second operator's with another name
        if event_type != "DELETED" and self.directory.matches(body):
            return  # the echo of our own write
        namespace = body["metadata"]["namespace"]
        self.directory.forget(namespace)
        await self.runner.publish(namespace)

    # ------------------------------------------------------------ any IOC event

    async def ioc_event(self, body: dict[str, Any], event_type: str | None,
                        ioc_prefixes: Index, port_clash_parties: Index) -> None:
        """Any IOC change (status included) or deletion: refresh its namespace's
        directory, release its host ports once it is gone or no longer in host mode, and
        let IOCs refused for its prefix or ports try again once it gave them up."""
        meta = body["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        key = f"{namespace}/{name}"
        freed = [n for n in prefixes.freed(self._prefix_holders(ioc_prefixes, namespace))
                 if n != name]
        if freed:
            await self.runner.call(self.recheck_sync, [f"{namespace}/{n}" for n in freed],
                                   body)
        deleted = event_type == "DELETED"
        if deleted:
            self.state.forget(uid)
            self.prober.forget(uid)
        if deleted or ((body.get("spec") or {}).get("network") or {}).get("mode") != "host":
            self.state.claims.release(key)
        # (A port clash with a changed IOC is rechecked by that IOC's own reconcile.)
        if deleted and (waiting := events.clash_parties(port_clash_parties, {key})):
            await self.runner.call(self.recheck_sync, waiting, body)
        if not deleted:
            self.prober.set(uid, reachability.target(body))
        status = body.get("status") or {}
        memory = self.state.peek(uid)
        if not events.directory_needs_publish(deleted, status,
                                              memory.published if memory else None):
            return
        if memory is not None:
            memory.published = None
        written = await self._publish_until_written(namespace)
        if deleted:
            log.info("IOC %s deleted: directory %s", key,
                     "refreshed" if written else "not written")
        elif written:
            self.state.ioc(uid).published = dict(status.get("clientEnv") or {})

    async def _publish_until_written(self, namespace: str) -> bool:
        """Publish, and again every RETRY_DELAY while that fails (the API server is
        down, say): the IOC events that asked may be the last ones for a long time.
        Bounded: PUBLISH_TRIES."""
        for _ in range(PUBLISH_TRIES - 1):
            if await self.runner.publish(namespace):
                return True
            await asyncio.sleep(RETRY_DELAY)
        return await self.runner.publish(namespace)

    def _publish(self, namespace: str) -> bool:
        """Write the namespace's directory (and the cluster one); False if that failed.
        In the publisher's thread (runner.py)."""
        index, gone = self.envs, self.state.gone

        def envs(ns: str) -> list[dict[str, str]]:
            return [env for _, uid, env in list(index.get(ns, [])) if uid not in gone]

        entries = envs(namespace)
        metrics = self.metrics
        started = time.perf_counter()
        try:
            written = self.directory.publish(namespace, entries or None)
            cluster_ns = self.config.cluster_directory_namespace
            if cluster_ns:
                everything = [env for ns in list(index) for env in envs(ns)]
                written |= self.directory.publish(cluster_ns, everything,
                                                  name=f"{self.config.directory_name}-cluster")
        except (KubeError, urllib3.exceptions.HTTPError, OSError) as exc:
            # e.g. the namespace is being deleted, or the API server is down
            log.warning("client directory of %s not written: %s", namespace, exc)
            metrics.publishes.labels("failed").inc()
            metrics.errors.labels("DirectoryPublishFailed").inc()
            return False
        finally:
            metrics.publish_seconds.set(time.perf_counter() - started)
        metrics.publishes.labels("written" if written else "unchanged").inc()
        return True

    # ------------------------------------------------------------ resync

    async def resync(self, port_clash_parties: Index) -> None:
        """Drop IOCs deleted while unwatched (resync.py) from the state and directory."""
        index = self.envs
        # a snapshot taken on the event loop, which is where kopf changes the index
        indexed = {uid: f"{ns}/{name}" for ns in index for name, uid, _ in index[ns]}
        try:
            gone = await self.runner.call(self._resync_sync, indexed)
            for uid in gone:
                self.prober.forget(uid)
            keys = {indexed[uid] for uid in gone}
            if waiting := events.clash_parties(port_clash_parties, keys):
                await self.runner.call(self.recheck_sync, waiting, None)
            for namespace in sorted({indexed[uid].split("/", 1)[0] for uid in gone}):
                await self.runner.publish(namespace)
        except (KubeError, urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("resync skipped: %s", exc)

    def _resync_sync(self, indexed: dict[str, str]) -> set[str]:
        new = self.state.gone.record(resync.gone(self.kube, indexed), indexed)
        for uid in new:
            key = indexed[uid]
            log.info("IOC %s was deleted while unwatched: dropping it from the directory",
                     key)
            self.state.forget(uid)
            self.state.claims.release(key, uid)
        return set(new)

    # ------------------------------------------------------------ reachability

    def _write_reachability(self, target: reachability.Target, status: dict[str, Any],
                            cond: Cond) -> None:
        body = {"metadata": {"namespace": target.namespace, "name": target.name,
                             "uid": target.uid, "generation": target.generation}}
        if cond.reason != reachability.NOT_READY.reason:  # that one is no probe result
            self.metrics.probes.labels(cond.reason).inc()
        with self.runner.locks.hold(target.uid):
            self._write_status(body, status, [cond], read=True)

    async def stop(self) -> None:
        await self.prober.stop()
        self.runner.shutdown()


def _children(index: Index, uid: str) -> list[Child]:
    return list(index.get(uid, []))


def _event_target(body: Mapping[str, Any]) -> dict[str, Any]:
    """What kopf.event needs of the IOC to post an event about it."""
    meta = body["metadata"]
    return {"apiVersion": IOC_API, "kind": "IOC",
            "metadata": {k: meta.get(k) for k in ("namespace", "name", "uid")}}
