"""Status conditions, Kubernetes style. Pure: the caller passes the time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Cond:
    type: str
    status: bool | None  # None: Unknown
    reason: str
    message: str = ""

    @property
    def status_text(self) -> str:
        return {True: "True", False: "False", None: "Unknown"}[self.status]


def merge_conditions(
    current: list[dict[str, Any]], new: list[Cond], generation: int | None, now: str
) -> list[dict[str, Any]]:
    """Replace conditions of the given types; lastTransitionTime moves only on a change
    of status, so an unchanged IOC yields an identical status and no write."""
    by_type = {c.get("type"): c for c in current}
    for cond in new:
        old = by_type.get(cond.type)
        changed = old is None or old.get("status") != cond.status_text
        by_type[cond.type] = {
            "type": cond.type,
            "status": cond.status_text,
            "reason": cond.reason,
            "message": cond.message,
            "observedGeneration": generation,
            "lastTransitionTime": now if changed or old is None else old.get(
                "lastTransitionTime", now),
        }
    return sorted(by_type.values(), key=lambda c: str(c.get("type")))


def transitions(current: list[dict[str, Any]], new: list[Cond]) -> list[Cond]:
    """Conditions whose status or reason differ from before: each is worth an event,
    except that conditions changing alike (one reason and message, as Reconciled and
    Ready do on a refusal) are one event: `kubectl describe` would show it twice."""
    by_type = {c.get("type"): c for c in current}
    out: list[Cond] = []
    for cond in new:
        old = by_type.get(cond.type)
        changed = old is None or (old.get("status"), old.get("reason")) != (
            cond.status_text, cond.reason)
        told = any((c.reason, c.message) == (cond.reason, cond.message) for c in out)
        if changed and not told:
            out.append(cond)
    return out
