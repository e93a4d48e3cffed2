"""kopf handlers: thin shells that call reconcile and report what it says."""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import functools
import logging
import socket
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import kopf
import urllib3

from . import (
    GROUP,
    PLURAL,
    VERSION,
    bookkeeping,
    credentials,
    echoes,
    prefixes,
    reachability,
    resync,
)
from .allocation import Allocation, allocate, host_ioc, placed
from .coalesce import Coalescer
from .conditions import Cond, merge_conditions, transitions
from .config import OperatorConfig
from .directory import COMPONENT as DIRECTORY_COMPONENT
from .ioclocks import IOCLocks
from .kube import Kube, KubeError, load_client
from .models import IOC
from .prefixes import PrefixHolder
from .publish import DirectoryPublisher
from .reconcile import event_type, reconcile
from .render.names import MANAGED_BY

log = logging.getLogger(__name__)
MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
RETRY_DELAY = 5.0

# One reconcile at a time per IOC: its own handlers and the watches on its children
# run on different kopf workers.
_locks = IOCLocks()
# How long a child event waits for its IOC's reconcile before it queues for a thread.
LOCK_WAIT = 60.0
# Host-port allocations made but maybe not yet seen in the index (status written after
# the handler returns), so two IOCs reconciled at once never pick the same port.
_claims: dict[str, Any] = {}  # key -> HostIOC
_claims_lock = threading.Lock()
# uid -> digest of the objects last applied: an unchanged render needs no new dry run.
_applied: dict[str, str] = {}
# uid -> the client settings last published for it: most IOC events (kopf's annotations,
# conditions, finalizers) leave them as they were, and a namespace's directory costs
# O(IOCs) to compute, so an unchanged IOC does not recompute it (O(n^2) at a cold start).
_published: dict[str, dict[str, str]] = {}
# IOC uid -> the inputs its kopf handler last reconciled (see ioc_changed).
_handled: dict[str, bookkeeping.Inputs] = {}
# IOC uid -> marks of the objects its last reconcile applied (see echoes.py).
_written: dict[str, dict[str, echoes.Mark]] = {}
# IOC uid -> what the operator last wrote of its status, shaped like an `ioc_states`
# entry: fresher than the index until the watch brings the status write back.
_reported: dict[str, dict[str, Any]] = {}


def _forget(uid: str) -> None:
    """Drop what the operator remembers of an IOC that is gone."""
    for memory in (_applied, _published, _handled, _written, _reported):
        memory.pop(uid, None)
    _locks.forget(uid)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# kopf's own HTTP session has no connection limit: a burst of 1,000 patches opens
# hundreds of TLS connections at once, ~1 MB each between asyncio's buffer and OpenSSL's,
# and the 500 MB peak that makes is never given back. 32 is room for the watches (6) and
# enough parallel requests to keep a burst moving.
KOPF_CONNECTIONS = 32


# A namespace's directory publishes take at most this share of the time: a burst of IOC
# changes shares writes (at 1,000 IOCs each is ~190 KB), a lone change goes out at once.
PUBLISH_DUTY = 0.1


