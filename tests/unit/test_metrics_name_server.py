"""The name server's Prometheus metrics: a real NameServer on 127.0.0.1 answers real
CA searches over UDP and TCP, and the figures are scraped from prometheus_client's HTTP
server, as Prometheus would."""

from __future__ import annotations

import asyncio
import socket
import struct
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ioc_operator.metrics import MetricsServer
from ioc_operator.nameserver import ca
from ioc_operator.nameserver import main as ns_main
from ioc_operator.nameserver.server import NameServer, ServerConfig
from ioc_operator.nameserver.table import CA, IOC, Endpoint, Table

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
VERSION = struct.pack(">HHHHII", 0, 0, 0, 13, 0, 0)


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ca_searches(names: list[str]) -> bytes:
    return VERSION + b"".join(ca.search_request(n, i) for i, n in enumerate(names))


async def udp_round_trip(port: int, datagram: bytes) -> bytes:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.sendto(datagram, ("127.0.0.1", port))
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout=5)
    finally:
        sock.close()


def the_ioc() -> IOC:
    return IOC(key="bl01/vac", prefix="VAC:", ca=Endpoint("198.18.16.2", 5064),
               pva=Endpoint("198.18.16.2", 5075))


def test_searches_answers_connections_and_cached_names_are_scraped():
    async def main() -> tuple[Samples, Samples]:
        table = Table()
        ioc = the_ioc()
        table.put(ioc)
        server = NameServer(ServerConfig(hosts=["127.0.0.1"], ca_port=0, pva_port=0,
                                         pva_udp_port=0), table)
        await server.start()
        metrics = MetricsServer(server.registry, 0, "127.0.0.1")
        try:
            before = await asyncio.to_thread(scrape, metrics.url)
            names = ["VAC:a", "VAC:b", "VAC:c"]
            for name in names:  # confirmed by the IOC a moment ago
                server.resolver.remember(CA, name, ioc)
            udp_port = server.bound["ca-udp"][0][1]
            reply = await udp_round_trip(udp_port, ca_searches(names))
            assert len(reply) == 16 + 3 * 24  # a VERSION and three answers
            # a libca name-server circuit: connected, one search answered
            tcp_port = server.bound["ca-tcp"][0][1]
            reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
            await reader.readexactly(16)  # the server's VERSION
            writer.write(ca.search_request("VAC:a", 7))
            await writer.drain()
            await reader.readexactly(16)  # the answer
            during = await asyncio.to_thread(scrape, metrics.url)
            writer.close()
            await writer.wait_closed()
            return before, during
        finally:
            metrics.stop()
            await server.stop()

    before, during = asyncio.run(main())
    key = ("ioc_name_server_searches_total", (("protocol", "ca"), ("transport", "udp")))
    assert before[key] == 0 and during[key] == 3
    assert during[("ioc_name_server_searches_total",
                   (("protocol", "ca"), ("transport", "tcp")))] == 1
    assert before[("ioc_name_server_answers_total", (("protocol", "ca"),))] == 0
    assert during[("ioc_name_server_answers_total", (("protocol", "ca"),))] == 4
    assert during[("ioc_name_server_connections", (("protocol", "ca"),))] == 1
    assert during[("ioc_name_server_connections", (("protocol", "pva"),))] == 0
    assert during[("ioc_name_server_cached_names", (("protocol", "ca"),))] == 3
    assert during[("ioc_name_server_iocs", ())] == 1
    assert during[("ioc_name_server_searches_dropped_total",
                   (("reason", "client_not_reading"),))] == 0


def test_metrics_port_flag_serves_while_the_name_server_runs(tmp_path: Path):
    table = tmp_path / "iocs.yaml"
    table.write_text("iocs:\n- {name: bl01/vac, prefix: 'VAC:', ca: '198.18.16.2:5064'}\n")
    port = free_port()
    args = ns_main.build_parser().parse_args([
        "--table", str(table), "--listen", "127.0.0.1", "--ca-port", "0", "--pva-port", "0",
        "--pva-udp-port", "0", "--metrics-port", str(port)])

    async def main() -> Samples:
        ready: asyncio.Future[NameServer] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(ns_main.serve(args, ready.set_result))
        await asyncio.wait_for(asyncio.shield(ready), timeout=10)
        try:
            return await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    got = asyncio.run(main())
    assert got[("ioc_name_server_iocs", ())] == 1
    assert_closed(port)


def assert_closed(port: int) -> None:
    """Nothing listens on the port any more (a scrape's connection may be in TIME_WAIT:
    SO_REUSEADDR, with which Linux still refuses a port that has a listener)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()


def test_metrics_are_off_by_default():
    args = ns_main.build_parser().parse_args(["--table", "x.yaml"])
    assert args.metrics_port == 0
