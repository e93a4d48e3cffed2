"""Operator-wide settings: defaults the renderer fills in where an IOC says nothing."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

FIELD_MANAGER = "ioc-operator"
DEFAULT_GATEWAY_IMAGE = "ghcr.io/epics-operator/ioc-gateway:0.1.0"


class OperatorConfig(BaseModel):
    """Settings read from the environment (IOC_OPERATOR_*), so the Helm chart sets them."""

    model_config = ConfigDict(frozen=True)

    gateway_image: str = Field(default=DEFAULT_GATEWAY_IMAGE)
    # Default image for gateways.ca.implementation: ca-gateway (EPICS' C++ gateway).
    ca_gateway_image: str | None = Field(default=None)
    directory_name: str = Field(default="epics-client-env")
    # When set, one more directory in this namespace lists the IOCs of all namespaces.
    cluster_directory_namespace: str | None = Field(default=None)
    # Host-network IOCs get their ports from this range (EPICS defaults first).
    host_port_min: int = Field(default=5064, ge=1024, le=65535)
    host_port_max: int = Field(default=5999, ge=1024, le=65535)
    # How often to list all IOCs and drop directory entries of IOCs deleted while the
    # operator's watch was down (see resync.py).
    resync_seconds: float = Field(default=60.0, ge=1.0)
    # The cluster's Service range (e.g. 10.96.0.0/12), where each IOC's Service gets
    # a ClusterIP derived from its name. Unset: read from the cluster's `kubernetes`
    # ServiceCIDR (Kubernetes 1.33+); without either, Kubernetes chooses.
    service_cidr: str | None = Field(default=None)
    # The name service's stable address (the ioc-name-server Service's ClusterIP, or a
    # name clients resolve). When set, every client directory holds only it and never
    # changes as IOCs come and go; unset, the directory lists every IOC's address.
    name_service_address: str | None = Field(default=None)
    name_service_ca_port: int = Field(default=5064, ge=1, le=65535)
    name_service_pva_port: int = Field(default=5075, ge=1, le=65535)
    name_service_pva_udp_port: int = Field(default=5076, ge=1, le=65535)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OperatorConfig:
        env = os.environ if environ is None else environ
        values: dict[str, str] = {}
        for name in cls.model_fields:
            key = f"IOC_OPERATOR_{name.upper()}"
            if env.get(key):
                values[name] = env[key]
        return cls.model_validate(values)