@kopf.on.login()
async def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.AiohttpSession:
    """The operator's credentials (credentials.py), in a bounded session."""
    try:
        info = credentials.load(settings)
    except credentials.CredentialsError as exc:
        raise kopf.LoginError(str(exc)) from None
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=KOPF_CONNECTIONS, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(), proxy=info.proxy_url, trust_env=info.trust_env)
    return kopf.AiohttpSession(aiohttp_session=session, server=info.server,
                               default_namespace=info.default_namespace,
                               expiration=info.expiration, priority=info.priority)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, client_envs: kopf.Index,
                  port_clash_parties: kopf.Index, **_: Any) -> None:
    # Our condition changes post their own events (kopf.event, any level). kopf's INFO
    # logs ("Handler ... succeeded") would add an Event POST per reconcile: warnings only.
    settings.posting.level = logging.WARNING
    # Events are the operator's (kubectl describe's "From"), its instance the pod's name.
    settings.posting.reporting_component = MANAGED_BY
    settings.posting.reporting_instance = socket.gethostname()
    settings.posting.event_name_prefix = f"{MANAGED_BY}-"
    # Handler progress: annotations only while a handler is retried, none after.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix="kopf.epics-operator.io"
    )
    # kopf's diff base: a short mark the operator writes with the status (bookkeeping.py).
    settings.persistence.diffbase_storage = bookkeeping.StatusMark()
    # Nothing needs a finalizer now (probes are our own tasks, not kopf daemons); kopf
    # removes this one, which earlier versions put on probed IOCs, as it sees them.
    settings.persistence.finalizer = f"{GROUP}/operator"
    settings.watching.server_timeout = 300
    # kopf's default backoffs grow to 21 s: after an API server outage the watches would
    # come back up to 21 s late. Retry at most 5 s apart, for longer in all (67 s > 54 s).
    settings.networking.error_backoffs = (1, 1, 2, 3) + (5,) * 12
    # Sync handlers run in kopf's thread pool (default: cores + 4). They mostly wait on
    # the API server, so more threads keep one slow burst from queueing the rest.
    settings.execution.max_workers = 16
    memo.executor = settings.execution.executor  # async handlers hand API work to it
    # kopf keeps an object's worker, and with it the object's last event, 5 s after the
    # event: at a cold start that is thousands of whole objects held for nothing.
    settings.queueing.idle_timeout = 0.5
    memo.config = OperatorConfig.from_env()
    memo.kube = Kube(load_client())
    memo.directory = DirectoryPublisher(memo.kube, memo.config.directory_name)
    # Publishes get a thread of their own: behind a cold start's 1,000 queued reconciles
    # in kopf's pool, each IOC's status event waited for one, holding its whole body.
    # One thread, so the cluster directory's writes land in the order they were made.
    memo.publisher_thread = ThreadPoolExecutor(1, thread_name_prefix="directory")
    memo.publishing = Coalescer(functools.partial(_publish, memo, client_envs),
                                memo.publisher_thread, PUBLISH_DUTY)
    memo.gone = resync.Tombstones()  # IOCs deleted unseen: their index entries are stale
    memo.prober = reachability.Prober(functools.partial(_write_reachability, memo))
    memo.resync_task = asyncio.create_task(_resync_forever(memo, client_envs,
                                                           port_clash_parties))


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    memo.resync_task.cancel()
    await memo.prober.stop()
    memo.publisher_thread.shutdown(wait=False, cancel_futures=True)


