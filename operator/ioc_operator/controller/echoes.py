"""Which events on an IOC's objects are the echo of the operator's own writes.

Every apply comes back as a watch event, and a StatefulSet's controller rewrites its
status several times per pod. Reconciling on each of those redoes a whole reconcile
(list, prune, apply, status) for nothing; at 1,000 IOCs they arrive by the thousand.
The operator remembers a mark of each object its apply returned; an event carrying the
same mark changed nothing the operator wrote. A hand edit of a spec or data changes
the mark, so drift is still reverted.

Pure: objects in, marks out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Mark = tuple[str, str]


def key(obj: dict[str, Any]) -> str:
    """An object's name within its IOC's objects."""
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def mark(obj: dict[str, Any]) -> Mark:
    """uid plus what changes when someone else edits the object: a StatefulSet's
    generation (its controller's status writes leave it alone), and for the other kinds,
    which have no status, the resourceVersion."""
    meta = obj.get("metadata", {})
    version = meta.get("generation") if obj.get("kind") == "StatefulSet" else meta.get(
        "resourceVersion")
    return (str(meta.get("uid", "")), str(version))


def marks(applied: list[dict[str, Any]]) -> dict[str, Mark]:
    """The marks of the objects one apply returned, by key."""
    return {key(obj): mark(obj) for obj in applied}


def is_echo(seen: Mapping[str, Mark] | None, obj: dict[str, Any]) -> bool:
    """Whether `obj` (from a watch event) is as the operator last wrote it."""
    return bool(seen) and seen is not None and seen.get(key(obj)) == mark(obj)
