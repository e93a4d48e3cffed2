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

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OperatorConfig:
        env = os.environ if environ is None else environ
        values: dict[str, str] = {}
        for name in cls.model_fields:
            key = f"IOC_OPERATOR_{name.upper()}"
            if env.get(key):
                values[name] = env[key]
        return cls(**values)
