"""Prometheus metrics on real nodes (issue 21): the chart's operator and name servers
serve them behind their metrics Services, and a scrape during the test shows the
reconcile of the IOC the test applied, its mode and conditions, and its probe results.

Scraped from a client pod (the example image's Python, urllib) at each Service's
ClusterIP, as Prometheus in the cluster would; parsed with prometheus_client.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ioc_testbed.incluster import CLIENT_IMAGE, ClientPod, Kubectl
from ioc_testbed.waiting import wait_for

from e2elib import OPERATOR_NS, apply_ready, directory_client

NAMESPACE = "e2e-metrics"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
FETCH = ("import sys, urllib.request\n"
         "with urllib.request.urlopen(sys.argv[1], timeout=5) as r:\n"
         "    sys.stdout.write(r.read().decode())\n")


def scrape(kubectl: Kubectl, client: ClientPod, service: str) -> Samples:
    svc = kubectl.get("service", service, OPERATOR_NS)
    assert svc is not None, f"no Service {service} in {OPERATOR_NS}"
    (port,) = [p for p in svc["spec"]["ports"] if p["name"] == "metrics"]
    return scrape_url(kubectl, client,
                      f"http://{svc['spec']['clusterIP']}:{port['port']}/metrics")


def scrape_url(kubectl: Kubectl, client: ClientPod, url: str) -> Samples:
    text = kubectl("exec", "-n", client.namespace, client.name, "--", "python", "-c", FETCH,
                   url, timeout=30).stdout
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_until(kubectl: Kubectl, client: ClientPod, what: str, name: str,
                 above: float, **labels: str) -> Samples:
    """Scrape the operator every 2 s until `name{labels}` exceeds `above` (60 s)."""
    def probe() -> Samples:
        samples = scrape(kubectl, client, "ioc-operator-metrics")
        return samples if value(samples, name, **labels) > above else {}
    return wait_for(what, probe, 60, 2.0)


def ioc(name: str, prefix: str, mode: str) -> dict[str, Any]:
    return {"apiVersion": "epics-operator.io/v1alpha1", "kind": "IOC",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"image": CLIENT_IMAGE, "prefix": prefix, "network": {"mode": mode},
                     "args": ["python", "-m", "pvxslibs.ioc", "-m", f"P={prefix}", "-d",
                              "/epics/example/example.db"],
                     "probe": {"pv": f"{prefix}counter", "periodSeconds": 5}}}


def test_a_scrape_shows_the_reconcile_of_an_ioc_the_test_applied(
        kubectl: Kubectl, operator: str) -> None:
    # A first IOC gives the namespace its directory, which the client pod loads.
    apply_ready(kubectl, NAMESPACE, [ioc("met-anchor", "METANCHOR:", "pod")])
    client = directory_client(kubectl, NAMESPACE, {}, "name-service")
    before = scrape(kubectl, client, "ioc-operator-metrics")
    applied_before = value(before, "ioc_operator_reconciles_total", result="applied")
    timed_before = value(before, "ioc_operator_reconcile_duration_seconds_count")
    sidecars_before = value(before, "ioc_operator_iocs_by_mode", mode="sidecar")

    sidecar = ioc("met-sidecar", "METSIDECAR:", "sidecar")
    sidecar["spec"]["gateways"] = {"ca": {"metricsPort": 9101}}
    apply_ready(kubectl, NAMESPACE, [sidecar])
    after = scrape_until(kubectl, client, "the new IOC in the operator's metrics",
                         "ioc_operator_iocs_by_mode", sidecars_before, mode="sidecar")
    assert value(after, "ioc_operator_reconciles_total", result="applied") > applied_before
    assert value(after, "ioc_operator_reconcile_duration_seconds_count") > timed_before
    assert value(after, "ioc_operator_iocs_by_condition", condition="Ready",
                 status="True") >= 2
    assert value(after, "ioc_operator_directory_publishes_total", result="written") >= 1
    # the operator probes both IOCs every 5 s once Ready: Reachable results are counted
    probed = scrape_until(kubectl, client, "Reachable probe results counted",
                          "ioc_operator_probes_total", value(
                              after, "ioc_operator_probes_total", outcome="Reachable"),
                          outcome="Reachable")
    print("\noperator metrics: " + json.dumps({
        "reconciles": {r: value(probed, "ioc_operator_reconciles_total", result=r)
                       for r in ("applied", "refused", "error")},
        "probes reachable": value(probed, "ioc_operator_probes_total", outcome="Reachable"),
        "by mode": {m: value(probed, "ioc_operator_iocs_by_mode", mode=m)
                    for m in ("host", "pod", "sidecar")}}))

    # a name server (whichever replica answers the scrape) has both IOCs in its table
    # and has answered searches once the client read a PV through the name service
    assert client.run("p4p", "get", ["METSIDECAR:value"])["ok"]
    names = scrape(kubectl, client, "ioc-operator-name-server-metrics")
    assert value(names, "ioc_name_server_iocs") >= 2
    assert ("ioc_name_server_searches_total", (("protocol", "pva"), ("transport", "tcp"))) \
        in names

    # the sidecar CA gateway's own metrics, on the pod port the IOC asked for: the
    # client's CA read went through it
    assert client.run("pyepics", "get", ["METSIDECAR:value"])["ok"]
    pod_ip = kubectl.get("pod", "met-sidecar-0", NAMESPACE)["status"]["podIP"]
    gateway = scrape_url(kubectl, client, f"http://{pod_ip}:9101/metrics")
    searches = sum(v for (n, _), v in gateway.items() if n == "ioc_ca_gateway_searches_total")
    assert searches >= 1, gateway
    assert value(gateway, "ioc_ca_gateway_upstream_channels") >= 1, gateway
    print(f"sidecar CA gateway metrics: searches {searches:.0f}, upstream channels "
          f"{value(gateway, 'ioc_ca_gateway_upstream_channels'):.0f}")
