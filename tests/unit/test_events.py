"""Every rule of controller/events.py: which watch events need work."""

from __future__ import annotations

from typing import Any

import pytest

from ioc_operator.allocation.hostports import HostIOC
from ioc_operator.controller import echoes, events
from ioc_operator.controller.state import HostClaims, OperatorState

OWNER = {"apiVersion": "epics-operator.io/v1alpha1", "kind": "IOC", "name": "ioc1",
         "uid": "u1", "controller": True}


def child(kind: str = "StatefulSet", generation: int = 1, observed: int | None = 1,
          ready: int = 0, owner: dict[str, Any] | None = OWNER,
          version: str = "10") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "ioc1", "namespace": "ns", "uid": f"{kind}-uid",
                            "generation": generation, "resourceVersion": version}
    if owner:
        meta["ownerReferences"] = [owner]
    body: dict[str, Any] = {"kind": kind, "metadata": meta}
    if kind == "StatefulSet":
        body["status"] = {"observedGeneration": observed, "readyReplicas": ready}
    return body


def state(generation: int = 1, observed: int | None = 1, reason: str = "PodNotReady",
          status: str = "False") -> dict[str, Any]:
    return events.ioc_state(generation, {"observedGeneration": observed, "conditions": [
        {"type": "Ready", "status": status, "reason": reason},
        {"type": "Reconciled", "status": "True", "reason": "Applied"}]})


def test_owner_ioc_is_read_from_the_ioc_owner_reference_only():
    assert events.owner_ioc(child()) == ("ioc1", "u1")
    assert events.owner_ioc(child(owner=None)) is None
    other = {**OWNER, "apiVersion": "apps/v1", "kind": "Deployment"}
    assert events.owner_ioc(child(owner=other)) is None
    elsewhere = {**OWNER, "apiVersion": "other.io/v1"}
    assert events.owner_ioc(child(owner=elsewhere)) is None


def test_ioc_state_keeps_only_what_the_rules_read():
    s = state()
    assert s["metadata"] == {"generation": 1}
    assert [c["type"] for c in s["status"]["conditions"]] == ["Ready"]


@pytest.mark.parametrize(("indexed", "reported", "fresher"), [
    (None, None, None),
    ("i", None, "i"),
    (None, "r", "r"),
])
def test_freshest_takes_whichever_exists(indexed, reported, fresher):
    states = {"i": state(), "r": state(reason="Running", status="True")}
    got = events.freshest(states.get(indexed), states.get(reported))
    assert got == states.get(fresher)


def test_freshest_prefers_the_operators_write_at_one_generation_and_newer_generations():
    indexed, reported = state(reason="PodNotReady"), state(reason="Running", status="True")
    assert events.freshest(indexed, reported) is reported  # same generation: ours
    newer = state(generation=2, observed=2)
    assert events.freshest(newer, reported) is newer  # the index saw a newer spec
    assert events.freshest(state(generation=2, observed=1), reported) is not reported


def test_echo_is_an_unchanged_mark_and_never_a_deletion():
    body = child(kind="Service")
    written = {echoes.key(body): echoes.mark(body)}
    assert events.is_echo(written, body, "MODIFIED")
    assert not events.is_echo(written, body, "DELETED")
    assert not events.is_echo(written, child(kind="Service", version="11"), "MODIFIED")
    assert not events.is_echo(None, body, "ADDED")


def test_nothing_to_do_only_for_statefulset_status_updates_readiness_already_says():
    assert events.nothing_to_do(child(ready=0), "MODIFIED", state())
    assert events.nothing_to_do(child(ready=1), "MODIFIED",
                                state(reason="Running", status="True"))
    # readiness changed: reconcile
    assert not events.nothing_to_do(child(ready=1), "MODIFIED", state())
    assert not events.nothing_to_do(child(ready=0), "MODIFIED",
                                    state(reason="Running", status="True"))


def test_nothing_to_do_is_never_true_for_other_kinds_or_deletions():
    assert not events.nothing_to_do(child(kind="Service"), "MODIFIED", state())
    assert not events.nothing_to_do(child(), "DELETED", state())


def test_a_statefulset_the_controller_has_not_observed_needs_work_unless_an_echo():
    unobserved = child(generation=2, observed=1)  # edited by someone: drift
    assert not events.nothing_to_do(unobserved, "MODIFIED", state())
    assert events.nothing_to_do(unobserved, "MODIFIED", state(), echo=True)


