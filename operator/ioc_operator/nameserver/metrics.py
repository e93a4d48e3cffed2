"""The name server's Prometheus metrics, made from its plain counters when scraped.

The listeners count in ints (`NameServer.stats`, `Resolver.stats`): a cached answer is
the hot path, over 200,000 a second on one core, and an int increment is all it pays.
`families` reads them on the metrics server's thread; the counters' keys never change
and each value is one int, so a scrape sees each figure whole (figures read a moment
apart may be a few searches out of step). Names: docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from .table import CA, PVA

if TYPE_CHECKING:
    from .server import NameServer

PREFIX = "ioc_name_server"
# Searches not answered although the name may exist, by reason (the stats key).
DROPPED = {
    "answers_dropped": "client_not_reading",  # a TCP client's answers piled up
    "outside_refused": "outside_network",  # a pod-mode IOC asked for from outside
    "dropped_lookups": "lookup_limit",  # too many names being confirmed at once
    "dropped_fanout": "fanout_limit",  # too many names no IOC's prefix claims
    "throttled": "confirmation_rate",  # confirmation searches over --probe-rate
    "parked_evicted": "waiting_limit",  # a waiting client forgotten (--max-waiting)
}
BAD = ("bad_messages", "bad_names", "ignored_messages")
LOOKUPS = ("found", "not_found", "answered_later", "retries", "revalidated", "revoked")


def _counter(name: str, doc: str, labels: list[str] | None = None) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)


def families(server: NameServer) -> Iterator[Metric]:
    stats = dict(server.stats)
    resolved = dict(server.resolver.stats)
    sizes = server.resolver.sizes()

    searches = _counter("searches", "Names searched for by clients", ["protocol", "transport"])
    for proto in (CA, PVA):
        for transport in ("udp", "tcp"):
            searches.add_metric([proto, transport], stats[f"{proto}_{transport}_searches"])
    yield searches
    answers = _counter("answers", "Searches answered with an IOC's address", ["protocol"])
    for proto in (CA, PVA):
        answers.add_metric([proto], stats[f"{proto}_answers"])
    yield answers
    dropped = _counter("searches_dropped", "Searches left unanswered though an IOC may "
                       "have the name, by reason (the client asks again)", ["reason"])
    for key, reason in DROPPED.items():
        dropped.add_metric([reason], stats.get(key, resolved.get(key, 0)))
    yield dropped
    bad = _counter("bad_input", "Malformed or unexpected client messages", ["kind"])
    for key in BAD:
        bad.add_metric([key.removesuffix("s")], stats[key])
    yield bad
    lookups = _counter("lookups", "Confirmations of a name with the IOCs, by result",
                       ["result"])
    for key in LOOKUPS:
        lookups.add_metric([key], resolved[key])
    yield lookups
    probes = _counter("confirmation_searches", "Searches sent to IOCs to confirm names",
                      ["protocol"])
    for proto in (CA, PVA):
        probes.add_metric([proto], server.prober.sent[proto])
    yield probes

    connections = _gauge("connections", "Client TCP connections (name-server searches)",
                         ["protocol"])
    for proto in (CA, PVA):
        connections.add_metric([proto], len(server.circuits[proto]))
    yield connections
    yield CounterMetricFamily(f"{PREFIX}_connections_refused",
                              "Client TCP connections refused (--max-circuits)",
                              value=stats["circuits_refused"])
    yield GaugeMetricFamily(f"{PREFIX}_iocs", "IOCs in the table", value=len(server.table))
    names = _gauge("cached_names", "Names with a confirmed answer cached (the channels "
                   "this server can answer at once)", ["protocol"])
    names.add_metric([CA], sizes["cached_ca"])
    names.add_metric([PVA], sizes["cached_pva"])
    yield names
    yield GaugeMetricFamily(f"{PREFIX}_waiting_clients", "Clients waiting for a name no "
                            "IOC has confirmed yet", value=sizes["waiting_clients"])
    yield GaugeMetricFamily(f"{PREFIX}_lookups_in_flight", "Names being confirmed",
                            value=sizes["lookups_in_flight"])
