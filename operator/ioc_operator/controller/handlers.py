"""kopf handlers: each decorates, calls the `Operator` in kopf's memo, and returns.

Where the work runs and why (event loop, threads, locks): runner.py. What is worth
doing for an event: events.py. The work itself: operator.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import aiohttp
import kopf

from ioc_operator import GROUP, PLURAL, VERSION
from ioc_operator.allocation import prefixes
from ioc_operator.allocation.hostports import host_ioc
from ioc_operator.controller import bookkeeping, events
from ioc_operator.controller.kube import Kube, client
from ioc_operator.controller.operator import Operator
from ioc_operator.discovery.directory import COMPONENT as DIRECTORY_COMPONENT
from ioc_operator.model.config import OperatorConfig
from ioc_operator.model.ioc import NetworkMode
from ioc_operator.render.names import CONFIG_LABEL, MANAGED_BY

MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
# kopf's own HTTP session has no connection limit: a burst of 1,000 patches opens
# hundreds of TLS connections at once, ~1 MB each between asyncio's buffer and OpenSSL's,
# and the 500 MB peak that makes is never given back. 32 is room for the watches (6) and
# enough parallel requests to keep a burst moving.
KOPF_CONNECTIONS = 32


@kopf.on.login()
async def login(settings: kopf.OperatorSettings, logger: Any,
                **_: Any) -> kopf.AiohttpSession:
    """kopf's own login through the kubernetes package (service account, kubeconfig,
    exec plugins), in a session of bounded size."""
    info = kopf.login_via_client(logger=logger, settings=settings)
    if info is None:
        raise kopf.LoginError("no credentials: not in a pod, and no kubeconfig")
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
        prefix="kopf.epics-operator.io")
    # kopf's diff base: a short mark the operator writes with the status (bookkeeping.py).
    settings.persistence.diffbase_storage = bookkeeping.StatusMark()
    # Nothing needs a finalizer (probes are our own tasks, not kopf daemons); kopf
    # removes this one, which earlier versions put on probed IOCs, as it sees them.
    settings.persistence.finalizer = f"{GROUP}/operator"
    settings.watching.server_timeout = 300
    # kopf's default backoffs grow to 21 s: after an API server outage the watches would
    # come back up to 21 s late. Retry at most 5 s apart, for longer in all (67 s > 54 s).
    settings.networking.error_backoffs = (1, 1, 2, 3) + (5,) * 12
    # kopf keeps an object's worker, and with it the object's last event, 5 s after the
    # event: at a cold start that is thousands of whole objects held for nothing.
    settings.queueing.idle_timeout = 0.5
    # The registry `ioc-operator run --metrics-port` serves (none: metrics unserved).
    operator = Operator(Kube(client()), OperatorConfig.from_env(),
                        registry=memo.get("metrics_registry"))
    operator.envs = client_envs
    settings.execution.executor = operator.runner.threads  # sync handlers run there
    memo.operator = operator
    memo.resync_task = asyncio.create_task(_resync_forever(operator, port_clash_parties))


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    memo.resync_task.cancel()
    await memo.operator.stop()


async def _resync_forever(operator: Operator, port_clash_parties: kopf.Index) -> None:
    while True:  # ends with the task, cancelled at cleanup
        await asyncio.sleep(operator.config.resync_seconds)
        await operator.resync(port_clash_parties)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def ioc_changed(body: kopf.Body, memo: kopf.Memo, host_iocs: kopf.Index,
                ioc_prefixes: kopf.Index, ioc_children: kopf.Index, **_: Any) -> None:
    memo.operator.ioc_changed_sync(dict(body), host_iocs, ioc_prefixes, ioc_children)


@kopf.on.event("apps", "v1", "statefulsets", labels=MANAGED)
@kopf.on.event("", "v1", "services", labels=MANAGED)
@kopf.on.event("", "v1", "configmaps", labels=MANAGED)
@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=MANAGED)
async def owned_object_event(body: kopf.Body, event: kopf.RawEvent, memo: kopf.Memo,
                             logger: Any, host_iocs: kopf.Index, ioc_prefixes: kopf.Index,
                             ioc_states: kopf.Index, ioc_children: kopf.Index,
                             **_: Any) -> None:
    labels = body.get("metadata", {}).get("labels") or {}
    if labels.get("app.kubernetes.io/component") == DIRECTORY_COMPONENT:
        await memo.operator.directory_event(dict(body), event.get("type"))
    else:
        await memo.operator.child_event(dict(body), event.get("type"), host_iocs,
                                        ioc_prefixes, ioc_states, ioc_children, logger)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def ioc_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo,
                    ioc_prefixes: kopf.Index, port_clash_parties: kopf.Index,
                    **_: Any) -> None:
    await memo.operator.ioc_event(dict(body), event.get("type"), ioc_prefixes,
                                  port_clash_parties)


# kopf's indexes: pure and async (microseconds; a sync one would wait for a thread).

@kopf.index(GROUP, VERSION, PLURAL)
async def host_iocs(body: kopf.Body, spec: kopf.Spec, **_: Any) -> dict[str, Any] | None:
    """Host-mode IOCs of the whole cluster: host ports are per node, not namespace."""
    if (spec.get("network") or {}).get("mode") != NetworkMode.HOST:
        return None
    return {"host": host_ioc(dict(body))}


@kopf.index(GROUP, VERSION, PLURAL)
async def port_clash_parties(namespace: str, name: str, status: kopf.Status,
                             **_: Any) -> dict[str, str] | None:
    """IOCs by the IOCs their explicit host ports clash with (status.portClashes). When
    one of those is deleted nothing else reconciles them: a refused IOC would stay
    refused, an older one would keep naming the deleted IOC."""
    return {key: f"{namespace}/{name}" for key in status.get("portClashes") or []} or None


@kopf.index(GROUP, VERSION, PLURAL)
async def ioc_states(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict[Any, Any]:
    """What events.nothing_to_do reads of each IOC, so most child events need no API call."""
    return {(namespace, name): events.ioc_state(body["metadata"].get("generation"),
                                                body.get("status") or {})}


@kopf.index(GROUP, VERSION, PLURAL)
async def ioc_prefixes(body: kopf.Body, namespace: str, **_: Any) -> dict[str, Any]:
    """Each IOC's PV prefix, by namespace: two IOCs must not serve the same PV names."""
    return {namespace: prefixes.holder(dict(body))}


