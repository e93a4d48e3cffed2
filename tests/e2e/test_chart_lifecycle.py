"""The chart's upgrade and uninstall on a cluster with running IOCs (runs last)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ioc_testbed.helm import Helm
from ioc_testbed.incluster import Kubectl, condition
from ioc_testbed.waiting import wait_for

from e2elib import CHART, EXAMPLES_NS

RELEASE = "ioc-operator"
# Everything the chart creates carries the release's instance label.
KINDS = ("deployments,replicasets,pods,serviceaccounts,configmaps,services,roles,"
         "rolebindings,clusterroles,clusterrolebindings,poddisruptionbudgets")


def release_objects(kubectl: Kubectl) -> list[str]:
    done = kubectl("get", KINDS, "-A", "-l", f"app.kubernetes.io/instance={RELEASE}",
                   "-o", "name")
    return done.stdout.split()


def ioc_pods(kubectl: Kubectl) -> dict[str, str]:
    pods = kubectl.json("-n", EXAMPLES_NS, "get", "pods", "-l",
                        "app.kubernetes.io/managed-by=ioc-operator")["items"]
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods}


@pytest.mark.last
def test_upgrade_then_uninstall(kubectl: Kubectl, helm: Helm, operator: str,
                                example_iocs: dict[str, dict[str, Any]]) -> None:
    before = ioc_pods(kubectl)
    assert len(before) == len(example_iocs)
    selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator"
    old_pod = kubectl.json("-n", operator, "get", "pods", "-l", selector)["items"][0]
    helm("upgrade", RELEASE, str(CHART), "--namespace", operator, "--reuse-values",
         "--set", "verbose=true", "--kubeconfig", str(kubectl.kubeconfig), "--wait",
         "--timeout", "120s", timeout=180)
    history = json.loads(helm("history", RELEASE, "--namespace", operator, "--kubeconfig",
                              str(kubectl.kubeconfig), "-o", "json").stdout)
    assert [h["status"] for h in history][-1] == "deployed" and len(history) == 2
    pods = [p for p in kubectl.json("-n", operator, "get", "pods", "-l", selector)["items"]
            if not p["metadata"].get("deletionTimestamp")]  # the old one may be going
    assert [p["metadata"]["uid"] for p in pods] != [old_pod["metadata"]["uid"]]
    assert "--verbose" in pods[0]["spec"]["containers"][0]["args"]
    # The new operator takes over the running IOCs without restarting any of them.
    wait_for("every IOC Ready under the upgraded operator", lambda: all(
        condition(i, "Ready").get("status") == "True" for i in
        kubectl.json("-n", EXAMPLES_NS, "get", "iocs")["items"]), 60, 1.0)
    assert ioc_pods(kubectl) == before

    helm("uninstall", RELEASE, "--namespace", operator, "--kubeconfig",
         str(kubectl.kubeconfig), "--wait", "--timeout", "120s", timeout=180)
    wait_for("the release's objects to be gone", lambda: release_objects(kubectl) == [],
             60, 1.0)
    # Helm keeps CRDs (and so the IOCs); the IOCs keep running without the operator.
    assert kubectl("get", "crd", "iocs.epics-operator.io", check=False).returncode == 0
    assert ioc_pods(kubectl) == before
