"""The operator's Prometheus metrics, scraped over HTTP from prometheus_client's real
server on 127.0.0.1 while the real `Operator` reconciles IOCs against an API client
that answers from memory."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from typing import Any

import kopf
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ioc_operator.cli import parser
from ioc_operator.controller import reachability
from ioc_operator.controller.conditions import Cond
from ioc_operator.controller.kube import KubeError
from ioc_operator.controller.operator import Operator
from ioc_operator.metrics import CollectorRegistry, MetricsServer
from ioc_operator.model.config import OperatorConfig


class MemoryKube:
    """What one reconcile asks of the API server, answered from memory: every apply
    succeeds (a Service gets a ClusterIP), status patches are accepted. `fail` makes
    every apply an API error."""

    def __init__(self) -> None:
        self.fail = False
        self.patches = 0

    def apply(self, obj: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        if self.fail:
            raise KubeError(500, "InternalError", "etcd is away")
        out = {**obj, "metadata": {**obj["metadata"], "uid": "child",
                                   "resourceVersion": "1"}}
        if obj["kind"] == "Service":
            out["spec"] = {**obj.get("spec", {}), "clusterIP": "10.96.0.10"}
        return out

    def request(self, method: str, url: str, *_: Any, **__: Any) -> Any:
        self.patches += 1
        return {}

    def list(self, *_: Any, **__: Any) -> list[dict[str, Any]]:
        return []

    def get(self, *_: Any, **__: Any) -> None:
        return None

    def delete(self, *_: Any, **__: Any) -> None:
        return None


def ioc_body(name: str, mode: str = "pod", uid: str | None = None,
             **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "epics-operator.io/v1alpha1", "kind": "IOC",
            "metadata": {"name": name, "namespace": "bl01", "uid": uid or f"uid-{name}",
                         "generation": 1},
            "spec": {"image": "reg/ioc:1", "prefix": f"{name.upper()}:",
                     "network": {"mode": mode}, **spec}}


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def served() -> Iterator[tuple[Operator, MemoryKube, str]]:
    registry = CollectorRegistry()
    server = MetricsServer(registry, 0, "127.0.0.1")
    kube = MemoryKube()
    operator = Operator(kube, OperatorConfig(), registry=registry)  # type: ignore[arg-type]
    try:
        yield operator, kube, server.url
    finally:
        operator.runner.shutdown()
        server.stop()


@pytest.fixture(autouse=True)
def no_kopf_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """kopf.event needs kopf's context (a running operator): not here."""
    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)


def test_reconciles_errors_and_iocs_appear_in_the_scrape(served):
    operator, kube, url = served
    before = scrape(url)
    assert before[("ioc_operator_reconciles_total", (("result", "applied"),))] == 0
    assert before[("ioc_operator_iocs_by_mode", (("mode", "pod"),))] == 0

    operator.ioc_changed_sync(ioc_body("vac"), {}, {}, {})
    operator.ioc_changed_sync(ioc_body("rf", mode="sidecar"), {}, {}, {})
    # a spec the model refuses: a condition says why, nothing is applied
    operator.ioc_changed_sync(ioc_body("bad", image=""), {}, {}, {})
    kube.fail = True
    with pytest.raises(kopf.TemporaryError):
        operator.ioc_changed_sync(ioc_body("down"), {}, {}, {})

    after = scrape(url)
    assert after[("ioc_operator_reconciles_total", (("result", "applied"),))] == 2
    assert after[("ioc_operator_reconciles_total", (("result", "refused"),))] == 1
    assert after[("ioc_operator_reconciles_total", (("result", "error"),))] == 1
    assert after[("ioc_operator_errors_total", (("reason", "InvalidSpec"),))] == 1
    assert after[("ioc_operator_errors_total", (("reason", "APIError"),))] == 1
    assert after[("ioc_operator_reconcile_duration_seconds_count", ())] == 4
    assert after[("ioc_operator_reconcile_duration_seconds_sum", ())] > 0
    # the IOCs whose status was written: two running, one refused
    assert after[("ioc_operator_iocs_by_mode", (("mode", "pod"),))] == 1
    assert after[("ioc_operator_iocs_by_mode", (("mode", "sidecar"),))] == 1
    assert after[("ioc_operator_iocs_by_condition",
                  (("condition", "Reconciled"), ("status", "True")))] == 2
    assert after[("ioc_operator_iocs_by_condition",
                  (("condition", "Reconciled"), ("status", "False")))] == 1
    # waiting for the pod: Ready=False on both that applied, and on the refused one
    assert after[("ioc_operator_iocs_by_condition",
                  (("condition", "Ready"), ("status", "False")))] == 3
    # a deleted IOC leaves the gauges
    operator.state.forget("uid-vac")
    assert scrape(url)[("ioc_operator_iocs_by_mode", (("mode", "pod"),))] == 0


def test_directory_publishes_and_probe_results(served):
    operator, kube, url = served
    operator.envs = {"bl01": [("vac", "uid-vac", {"EPICS_CA_ADDR_LIST": "10.96.0.10"})]}
    assert operator._publish("bl01") is True  # written
    assert operator._publish("bl01") is True  # the same content: no API call
    kube.fail = True
    operator.directory.forget("bl01")
    assert operator._publish("bl01") is False
    target = reachability.Target("bl01", "vac", "uid-vac", "VAC:value", 30.0, ())
    operator._write_reachability(target, {}, Cond("Reachable", True, "Reachable", "CA 2 ms"))
    operator._write_reachability(target, {}, reachability.NOT_READY)  # not a probe

    got = scrape(url)
    publishes = {result: got[("ioc_operator_directory_publishes_total",
                              (("result", result),))]
                 for result in ("written", "unchanged", "failed")}
    assert publishes == {"written": 1, "unchanged": 1, "failed": 1}
    assert got[("ioc_operator_errors_total", (("reason", "DirectoryPublishFailed"),))] == 1
    assert got[("ioc_operator_directory_publish_last_duration_seconds", ())] > 0
    assert got[("ioc_operator_probes_total", (("outcome", "Reachable"),))] == 1
    assert got[("ioc_operator_probes_total", (("outcome", "Unreachable"),))] == 0


def test_two_operators_keep_their_own_figures():
    """State lives in objects: each Operator counts in its own registry."""
    one = Operator(MemoryKube(), OperatorConfig())  # type: ignore[arg-type]
    two = Operator(MemoryKube(), OperatorConfig())  # type: ignore[arg-type]
    try:
        one.ioc_changed_sync(ioc_body("vac"), {}, {}, {})
        assert one.metrics.reconciles.labels("applied")._value.get() == 1
        assert two.metrics.reconciles.labels("applied")._value.get() == 0
    finally:
        one.runner.shutdown()
        two.runner.shutdown()


def test_run_flags():
    args = parser().parse_args(["run"])
    assert args.metrics_port == 0  # off unless asked: several operators share test hosts
    args = parser().parse_args(["run", "--metrics-port", "8081", "--metrics-address",
                                "127.0.0.1"])
    assert (args.metrics_port, args.metrics_address) == (8081, "127.0.0.1")
    with pytest.raises(SystemExit):
        parser().parse_args(["run", "--metrics-port", "70000"])
