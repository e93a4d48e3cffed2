"""Offline: several IOCs rendered together, host ports allocated across them as the
operator does (`ioc-operator render`, the lab, the demo)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ioc_operator.allocation.hostports import (
    HostIOC,
    PortRangeExhausted,
    allocate,
    placed,
)
from ioc_operator.model.config import OperatorConfig
from ioc_operator.model.errors import IOCValidationError
from ioc_operator.model.ioc import IOC, NetworkMode
from ioc_operator.model.validation import check_config
from ioc_operator.render import render
from ioc_operator.render.ports import ResolvedPorts, resolve_ports


@dataclass(frozen=True)
class Rendered:
    ioc: IOC
    ports: ResolvedPorts
    objects: list[dict[str, Any]]


def render_all(iocs: list[IOC], config: OperatorConfig | None = None) -> list[Rendered]:
    """Render several IOCs, allocating host ports across them as the operator does
    (list order stands in for creation order). Raises IOCValidationError on a clash."""
    config = config or OperatorConfig()
    port_range = (config.host_port_min, config.host_port_max)
    holders: list[HostIOC] = []
    out = []
    # Like the operator's index, every IOC's explicit ports are known from the start,
    # so an earlier IOC's allocation never takes a later IOC's explicit port.
    explicit_only = {i: planned(ioc, i) for i, ioc in enumerate(iocs)
                     if ioc.spec.network.mode == NetworkMode.HOST}
    for order, ioc in enumerate(iocs):
        check_config(ioc, config)
        allocated = None
        where = f"(IOC {ioc.metadata.namespace}/{ioc.metadata.name})"
        if ioc.spec.network.mode == NetworkMode.HOST:
            me = explicit_only[order]
            later = [h for i, h in explicit_only.items() if i > order]
            try:
                allocation = allocate(me, holders + later, port_range)
            except PortRangeExhausted as exc:
                raise IOCValidationError("spec.network.ports", f"{exc} {where}") from None
            if allocation.refused:
                raise IOCValidationError("spec.network.ports", f"{allocation.refused} {where}")
            holders.append(placed(me, allocation))
            allocated = allocation.ports
        out.append(Rendered(ioc, resolve_ports(ioc.spec, allocated),
                            render(ioc, config, allocated)))
    return out


def planned(ioc: IOC, order: int) -> HostIOC:
    """An IOC's allocation facts before it exists: its place in the list stands in for
    its creation time (the older IOC wins a clash)."""
    ports = ioc.spec.network.ports
    return HostIOC(key=f"{ioc.metadata.namespace}/{ioc.metadata.name}",
                   node=ioc.spec.scheduling.node_name,
                   explicit=(ports.ca, ports.pva_server, ports.pva_broadcast),
                   created=f"{order:09}", uid=ioc.metadata.uid or "")
