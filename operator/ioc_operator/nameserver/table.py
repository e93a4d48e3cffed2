"""The IOCs the name server answers for: prefix, endpoints, server implementations.

An `IOC` entry never changes where it points: an IOC that moves (re-created,
rescheduled, another mode) gets a new entry and the old one is marked dead, so every
answer cached from the old one is known to be stale the moment the table learns of the
move (`IOC.live`). Readiness is the only field updated in place.

Two IOCs may claim one name (the same prefix in two namespaces). The answer is defined:
the longest matching prefix first, then the older IOC (creation time, then key), the
same rule the operator applies to duplicate prefixes inside one namespace.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = ["CA", "IOC", "PROTOCOLS", "PVA", "Endpoint", "Table", "TableError"]

CA, PVA = "ca", "pva"
PROTOCOLS = (CA, PVA)
DEFAULT_PORTS = {"ca": 5064, "pva": 5075, "pva_search": 5076}


class TableError(ValueError):
    """An IOC entry that cannot be used (bad address, no endpoint)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An IPv4 address and port (answers carry IPv4 only: CA cannot say anything else)."""

    host: str
    port: int
    ip: int = field(init=False, compare=False, repr=False)  # as CA search replies carry it

    def __post_init__(self) -> None:
        try:
            number = int(ipaddress.IPv4Address(self.host))
        except ValueError:
            raise TableError(f"{self.host!r} is not an IPv4 address") from None
        if not 0 < self.port < 65536:
            raise TableError(f"port {self.port} out of range")
        object.__setattr__(self, "ip", number)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, default_port: int) -> Endpoint:
        host, sep, port = text.strip().rpartition(":")
        if not sep:
            return cls(text.strip(), default_port)
        try:
            return cls(host, int(port))
        except ValueError as exc:
            raise TableError(f"{text!r}: {exc}") from None


@dataclass(eq=False, slots=True)
class IOC:
    """One IOC as clients reach it. Identity (not equality) tells entries apart."""

    key: str  # namespace/name, unique in the table
    prefix: str
    ca: Endpoint | None = None  # where CA clients connect (TCP) ...
    pva: Endpoint | None = None  # ... and PVA clients
    ca_search: Endpoint | None = None  # where we confirm names (UDP); default: ca
    pva_search: Endpoint | None = None  # default: pva's host, port 5076
    created: str = ""  # older wins a name two IOCs claim ("" sorts first)
    ca_server: str = ""  # implementation (rsrv, caproto, pcas), for logs
    pva_server: str = ""  # (pvxs, classic)
    external: bool = False  # its endpoints are reachable from outside the cluster
    ready: bool = True
    live: bool = True  # False once replaced or removed
    guid: bytes = field(default=b"", repr=False)  # the PVA server GUID we answer with

    def __post_init__(self) -> None:
        if self.ca is None and self.pva is None:
            raise TableError(f"{self.key}: no CA or PVA endpoint")
        if self.ca is not None and self.ca_search is None:
            self.ca_search = self.ca
        if self.pva is not None and self.pva_search is None:
            self.pva_search = Endpoint(self.pva.host, DEFAULT_PORTS["pva_search"])
        if not self.guid:
            # Made up, but stable: both replicas answer with the same one, and a move
            # (new endpoint) looks like a new server, as it is.
            self.guid = hashlib.sha1(f"{self.key} {self.pva}".encode()).digest()[:12]

    def endpoint(self, proto: str) -> Endpoint | None:
        return self.ca if proto == CA else self.pva

    def search_endpoint(self, proto: str) -> Endpoint | None:
        return self.ca_search if proto == CA else self.pva_search

    def placement(self) -> tuple[object, ...]:
        """Everything an answer depends on: equal placements answer identically."""
        return (self.prefix, self.ca, self.pva, self.ca_search, self.pva_search,
                self.created, self.ca_server, self.pva_server, self.external)

    def rank(self) -> tuple[str, str]:
        return (self.created, self.key)

    def __repr__(self) -> str:
        return (f"IOC({self.key} {self.prefix!r} ca={self.ca} pva={self.pva}"
                f"{'' if self.live else ' dead'})")


# changed: entries that are new, moved or became ready; removed: entries now dead
Listener = Callable[[list[IOC], list[IOC]], None]


class Table:
    """IOCs by key, and a prefix index for longest-prefix matching."""

    def __init__(self) -> None:
        self._iocs: dict[str, IOC] = {}
        self._by_prefix: dict[str, list[IOC]] = {}
        self._lengths: list[int] = []  # distinct prefix lengths, longest first
        self.listeners: list[Listener] = []
        self.version = 0  # bumped on every change

    def __len__(self) -> int:
        return len(self._iocs)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._iocs.values()))

    def get(self, key: str) -> IOC | None:
        return self._iocs.get(key)

    # ------------------------------------------------------------------ queries
    def candidates(self, proto: str, name: str) -> list[IOC]:
        """IOCs serving `proto` whose prefix starts `name`: longest prefix first, then
        the older IOC."""
        out: list[IOC] = []
        by_prefix = self._by_prefix
        size = len(name)
        for length in self._lengths:
            if length > size:
                continue
            group = by_prefix.get(name[:length])
            if group:
                out.extend(i for i in group if i.endpoint(proto) is not None)
        return out

    def serving(self, proto: str) -> list[IOC]:
        """Every IOC serving `proto`, older first."""
        return sorted((i for i in self._iocs.values() if i.endpoint(proto) is not None),
                      key=IOC.rank)

    def claims(self) -> dict[str, list[IOC]]:
        """Prefixes held by more than one IOC."""
        return {p: list(g) for p, g in self._by_prefix.items() if len(g) > 1}

    # ------------------------------------------------------------------ changes
    def put(self, ioc: IOC) -> bool:
        """Add or replace the entry with `ioc`'s key. Returns whether anything changed."""
        changed, removed = self._put(ioc)
        if changed or removed:
            self._notify(changed, removed)
        return bool(changed or removed)

    def remove(self, key: str) -> bool:
        old = self._iocs.get(key)
        if old is None:
            return False
        self._drop(old)
        self._notify([], [old])
        return True

    def replace_all(self, iocs: Iterable[IOC],
                    scope: Callable[[str], bool] | None = None) -> tuple[int, int]:
        """Make the table's entries (those whose key is in `scope`, default all) exactly
        `iocs`: a full re-list or a reloaded file. Listeners are told once. Returns the
        (changed, removed) counts."""
        wanted = {i.key: i for i in iocs}
        changed: list[IOC] = []
        removed: list[IOC] = []
        for key in [k for k in self._iocs
                    if k not in wanted and (scope is None or scope(k))]:
            old = self._iocs[key]
            self._drop(old)
            removed.append(old)
        for ioc in wanted.values():
            c, r = self._put(ioc)
            changed += c
            removed += r
        if changed or removed:
            self._notify(changed, removed)
        return len(changed), len(removed)

    def _put(self, ioc: IOC) -> tuple[list[IOC], list[IOC]]:
        old = self._iocs.get(ioc.key)
        if old is not None and old.placement() == ioc.placement():
            if old.ready == ioc.ready:
                return [], []
            old.ready = ioc.ready  # same place: answers cached from it stay good
            return ([old] if old.ready else []), []
        removed = []
        if old is not None:
            self._drop(old)
            removed.append(old)
        self._iocs[ioc.key] = ioc
        group = self._by_prefix.setdefault(ioc.prefix, [])
        group.append(ioc)
        group.sort(key=IOC.rank)
        if len(group) == 1:
            self._lengths = sorted({len(p) for p in self._by_prefix}, reverse=True)
        return [ioc], removed

    def _drop(self, old: IOC) -> None:
        old.live = False
        del self._iocs[old.key]
        group = self._by_prefix.get(old.prefix, [])
        if old in group:
            group.remove(old)
        if not group:
            self._by_prefix.pop(old.prefix, None)
            self._lengths = sorted({len(p) for p in self._by_prefix}, reverse=True)

    def _notify(self, changed: list[IOC], removed: list[IOC]) -> None:
        self.version += 1
        for listener in list(self.listeners):
            listener(changed, removed)
