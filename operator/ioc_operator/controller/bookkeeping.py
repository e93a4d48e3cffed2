"""kopf's bookkeeping of what it handled, kept small and written with the IOC's status.

kopf tells a creation from a change from nothing by a "diff base" it keeps in the
object: by default the whole spec, labels and annotations as JSON in an annotation,
written by a patch of its own after each handler. That annotation is as big as the
spec (a large one failed "Too long", and from then on kopf took every change for a
creation), fills `kubectl describe`, and its patch can fail while the status the
handler wrote already reports success.

Here the diff base is what a reconcile depends on (`inputs`: the generation, which
stands for the spec, the labels the objects inherit, and the recheck annotation other
IOCs set) as a short mark, `status.lastHandled`. The operator writes it in the same
status write that reports the outcome, and kopf reads it back from there and writes
nothing: kopf's bookkeeping and the reported outcome succeed or fail as one write
(a failed one raises, and kopf retries the handler).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any, cast

import kopf

from ioc_operator import GROUP

RECHECK_ANNOTATION = f"{GROUP}/recheck-ports"
FIELD = "lastHandled"  # in the IOC's status
# The diff base earlier versions had kopf keep; dropped from each IOC as it is handled.
LEGACY_ANNOTATION = "kopf.epics-operator.io/last-handled-configuration"

Inputs = tuple[int, str, str]


def inputs(body: Mapping[str, Any]) -> Inputs:
    """What a reconcile depends on besides the spec (which the generation stands for):
    the labels the objects inherit and the recheck annotation other IOCs set."""
    meta = body["metadata"]
    notes = meta.get("annotations") or {}
    return (int(meta.get("generation") or 0), json.dumps(meta.get("labels") or {},
            sort_keys=True), notes.get(RECHECK_ANNOTATION, ""))


def mark(body: Mapping[str, Any]) -> str:
    """`inputs` as written to status.lastHandled: <generation>-<digest of the rest>."""
    generation, labels, recheck = inputs(body)
    digest = hashlib.sha256(f"{labels}\n{recheck}".encode()).hexdigest()[:12]
    return f"{generation}-{digest}"


class StatusMark(kopf.DiffBaseStorage):
    """kopf's diff base: `mark(body)`, read from status.lastHandled. Handlers with a
    `field=` filter would need more than this essence; the operator has none."""

    def build(self, *, body: kopf.Body,
              extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {FIELD: mark(body)})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        handled = (body.get("status") or {}).get(FIELD)
        return cast(kopf.BodyEssence, {FIELD: handled}) if handled else None

    def store(self, *, body: kopf.Body, patch: kopf.Patch,
              essence: kopf.BodyEssence) -> None:
        # The operator wrote the mark with the outcome (handlers._run); kopf only drops
        # the big annotation earlier versions kept.
        if LEGACY_ANNOTATION in body.metadata.annotations:
            patch.metadata.annotations[LEGACY_ANNOTATION] = None
