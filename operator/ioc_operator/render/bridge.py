"""The CA-to-PVA bridge sidecar: a PVA server on the pod IP serving a CA-only IOC's PVs
as Normative Types (docs/ca-pva-bridge.md)."""

from __future__ import annotations

import copy
from typing import Any

from ioc_operator.model.config import OperatorConfig
from ioc_operator.model.ioc import IOC

from . import sidecars
from .ports import ResolvedPorts


def ca_target(ioc: IOC, ports: ResolvedPorts) -> str:
    """Where the bridge finds the IOC's CA server: loopback, on the moved port when the
    CA gateway fronts it, else on its own port (it binds every interface then)."""
    spec = ioc.spec
    port = spec.ca_gateway.internal_port if spec.runs_ca_gateway else ports.ca
    return f"127.0.0.1:{port}"


def container(ioc: IOC, ports: ResolvedPorts, config: OperatorConfig) -> dict[str, Any]:
    bridge = ioc.spec.bridge
    args = ["--interface", sidecars.POD_IP, "--server-port", str(ports.pva_server),
            "--broadcast-port", str(ports.pva_broadcast),
            "--ca-addr-list", ca_target(ioc, ports),
            "--inactive-timeout", str(ioc.spec.ca_gateway.inactive_timeout_seconds),
            "--prefix", ioc.spec.prefix]
    if bridge.read_only:
        args.append("--read-only")
    if bridge.metrics_port:
        args += ["--metrics-port", str(bridge.metrics_port)]
    out: dict[str, Any] = {
        "name": "bridge",
        "image": bridge.image or config.gateway_image,
        "command": ["ioc-ca-pva-bridge"],
        "args": args,
        "env": [sidecars.POD_IP_ENV],
        "ports": sidecars.ports("pva", ports.pva_server, ports.pva_broadcast)
        + sidecars.metrics_port("bridge-metrics", bridge.metrics_port),
        **sidecars.probes(ports.pva_server),
        "securityContext": copy.deepcopy(sidecars.SECURITY_CONTEXT),
    }
    resources = bridge.resources.model_dump(exclude_defaults=True)
    if resources:
        out["resources"] = resources
    return out
