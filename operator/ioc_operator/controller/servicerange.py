"""The cluster's Service range, read from its `kubernetes` ServiceCIDR object
(networking.k8s.io/v1, Kubernetes 1.33+): where IOC Services get derived ClusterIPs."""

from __future__ import annotations

import ipaddress
import logging

from ioc_operator.controller.kube import Kube, KubeError

log = logging.getLogger(__name__)


def detect(kube: Kube) -> str | None:
    """The IPv4 Service range, or None (an older cluster, no RBAC to read it, IPv6 only):
    then Kubernetes chooses each Service's address, and IOC_OPERATOR_SERVICE_CIDR
    (the chart's serviceCIDR) can name the range instead."""
    try:
        found = kube.get("networking.k8s.io/v1", "ServiceCIDR", None, "kubernetes")
    except KubeError as exc:
        log.warning("cannot read the cluster's Service range (%s): IOC Services get the "
                    "ClusterIP Kubernetes chooses; set serviceCIDR to keep them stable", exc)
        return None
    for cidr in ((found or {}).get("spec") or {}).get("cidrs") or []:
        if ipaddress.ip_network(cidr, strict=False).version == 4:
            log.info("Service range %s: IOC Services get ClusterIPs derived from their names",
                     cidr)
            return str(cidr)
    log.warning("no IPv4 Service range found: IOC Services get the ClusterIP Kubernetes "
                "chooses; set serviceCIDR to keep them stable")
    return None
