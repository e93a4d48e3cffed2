"""Which watch events need work, decided from what the operator already knows. Pure:
event bodies and remembered state in, a decision out; no API calls, no clock, no kopf.

Most events on a big cluster need nothing: the echo of the operator's own write, the
StatefulSet controller's status bookkeeping, an IOC event whose client settings did not
change, a stale IOC event kopf delivers late. Each rule here is one such case; the
handlers call them on the event loop, so the thousands of these a cold start brings
never queue for a handler thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ioc_operator import GROUP
from ioc_operator.controller import echoes
from ioc_operator.controller.bookkeeping import Inputs

# What the operator keeps of an IOC to judge its children's events: its generation,
# observedGeneration and Ready condition, shaped like the IOC itself.
IOCState = dict[str, Any]


def owner_ioc(body: Mapping[str, Any]) -> tuple[str, str] | None:
    """The owning IOC's name and uid, from the object's owner references."""
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == "IOC" and ref.get("apiVersion", "").startswith(GROUP):
            return ref.get("name", ""), ref.get("uid", "")
    return None


def ioc_state(generation: int | None, status: Mapping[str, Any]) -> IOCState:
    """The part of an IOC that `nothing_to_do` reads."""
    ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    return {"metadata": {"generation": generation},
            "status": {"observedGeneration": status.get("observedGeneration"),
                       "conditions": ready}}


def freshest(indexed: IOCState | None, reported: IOCState | None) -> IOCState | None:
    """The newer of an IOC's indexed state and the status the operator last wrote.
    Only the operator writes Ready, so at one generation its own write is the newest."""
    if indexed is None or reported is None:
        return indexed or reported

    def generations(state: IOCState) -> tuple[int, int]:
        return (int(state["metadata"].get("generation") or 0),
                int(state["status"].get("observedGeneration") or 0))

    return reported if generations(reported) >= generations(indexed) else indexed


def is_echo(written: Mapping[str, echoes.Mark] | None, body: Mapping[str, Any],
            event_type: str | None) -> bool:
    """The object is as the operator last applied it (a deletion never is)."""
    return event_type != "DELETED" and echoes.is_echo(written, dict(body))


def nothing_to_do(body: Mapping[str, Any], event_type: str | None, ioc: IOCState,
                  echo: bool = False) -> bool:
    """A StatefulSet status update that changes nothing the IOC reports. Most events on
    a big cluster are these (the controller's own bookkeeping); drift bumps the
    generation and deletion is its own event type, so both still reconcile. `echo`: the
    StatefulSet is as the operator applied it, so a controller that has not observed it
    yet needs no reconcile either."""
    if body.get("kind") != "StatefulSet" or event_type == "DELETED":
        return False
    meta, sts = body.get("metadata", {}), body.get("status") or {}
    status = ioc.get("status") or {}
    if not echo and meta.get("generation") != sts.get("observedGeneration"):
        return False
    if status.get("observedGeneration") != ioc["metadata"].get("generation"):
        return False
    ready: Mapping[str, Any] = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    if ready.get("reason") not in ("Running", "PodNotReady"):
        return False  # waiting for an address, suspended, refused: let reconcile decide
    return ((sts.get("readyReplicas") or 0) >= 1) == (ready.get("status") == "True")


def child_settled(body: Mapping[str, Any], event_type: str | None,
                  indexed: IOCState | None, reported: IOCState | None,
                  written: Mapping[str, echoes.Mark] | None, reconciled: bool) -> bool:
    """Whether an event on an object an IOC owns needs no reconcile of that IOC.
    `indexed`: the IOC's state from kopf's index (None: not known); `reported`: the
    status this process last wrote; `written`: the marks of the objects it applied;
    `reconciled`: whether a reconcile of the IOC started in this process."""
    if not owner_ioc(body):
        return True
    echo = is_echo(written, body, event_type)
    if echo and body.get("kind") != "StatefulSet":
        return True  # our own write coming back
    if indexed is not None and not reconciled:
        # A known IOC this process has not reconciled yet: its first reconcile (kopf
        # resumes every IOC at start) applies all its objects. At a restart with 1,000
        # IOCs the children's listing would otherwise queue hundreds of events for
        # threads, each holding its object, to redo what that reconcile does anyway.
        return True
    state = freshest(indexed, reported)
    return state is not None and nothing_to_do(body, event_type, state, echo)


def stale(last: Inputs | None, seen: Inputs) -> bool:
    """An IOC event whose inputs were reconciled already, or older ones than those.
    Under load the watch can deliver an IOC's events a minute late, and kopf takes one
    whose status lacks the newer mark (bookkeeping.py) for a change: reconciling it
    would re-apply an older spec."""
    return last is not None and (last[0] > seen[0] or last == seen)


def directory_needs_publish(deleted: bool, status: Mapping[str, Any],
                            published: Mapping[str, str] | None) -> bool:
    """Whether an IOC event can change its namespace's directory. Most IOC events
    (kopf's bookkeeping, conditions, probes) leave its client settings as they were,
    and a directory costs O(IOCs) to compute. A never reconciled IOC (no status) is in
    no directory: kopf calls the create handler only after the event handlers return,
    and a publish there would hold the reconcile back."""
    if deleted:
        return True
    if not status:
        return False
    return published != dict(status.get("clientEnv") or {})


def is_own_directory(body: Mapping[str, Any], directory_name: str) -> bool:
    """A directory ConfigMap of this operator (another operator may use another name)."""
    return body.get("metadata", {}).get("name") in (directory_name,
                                                    f"{directory_name}-cluster")


def clash_parties(index: Mapping[str, Iterable[str]], gone: set[str]) -> list[str]:
    """The IOCs whose port clash names one of the `gone` IOCs (index: the clashed-with
    IOC -> the IOCs naming it in status.portClashes)."""
    return sorted({party for key in gone for party in index.get(key, [])} - gone)


def recheck_after(before: Iterable[str], clashes: Iterable[str],
                  evicts: Iterable[str]) -> list[str]:
    """The IOCs that must reconcile after one IOC's reconcile: those it evicted from an
    allocated port, and both old and new clash parties when its clashes changed (so
    both sides report a clash, and both clear it)."""
    before, clashes = set(before), set(clashes)
    recheck = set(evicts)
    if before != clashes:
        recheck |= before | clashes
    return sorted(recheck)
