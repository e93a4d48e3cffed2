"""What an IOC's status and events say: refusals tell what still runs and are one
event; kopf's bookkeeping is the mark the operator writes with the status."""

from __future__ import annotations

import copy
from typing import Any

import kopf
import pytest

from ioc_operator.controller import bookkeeping
from ioc_operator.controller.conditions import Cond, transitions
from ioc_operator.controller.reconcile import reconcile
from ioc_operator.model.config import OperatorConfig


class OneStatefulSet:
    """A Kube that lists one StatefulSet (or none) and refuses anything else."""

    def __init__(self, sts: dict[str, Any] | None) -> None:
        self.sts = sts

    def list(self, api_version: str, kind: str, namespace: str | None,
             label_selector: str | None = None) -> list[dict[str, Any]]:
        assert (api_version, kind) == ("apps/v1", "StatefulSet")
        assert label_selector == "epics-operator.io/ioc=bl01"
        return [self.sts] if self.sts else []


def invalid_ioc(observed_generation: int | None = None) -> dict[str, Any]:
    """An IOC the operator refuses (InvalidSpec: a classic PVA server cannot promise
    name servers outside sidecar mode)."""
    body: dict[str, Any] = {
        "metadata": {"name": "bl01", "namespace": "ns", "uid": "u-1", "generation": 4},
        "spec": {"image": "i", "prefix": "BL01:", "network": {"requireNameServers": True},
                 "servers": {"pva": {"implementation": "classic"}}}}
    if observed_generation is not None:
        body["status"] = {"observedGeneration": observed_generation}
    return body


def statefulset(replicas: int, owner_uid: str = "u-1") -> dict[str, Any]:
    return {"metadata": {"name": "bl01", "ownerReferences": [
        {"kind": "IOC", "uid": owner_uid, "controller": True}]}, "spec": {"replicas": replicas}}


def refusal(body: dict[str, Any], sts: dict[str, Any] | None) -> dict[str, str]:
    outcome = reconcile(OneStatefulSet(sts), body, OperatorConfig())  # type: ignore[arg-type]
    by_type = {c.type: c for c in outcome.conditions}
    assert by_type["Reconciled"].reason == by_type["Ready"].reason == "InvalidSpec"
    return {t: c.message for t, c in by_type.items()}


@pytest.mark.parametrize(("observed", "sts", "says"), [
    (None, None, "nothing runs: no configuration of this IOC has been applied yet"),
    (3, statefulset(1), "the last applied configuration (generation 3) keeps running"),
    (3, statefulset(0), "the last applied configuration (generation 3) stays in place, "
                        "suspended"),
    (3, None, "the IOC does not run: its StatefulSet is gone"),
    (None, statefulset(1, owner_uid="someone-else"),
     "nothing runs: no configuration of this IOC has been applied yet"),
])
def test_a_refusal_says_what_is_true_about_what_runs(observed, sts, says):
    messages = refusal(invalid_ioc(observed), sts)
    for message in messages.values():
        assert message.startswith("spec.network.requireNameServers: ")
        assert message.endswith(f"({says})")
    if "keeps running" not in says:
        assert all("keeps running" not in m for m in messages.values())


def test_a_refusal_is_one_warning_event_not_two():
    outcome = reconcile(OneStatefulSet(None), invalid_ioc(),  # type: ignore[arg-type]
                        OperatorConfig())
    assert len(outcome.conditions) == 2
    events = transitions([], outcome.conditions)
    assert len(events) == 1 and events[0].reason == "InvalidSpec"
    # conditions that change differently are still an event each
    current = [{"type": "Reconciled", "status": "True", "reason": "Applied"},
               {"type": "Ready", "status": "True", "reason": "Running"}]
    assert len(transitions(current, outcome.conditions)) == 1
    both = [Cond("Reconciled", True, "Applied", "generation 2 applied"),
            Cond("Ready", False, "PodNotReady", "waiting for the IOC pod to be ready")]
    assert [c.reason for c in transitions([], both)] == ["Applied", "PodNotReady"]


def handled_ioc(**meta: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": "bl01", "namespace": "ns", "uid": "u-1", "generation": 2,
                     "labels": {"team": "vac"}, "annotations": {"note": "x"}, **meta},
        "spec": {"image": "i", "prefix": "BL01:"}}
    # what handlers._run writes with the outcome
    body["status"] = {bookkeeping.FIELD: bookkeeping.mark(body)}
    return body


def diff_base(body: dict[str, Any]) -> tuple[Any, Any]:
    storage = bookkeeping.StatusMark()
    wrapped = kopf.Body(body)
    return storage.fetch(body=wrapped), storage.build(body=wrapped)


def test_kopf_reads_its_diff_base_from_the_status_the_operator_wrote():
    old, new = diff_base(handled_ioc())
    assert old == new == {"lastHandled": f"2-{bookkeeping.mark(handled_ioc())[2:]}"}
    assert len(str(new)) < 64  # not the whole spec: no "Too long", nothing to show
    # what a reconcile depends on is a change for kopf ...
    for change in ({"generation": 3}, {"labels": {"team": "rf"}},
                   {"annotations": {bookkeeping.RECHECK_ANNOTATION: "ns/other 1"}}):
        body = handled_ioc()
        body["metadata"].update(change)
        old, new = diff_base(body)
        assert old != new, change
    # ... other annotations, status and the spec's echo are not
    body = handled_ioc()
    body["metadata"]["annotations"] = {"note": "y"}
    body["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    old, new = diff_base(body)
    assert old == new
    # never handled: a creation
    body = handled_ioc()
    del body["status"]
    assert diff_base(body)[0] is None


def test_kopf_writes_no_bookkeeping_of_its_own():
    """Its diff base goes out with the operator's status write, so it can never fail
    apart from it; only the big annotation of earlier versions is dropped."""
    storage = bookkeeping.StatusMark()
    body = handled_ioc()
    patch = kopf.Patch()
    storage.store(body=kopf.Body(body), patch=patch, essence=storage.build(body=kopf.Body(body)))
    assert not patch
    legacy = copy.deepcopy(body)
    legacy["metadata"]["annotations"][bookkeeping.LEGACY_ANNOTATION] = '{"spec": {}}'
    patch = kopf.Patch()
    storage.store(body=kopf.Body(legacy), patch=patch, essence={})
    assert dict(patch) == {"metadata": {"annotations": {bookkeeping.LEGACY_ANNOTATION: None}}}
