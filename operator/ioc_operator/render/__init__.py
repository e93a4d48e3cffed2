"""The pure renderer: an IOC in, Kubernetes objects out. No API calls, no sockets, no clock.

Everything the operator creates for an IOC comes from `render`; everything clients
are told comes from `discovery.clientenv`. Both are deterministic functions of their
inputs. Validation is model.validation's, host-port allocation allocation's.
"""

from __future__ import annotations

import json
from typing import Any

from ioc_operator.model.config import OperatorConfig
from ioc_operator.model.ioc import IOC, NetworkMode
from ioc_operator.render import cagw, instance, names, pvagw
from ioc_operator.render.policy import network_policy
from ioc_operator.render.ports import ResolvedPorts, resolve_ports
from ioc_operator.render.service import service
from ioc_operator.render.storage import autosave_claim
from ioc_operator.render.workload import stateful_set

__all__ = ["ResolvedPorts", "render", "resolve_ports"]


def render(
    ioc: IOC, config: OperatorConfig | None = None, allocated: ResolvedPorts | None = None,
    *, mounted_config_hash: str | None = None, cluster_ip: str | None = None,
) -> list[dict[str, Any]]:
    """All objects for one IOC, in apply order (config before the pods that read it).
    `ioc` must have passed validation.check (parse_ioc does that). The controller's
    inputs: `allocated` host ports, `mounted_config_hash` the content hash of the
    ConfigMap spec.config.configMap names, `cluster_ip` the address a new Service asks
    for (None: keep what the Service has, or let Kubernetes choose)."""
    config = config or OperatorConfig()
    ports = resolve_ports(ioc.spec, allocated)
    spec = ioc.spec
    objects: list[dict[str, Any]] = []
    configs = []
    if spec.runs_pvagw:
        configs.append(pvagw.config_map(ioc, ports))
    if spec.runs_ca_gateway and (cm := cagw.config_map(ioc)):
        configs.append(cm)
    objects += configs
    if files := instance.config_map(ioc):
        objects.append(files)
    # A changed gateway config must restart the pod: its hash is in the pod template.
    texts = [json.dumps(c["data"], sort_keys=True) if c["metadata"]["name"] ==
             names.cagw_config_name(ioc) else c["data"][pvagw.CONFIG_KEY] for c in configs]
    config_hash = pvagw.config_hash("".join(texts)) if texts else None
    if ioc.spec.autosave.enabled:
        objects.append(autosave_claim(ioc))
    if ioc.spec.network.mode != NetworkMode.HOST:
        objects.append(service(ioc, ports, cluster_ip))
        if ioc.spec.network.allowed_namespaces is not None:
            objects.append(network_policy(ioc, ports))
    objects.append(stateful_set(ioc, ports, config, config_hash,
                                instance.content_hash(ioc, mounted_config_hash)))
    return objects
