"""`ioc-operator run --metrics-port` against the real API server: the endpoint it serves
shows the reconcile it did and the IOCs by mode and condition, scraped over HTTP as
Prometheus would."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from support import ioc_manifest, reconciled, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_the_metrics_endpoint_shows_the_reconciles_it_did(kube, operator, namespace):
    port = operator.metrics_port
    def served() -> Samples:
        try:
            return scrape(port)
        except OSError:  # URLError too: the operator is still starting
            return {}

    before = wait_for("the metrics endpoint", served)
    kube.create(ioc_manifest("met-a", namespace, network={"mode": "sidecar"}))
    wait_for("reconciled", lambda: reconciled(kube, namespace, "met-a"))
    after = wait_for("the reconciles counted", lambda: (s := scrape(port)) and value(
        s, "ioc_operator_reconciles_total", result="applied") > value(
        before, "ioc_operator_reconciles_total", result="applied") and s)
    assert value(after, "ioc_operator_reconcile_duration_seconds_count") >= 1
    assert value(after, "ioc_operator_iocs_by_mode", mode="sidecar") >= 1
    assert value(after, "ioc_operator_iocs_by_condition", condition="Reconciled",
                 status="True") >= 1
    errors = {k[1]: v for k, v in after.items() if k[0] == "ioc_operator_errors_total"}
    print(f"\nerrors by reason: {errors}")
