"""Host-network port allocation. Pure: the host-mode IOCs in, one IOC's ports out.

Several host-mode IOCs on one node must not share UDP 5064: unicast searches reach
only one of the sockets bound to it. So each gets its own CA, PVA server and PVA
broadcast ports, unique among the IOCs that can land on the same node (all of them,
when either is not pinned to a node). Rules, in order:
- explicit ports in the spec win; two IOCs asking for the same explicit port clash,
  and the older one keeps it;
- a recorded allocation (status.ports) is kept, so restarts never move an IOC, unless
  an explicit port or an older IOC's recorded port now needs it;
- a new port prefers the EPICS default, then the lowest free port in the range.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ioc_operator.render.ports import CA_PORT, PVA_BROADCAST_PORT, PVA_SERVER_PORT, ResolvedPorts

CA_REPEATER_PORT = 5065  # every host's CA repeater listens here
DEFAULT_RANGE = (5064, 5999)
KINDS = ("ca", "pva_server", "pva_broadcast")
DEFAULTS = {"ca": CA_PORT, "pva_server": PVA_SERVER_PORT, "pva_broadcast": PVA_BROADCAST_PORT}

Ports = tuple[int | None, int | None, int | None]


@dataclass(frozen=True)
class HostIOC:
    """What allocation needs to know of one host-mode IOC."""

    key: str  # namespace/name
    node: str | None  # the node it is pinned to; None: any node
    explicit: Ports = (None, None, None)
    recorded: Ports = (None, None, None)
    created: str = ""  # creationTimestamp: the older IOC wins a clash
    uid: str = ""  # tells a deleted IOC from a namesake created since

    def may_share_node(self, other: HostIOC) -> bool:
        return self.node is None or other.node is None or self.node == other.node

    def older_than(self, other: HostIOC) -> bool:
        return (self.created, self.key) < (other.created, other.key)

    def ports(self) -> set[int]:
        return {p for e, r in zip(self.explicit, self.recorded, strict=True)
                if (p := e or r)}


@dataclass(frozen=True)
class Allocation:
    ports: ResolvedPorts
    clashes: tuple[str, ...] = ()  # keys of IOCs asking for one of our explicit ports
    refused: str | None = None  # why this IOC cannot have its ports (it lost a clash)
    evicts: tuple[str, ...] = ()  # IOCs whose allocated ports our explicit ones now take


class PortRangeExhausted(ValueError):
    pass


def allocate(me: HostIOC, others: Iterable[HostIOC],
             port_range: tuple[int, int] = DEFAULT_RANGE) -> Allocation:
    neighbours = [o for o in others if o.key != me.key and me.may_share_node(o)]
    mine = {p for p in me.explicit if p}
    # Every IOC asking for one of our explicit ports, however many ask for the same one.
    rivals = [o for o in neighbours if mine & {p for p in o.explicit if p}]
    clashes = sorted({o.key for o in rivals})
    refused = None
    lost = [o for o in rivals if o.older_than(me)]
    if lost:
        taken_by = ", ".join(sorted({o.key for o in lost}))
        refused = f"explicit port(s) already taken on a shared node by the older IOC(s) {taken_by}"

    # Ports nobody else may take from us: explicit ones, and older recorded ones.
    firm = {p for o in neighbours for p in o.explicit if p}
    for o in neighbours:
        if o.older_than(me):
            firm |= o.ports()
    taken = firm | {p for o in neighbours for p in o.ports()}

    chosen: dict[str, int] = {}
    for kind, explicit, recorded in zip(KINDS, me.explicit, me.recorded, strict=True):
        if explicit:
            chosen[kind] = explicit
        elif recorded and recorded not in firm and recorded not in chosen.values():
            chosen[kind] = recorded
    for kind in KINDS:
        if kind not in chosen:
            chosen[kind] = _free_port(kind, taken | set(chosen.values()) | set(
                p for p in me.explicit if p), port_range)
    evicts = sorted({o.key for o in neighbours
                     if mine & {r for e, r in zip(o.explicit, o.recorded, strict=True)
                                if r and not e}})
    return Allocation(ResolvedPorts(**chosen), tuple(clashes), refused, tuple(evicts))


def _free_port(kind: str, taken: set[int], port_range: tuple[int, int]) -> int:
    if DEFAULTS[kind] not in taken:
        return DEFAULTS[kind]
    low, high = port_range
    for port in range(low, high + 1):
        if port != CA_REPEATER_PORT and port not in taken:
            return port
    raise PortRangeExhausted(f"no free host port left in {low}-{high}")


def host_ioc(body: dict[str, Any]) -> HostIOC:
    """An IOC's allocation facts, read from its raw body (valid or not)."""
    meta, spec = body.get("metadata", {}), body.get("spec") or {}
    status = body.get("status") or {}
    explicit = (spec.get("network") or {}).get("ports") or {}
    recorded = (status.get("ports") or {}) if status.get("mode") == "host" else {}
    return HostIOC(
        key=f"{meta.get('namespace')}/{meta.get('name')}",
        node=(spec.get("scheduling") or {}).get("nodeName"),
        explicit=(explicit.get("ca"), explicit.get("pvaServer"), explicit.get("pvaBroadcast")),
        recorded=(recorded.get("ca"), recorded.get("pvaServer"), recorded.get("pvaBroadcast")),
        created=meta.get("creationTimestamp") or "",
        uid=meta.get("uid") or "",
    )


def placed(me: HostIOC, allocation: Allocation) -> HostIOC:
    """`me` holding the ports it was just given."""
    p = allocation.ports
    return HostIOC(me.key, me.node, me.explicit, (p.ca, p.pva_server, p.pva_broadcast),
                   me.created, me.uid)
