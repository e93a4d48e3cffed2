"""Prometheus metrics, shared by the operator, the gateways and the name server.

Each process keeps its metrics in a `CollectorRegistry` of its own, held by the object
that owns the figures (never prometheus_client's global registry), and serves it with
prometheus_client's HTTP server when asked (`--metrics-port`). Hot paths count in plain
ints; `Collected` turns them into metric families only when Prometheus scrapes, so an
answered search costs an integer increment, not a `Counter.inc()` and its lock.
Metric names: docs/metrics.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = ["Collected", "CollectorRegistry", "MetricsServer", "port_arg"]


class Collected(Collector):
    """Metric families made by `collect` at each scrape, from whatever it reads (plain
    counters, table sizes). `collect` runs on the HTTP server's thread: it must only
    read, and tolerate figures that move while it does."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        return iter(list(self._collect()))


class MetricsServer:
    """prometheus_client's HTTP server (any path: the text exposition format) for one
    registry, in a daemon thread; `stop()` closes the socket."""

    def __init__(self, registry: CollectorRegistry, port: int, address: str = "0.0.0.0") -> None:
        self._server, self._thread = start_http_server(port, address, registry=registry)
        self.address = address
        self.port: int = self._server.server_port  # the bound one (port 0: any free port)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.address in ("", "0.0.0.0") else self.address
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def port_arg(text: str) -> int:
    """argparse type of `--metrics-port`: 0 (off) or a TCP port."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port") from None
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port")
    return value
