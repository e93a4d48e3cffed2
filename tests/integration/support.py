"""Helpers for the integration tests: bounded waits (ioc_testbed.waiting), IOC manifests
and their status, the operator subprocess."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ioc_operator.controller.kube import Kube
from ioc_testbed.controlplane import free_port
from ioc_testbed.operator_process import OperatorProcess
from ioc_testbed.waiting import wait_for

__all__ = ["wait_for"]  # the one poll loop, ioc_testbed.waiting's: tests import it here

IOC_API = "epics-operator.io/v1alpha1"
WAIT = 30.0


def ioc_manifest(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": IOC_API,
        "kind": "IOC",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"image": "registry.example/ioc:1", "prefix": f"{name.upper()}:", **spec},
    }


def get_ioc(kube: Kube, ns: str, name: str) -> dict[str, Any] | None:
    return kube.get(IOC_API, "IOC", ns, name)


def condition(ioc: dict[str, Any] | None, ctype: str) -> dict[str, Any] | None:
    for cond in ((ioc or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == ctype:
            return cond
    return None


def reconciled(kube: Kube, ns: str, name: str) -> dict[str, Any] | None:
    """The IOC once the operator has handled its current generation."""
    ioc = get_ioc(kube, ns, name)
    cond = condition(ioc, "Reconciled")
    if ioc and cond and cond["observedGeneration"] == ioc["metadata"]["generation"]:
        return ioc
    return None


def events_for(kube: Kube, ns: str, name: str) -> list[dict[str, Any]]:
    return [e for e in kube.list("v1", "Event", ns)
            if e["involvedObject"].get("name") == name
            and e["involvedObject"].get("kind") == "IOC"]


def owned_by(obj: dict[str, Any], ioc: dict[str, Any]) -> bool:
    return any(ref["uid"] == ioc["metadata"]["uid"] and ref.get("controller")
               for ref in obj["metadata"].get("ownerReferences") or [])


class Operator(OperatorProcess):
    """`ioc-operator run -v`, as the integration tests use it."""

    def __init__(self, kubeconfig: Path, log_dir: Path) -> None:
        # IOCs deleted while the watch was down (test_faults) leave the directory
        # within one resync period: 10 s here, 60 s by default.
        # Prometheus metrics on a free loopback port (test_metrics.py scrapes them).
        self.metrics_port = free_port()
        super().__init__(kubeconfig, log_dir / "operator.log",
                         args=("run", "-v", "--metrics-port", str(self.metrics_port),
                               "--metrics-address", "127.0.0.1"),
                         env={"IOC_OPERATOR_RESYNC_SECONDS": "10"})
