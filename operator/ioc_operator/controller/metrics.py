"""The operator's Prometheus metrics, in a registry of its own (one per `Operator`).

Counted where the work happens (operator.py): reconciles by result and their duration,
errors by reason, directory publishes, probe results. Gauges of IOCs by condition and
by network mode are read from the operator's state (state.py) at each scrape, from the
status the operator last wrote for each IOC: nothing to keep in step. Names and labels:
docs/metrics.md.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from ioc_operator.controller.state import OperatorState
from ioc_operator.metrics import Collected

RESULTS = ("applied", "refused", "error")
PUBLISH_RESULTS = ("written", "unchanged", "failed")
PROBE_OUTCOMES = ("Reachable", "Unreachable", "NoAddress")
MODES = ("host", "pod", "sidecar")
# A reconcile is a handful of API requests: milliseconds on a quiet API server, seconds
# when it is loaded (a cold start of 1,000 IOCs) or slow.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class OperatorMetrics:
    """Counters the operator updates as it works, and its state read at scrape time."""

    def __init__(self, state: OperatorState, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.state = state
        r = self.registry
        self.reconciles = Counter(
            "ioc_operator_reconciles", "IOC reconciles by result: applied (the spec runs), "
            "refused (a condition says why: see errors), error (an API error; retried)",
            ["result"], registry=r)
        self.reconcile_seconds = Histogram(
            "ioc_operator_reconcile_duration_seconds",
            "Time of one IOC reconcile: render, dry run, apply, prune, status write",
            buckets=DURATION_BUCKETS, registry=r)
        self.errors = Counter(
            "ioc_operator_errors", "Errors by reason: a refused reconcile's condition "
            "reason (InvalidSpec, Rejected, PortConflict, ...), APIError, APIUnreachable, "
            "DirectoryPublishFailed", ["reason"], registry=r)
        self.publishes = Counter(
            "ioc_operator_directory_publishes", "Client directory publishes by result: "
            "written (an API call), unchanged (nothing to write), failed",
            ["result"], registry=r)
        self.publish_seconds = Gauge(
            "ioc_operator_directory_publish_last_duration_seconds",
            "Duration of the last client directory publish", registry=r)
        self.probes = Counter(
            "ioc_operator_probes", "Reachability probe results by outcome (the Reachable "
            "condition's reason)", ["outcome"], registry=r)
        for result in RESULTS:
            self.reconciles.labels(result)
        for result in PUBLISH_RESULTS:
            self.publishes.labels(result)
        for outcome in PROBE_OUTCOMES:
            self.probes.labels(outcome)
        r.register(Collected(self._iocs))

    def _iocs(self) -> Iterator[Metric]:
        by_condition: Tally[tuple[str, str]] = Tally()
        by_mode: Tally[str] = Tally(dict.fromkeys(MODES, 0))
        for status in self.state.statuses():
            by_mode[str(status.get("mode") or "unknown")] += 1
            for cond in status.get("conditions") or []:
                by_condition[(str(cond.get("type")), str(cond.get("status")))] += 1
        condition = GaugeMetricFamily(
            "ioc_operator_iocs_by_condition", "IOCs by status condition (type and status) "
            "as the operator last wrote them", labels=["condition", "status"])
        for (kind, value), n in sorted(by_condition.items()):
            condition.add_metric([kind, value], n)
        mode = GaugeMetricFamily("ioc_operator_iocs_by_mode", "IOCs by network mode",
                                 labels=["mode"])
        for name, n in sorted(by_mode.items()):
            mode.add_metric([name], n)
        yield condition
        yield mode
