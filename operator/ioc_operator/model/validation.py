"""Validation of an IOC beyond its schema: the rules that depend on what each server
implementation can do, on the ports it ends up with, and on the operator's settings.
The schema's own cross-field rules (CEL in the CRD, checks in the model) are in
model.rules. A broken rule raises IOCValidationError naming the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ioc_operator.model import capabilities
from ioc_operator.model.config import OperatorConfig
from ioc_operator.model.errors import IOCValidationError
from ioc_operator.model.ioc import (
    IOC,
    CAGatewayImplementation,
    CAImplementation,
    IOCSpec,
    NetworkMode,
)
from ioc_operator.render.ports import resolve_ports
from ioc_operator.render.workload import OPERATOR_CONTAINERS, server_env


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
    _check_containers(spec)


def _check_containers(spec: IOCSpec) -> None:
    """Init and extra containers: Kubernetes validates the rest at the dry run; these
    are what it cannot know (the operator's names and ports)."""
    seen: set[str] = set()
    taken = {**epics_ports(spec), **metrics_ports(spec)}
    for field, containers in (("initContainers", spec.init_containers),
                              ("extraContainers", spec.extra_containers)):
        for i, container in enumerate(containers):
            where = f"spec.{field}[{i}]"
            name = container.get("name")
            if not isinstance(name, str) or not name:
                raise IOCValidationError(f"{where}.name", "is required")
            if name in OPERATOR_CONTAINERS:
                raise IOCValidationError(
                    f"{where}.name", f"{name!r} is a container the operator runs; choose "
                    "another name")
            if name in seen:
                raise IOCValidationError(f"{where}.name", f"{name!r} is used twice")
            seen.add(name)
            ports = container.get("ports") or []
            if not isinstance(ports, list):
                raise IOCValidationError(f"{where}.ports", "must be a list")
            for j, port in enumerate(ports):
                for key in ("containerPort", "hostPort"):
                    number = port.get(key) if isinstance(port, dict) else None
                    if number in taken:
                        raise IOCValidationError(
                            f"{where}.ports[{j}].{key}",
                            f"{number} is the IOC's {taken[number]} port, which the "
                            "operator assigns")


def epics_ports(spec: IOCSpec) -> dict[int, str]:
    """The ports the operator gives the IOC's servers and gateways in its pod (host
    mode: the explicit ones; the allocated ones are checked against the range in
    check_config)."""
    ports = resolve_ports(spec)
    host = spec.network.mode == NetworkMode.HOST
    explicit = spec.network.ports
    out: dict[int, str] = {}
    if spec.servers.ca.enabled:
        if (ca := explicit.ca if host else ports.ca) is not None:
            out[ca] = "CA"
        if spec.runs_ca_gateway:
            out[spec.ca_gateway.internal_port] = "loopback CA"
    if spec.serves_pva:
        for value, what in ((explicit.pva_server if host else ports.pva_server, "PVA server"),
                            (explicit.pva_broadcast if host else ports.pva_broadcast,
                             "PVA search")):
            if value is not None:
                out[value] = what
        if spec.runs_pvagw:
            out[spec.pva_gateway.internal_server_port] = "loopback PVA server"
            out[spec.pva_gateway.internal_broadcast_port] = "loopback PVA search"
    return out


def metrics_ports(spec: IOCSpec) -> dict[int, str]:
    """The sidecars' metrics ports, which containers beside them may not take either."""
    out: dict[int, str] = {}
    if spec.runs_ca_gateway and spec.ca_gateway.metrics_port:
        out[spec.ca_gateway.metrics_port] = "CA gateway metrics"
    if spec.runs_bridge and spec.bridge.metrics_port:
        out[spec.bridge.metrics_port] = "bridge metrics"
    return out


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
    if ca.implementation == CAGatewayImplementation.CA_GATEWAY and ca.metrics_port:
        raise IOCValidationError(
            "spec.gateways.ca.metricsPort",
            "only for implementation: builtin (EPICS' ca-gateway serves no Prometheus "
            "metrics)")
    taken = {p: "an EPICS port of the pod" for p in epics_ports(spec)}
    for field, port in (("ca.metricsPort", ca.metrics_port if spec.runs_ca_gateway else None),
                        ("bridge.metricsPort",
                         spec.bridge.metrics_port if spec.runs_bridge else None)):
        if port is None:
            continue
        if port in taken:
            raise IOCValidationError(f"spec.gateways.{field}", f"{port} is {taken[port]}")
        taken[port] = f"spec.gateways.{field}"
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


def check_config(ioc: IOC, config: OperatorConfig) -> None:
    """Rules that depend on the operator's settings."""
    spec = ioc.spec
    if spec.network.mode == NetworkMode.HOST:
        # A host-network pod shares the node's ports: one the allocator may hand to
        # this or another IOC must not be held by a container beside the IOC.
        for field, containers in (("initContainers", spec.init_containers),
                                  ("extraContainers", spec.extra_containers)):
            for i, container in enumerate(containers):
                for j, port in enumerate(container.get("ports") or []):
                    number = port.get("containerPort") if isinstance(port, dict) else None
                    if isinstance(number, int) and (
                            config.host_port_min <= number <= config.host_port_max):
                        raise IOCValidationError(
                            f"spec.{field}[{i}].ports[{j}].containerPort",
                            f"{number} is in the operator's host port range "
                            f"{config.host_port_min}-{config.host_port_max}, from which "
                            "IOCs on this node get their EPICS ports")
    if (spec.runs_ca_gateway and spec.ca_gateway.implementation ==
            CAGatewayImplementation.CA_GATEWAY and not spec.ca_gateway.image
            and not config.ca_gateway_image):
        raise IOCValidationError(
            "spec.gateways.ca.image",
            "implementation ca-gateway needs an image with EPICS' ca-gateway (the operator "
            "has no default: IOC_OPERATOR_CA_GATEWAY_IMAGE is unset)")
