"""Two IOCs of one namespace with one PV prefix would serve the same PV names: clients
of the namespace's directory search every IOC, get two answers and connect to either.
Pure: the namespace's IOCs in, the rule out. The older IOC keeps its prefix (like an
explicit host port); the newer one is refused until the prefix is free again."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

REASON = "DuplicatePrefix"


@dataclass(frozen=True)
class PrefixHolder:
    name: str
    uid: str
    prefix: str | None
    created: str  # creationTimestamp: the older IOC keeps the prefix
    refused: bool  # its status says it was refused for a duplicate prefix

    def older_than(self, other: PrefixHolder) -> bool:
        return (self.created, self.name) < (other.created, other.name)


def holder(body: dict[str, Any]) -> PrefixHolder:
    meta, spec = body.get("metadata", {}), body.get("spec") or {}
    conds = (body.get("status") or {}).get("conditions") or []
    refused = any(c.get("type") == "Reconciled" and c.get("reason") == REASON for c in conds)
    prefix = spec.get("prefix")
    return PrefixHolder(meta.get("name", ""), meta.get("uid", ""),
                        prefix if isinstance(prefix, str) else None,
                        meta.get("creationTimestamp") or "", refused)


def taken_by(me: PrefixHolder, others: Iterable[PrefixHolder]) -> str | None:
    """The older IOC that has `me`'s prefix, if any."""
    owners = sorted((o for o in others if o.uid != me.uid and o.prefix == me.prefix
                     and me.prefix is not None and o.older_than(me)),
                    key=lambda o: (o.created, o.name))
    return owners[0].name if owners else None


def freed(holders: Iterable[PrefixHolder]) -> list[str]:
    """IOCs refused for a duplicate prefix that no older IOC holds any more."""
    items = list(holders)
    return sorted(h.name for h in items if h.refused and taken_by(h, items) is None)
