"""What the operator remembers between events, in one object (kopf's memo holds it).

Per IOC (by uid) one `IOCMemory`; `forget(uid)` drops all of it when the IOC is gone.
Host-port claims are per IOC key, and IOCs deleted while unwatched are tombstones
until the watch drops their index entries. Nothing here calls the API.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ioc_operator.allocation.hostports import Allocation, HostIOC, allocate, placed
from ioc_operator.controller import echoes
from ioc_operator.controller.bookkeeping import Inputs
from ioc_operator.controller.resync import Tombstones


@dataclass
class IOCMemory:
    """What the operator remembers of one IOC."""

    # A reconcile of it started in this process (its children's events before that are
    # settled by that first reconcile: events.child_settled).
    reconciled: bool = False
    # Digest of the objects last applied: an unchanged render needs no new dry run.
    applied: str | None = None
    # Marks of the objects applied, by key: their echoes need no reconcile (echoes.py).
    written: dict[str, echoes.Mark] = field(default_factory=dict)
    # The inputs its kopf handler last reconciled (events.stale).
    handled: Inputs | None = None
    # The status last written, whole: fresher than kopf's index until the watch brings
    # the write back, and what the next write merges its conditions into.
    status: dict[str, Any] | None = None
    generation: int | None = None  # of the IOC when `status` was written
    # The client settings last published in its namespace's directory.
    published: dict[str, str] | None = None


class HostClaims:
    """Host-port allocations made but maybe not yet in kopf's index (the status is
    written after the allocation), so two IOCs reconciled at once never pick one port."""

    def __init__(self) -> None:
        self._claims: dict[str, HostIOC] = {}
        self._lock = threading.Lock()

    def allocate(self, me: HostIOC, indexed: Iterable[HostIOC],
                 port_range: tuple[int, int]) -> Allocation:
        with self._lock:
            others = {h.key: h for h in indexed}
            others.update(self._claims)
            others.pop(me.key, None)
            allocation = allocate(me, others.values(), port_range)
            if not allocation.refused:
                self._claims[me.key] = placed(me, allocation)
        return allocation

    def release(self, key: str, uid: str | None = None) -> None:
        """Drop `key`'s claim (only if it is `uid`'s, when given)."""
        with self._lock:
            claim = self._claims.get(key)
            if claim is not None and (uid is None or claim.uid == uid):
                del self._claims[key]

    def __len__(self) -> int:
        return len(self._claims)


class OperatorState:
    """Everything the operator remembers; one instance per operator process."""

    def __init__(self) -> None:
        self._iocs: dict[str, IOCMemory] = {}
        self.claims = HostClaims()
        self.gone = Tombstones()  # IOCs deleted unseen: their index entries are stale

    def ioc(self, uid: str) -> IOCMemory:
        """The IOC's memory, made empty on first use."""
        memory = self._iocs.get(uid)
        if memory is None:
            memory = self._iocs.setdefault(uid, IOCMemory())
        return memory

    def peek(self, uid: str) -> IOCMemory | None:
        return self._iocs.get(uid)

    def forget(self, uid: str) -> None:
        """Drop what the operator remembers of an IOC that is gone."""
        self._iocs.pop(uid, None)

    def statuses(self) -> list[dict[str, Any]]:
        """The status last written of each IOC that has one (metrics.py reads them from
        another thread: a snapshot, each status a dict replaced whole, never changed)."""
        return [m.status for m in list(self._iocs.values()) if m.status is not None]

    def __len__(self) -> int:
        return len(self._iocs)
