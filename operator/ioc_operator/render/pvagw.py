"""The pvagw sidecar: PVA on the pod IP in front of an IOC whose PVA server is on loopback."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from ioc_operator.model.config import OperatorConfig
from ioc_operator.model.ioc import IOC

from . import names, sidecars
from .ports import ResolvedPorts

POD_IP_TOKEN = "@POD_IP@"
CONFIG_DIR = "/etc/pvagw"
RUN_DIR = "/run/pvagw"
CONFIG_KEY = "pvagw.json"


def pvagw_config(ioc: IOC, ports: ResolvedPorts) -> dict[str, Any]:
    """pvagw's JSON config; the pod IP is a token replaced at container start."""
    gw = ioc.spec.pva_gateway
    return {
        "version": 2,
        "readOnly": gw.read_only,
        "clients": [
            {
                "name": "ioc",
                "provider": "pva",
                "addrlist": f"127.0.0.1:{gw.internal_broadcast_port}",
                "autoaddrlist": False,
            }
        ],
        "servers": [
            {
                "name": "pod",
                "clients": ["ioc"],
                # Only the pod IP: binding 0.0.0.0 would also answer on loopback and
                # collide with the IOC's moved PVA server.
                "interface": [POD_IP_TOKEN],
                "serverport": ports.pva_server,
                "bcastport": ports.pva_broadcast,
                "autoaddrlist": False,
                "addrlist": "",
                "statusprefix": gw.status_prefix or f"{ioc.spec.prefix}PVAGW:",
            }
        ],
    }


def config_text(ioc: IOC, ports: ResolvedPorts) -> str:
    return json.dumps(pvagw_config(ioc, ports), indent=2, sort_keys=True) + "\n"


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_map(ioc: IOC, ports: ResolvedPorts) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": names.metadata(ioc, names.pvagw_config_name(ioc), "pva-gateway"),
        "data": {CONFIG_KEY: config_text(ioc, ports)},
    }


def container(ioc: IOC, ports: ResolvedPorts, config: OperatorConfig) -> dict[str, Any]:
    gw = ioc.spec.pva_gateway
    # JSON has no variable expansion, so the pod IP from the downward API is put in here.
    script = (
        f'sed "s/{POD_IP_TOKEN}/$POD_IP/g" {CONFIG_DIR}/{CONFIG_KEY} > {RUN_DIR}/{CONFIG_KEY}'
        f" && exec pvagw {RUN_DIR}/{CONFIG_KEY}"
    )
    out: dict[str, Any] = {
        "name": "pvagw",
        "image": gw.image or config.gateway_image,
        "command": ["/bin/sh", "-c", script],
        "env": [sidecars.POD_IP_ENV],
        "ports": sidecars.ports("pva", ports.pva_server, ports.pva_broadcast),
        **sidecars.probes(ports.pva_server),
        "volumeMounts": [
            {"name": "pvagw-config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "pvagw-run", "mountPath": RUN_DIR},
            # pvagw keeps its statistics in a SQLite file in $TMPDIR (p4p.gw.GWStats);
            # the root filesystem is read-only.
            {"name": "pvagw-tmp", "mountPath": "/tmp"},
        ],
        "securityContext": copy.deepcopy(sidecars.SECURITY_CONTEXT),
    }
    resources = gw.resources.model_dump(exclude_defaults=True)
    if resources:
        out["resources"] = resources
    return out


def volumes(ioc: IOC) -> list[dict[str, Any]]:
    return [
        {"name": "pvagw-config", "configMap": {"name": names.pvagw_config_name(ioc)}},
        {"name": "pvagw-run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {"name": "pvagw-tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]