async def _resync_forever(memo: kopf.Memo, client_envs: kopf.Index,
                          port_clash_parties: kopf.Index) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(memo.config.resync_seconds)
        # a snapshot taken on the event loop, which is where kopf changes the index
        indexed = {uid: f"{ns}/{name}" for ns in client_envs for name, uid, _ in client_envs[ns]}
        try:
            gone = await loop.run_in_executor(None, _resync, memo, indexed)
            for uid in gone:
                memo.prober.forget(uid)
            keys = {indexed[uid] for uid in gone}
            if waiting := _clash_parties(port_clash_parties, keys):
                await _in_thread(memo, _recheck, memo, waiting, None)
            for namespace in sorted({indexed[uid].split("/", 1)[0] for uid in gone}):
                await memo.publishing.run(namespace)
        except (KubeError, urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("resync skipped: %s", exc)


def _resync(memo: kopf.Memo, indexed: dict[str, str]) -> set[str]:
    """Drop IOCs deleted while unwatched; returns their uids."""
    new = memo.gone.record(resync.gone(memo.kube, indexed), indexed)
    for uid in new:
        key = indexed[uid]
        log.info("IOC %s was deleted while unwatched: dropping it from the directory", key)
        _forget(uid)
        with _claims_lock:
            if key in _claims and _claims[key].uid == uid:
                del _claims[key]
    return set(new)


def _allocator(memo: kopf.Memo, index: kopf.Index) -> Any:
    def allocator(_: IOC, body: dict[str, Any]) -> Allocation:
        me = host_ioc(body)
        with _claims_lock:
            others = {h.key: h for h in index.get("host", []) if h.uid not in memo.gone}
            others.update(_claims)
            others.pop(me.key, None)
            port_range = (memo.config.host_port_min, memo.config.host_port_max)
            allocation = allocate(me, others.values(), port_range)
            if not allocation.refused:
                _claims[me.key] = placed(me, allocation)
        return allocation
    return allocator


def _write_status(memo: kopf.Memo, body: dict[str, Any], status: dict[str, Any],
                  conds: list[Cond]) -> None:
    """Merge `conds` into the IOC's current conditions and write; post an event for each
    change. Callers hold the IOC's lock, so the reconcile and the probe, which own
    different conditions, never drop each other's."""
    meta = body["metadata"]
    fresh = memo.kube.get(f"{GROUP}/{VERSION}", "IOC", meta["namespace"], meta["name"])
    if fresh is None or fresh["metadata"]["uid"] != meta["uid"]:
        return  # deleted meanwhile
    old = fresh.get("status") or {}
    current = old.get("conditions") or []
    # observedGeneration: the generation this outcome was computed from, not the newest.
    new = {**status, "conditions": merge_conditions(
        current, conds, meta.get("generation"), _now())}
    if any(old.get(k) != v for k, v in new.items()):  # a null in a merge patch deletes
        try:
            memo.kube.patch_status(f"{GROUP}/{VERSION}", "IOC", meta["namespace"],
                                   meta["name"], new)
        except KubeError as exc:
            if exc.status != 404:
                raise
            return
    _reported[meta["uid"]] = _state(fresh["metadata"].get("generation"), {**old, **new})
    for cond in transitions(current, conds):
        kopf.event(fresh, type=event_type(cond), reason=cond.reason, message=cond.message)


def _prefix_holders(memo: kopf.Memo, index: kopf.Index, namespace: str) -> list[PrefixHolder]:
    return [h for h in list(index.get(namespace, [])) if h.uid not in memo.gone]


def _run(body: dict[str, Any], memo: kopf.Memo, host_iocs: kopf.Index,
         ioc_prefixes: kopf.Index) -> None:
    """Reconcile one IOC and write its status."""
    uid = body["metadata"]["uid"]
    me = prefixes.holder(body)
    owner = prefixes.taken_by(me, _prefix_holders(memo, ioc_prefixes, body["metadata"][
        "namespace"]))
    with _locks.hold(uid):
        try:
            outcome = reconcile(memo.kube, body, memo.config, _allocator(memo, host_iocs),
                                _applied, owner, _written.setdefault(uid, {}))
            # kopf's bookkeeping goes in the same write as the outcome (bookkeeping.py).
            status = {**outcome.status, bookkeeping.FIELD: bookkeeping.mark(body)}
            _write_status(memo, body, status, outcome.conditions)
        except KubeError as exc:
            raise kopf.TemporaryError(f"API error, retrying: {exc}", delay=RETRY_DELAY) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:  # API server unreachable
            raise kopf.TemporaryError(f"API unreachable, retrying: {exc}",
                                      delay=RETRY_DELAY) from exc
    before = set((body.get("status") or {}).get("portClashes") or [])
    recheck = set(outcome.evicts)
    if before != set(outcome.clashes):
        recheck |= before | set(outcome.clashes)
    if recheck:
        _recheck(memo, sorted(recheck), body)


def _recheck(memo: kopf.Memo, keys: list[str], body: dict[str, Any] | None) -> None:
    """Make the other side of a port clash reconcile too, so both report it (and both
    clear it). An annotation change is an update kopf hands to that IOC's handler.
    `body`: the IOC that asks (None: the resync, for IOCs deleted unseen)."""
    me = f"{body['metadata']['namespace']}/{body['metadata']['name']}" if body else "resync"
    for key in keys:
        namespace, name = key.split("/", 1)
        url = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"
        # A fresh token each time: an unchanged value would be no update at all.
        patch = {"metadata": {"annotations": {
            bookkeeping.RECHECK_ANNOTATION: f"{me} {uuid.uuid4().hex}"}}}
        try:
            memo.kube.request("PATCH", url, body=patch,
                              content_type="application/merge-patch+json")
        except KubeError as exc:
            if exc.status != 404:  # gone: nothing left to recheck
                log.warning("could not ask IOC %s to recheck its ports: %s", key, exc)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def ioc_changed(body: kopf.Body, memo: kopf.Memo, host_iocs: kopf.Index,
                ioc_prefixes: kopf.Index, logger: Any, **_: Any) -> None:
    uid, seen = body["metadata"]["uid"], bookkeeping.inputs(body)
    last = _handled.get(uid)
    if last is not None and (last[0] > seen[0] or last == seen):
        # A stale event: under load the watch can deliver an IOC's events a minute late,
        # and kopf takes one whose status lacks the newer mark (bookkeeping.py) for a
        # change. Reconciling it would re-apply an older spec.
        logger.debug("generation %s already reconciled: nothing to do", seen[0])
        return
    _run(dict(body), memo, host_iocs, ioc_prefixes)
    _handled[uid] = seen


def _owner_ioc(body: kopf.Body) -> tuple[str, str] | None:
    """The owning IOC's name and uid."""
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == "IOC" and ref.get("apiVersion", "").startswith(GROUP):
            return ref.get("name", ""), ref.get("uid", "")
    return None


def _nothing_to_do(body: kopf.Body, event_type: str | None, ioc: dict[str, Any],
                   echo: bool = False) -> bool:
    """A StatefulSet status update that changes nothing the IOC reports. Most events on
    a big cluster are these (the controller's own bookkeeping); drift bumps the
    generation and deletion is its own event type, so both still reconcile. `echo`: the
    StatefulSet is as the operator applied it (echoes.py), so a controller that has
    not observed it yet needs no reconcile either."""
    if body.get("kind") != "StatefulSet" or event_type == "DELETED":
        return False
    meta, sts = body.get("metadata", {}), body.get("status") or {}
    status = ioc.get("status") or {}
    if not echo and meta.get("generation") != sts.get("observedGeneration"):
        return False
    if status.get("observedGeneration") != ioc["metadata"].get("generation"):
        return False
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    if ready.get("reason") not in ("Running", "PodNotReady"):
        return False  # waiting for an address, suspended, refused: let reconcile decide
    return ((sts.get("readyReplicas") or 0) >= 1) == (ready.get("status") == "True")


def _echo(body: kopf.Body | dict[str, Any], owner_uid: str, event_type: str | None) -> bool:
    return event_type != "DELETED" and echoes.is_echo(_written.get(owner_uid), dict(body))


def _child_settled(body: kopf.Body | dict[str, Any], ioc_states: kopf.Index,
                   event_type: str | None) -> bool:
    """Whether an event on an owned object needs no reconcile, decided from what the
    operator already knows (no API call): the echo of our own write, or a StatefulSet
    status update the IOC's status already says. Decided on the event loop, so the
    thousands of these a cold start brings never queue for a handler thread."""
    owner = _owner_ioc(body)
    if not owner:
        return True
    name, owner_uid = owner
    echo = _echo(body, owner_uid, event_type)
    if echo and body.get("kind") != "StatefulSet":
        return True  # our own write coming back
    namespace = body.get("metadata", {}).get("namespace")
    known = list(ioc_states.get((namespace, name), []))
    if known and owner_uid not in _written:
        # A known IOC this process has not reconciled yet: its first reconcile (kopf
        # resumes every IOC at start) applies all its objects. At a restart with 1,000
        # IOCs the children's listing would otherwise queue hundreds of events for
        # threads, each holding its object, to redo what that reconcile does anyway.
        return True
    state = _freshest(known[0] if known else None, _reported.get(owner_uid))
    return state is not None and _nothing_to_do(body, event_type, state, echo)


def _child_event(body: dict[str, Any], memo: kopf.Memo, logger: Any, host_iocs: kopf.Index,
                 ioc_prefixes: kopf.Index, ioc_states: kopf.Index,
                 event_type: str | None = None) -> None:
    """An owned object changed or vanished and `_child_settled` could not tell (its
    IOC's reconcile was still running, or the IOC's state is not known): ask the API
    server, and reconcile the IOC (recreates, reverts drift, refreshes readiness).
    Server-side apply of unchanged objects writes nothing."""
    owner = _owner_ioc(body)
    if not owner:
        return
    name, owner_uid = owner
    with _locks.hold(owner_uid):
        pass  # a reconcile in flight records its writes before we compare
    if _child_settled(body, ioc_states, event_type):
        return
    namespace = body.get("metadata", {}).get("namespace")
    ioc = memo.kube.get(f"{GROUP}/{VERSION}", "IOC", namespace, name)
    if ioc is None or ioc["metadata"].get("deletionTimestamp"):
        return  # the garbage collector is removing it
    if _nothing_to_do(body, event_type, ioc, _echo(body, owner_uid, event_type)):
        return
    try:
        _run(ioc, memo, host_iocs, ioc_prefixes)
    except kopf.TemporaryError as exc:
        logger.warning("reconcile of IOC %s/%s deferred: %s", namespace, name, exc)


async def _in_thread(memo: kopf.Memo, fn: Any, *args: Any) -> Any:
    """`fn(*args)` in kopf's handler threads, with the handler's context (its logger)."""
    call = functools.partial(contextvars.copy_context().run, fn, *args)
    return await asyncio.get_running_loop().run_in_executor(memo.executor, call)


@kopf.on.event("apps", "v1", "statefulsets", labels=MANAGED)
@kopf.on.event("", "v1", "services", labels=MANAGED)
@kopf.on.event("", "v1", "configmaps", labels=MANAGED)
@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=MANAGED)
async def owned_object_event(body: kopf.Body, event: kopf.RawEvent, memo: kopf.Memo,
                             logger: Any, host_iocs: kopf.Index, ioc_prefixes: kopf.Index,
                             ioc_states: kopf.Index, **_: Any) -> None:
    labels = body.get("metadata", {}).get("labels") or {}
    if labels.get("app.kubernetes.io/component") == DIRECTORY_COMPONENT:
        name = memo.config.directory_name
        if body["metadata"]["name"] not in (name, f"{name}-cluster"):
            return  # someone else's, e.g. a second operator's with another name
        if event.get("type") != "DELETED" and memo.directory.matches(dict(body)):
            return  # the echo of our own write
        namespace = body["metadata"]["namespace"]
        memo.directory.forget(namespace)  # changed or deleted by hand: write it again
        await memo.publishing.run(namespace)
        return
    owner = _owner_ioc(body)
    if not owner:
        return
    # A reconcile in flight records its writes before we compare.
    if await _locks.released(owner[1], LOCK_WAIT) and _child_settled(
            body, ioc_states, event.get("type")):
        return
    await _in_thread(memo, _child_event, dict(body), memo, logger, host_iocs, ioc_prefixes,
                     ioc_states, event.get("type"))