@kopf.index(GROUP, VERSION, PLURAL)
async def client_envs(namespace: str, name: str, uid: str, status: kopf.Status,
                      **_: Any) -> dict[str, Any]:
    """Each IOC's published client settings, by namespace."""
    return {namespace: (name, uid, dict(status.get("clientEnv") or {}))}


@kopf.index("", "v1", "services", labels=MANAGED)
@kopf.index("", "v1", "configmaps", labels=MANAGED)
@kopf.index("networking.k8s.io", "v1", "networkpolicies", labels=MANAGED)
async def ioc_children(body: kopf.Body, **_: Any) -> dict[str, Any] | None:
    """The objects an IOC may prune, by the IOC's uid: no LIST per kind per reconcile."""
    owner = events.owner_ioc(body)
    if owner is None:
        return None
    meta = body["metadata"]
    return {owner[1]: (body.get("kind", ""), meta["name"], meta.get("uid", ""))}


# A ConfigMap that IOCs mount as spec.config.configMap and that its owner labelled
# epics-operator.io/config: an edit restarts those IOCs (the hash on their pod template).

@kopf.index(GROUP, VERSION, PLURAL)
async def ioc_config_maps(namespace: str, name: str, spec: kopf.Spec,
                          **_: Any) -> dict[Any, str] | None:
    """IOCs by the ConfigMap they mount (spec.config.configMap)."""
    mounted = (spec.get("config") or {}).get("configMap")
    return {(namespace, mounted): f"{namespace}/{name}"} if mounted else None


@kopf.on.event("", "v1", "configmaps", labels={CONFIG_LABEL: kopf.PRESENT})
async def mounted_config_event(body: kopf.Body, event: kopf.RawEvent, memo: kopf.Memo,
                               ioc_config_maps: kopf.Index, **_: Any) -> None:
    # Not the initial listing (type None): the IOCs reconcile at the operator's start.
    if event.get("type") not in ("ADDED", "MODIFIED"):
        return
    meta = body["metadata"]
    keys = sorted(set(ioc_config_maps.get((meta["namespace"], meta["name"]), [])))
    if keys:
        await memo.operator.runner.call(memo.operator.recheck_sync, keys, dict(body))
