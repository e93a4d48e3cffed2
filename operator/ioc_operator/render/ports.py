"""The ports an IOC uses, after explicit settings and allocations are applied."""

from __future__ import annotations

from dataclasses import dataclass

from ioc_operator.model.ioc import IOCSpec, NetworkMode

CA_PORT = 5064
PVA_SERVER_PORT = 5075
PVA_BROADCAST_PORT = 5076


@dataclass(frozen=True)
class ResolvedPorts:
    """Ports clients use (node ports in host mode, pod/Service ports otherwise)."""

    ca: int = CA_PORT
    pva_server: int = PVA_SERVER_PORT
    pva_broadcast: int = PVA_BROADCAST_PORT

    def as_dict(self) -> dict[str, int]:
        return {"ca": self.ca, "pvaServer": self.pva_server, "pvaBroadcast": self.pva_broadcast}


def resolve_ports(spec: IOCSpec, allocated: ResolvedPorts | None = None) -> ResolvedPorts:
    """Explicit ports win; host-mode IOCs fall back to their allocation, then defaults."""
    base = allocated if (allocated and spec.network.mode == NetworkMode.HOST) else ResolvedPorts()
    explicit = spec.network.ports
    return ResolvedPorts(
        ca=explicit.ca or base.ca,
        pva_server=explicit.pva_server or base.pva_server,
        pva_broadcast=explicit.pva_broadcast or base.pva_broadcast,
    )