@kopf.index(GROUP, VERSION, PLURAL)
async def host_iocs(body: kopf.Body, spec: kopf.Spec, **_: Any) -> dict[str, Any] | None:
    """Host-mode IOCs of the whole cluster: host ports are per node, not namespace."""
    if (spec.get("network") or {}).get("mode") != "host":
        return None
    return {"host": host_ioc(dict(body))}


@kopf.index(GROUP, VERSION, PLURAL)
async def port_clash_parties(namespace: str, name: str, status: kopf.Status,
                             **_: Any) -> dict[str, str] | None:
    """IOCs by the IOCs their explicit host ports clash with (status.portClashes). When
    one of those is deleted nothing else reconciles them: a refused IOC would stay
    refused, an older one would keep naming the deleted IOC."""
    return {key: f"{namespace}/{name}" for key in status.get("portClashes") or []} or None


def _clash_parties(index: kopf.Index, gone: set[str]) -> list[str]:
    """The IOCs whose port clash names one of the `gone` IOCs."""
    return sorted({party for key in gone for party in index.get(key, [])} - gone)


@kopf.index(GROUP, VERSION, PLURAL)
async def ioc_states(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict[Any, Any]:
    """What `_nothing_to_do` reads of each IOC, so most child events need no API call."""
    return {(namespace, name): _state(body["metadata"].get("generation"),
                                      body.get("status") or {})}


def _state(generation: int | None, status: Mapping[str, Any]) -> dict[str, Any]:
    ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    return {"metadata": {"generation": generation},
            "status": {"observedGeneration": status.get("observedGeneration"),
                       "conditions": ready}}


def _freshest(indexed: dict[str, Any] | None,
              reported: dict[str, Any] | None) -> dict[str, Any] | None:
    """The newer of an IOC's indexed state and the status the operator last wrote.
    Only the operator writes Ready, so at one generation its own write is the newest."""
    if indexed is None or reported is None:
        return indexed or reported
    def generations(state: dict[str, Any]) -> tuple[int, int]:
        return (int(state["metadata"].get("generation") or 0),
                int(state["status"].get("observedGeneration") or 0))
    return reported if generations(reported) >= generations(indexed) else indexed


@kopf.index(GROUP, VERSION, PLURAL)
async def ioc_prefixes(body: kopf.Body, namespace: str, **_: Any) -> dict[str, Any]:
    """Each IOC's PV prefix, by namespace: two IOCs must not serve the same PV names."""
    return {namespace: prefixes.holder(dict(body))}


@kopf.index(GROUP, VERSION, PLURAL)
async def client_envs(namespace: str, name: str, uid: str, status: kopf.Status,
                      **_: Any) -> dict[str, Any]:
    """Each IOC's published client settings, by namespace."""
    return {namespace: (name, uid, dict(status.get("clientEnv") or {}))}


def _publish(memo: kopf.Memo, index: kopf.Index, namespace: str) -> bool:
    """Write the namespace's directory (and the cluster one); False if that failed."""
    def envs(ns: str) -> list[dict[str, str]]:
        return [env for _, uid, env in list(index.get(ns, [])) if uid not in memo.gone]

    entries = envs(namespace)
    try:
        memo.directory.publish(namespace, entries or None)
        cluster_ns = memo.config.cluster_directory_namespace
        if cluster_ns:
            everything = [env for ns in list(index) for env in envs(ns)]
            memo.directory.publish(cluster_ns, everything,
                                   name=f"{memo.config.directory_name}-cluster")
    except KubeError as exc:
        # e.g. the namespace is being deleted; the next IOC event publishes again.
        log.warning("client directory of %s not written: %s", namespace, exc)
        return False
    return True


@kopf.on.event(GROUP, VERSION, PLURAL)
async def ioc_event(event: kopf.RawEvent, body: kopf.Body, namespace: str, name: str,
                    uid: str, spec: kopf.Spec, status: kopf.Status, memo: kopf.Memo,
                    client_envs: kopf.Index, ioc_prefixes: kopf.Index,
                    port_clash_parties: kopf.Index, **_: Any) -> None:
    """Any IOC change (status included) or deletion: refresh its namespace's directory,
    release its host ports once it is gone or no longer in host mode, and let IOCs
    refused for its prefix or ports try again once it gave them up. Most IOC events
    change none of that and end here on the event loop; only API writes go to a thread."""
    freed = [n for n in prefixes.freed(_prefix_holders(memo, ioc_prefixes, namespace))
             if n != name]
    if freed:
        await _in_thread(memo, _recheck, memo, [f"{namespace}/{n}" for n in freed],
                         dict(body))
    deleted = event.get("type") == "DELETED"
    if deleted:
        _forget(uid)
    if deleted or (spec.get("network") or {}).get("mode") != "host":
        with _claims_lock:
            _claims.pop(f"{namespace}/{name}", None)
    # (A port clash with a changed IOC is rechecked by that IOC's own reconcile.)
    if deleted and (waiting := _clash_parties(port_clash_parties, {f"{namespace}/{name}"})):
        await _in_thread(memo, _recheck, memo, waiting, dict(body))
    env = dict(status.get("clientEnv") or {})
    if not deleted and _published.get(uid) == env:
        return
    if not deleted and not status:
        # Never reconciled, so in no directory: kopf calls the create handler only
        # after this one returns, and a publish here would hold the reconcile back.
        return
    _published.pop(uid, None)
    written = await memo.publishing.run(namespace)
    if deleted:
        log.info("IOC %s/%s deleted: directory %s", namespace, name,
                 "refreshed" if written else "not written")
    elif written:
        _published[uid] = env


@kopf.on.event(GROUP, VERSION, PLURAL)
async def probe_event(event: kopf.RawEvent, body: kopf.Body, uid: str, memo: kopf.Memo,
                      **_: Any) -> None:
    """Start, retarget or stop the IOC's reachability probe (reachability.py)."""
    if event.get("type") == "DELETED":
        memo.prober.forget(uid)
    else:
        memo.prober.set(uid, reachability.target(dict(body)))


def _write_reachability(memo: kopf.Memo, target: reachability.Target,
                        status: dict[str, Any], cond: Cond) -> None:
    body = {"metadata": {"namespace": target.namespace, "name": target.name,
                         "uid": target.uid, "generation": target.generation}}
    with _locks.hold(target.uid):
        _write_status(memo, body, status, [cond])
