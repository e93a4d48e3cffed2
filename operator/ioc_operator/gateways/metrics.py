"""Prometheus metrics of the CA gateway and the CA-to-PVA bridge. Names: docs/metrics.md.

The CA gateway is one asyncio loop answering searches and fanning out monitor updates:
it counts in plain ints (`Gateway.udp_searches`, `Upstream.updates_out`, ...) and
`ca_gateway_families` reads them at scrape time, on the metrics server's thread. The
bridge is threaded (pvxs and caproto call it on their own threads): searches, asked on
pvxs's threads, are counted with prometheus_client's Counters (thread-safe); updates,
the bridge's hot path, in a plain int (`BridgeMetrics.relayed`): they all arrive on
caproto's one receive thread of the IOC's circuit, and a Counter.inc() (its lock) cost
~1 us here, 20 times an int increment.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from ..metrics import Collected

if TYPE_CHECKING:
    from .ca_gateway import Gateway

CA_GATEWAY = "ioc_ca_gateway"
BRIDGE = "ioc_ca_pva_bridge"
# Gateway.stats keys: what was refused, dropped or ignored (ca_gateway.py counts them)
CA_GATEWAY_DROPS = ("datagrams_dropped", "lookups_throttled", "lookups_refused",
                    "circuits_refused", "channels_refused", "subscriptions_refused",
                    "puts_refused", "circuits_closed", "bad_messages", "bad_names",
                    "ignored_messages", "forged_replies")


def _snapshot(table: Mapping[str, int]) -> dict[str, int]:
    """A copy of a dict another thread may add keys to meanwhile."""
    for _ in range(5):
        try:
            return dict(table)
        except RuntimeError:  # changed size during the copy: try again
            continue
    return {}


def ca_gateway_families(gw: Gateway) -> Iterator[Metric]:
    up = gw.upstream
    searches = CounterMetricFamily(f"{CA_GATEWAY}_searches", "Client searches for names "
                                   "(UDP: EPICS_CA_ADDR_LIST; TCP: EPICS_CA_NAME_SERVERS)",
                                   labels=["transport"])
    searches.add_metric(["udp"], gw.udp_searches)
    searches.add_metric(["tcp"], gw.tcp_searches)
    yield searches
    yield CounterMetricFamily(f"{CA_GATEWAY}_search_answers", "Client searches answered "
                              "(the IOC has the name)", value=gw.search_answers)
    stats = _snapshot(gw.stats)
    dropped = CounterMetricFamily(f"{CA_GATEWAY}_dropped", "What was refused, dropped or "
                                  "ignored, by reason (docs/ca-gateway.md, limits)",
                                  labels=["reason"])
    for key in sorted(set(CA_GATEWAY_DROPS) | set(stats)):
        dropped.add_metric([key], stats.get(key, 0))
    yield dropped
    yield CounterMetricFamily(f"{CA_GATEWAY}_upstream_updates", "Monitor updates received "
                              "from the IOC", value=up.updates_in)
    yield CounterMetricFamily(f"{CA_GATEWAY}_updates_relayed", "Monitor updates queued to "
                              "clients (one per subscribed client; a client that does not "
                              "read keeps only the latest)", value=up.updates_out)
    upstream = up.stats()
    for name, doc, value in (
            ("connections", "Client TCP circuits", len(gw.circuits)),
            ("channels", "Client channels, all circuits", gw.channels),
            ("subscriptions", "Client subscriptions, all circuits", gw.subscriptions),
            ("upstream_channels", "Channels connected to the IOC (shared by clients)",
             upstream["upstream_channels"]),
            ("upstream_circuits", "TCP circuits to the IOC", upstream["upstream_circuits"]),
            ("lookups_waiting", "Client searches waiting for the IOC's answer",
             upstream["waiting"])):
        yield GaugeMetricFamily(f"{CA_GATEWAY}_{name}", doc, value=value)


class BridgeMetrics:
    """The bridge's counters, and gauges read from it at scrape time."""

    def __init__(self, channels: Callable[[], list[Any]], names: Callable[[], int],
                 refused: Mapping[str, int]) -> None:
        self.registry = CollectorRegistry()
        self.searches = Counter(f"{BRIDGE}_searches", "PVA searches for names (asked of "
                                "the bridge's search provider)", registry=self.registry)
        self.answers = Counter(f"{BRIDGE}_search_answers", "PVA searches answered (the "
                               "name's CA channel is connected)", registry=self.registry)
        self.updates = 0  # CA updates posted to PVA (relayed() on caproto's thread)
        self._channels = channels
        self._names = names
        self._refused = refused
        self.registry.register(Collected(self._gauges))

    def relayed(self) -> None:
        self.updates += 1

    def _gauges(self) -> Iterator[Metric]:
        yield CounterMetricFamily(f"{BRIDGE}_updates_relayed", "CA monitor updates posted "
                                  "to PVA (one per update, whatever the number of PVA "
                                  "clients)", value=self.updates)
        channels = self._channels()
        states = Tally(c.state.value for c in channels)
        by_state = GaugeMetricFamily(f"{BRIDGE}_channels", "CA channels bridged, by state",
                                     labels=["state"])
        for state, n in sorted(states.items()):
            by_state.add_metric([str(state)], n)
        yield by_state
        yield GaugeMetricFamily(f"{BRIDGE}_channels_in_use", "Bridged channels with PVA "
                                "clients attached", value=sum(c.in_use for c in channels))
        yield GaugeMetricFamily(f"{BRIDGE}_pva_names", "PVA names served",
                                value=self._names())
        refused = CounterMetricFamily(f"{BRIDGE}_searches_refused", "Searches not looked up "
                                      "over CA, by reason (names: not a PV name; channels: "
                                      "--max-channels)", labels=["reason"])
        for reason, n in sorted(_snapshot(self._refused).items()):
            refused.add_metric([reason], n)
        yield refused
