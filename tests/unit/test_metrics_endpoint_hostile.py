"""The metrics endpoint every long-running process serves (prometheus_client's HTTP
server) survives junk from a client and keeps answering scrapes."""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from ioc_operator.metrics import MetricsServer


def test_junk_and_half_requests_leave_the_metrics_endpoint_serving():
    registry = CollectorRegistry()
    Counter("ioc_test_things", "things", registry=registry).inc()
    server = MetricsServer(registry, 0, "127.0.0.1")
    try:
        for junk in (os.urandom(4096), b"GET /" + b"x" * 70000 + b" HTTP/1.1\r\n\r\n",
                     b"\x00\xff" * 100, b"GET /metrics HTTP/1.1\r\n"):  # the last unfinished
            with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
                sock.sendall(junk)
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(2)
                with contextlib.suppress(OSError):
                    sock.recv(65536)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics",
                                    timeout=5) as reply:
            assert b"ioc_test_things_total 1.0" in reply.read()
    finally:
        server.stop()