def test_an_ioc_not_at_its_generation_or_waiting_for_something_else_needs_work():
    assert not events.nothing_to_do(child(), "MODIFIED", state(generation=2, observed=1))
    for reason in ("WaitingForAddress", "Suspended", "InvalidSpec"):
        assert not events.nothing_to_do(child(), "MODIFIED", state(reason=reason))


def test_child_settled_rules():
    sts, svc = child(), child(kind="Service")
    written = {echoes.key(svc): echoes.mark(svc)}
    # not an IOC's object: nothing to do
    assert events.child_settled(child(owner=None), "MODIFIED", None, None, None, False)
    # our own Service write coming back
    assert events.child_settled(svc, "MODIFIED", None, None, written, True)
    # a Service edited by hand: reconcile
    assert not events.child_settled(child(kind="Service", version="12"), "MODIFIED",
                                    state(), None, written, True)
    # a known IOC not reconciled by this process yet: its first reconcile covers it
    assert events.child_settled(child(kind="Service", version="12"), "MODIFIED",
                                state(), None, written, False)
    # a StatefulSet status update readiness already says
    assert events.child_settled(sts, "MODIFIED", state(), None, {}, True)
    # ... judged by the operator's own fresher write
    assert not events.child_settled(sts, "MODIFIED", state(), state(reason="Running",
                                                                   status="True"), {}, True)
    # an unknown IOC (not indexed, never written): ask the API server
    assert not events.child_settled(sts, "MODIFIED", None, None, None, False)


def test_stale_events_are_older_or_already_reconciled_inputs():
    assert not events.stale(None, (1, "{}", ""))
    assert events.stale((2, "{}", ""), (1, "{}", ""))
    assert events.stale((1, "{}", ""), (1, "{}", ""))
    assert not events.stale((1, "{}", ""), (1, '{"a": "b"}', ""))  # labels changed
    assert not events.stale((1, "{}", ""), (1, "{}", "x 1"))  # a recheck asked
    assert not events.stale((1, "{}", ""), (2, "{}", ""))


def test_directory_needs_publish():
    env = {"EPICS_CA_ADDR_LIST": "198.19.0.1"}
    assert events.directory_needs_publish(True, {}, env)  # deleted: always
    assert not events.directory_needs_publish(False, {}, None)  # never reconciled
    assert not events.directory_needs_publish(False, {"clientEnv": env}, env)  # unchanged
    assert events.directory_needs_publish(False, {"clientEnv": env}, None)
    assert events.directory_needs_publish(False, {"mode": "pod"}, env)  # settings gone


def test_own_directory_by_name():
    assert events.is_own_directory({"metadata": {"name": "dir"}}, "dir")
    assert events.is_own_directory({"metadata": {"name": "dir-cluster"}}, "dir")
    assert not events.is_own_directory({"metadata": {"name": "other"}}, "dir")


def test_clash_parties_and_rechecks():
    index = {"ns/a": ["ns/b", "ns/c"], "ns/b": ["ns/a"]}
    assert events.clash_parties(index, {"ns/a"}) == ["ns/b", "ns/c"]
    assert events.clash_parties(index, {"ns/a", "ns/b"}) == ["ns/c"]
    assert events.recheck_after(["x"], ["x"], []) == []
    assert events.recheck_after(["x"], ["y"], ["z"]) == ["x", "y", "z"]
    assert events.recheck_after([], [], ["z"]) == ["z"]


def test_state_forget_drops_everything_of_one_ioc():
    s = OperatorState()
    s.ioc("u1").applied = "digest"
    s.ioc("u2").published = {"A": "1"}
    s.forget("u1")
    assert s.peek("u1") is None and s.peek("u2") is not None and len(s) == 1
    s.forget("gone")  # unknown: no error


def test_host_claims_keep_two_concurrent_allocations_apart():
    claims = HostClaims()
    a, b = HostIOC("ns/a", "n1", uid="ua"), HostIOC("ns/b", "n1", uid="ub")
    first = claims.allocate(a, [], (5064, 5999))
    second = claims.allocate(b, [], (5064, 5999))  # a is not indexed yet: its claim counts
    assert first.ports.ca != second.ports.ca
    claims.release("ns/a", uid="other")  # a namesake's release leaves it
    assert len(claims) == 2
    claims.release("ns/a")
    assert len(claims) == 1
