"""The CA gateway's and the bridge's Prometheus metrics, scraped over HTTP from
prometheus_client's real server on 127.0.0.1.

The CA gateway runs its real classes against the played IOC of test_ca_gateway_fuzz
(clients' searches over UDP and TCP, a monitor, updates fanned out); the bridge's
counters are driven through the calls pvxs and caproto make of it."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator

import caproto as ca
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_ca_gateway_fuzz import Harness, message, search

from ioc_operator.gateways import bridge as bridge_mod
from ioc_operator.gateways import ca_gateway
from ioc_operator.gateways import ca_wire as w
from ioc_operator.metrics import MetricsServer

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_ca_gateway_searches_channels_and_updates_relayed(loop):
    h = Harness(loop)
    server = MetricsServer(h.gw.registry, 0, "127.0.0.1")
    try:
        before = scrape(server.url)
        client = h.client()
        # two TCP name-server searches: one the IOC has, one it lacks
        client.send(search("GW:ai", 1) + search("GW:nosuch", 2))
        h.drain()
        # UDP searches (a cached name is answered in the same datagram)
        h.udp.datagram_received(bytes(ca.VersionRequest(0, 13)) + search("GW:ai", 3),
                                ("198.18.17.2", 40001))
        h.settle()
        # two clients monitor one PV: each IOC update reaches both
        other = h.client(port=40002)
        for c in (client, other):
            sid = h.channel(c, "GW:ai")
            request = bytes(ca.EventAddRequest(ca.ChannelType.DOUBLE, 1, sid, 0, 0, 0, 0,
                                               1))[16:]
            c.send(message(w.EVENT_ADD, 6, 1, sid, 7, request))
            h.settle()
        h.ioc.post(4.5)
        h.ioc.post(5.5)
        h.settle()
        during = scrape(server.url)
    finally:
        server.stop()

    assert before[("ioc_ca_gateway_searches_total", (("transport", "tcp"),))] == 0
    assert during[("ioc_ca_gateway_searches_total", (("transport", "tcp"),))] == 2
    assert during[("ioc_ca_gateway_searches_total", (("transport", "udp"),))] == 1
    assert during[("ioc_ca_gateway_search_answers_total", ())] == 2  # GW:ai twice
    assert during[("ioc_ca_gateway_connections", ())] == 2
    assert during[("ioc_ca_gateway_channels", ())] == 2
    assert during[("ioc_ca_gateway_subscriptions", ())] == 2
    assert during[("ioc_ca_gateway_upstream_channels", ())] == 1  # shared
    # the IOC's first value for the subscription, then two posts
    assert during[("ioc_ca_gateway_upstream_updates_total", ())] == 3
    assert during[("ioc_ca_gateway_updates_relayed_total", ())] >= 4  # 2 posts x 2 clients
    assert during[("ioc_ca_gateway_dropped_total", (("reason", "datagrams_dropped"),))] == 0


def test_ca_gateway_flag_both_spellings():
    assert ca_gateway.parse_args([]).metrics_port == 0
    assert ca_gateway.parse_args(["-metrics_port", "9102"]).metrics_port == 9102
    assert ca_gateway.parse_args(["--metrics-port", "9102"]).metrics_port == 9102


class _Chan:
    """What BridgeMetrics reads of a channel."""

    def __init__(self, state: str, in_use: bool) -> None:
        self.state = bridge_mod.ChannelState(state)
        self.in_use = in_use


def test_bridge_counters_and_gauges():
    channels = [_Chan("connected", True), _Chan("connected", False), _Chan("searching", False)]
    refused = {"names": 0, "channels": 0}
    metrics = bridge_mod.BridgeMetrics(lambda: channels, lambda: 2, refused)
    server = MetricsServer(metrics.registry, 0, "127.0.0.1")
    try:
        metrics.searches.inc(3)
        metrics.answers.inc(2)
        for _ in range(5):
            metrics.relayed()
        refused["names"] += 1
        got = scrape(server.url)
    finally:
        server.stop()
    assert got[("ioc_ca_pva_bridge_searches_total", ())] == 3
    assert got[("ioc_ca_pva_bridge_search_answers_total", ())] == 2
    assert got[("ioc_ca_pva_bridge_updates_relayed_total", ())] == 5
    assert got[("ioc_ca_pva_bridge_channels", (("state", "connected"),))] == 2
    assert got[("ioc_ca_pva_bridge_channels", (("state", "searching"),))] == 1
    assert got[("ioc_ca_pva_bridge_channels_in_use", ())] == 1
    assert got[("ioc_ca_pva_bridge_pva_names", ())] == 2
    assert got[("ioc_ca_pva_bridge_searches_refused_total", (("reason", "names"),))] == 1


def test_bridge_counts_searches_and_answers_through_test_channel(monkeypatch):
    """testChannel (pvxs's search) counts every name asked and each one answered."""
    bridge = bridge_mod.Bridge.__new__(bridge_mod.Bridge)  # no CA context, no PVA server
    refused = {"names": 0, "channels": 0}
    bridge.refused = refused
    bridge.metrics = bridge_mod.BridgeMetrics(lambda: [], lambda: 0, refused)
    answers = iter([True, False, True])
    monkeypatch.setattr(bridge, "_test_channel", lambda name: next(answers))
    assert [bridge.testChannel(n) for n in ("A:x", "A:y", "A:z")] == [True, False, True]
    assert bridge.metrics.searches._value.get() == 3
    assert bridge.metrics.answers._value.get() == 2
    assert bridge_mod.parse_args(["--interface", "127.0.0.1"]).metrics_port == 0
    assert bridge_mod.parse_args(["--interface", "127.0.0.1", "--metrics-port",
                                  "9103"]).metrics_port == 9103
