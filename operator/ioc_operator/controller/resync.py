"""IOCs deleted while the operator was not watching.

kopf's indexes (the client directory, the host ports) are fed by the watch. When the
API server restarts, kopf re-lists, and a re-list cannot say that an object vanished
meanwhile: its index entry stays, so the directory would list a deleted IOC and its
host ports would stay taken until the operator restarts. A periodic list of all IOCs
finds such entries; each is confirmed with a GET before it is dropped, because an IOC
created after the list is in the index but not in the list.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from ioc_operator import GROUP, VERSION
from ioc_operator.controller.kube import Kube

IOC_API = f"{GROUP}/{VERSION}"


def suspects(indexed: Mapping[str, str], listed: set[str]) -> dict[str, str]:
    """Pure: index entries (uid -> namespace/name) whose uid the list did not return."""
    return {uid: key for uid, key in indexed.items() if uid not in listed}


def gone(kube: Kube, indexed: Mapping[str, str]) -> set[str]:
    """uids of indexed IOCs that no longer exist (a namesake may exist: uids differ)."""
    listed = {i["metadata"]["uid"] for i in kube.list(IOC_API, "IOC", None)}
    found = set()
    for uid, key in suspects(indexed, listed).items():
        namespace, name = key.split("/", 1)
        live = kube.get(IOC_API, "IOC", namespace, name)
        if live is None or live["metadata"]["uid"] != uid:
            found.add(uid)
    return found


class Tombstones:
    """uids of IOCs deleted unseen, whose index entries are stale until the watch drops
    them. One shared object mutated in place: kopf hands each resource's handlers a
    shallow copy of the memo, so rebinding a memo attribute would never reach them."""

    def __init__(self) -> None:
        self._uids: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def __contains__(self, uid: object) -> bool:
        return uid in self._uids  # one read of an immutable set: no lock needed

    def __len__(self) -> int:
        return len(self._uids)

    def record(self, found: Iterable[str], indexed: Iterable[str]) -> set[str]:
        """Remember `found` (newly confirmed gone), forget uids the index no longer
        holds; return the uids that are new."""
        found = set(found)
        with self._lock:
            new = found - self._uids
            self._uids = frozenset(found | (self._uids & set(indexed)))
        return new
