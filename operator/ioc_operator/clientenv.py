"""EPICS client settings: what a client must load to reach IOCs without broadcast.

Pure: addresses in, variables out. Used per IOC (status.clientEnv) and, merged over
all IOCs, for the namespace's client directory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from . import capabilities
from .models import IOCSpec
from .render.ports import CA_PORT, PVA_BROADCAST_PORT, ResolvedPorts


def _hostport(address: str, port: int, default: int) -> str:
    # Without a port, a client uses its own default; only name a port that differs.
    return address if port == default else f"{address}:{port}"


@dataclass(frozen=True)
class ClientSettings:
    """Address entries per variable; merged settings keep each entry once, sorted."""

    ca_addr: tuple[str, ...] = ()
    ca_name_servers: tuple[str, ...] = ()
    pva_addr: tuple[str, ...] = ()
    pva_name_servers: tuple[str, ...] = ()
    serves_ca: bool = False
    serves_pva: bool = False

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.serves_ca:
            out["EPICS_CA_AUTO_ADDR_LIST"] = "NO"
            out["EPICS_CA_ADDR_LIST"] = " ".join(self.ca_addr)
            if self.ca_name_servers:
                out["EPICS_CA_NAME_SERVERS"] = " ".join(self.ca_name_servers)
        if self.serves_pva:
            out["EPICS_PVA_AUTO_ADDR_LIST"] = "NO"
            out["EPICS_PVA_ADDR_LIST"] = " ".join(self.pva_addr)
            if self.pva_name_servers:
                out["EPICS_PVA_NAME_SERVERS"] = " ".join(self.pva_name_servers)
        return out


def for_ioc(spec: IOCSpec, address: str, ports: ResolvedPorts) -> ClientSettings:
    """Settings that reach one IOC at `address` (ClusterIP, or node IP in host mode)."""
    ca = spec.servers.ca.enabled
    pva = spec.serves_pva
    return ClientSettings(
        ca_addr=(_hostport(address, ports.ca, CA_PORT),) if ca else (),
        ca_name_servers=(f"{address}:{ports.ca}",) if capabilities.ca_name_server(spec) else (),
        pva_addr=(_hostport(address, ports.pva_broadcast, PVA_BROADCAST_PORT),) if pva else (),
        pva_name_servers=(
            (f"{address}:{ports.pva_server}",) if capabilities.pva_name_server(spec) else ()
        ),
        serves_ca=ca,
        serves_pva=pva,
    )


def merge(settings: Iterable[ClientSettings]) -> ClientSettings:
    """One set of settings reaching every IOC: deterministic, each entry once."""
    items = list(settings)

    def union(attr: str) -> tuple[str, ...]:
        return tuple(sorted({entry for s in items for entry in getattr(s, attr)}))

    return ClientSettings(
        ca_addr=union("ca_addr"),
        ca_name_servers=union("ca_name_servers"),
        pva_addr=union("pva_addr"),
        pva_name_servers=union("pva_name_servers"),
        serves_ca=any(s.serves_ca for s in items),
        serves_pva=any(s.serves_pva for s in items),
    )


def endpoints(spec: IOCSpec, address: str, ports: ResolvedPorts) -> dict[str, str]:
    out = {}
    if spec.servers.ca.enabled:
        out["ca"] = f"{address}:{ports.ca}"
    if spec.serves_pva:
        out["pva"] = f"{address}:{ports.pva_server}"
    return out
