"""The Service that gives pod- and sidecar-mode IOCs a stable ClusterIP.

Service port == targetPort == the port the server binds: CA and PVXS reply to the
searcher with "use the source address", and conntrack reverses the DNAT, so the
reply and the TCP connection land on the same ClusterIP and port.
"""

from __future__ import annotations

from typing import Any

from ioc_operator.model.ioc import IOC

from . import names
from .ports import ResolvedPorts


def service_ports(ioc: IOC, ports: ResolvedPorts) -> list[dict[str, Any]]:
    spec = ioc.spec
    out: list[dict[str, Any]] = []
    if spec.servers.ca.enabled:
        out += [
            {"name": "ca-tcp", "protocol": "TCP", "port": ports.ca, "targetPort": ports.ca},
            {"name": "ca-udp", "protocol": "UDP", "port": ports.ca, "targetPort": ports.ca},
        ]
    if spec.serves_pva:
        out += [
            {"name": "pva-tcp", "protocol": "TCP", "port": ports.pva_server,
             "targetPort": ports.pva_server},
            {"name": "pva-udp", "protocol": "UDP", "port": ports.pva_broadcast,
             "targetPort": ports.pva_broadcast},
        ]
    return out


def service(ioc: IOC, ports: ResolvedPorts, cluster_ip: str | None = None) -> dict[str, Any]:
    """`cluster_ip`: the address a new Service asks for (an existing Service keeps its
    own: the field is immutable). spec.network.clusterIP wins."""
    svc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": names.metadata(ioc, names.service_name(ioc), "ioc"),
        "spec": {
            "type": "ClusterIP",
            "selector": names.selector(ioc),
            "ports": service_ports(ioc, ports),
            # Client settings carry the ClusterIP, so one IOC address never changes.
            "sessionAffinity": "None",
            # The ClusterIP leads to the pod as soon as it exists, not once the kubelet
            # has seen it Ready: an EPICS server answers searches only when it is up, so
            # readiness adds nothing for clients but the probe's delay (measured on the
            # real node: a running client read a new pod-mode IOC ~0.6 s after Ready).
            "publishNotReadyAddresses": True,
        },
    }
    if address := ioc.spec.network.cluster_ip or cluster_ip:
        svc["spec"]["clusterIP"] = address
    return svc
