"""The IOC's enumerations: network modes and server implementations."""

from __future__ import annotations

from enum import StrEnum


class NetworkMode(StrEnum):
    HOST = "host"
    POD = "pod"
    SIDECAR = "sidecar"


class CAImplementation(StrEnum):
    RSRV = "rsrv"
    CAPROTO = "caproto"
    PCAS = "pcas"


class PVAImplementation(StrEnum):
    PVXS = "pvxs"
    CLASSIC = "classic"


class CAGatewayImplementation(StrEnum):
    BUILTIN = "builtin"
    CA_GATEWAY = "ca-gateway"
