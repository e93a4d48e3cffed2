"""What a user sees on the real API server: long names refused at apply (oversized
input: test_operator.py), refusals that say what is true once, events from the
operator, no kopf bookkeeping in `kubectl describe`, and `kubectl explain` text."""

from __future__ import annotations

import time
from typing import Any

import pytest

from ioc_operator.controller import bookkeeping
from ioc_operator.controller.kube import KubeError

from support import (
    IOC_API,
    condition,
    events_for,
    get_ioc,
    ioc_manifest,
    reconciled,
    wait_for,
)


def test_names_longer_than_52_are_refused_and_52_characters_run(kube, operator, namespace):
    with pytest.raises(KubeError) as info:
        kube.create(ioc_manifest("n" * 53, namespace, prefix="LONG:"))
    assert info.value.status == 422
    message = info.value.message
    assert "metadata.name" in message and "at most 52 characters" in message
    assert "controller-revision-hash" in message  # why 52
    name = "n" * 52
    kube.create(ioc_manifest(name, namespace, prefix="LONG:"))
    wait_for("reconciled", lambda: reconciled(kube, namespace, name))
    assert condition(get_ioc(kube, namespace, name), "Reconciled")["reason"] == "Applied"
    # the StatefulSet controller creates the pod: its revision label fits in 63
    pod = wait_for("pod", lambda: kube.list("v1", "Pod", namespace,
                                            f"epics-operator.io/ioc={name}"))
    assert len(pod[0]["metadata"]["labels"]["controller-revision-hash"]) <= 63


def warnings(kube, namespace: str, name: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in events_for(kube, namespace, name)
            if e["type"] == "Warning" and e["reason"] == reason]


def test_a_refusal_says_what_runs_and_is_one_warning(kube, operator, namespace):
    invalid = {"network": {"requireNameServers": True},
               "servers": {"pva": {"implementation": "classic"}}}
    kube.create(ioc_manifest("never-ran", namespace, **invalid))
    ioc = wait_for("refused", lambda: reconciled(kube, namespace, "never-ran"))
    for ctype in ("Reconciled", "Ready"):
        message = condition(ioc, ctype)["message"]
        assert "keeps running" not in message
        assert message.endswith(
            "(nothing runs: no configuration of this IOC has been applied yet)")
    wait_for("warning", lambda: warnings(kube, namespace, "never-ran", "InvalidSpec"))

    kube.create(ioc_manifest("ran", namespace))
    wait_for("applied", lambda: reconciled(kube, namespace, "ran"))
    kube.request("PATCH", f"/apis/{IOC_API}/namespaces/{namespace}/iocs/ran",
                 body={"spec": invalid}, content_type="application/merge-patch+json")
    ioc = wait_for("refused", lambda: (i := reconciled(kube, namespace, "ran"))
                   and i["metadata"]["generation"] == 2 and i)
    assert condition(ioc, "Ready")["message"].endswith(
        "(the last applied configuration (generation 1) keeps running)")
    assert kube.get("apps/v1", "StatefulSet", namespace, "ran")
    wait_for("warning", lambda: warnings(kube, namespace, "ran", "InvalidSpec"))
    time.sleep(1.0)  # events are posted in the background: room for a second one
    for name in ("never-ran", "ran"):
        assert len(warnings(kube, namespace, name, "InvalidSpec")) == 1, name


def test_events_are_the_operators_and_describe_shows_no_kopf(kube, operator, control_plane,
                                                            namespace):
    kube.create(ioc_manifest("seen", namespace))
    ioc = wait_for("reconciled", lambda: reconciled(kube, namespace, "seen"))
    events = wait_for("events", lambda: events_for(kube, namespace, "seen"))
    for event in events:
        assert event["source"]["component"] == "ioc-operator"
        assert event["reportingComponent"] == "ioc-operator"
    assert not [k for k in ioc["metadata"].get("annotations") or {} if "kopf" in k]
    assert ioc["status"]["lastHandled"].startswith(f"{ioc['metadata']['generation']}-")
    described = control_plane.kubectl("describe", "ioc", "seen", "-n", namespace).stdout
    assert "ioc-operator" in described  # the events' From column
    assert "kopf" not in described.lower()


def test_huge_user_annotations_leave_kopf_no_bookkeeping_to_fail(kube, operator, namespace):
    """kopf kept its diff base in an annotation: on an IOC whose own annotations nearly
    fill the API server's 256 KiB, every write of it failed ("Too long"), kopf took
    each later change for a creation and logged a traceback, while the status said
    Reconciled. Its diff base now goes out with the status write."""
    body = ioc_manifest("crowded", namespace)
    body["metadata"]["annotations"] = {"example.org/blob": "x" * 261_000}
    kube.create(body)
    wait_for("reconciled", lambda: reconciled(kube, namespace, "crowded"))
    kube.request("PATCH", f"/apis/{IOC_API}/namespaces/{namespace}/iocs/crowded",
                 body={"spec": {"args": ["st.cmd"]}},
                 content_type="application/merge-patch+json")
    ioc = wait_for("generation 2", lambda: (i := reconciled(kube, namespace, "crowded"))
                   and i["metadata"]["generation"] == 2 and i)
    time.sleep(1.0)  # kopf's own patch would follow the handler
    log = [line for line in operator.log_path.read_text().splitlines()
           if "crowded" in line]
    assert not [line for line in log if "Too long" in line or "Throttling" in line]
    assert not [line for line in log if "Creation is in progress" in line][1:]
    assert condition(ioc, "Reconciled")["reason"] == "Applied"
    assert ioc["status"]["lastHandled"] == bookkeeping.mark(ioc)


def test_the_diff_base_annotation_of_earlier_versions_is_dropped(kube, operator, namespace):
    body = ioc_manifest("upgraded", namespace)
    body["metadata"]["annotations"] = {bookkeeping.LEGACY_ANNOTATION: '{"spec":{}}\n'}
    kube.create(body)
    wait_for("legacy annotation dropped", lambda: (i := reconciled(kube, namespace, "upgraded"))
             and bookkeeping.LEGACY_ANNOTATION not in (i["metadata"].get("annotations") or {}))


def test_kubectl_explain_documents_what_users_set_and_read(control_plane):
    def explain(field: str) -> str:
        return control_plane.kubectl("explain", f"iocs.{field}").stdout

    mode = " ".join(explain("spec.network.mode").split())
    for words in ("pvagw", "CA gateway", "on by default", "CA-to-PVA bridge", "Default: pod"):
        assert words in mode
    assert "allocated" in explain("spec.network.ports")
    for field in ("type", "status", "reason", "message", "observedGeneration",
                  "lastTransitionTime"):
        assert "<no description>" not in explain(f"status.conditions.{field}"), field
    recursive = control_plane.kubectl("explain", "iocs", "--recursive").stdout
    assert "lastHandled" in recursive and "portClashes" in recursive
