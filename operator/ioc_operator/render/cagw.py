"""The CA gateway sidecar: CA on the pod IP in front of an IOC whose CA server is on
loopback. The builtin gateway (ioc-ca-gateway, caproto) and EPICS' C++ ca-gateway take
the same flags, so one renderer serves both."""

from __future__ import annotations

import copy
from typing import Any

from ioc_operator.model.config import OperatorConfig
from ioc_operator.model.ioc import IOC, CAGatewayImplementation

from . import names, sidecars
from .ports import ResolvedPorts

CONFIG_DIR = "/etc/cagw"
HOME_DIR = "/run/cagw"
PVLIST_KEY = "pvlist"
ACCESS_KEY = "access"
# ca-gateway has no read-only flag: an access file granting READ to everyone does it.
READ_ONLY_ACCESS = "ASG(DEFAULT) {\n    RULE(1, READ)\n}\n"


def config_data(ioc: IOC) -> dict[str, str]:
    """The files the gateway reads; empty when it needs none."""
    gw = ioc.spec.ca_gateway
    data = {}
    if gw.pvlist is not None:
        data[PVLIST_KEY] = gw.pvlist
    if gw.implementation == CAGatewayImplementation.CA_GATEWAY:
        if gw.access is not None:
            data[ACCESS_KEY] = gw.access
        elif gw.read_only:
            data[ACCESS_KEY] = READ_ONLY_ACCESS
    return data


def config_map(ioc: IOC) -> dict[str, Any] | None:
    data = config_data(ioc)
    if not data:
        return None
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": names.metadata(ioc, names.cagw_config_name(ioc), "ca-gateway"),
        "data": data,
    }


def args(ioc: IOC, ports: ResolvedPorts) -> list[str]:
    gw = ioc.spec.ca_gateway
    out = ["-sip", sidecars.POD_IP, "-sport", str(ports.ca),
           "-cip", "127.0.0.1", "-cport", str(gw.internal_port),
           "-inactive_timeout", str(gw.inactive_timeout_seconds)]
    data = config_data(ioc)
    if PVLIST_KEY in data:
        out += ["-pvlist", f"{CONFIG_DIR}/{PVLIST_KEY}"]
    if ACCESS_KEY in data:
        out += ["-access", f"{CONFIG_DIR}/{ACCESS_KEY}"]
    if gw.implementation == CAGatewayImplementation.CA_GATEWAY:
        out += ["-home", HOME_DIR]  # it writes helper scripts there; the root fs is read-only
    elif gw.read_only:
        out.append("-ro")
    if gw.metrics_port and gw.implementation == CAGatewayImplementation.BUILTIN:
        out += ["-metrics_port", str(gw.metrics_port)]
    return out


def image(ioc: IOC, config: OperatorConfig) -> str:
    gw = ioc.spec.ca_gateway
    if gw.image:
        return gw.image
    if gw.implementation == CAGatewayImplementation.CA_GATEWAY:
        assert config.ca_gateway_image, "validation.check_config refuses this"
        return config.ca_gateway_image
    return config.gateway_image


def container(ioc: IOC, ports: ResolvedPorts, config: OperatorConfig) -> dict[str, Any]:
    gw = ioc.spec.ca_gateway
    cpp = gw.implementation == CAGatewayImplementation.CA_GATEWAY
    out: dict[str, Any] = {
        "name": "cagw",
        "image": image(ioc, config),
        "command": list(gw.command or ["gateway"]) if cpp else ["ioc-ca-gateway"],
        "args": args(ioc, ports),
        "env": [sidecars.POD_IP_ENV],
        "ports": sidecars.ports("ca", ports.ca, ports.ca) + sidecars.metrics_port(
            "cagw-metrics", gw.metrics_port if not cpp else None),
        **sidecars.probes(ports.ca),
        "securityContext": copy.deepcopy(sidecars.SECURITY_CONTEXT),
    }
    mounts = []
    if config_data(ioc):
        mounts.append({"name": "cagw-config", "mountPath": CONFIG_DIR, "readOnly": True})
    if cpp:
        mounts.append({"name": "cagw-home", "mountPath": HOME_DIR})
    if mounts:
        out["volumeMounts"] = mounts
    resources = gw.resources.model_dump(exclude_defaults=True)
    if resources:
        out["resources"] = resources
    return out


def volumes(ioc: IOC) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if config_data(ioc):
        out.append({"name": "cagw-config", "configMap": {"name": names.cagw_config_name(ioc)}})
    if ioc.spec.ca_gateway.implementation == CAGatewayImplementation.CA_GATEWAY:
        out.append({"name": "cagw-home", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
    return out
