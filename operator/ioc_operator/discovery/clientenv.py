"""EPICS client settings: what a client must load to reach IOCs without broadcast.

Pure: addresses in, variables out. Used per IOC (status.clientEnv) and, merged over
all IOCs, for the namespace's client directory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ioc_operator.model import capabilities
from ioc_operator.model.config import OperatorConfig
from ioc_operator.model.ioc import IOCSpec
from ioc_operator.render.ports import CA_PORT, PVA_BROADCAST_PORT, PVA_SERVER_PORT, ResolvedPorts


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


@dataclass(frozen=True)
class NameService:
    """Where the name service (ioc-name-server) is reached: one stable address."""

    address: str
    ca_port: int = CA_PORT  # TCP name-server searches and UDP searches
    pva_port: int = PVA_SERVER_PORT  # TCP
    pva_udp_port: int = PVA_BROADCAST_PORT


def name_service(config: OperatorConfig) -> NameService | None:
    """The name service the operator is told of (IOC_OPERATOR_NAME_SERVICE_*), if any."""
    if not config.name_service_address:
        return None
    return NameService(config.name_service_address, config.name_service_ca_port,
                       config.name_service_pva_port, config.name_service_pva_udp_port)


def name_service_env(service: NameService) -> dict[str, str]:
    """The constant directory: every client setting names only the name service, so it
    never changes as IOCs come and go. Both lists of each protocol name it: libca and
    pvxs clients search over TCP (NAME_SERVERS), caproto and pvAccessCPP clients only
    over UDP (ADDR_LIST); libca and pvxs send each batch of names both ways, one TCP
    message and one datagram per batch."""
    a = service.address
    return {
        "EPICS_CA_ADDR_LIST": _hostport(a, service.ca_port, CA_PORT),
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_NAME_SERVERS": f"{a}:{service.ca_port}",
        "EPICS_PVA_ADDR_LIST": _hostport(a, service.pva_udp_port, PVA_BROADCAST_PORT),
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_NAME_SERVERS": f"{a}:{service.pva_port}",
    }
