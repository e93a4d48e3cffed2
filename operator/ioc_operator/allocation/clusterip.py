"""A stable ClusterIP per IOC, derived from its namespace and name.

Kubernetes gives a new Service a random ClusterIP, so a deleted and re-created IOC got
a new address and running clients, which hold the old one, never found it again. An
address derived from namespace/name is the same every time. Another Service may hold
it already (one created without asking for an address takes a random one), so each
IOC has a short list of candidates, tried in order; with the occupant unchanged the
same candidate wins each time. Pure: no API calls.
"""

from __future__ import annotations

import hashlib
import ipaddress

CANDIDATES = 4


def candidates(namespace: str, name: str, cidr: str, count: int = CANDIDATES) -> list[str]:
    """The IOC's ClusterIP candidates inside the Service range `cidr`, best first. The
    network's first address (the `kubernetes` Service takes it) and, for IPv4, its
    last, are never chosen."""
    net = ipaddress.ip_network(cidr, strict=False)
    usable = net.num_addresses - 3  # network address, the kubernetes Service, broadcast
    if usable < 1:
        return []
    out: list[str] = []
    for attempt in range(count * 4):  # distinct candidates; a tiny range has fewer
        digest = hashlib.sha256(f"{namespace}/{name}/{attempt}".encode()).digest()
        address = str(net.network_address + 2 + int.from_bytes(digest[:8], "big") % usable)
        if address not in out:
            out.append(address)
        if len(out) == count:
            break
    return out


def contains(cidr: str, address: str) -> bool:
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False
