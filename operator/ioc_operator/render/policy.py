"""An optional NetworkPolicy: the IOC's EPICS ports (and its sidecars' metrics ports),
only from the namespaces listed.

Once a pod is selected by an ingress policy, everything the policy does not admit is
refused, so the listed namespaces reach the EPICS ports and nothing else gets in.
"""

from __future__ import annotations

from typing import Any

from ioc_operator.model.ioc import IOC

from . import names
from .ports import ResolvedPorts
from .service import service_ports


def metrics_ports(ioc: IOC) -> list[int]:
    spec = ioc.spec
    return sorted(p for p, runs in ((spec.ca_gateway.metrics_port, spec.runs_ca_gateway),
                                    (spec.bridge.metrics_port, spec.runs_bridge)) if p and runs)


def network_policy(ioc: IOC, ports: ResolvedPorts) -> dict[str, Any]:
    allowed = sorted(ioc.spec.network.allowed_namespaces or [])
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": names.metadata(ioc, names.workload_name(ioc), "ioc"),
        "spec": {
            "podSelector": {"matchLabels": names.selector(ioc)},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"namespaceSelector": {"matchExpressions": [{
                    "key": "kubernetes.io/metadata.name", "operator": "In",
                    "values": allowed}]}}],
                # The sidecars' metrics ports too: list the monitoring namespace to
                # scrape them.
                "ports": [{"protocol": p["protocol"], "port": p["port"]}
                          for p in service_ports(ioc, ports)]
                + [{"protocol": "TCP", "port": port} for port in metrics_ports(ioc)],
            }],
        },
    }
