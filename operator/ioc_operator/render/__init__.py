"""The pure renderer: an IOC in, Kubernetes objects out. No API calls, no sockets, no clock.

Everything the operator creates for an IOC comes from `render`; everything clients
are told comes from `clientenv`. Both are deterministic functions of their inputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .. import capabilities
from ..config import OperatorConfig
from ..errors import IOCValidationError
from ..models import IOC, CAGatewayImplementation, CAImplementation, IOCSpec, NetworkMode
from . import cagw, names, pvagw
from .policy import network_policy
from .ports import ResolvedPorts, resolve_ports
from .service import service
from .storage import autosave_claim
from .workload import server_env, stateful_set

__all__ = ["Rendered", "ResolvedPorts", "parse_ioc", "render", "render_all", "resolve_ports"]


def parse_ioc(body: dict[str, Any]) -> IOC:
    """Validate an IOC manifest (a dict as read from YAML or the API)."""
    meta = body.get("metadata") or {}
    try:
        ioc = IOC.model_validate({"metadata": meta, "spec": body.get("spec") or {}})
    except ValidationError as exc:
        raise IOCValidationError.from_pydantic(exc) from None
    check_semantics(ioc)
    return ioc


def check_semantics(ioc: IOC) -> None:
    """Rules the schema cannot express (they depend on server capabilities)."""
    spec = ioc.spec
    if spec.network.require_name_servers:
        if spec.servers.ca.enabled and not capabilities.ca_name_server(spec):
            raise IOCValidationError(
                "spec.network.requireNameServers",
                f"a {spec.servers.ca.implementation.value} CA server does not answer "
                "name-server (TCP) searches; only rsrv does",
            )
        if spec.servers.pva.enabled and not capabilities.pva_name_server(spec):
            raise IOCValidationError(
                "spec.network.requireNameServers",
                "a classic PVA server does not answer name-server (TCP) searches: use "
                "network.mode: sidecar, whose pvagw answers them",
            )
    if (spec.servers.ca.enabled and spec.servers.ca.implementation == CAImplementation.PCAS
            and spec.network.mode != NetworkMode.HOST and not spec.runs_ca_gateway):
        raise IOCValidationError(
            "spec.servers.ca.implementation",
            "the portable CA server (pcas, pcaspy) needs an interface with a broadcast "
            "address and aborts in a /32 pod network (Calico, ptp): use network.mode: host, "
            "or sidecar, where it runs on loopback behind the CA gateway",
        )
    _check_ports(spec)
    names = [e.name for e in spec.env]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise IOCValidationError("spec.env", f"{', '.join(repeated)} listed more than once")
    managed = {e["name"] for e in server_env(ioc, resolve_ports(spec))}
    clash = sorted(managed & {e.name for e in spec.env})
    if clash:
        raise IOCValidationError(
            "spec.env", f"{', '.join(clash)} is set by the operator: use spec.network.ports")
    if spec.network.mode == NetworkMode.SIDECAR:
        _check_sidecars(spec)


def _check_sidecars(spec: IOCSpec) -> None:
    if not (spec.runs_pvagw or spec.runs_ca_gateway or spec.runs_bridge):
        raise IOCValidationError(
            "spec.network.mode",
            "sidecar mode with no gateway to run: serve PVA (pvagw fronts it), keep "
            "gateways.ca enabled, or enable gateways.bridge; or use network.mode: pod",
        )
    ports = resolve_ports(spec)
    internal: dict[int, str] = {}  # loopback port -> the field that moved a server there
    if spec.runs_pvagw:
        gw = spec.pva_gateway
        if gw.internal_server_port == gw.internal_broadcast_port:
            raise IOCValidationError(
                "spec.gateways.pva.internalBroadcastPort", "must differ from internalServerPort")
        internal[gw.internal_server_port] = "spec.gateways.pva.internalServerPort"
        internal[gw.internal_broadcast_port] = "spec.gateways.pva.internalBroadcastPort"
        if spec.servers.ca.enabled and ports.ca in internal:
            raise IOCValidationError(
                "spec.network.ports.ca", "collides with the gateway's internal PVA ports")
    ca = spec.ca_gateway
    if spec.runs_ca_gateway and ca.internal_port in internal:
        raise IOCValidationError(
            "spec.gateways.ca.internalPort", f"collides with {internal[ca.internal_port]}")
    if ca.implementation == CAGatewayImplementation.BUILTIN and (ca.access or ca.command):
        field = "access" if ca.access else "command"
        raise IOCValidationError(
            f"spec.gateways.ca.{field}",
            "only for implementation: ca-gateway (the builtin gateway has readOnly and pvlist)")
    if ca.access is not None and ca.read_only:
        raise IOCValidationError(
            "spec.gateways.ca.readOnly", "set readOnly or an access file, not both")


def _check_ports(spec: IOCSpec) -> None:
    """No port twice for one protocol inside the pod. In host mode only explicit ports
    can collide (the allocator keeps the rest apart)."""
    ports = resolve_ports(spec)
    explicit = spec.network.ports
    host = spec.network.mode == NetworkMode.HOST

    def chosen(value: int, given: int | None) -> int | None:
        return given if host else value

    ca = chosen(ports.ca, explicit.ca) if spec.servers.ca.enabled else None
    pva_tcp = chosen(ports.pva_server, explicit.pva_server) if spec.serves_pva else None
    pva_udp = (chosen(ports.pva_broadcast, explicit.pva_broadcast)
               if spec.serves_pva else None)
    for proto, pair in (("TCP", (ca, pva_tcp)), ("UDP", (ca, pva_udp))):
        if None not in pair and pair[0] == pair[1]:
            raise IOCValidationError(
                "spec.network.ports",
                f"{proto} port {pair[0]} is used by both CA and PVA in this pod")


def render(
    ioc: IOC, config: OperatorConfig | None = None, allocated: ResolvedPorts | None = None
) -> list[dict[str, Any]]:
    """All objects for one IOC, in apply order (config before the pods that read it)."""
    config = config or OperatorConfig()
    check_semantics(ioc)
    ports = resolve_ports(ioc.spec, allocated)
    spec = ioc.spec
    if (spec.runs_ca_gateway and spec.ca_gateway.implementation ==
            CAGatewayImplementation.CA_GATEWAY and not spec.ca_gateway.image
            and not config.ca_gateway_image):
        raise IOCValidationError(
            "spec.gateways.ca.image",
            "implementation ca-gateway needs an image with EPICS' ca-gateway (the operator "
            "has no default: IOC_OPERATOR_CA_GATEWAY_IMAGE is unset)")
    objects: list[dict[str, Any]] = []
    configs = []
    if spec.runs_pvagw:
        configs.append(pvagw.config_map(ioc, ports))
    if spec.runs_ca_gateway and (cm := cagw.config_map(ioc)):
        configs.append(cm)
    objects += configs
    # A changed gateway config must restart the pod: its hash is in the pod template.
    texts = [json.dumps(c["data"], sort_keys=True) if c["metadata"]["name"] ==
             names.cagw_config_name(ioc) else c["data"][pvagw.CONFIG_KEY] for c in configs]
    config_hash = pvagw.config_hash("".join(texts)) if texts else None
    if ioc.spec.autosave.enabled:
        objects.append(autosave_claim(ioc))
    if ioc.spec.network.mode != NetworkMode.HOST:
        objects.append(service(ioc, ports))
        if ioc.spec.network.allowed_namespaces is not None:
            objects.append(network_policy(ioc, ports))
    objects.append(stateful_set(ioc, ports, config, config_hash))
    return objects


@dataclass(frozen=True)
class Rendered:
    ioc: IOC
    ports: ResolvedPorts
    objects: list[dict[str, Any]]


def render_all(iocs: list[IOC], config: OperatorConfig | None = None) -> list[Rendered]:
    """Render several IOCs, allocating host ports across them as the operator does
    (list order stands in for creation order). Raises IOCValidationError on a clash."""
    from ..allocation import PortRangeExhausted, allocate, host_ioc, placed

    config = config or OperatorConfig()
    port_range = (config.host_port_min, config.host_port_max)
    holders = []
    out = []
    # Like the operator's index, every IOC's explicit ports are known from the start,
    # so an earlier IOC's allocation never takes a later IOC's explicit port.
    explicit_only = {
        i: host_ioc({"metadata": {**ioc.metadata.model_dump(), "creationTimestamp": f"{i:06}"},
                     "spec": ioc.spec.model_dump(by_alias=True)})
        for i, ioc in enumerate(iocs) if ioc.spec.network.mode == NetworkMode.HOST}
    for order, ioc in enumerate(iocs):
        allocated = None
        where = f"(IOC {ioc.metadata.namespace}/{ioc.metadata.name})"
        if ioc.spec.network.mode == NetworkMode.HOST:
            me = explicit_only[order]
            later = [h for i, h in explicit_only.items() if i > order]
            try:
                allocation = allocate(me, holders + later, port_range)
            except PortRangeExhausted as exc:
                raise IOCValidationError("spec.network.ports", f"{exc} {where}") from None
            if allocation.refused:
                raise IOCValidationError("spec.network.ports", f"{allocation.refused} {where}")
            holders.append(placed(me, allocation))
            allocated = allocation.ports
        out.append(Rendered(ioc, resolve_ports(ioc.spec, allocated),
                            render(ioc, config, allocated)))
    return out
