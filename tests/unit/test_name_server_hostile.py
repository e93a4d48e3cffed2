"""Hostile input: the name server's four listeners fed any bytes (hypothesis) and the
cases the issue names: truncated, oversized, wrong byte order, unknown commands,
100,000 names in one message, extended headers with huge counts, a client that never
reads. Nothing escapes a callback, and every buffer and table stays within its bound.

The listeners are driven without sockets: a transport double records what would be
written (the lab tests do the same over real sockets with real clients).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from typing import Any

import caproto as ca
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ioc_operator.nameserver import pva
from ioc_operator.nameserver import server as srv
from ioc_operator.nameserver.resolver import Limits
from ioc_operator.nameserver.table import IOC, Endpoint, Table

CLIENT = ("198.18.17.2", 40000)


class Transport:
    """What a listener sees of a socket: writes are counted, not sent."""

    def __init__(self, buffered: int = 0) -> None:
        self.written = 0
        self.datagrams: list[tuple[bytes, Any]] = []
        self.buffered = buffered  # pretend the client reads nothing: bytes held for it
        self.closed = False
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": CLIENT, "sockname": ("198.18.16.9", 5064)}.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, data: list[bytes]) -> None:
        self.written += sum(map(len, data))

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.datagrams.append((data, addr))

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make_server(loop: asyncio.AbstractEventLoop, **limits: Any) -> srv.NameServer:
    async def build() -> srv.NameServer:
        table = Table()
        table.put(IOC(key="ns/a", prefix="A:", ca=Endpoint("198.18.16.2", 5064),
                      pva=Endpoint("198.18.16.2", 5075)))
        return srv.NameServer(srv.ServerConfig(limits=Limits(**limits)), table)

    return loop.run_until_complete(build())


def drain(loop: asyncio.AbstractEventLoop, server: srv.NameServer) -> None:
    """Run what the listeners scheduled (flushes), and the housekeeping once."""
    loop.run_until_complete(asyncio.sleep(0))
    server.prober.tick()
    server.resolver.tick()
    server.flush()


def bounded(server: srv.NameServer) -> None:
    limits = server.config.limits
    assert len(server.resolver.lookups) <= limits.max_lookups
    assert len(server.resolver.parked) <= limits.max_parked
    assert all(len(p.askers) <= limits.max_askers for p in server.resolver.parked.values())
    assert len(server.prober.pending) <= server.prober.max_pending
    for cache in server.resolver.positive.values():
        assert len(cache) <= limits.cache_size


def feed_stream(loop, server, factory, chunks: list[bytes], buffered: int = 0):  # type: ignore[no-untyped-def]
    circuit = factory(server)
    transport = Transport(buffered)
    circuit.connection_made(transport)
    for chunk in chunks:
        if transport.closed:
            break
        circuit.data_received(chunk)
        pending = (circuit.framer.pending() if isinstance(circuit, srv.CaCircuit)
                   else circuit.parser.pending())
        # at most one unfinished message is held: the largest allowed plus one chunk
        limit = srv.CA_MAX_PENDING if isinstance(circuit, srv.CaCircuit) \
            else srv.PVA_MAX_MESSAGE + pva.HEADER
        assert transport.closed or pending <= limit + len(chunk)
    drain(loop, server)
    bounded(server)
    circuit.connection_lost(None)
    return transport


def ca_message(command: int, data_type: int = 0, count: int = 0, p1: int = 0, p2: int = 0,
               payload: bytes = b"") -> bytes:
    return struct.pack(">HHHHII", command, len(payload), data_type, count, p1, p2) + payload


def ca_search(name: str, cid: int) -> bytes:
    return bytes(ca.SearchRequest(name, cid, 13))


# ----------------------------------------------------------------------- any bytes
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.lists(st.binary(max_size=2048), max_size=8))
def test_ca_stream_survives_any_bytes(loop, chunks):
    feed_stream(loop, make_server(loop), srv.CaCircuit, chunks)


@FUZZ
@given(st.lists(st.binary(max_size=2048), max_size=8))
def test_pva_stream_survives_any_bytes(loop, chunks):
    feed_stream(loop, make_server(loop), srv.PvaCircuit, chunks)


@FUZZ
@given(st.binary(max_size=4096))
def test_udp_listeners_survive_any_bytes(loop, data):
    server = make_server(loop)
    for proto in (srv.CaUdp(server), srv.PvaUdp(server)):
        proto.connection_made(Transport())
        proto.datagram_received(data, CLIENT)
    drain(loop, server)
    bounded(server)


@st.composite
def mangled_ca(draw: st.DrawFn) -> bytes:
    """Well-formed searches with fields and lengths changed at random."""
    names = draw(st.lists(st.text(alphabet="AB:xy01\0\x7f", min_size=0, max_size=40),
                          max_size=20))
    data = bytearray(b"".join(ca_search(n or "A:", i) if "\0" not in n else
                              ca_message(6, 5, 13, i, i, n.encode() + b"\0")
                              for i, n in enumerate(names)))
    for _ in range(draw(st.integers(0, 5))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(0, len(data)))])


@FUZZ
@given(mangled_ca())
def test_ca_mangled_searches_over_udp_and_tcp(loop, data):
    server = make_server(loop)
    udp = srv.CaUdp(server)
    udp.connection_made(Transport())
    udp.datagram_received(data, CLIENT)
    feed_stream(loop, server, srv.CaCircuit, [data])


@st.composite
def mangled_pva(draw: st.DrawFn) -> bytes:
    names = draw(st.lists(st.tuples(st.integers(0, 2**32 - 1),
                                    st.text(alphabet="AB:x\x01é", max_size=30)), max_size=20))
    data = bytearray(pva.encode_search(draw(st.integers(0, 2**32 - 1)), names, 40000,
                                       big_endian=draw(st.booleans())))
    for _ in range(draw(st.integers(0, 5))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(0, len(data)))])


@FUZZ
@given(mangled_pva())
def test_pva_mangled_searches_over_udp_and_tcp(loop, data):
    server = make_server(loop)
    udp = srv.PvaUdp(server)
    udp.connection_made(Transport())
    udp.datagram_received(data, CLIENT)
    feed_stream(loop, server, srv.PvaCircuit, [pva.connection_validated(False), data])


# ------------------------------------------------------------------ the named cases
def test_truncated_messages_wait_and_are_then_read(loop):
    server = make_server(loop)
    data = ca_search("A:one", 1)
    transport = feed_stream(loop, server, srv.CaCircuit, [data[:5], data[5:20], data[20:]])
    assert not transport.closed
    assert ("ca", "A:one") in server.resolver.lookups or server.resolver.parked


def test_ca_extended_header_with_a_huge_size_closes_without_buffering_it(loop):
    server = make_server(loop)
    huge = struct.pack(">HHHHII", 6, 0xFFFF, 5, 0, 1, 1) + struct.pack(">II", 0xFFFFFFF0,
                                                                        0xFFFFFFF0)
    transport = feed_stream(loop, server, srv.CaCircuit,
                            [huge] + [b"\0" * 65536] * 4)
    assert transport.closed
    assert server.stats["bad_messages"] == 1


def test_pva_oversized_and_segmented_messages_close_the_circuit(loop):
    server = make_server(loop)
    oversized = struct.pack("<BBBBI", 0xCA, 2, 0, pva.SEARCH, 1 << 30)
    assert feed_stream(loop, server, srv.PvaCircuit, [oversized]).closed
    segmented = struct.pack("<BBBBI", 0xCA, 2, 0x10, pva.SEARCH, 4) + b"abcd"
    assert feed_stream(loop, server, srv.PvaCircuit, [segmented]).closed


def test_wrong_byte_order_is_a_bad_message_not_a_crash(loop):
    server = make_server(loop)
    good = pva.encode_search(1, [(1, "A:x")], 40000, big_endian=True)
    flipped = bytearray(good)
    flipped[2] &= ~pva.FLAG_MSB  # says little-endian, is big-endian: a size of 687 MB
    udp = srv.PvaUdp(server)
    transport = Transport()
    udp.connection_made(transport)
    udp.datagram_received(bytes(flipped), CLIENT)
    assert transport.datagrams == [] and server.stats["pva_udp_searches"] == 0
    assert feed_stream(loop, server, srv.PvaCircuit, [bytes(flipped)]).closed
    assert server.stats["bad_messages"] == 1
    # The body alone in the wrong order: fields decode to nonsense, never to a crash.
    body = good[8:]
    for cut in (10, len(body)):
        with pytest.raises(pva.ProtocolError):
            pva.decode_search(body[:cut], False)  # the count reads 256: the body is short


def test_unknown_commands_are_ignored_and_counted(loop):
    server = make_server(loop)
    data = b"".join(ca_message(cmd) for cmd in (99, 200, 0x7FFF)) + ca_message(23)  # ECHO
    transport = feed_stream(loop, server, srv.CaCircuit, [data])
    assert not transport.closed and server.stats["ignored_messages"] == 3
    assert transport.written == 32  # VERSION, then the ECHO reply
    pva_data = pva.message(77, b"xyz", big_endian=False, server=False) + pva.echo(b"hi", False)
    transport = feed_stream(loop, server, srv.PvaCircuit, [pva_data])
    assert not transport.closed and server.stats["ignored_messages"] == 4


def test_100000_names_in_one_message_keep_every_table_bounded(loop):
    server = make_server(loop, max_lookups=1000, max_parked=2000, max_askers=4)
    ca_burst = b"".join(ca_search(f"A:{i}", i) for i in range(100_000))
    transport = feed_stream(loop, server, srv.CaCircuit, [ca_burst])
    assert not transport.closed
    assert server.stats["ca_tcp_searches"] == 100_000
    # PVA counts names in 16 bits: the message claims 65535 and carries 100,000
    body = pva.encode_search(1, [(i, f"A:{i}") for i in range(65535)], 40000,
                             big_endian=True)[8:]
    body += b"".join(struct.pack(">I", i) + pva.encode_string(f"A:{i}", True)
                     for i in range(65535, 100_000))
    message = pva.message(pva.SEARCH, body, big_endian=True, server=False)
    assert len(message) > srv.PVA_MAX_MESSAGE  # so the circuit refuses it whole ...
    transport = feed_stream(loop, server, srv.PvaCircuit, [message])
    assert transport.closed and server.stats["pva_tcp_searches"] == 0
    udp = srv.PvaUdp(server)  # ... and a datagram cannot hold it: the first 65535 count
    udp.connection_made(Transport())
    udp.datagram_received(message, CLIENT)
    assert server.stats["pva_udp_searches"] == 65535
    drain(loop, server)
    bounded(server)


def test_a_client_that_never_reads_is_paused_then_its_answers_dropped(loop):
    server = make_server(loop)
    server.resolver.remember("ca", "A:hot", server.table.get("ns/a"))  # type: ignore[arg-type]
    circuit = srv.CaCircuit(server)
    transport = Transport(buffered=srv.WRITE_HARD + 1)
    circuit.connection_made(transport)
    circuit.pause_writing()  # asyncio says so above the high-water mark
    assert not transport.reading
    circuit.data_received(b"".join(ca_search("A:hot", i) for i in range(1000)))
    drain(loop, server)
    assert transport.written == 0 and server.stats["answers_dropped"] >= 1000
    circuit.resume_writing()
    assert transport.reading


def test_answers_go_to_the_sender_never_to_an_address_in_the_payload(loop):
    server = make_server(loop)
    server.resolver.remember("pva", "A:x", server.table.get("ns/a"))  # type: ignore[arg-type]
    message = bytearray(pva.encode_search(3, [(5, "A:x")], 41000, big_endian=True))
    message[8 + 8:8 + 24] = pva.encode_address("198.18.99.99")  # someone else
    udp = srv.PvaUdp(server)
    transport = Transport()
    udp.connection_made(transport)
    udp.datagram_received(bytes(message), CLIENT)
    drain(loop, server)
    assert [addr for _, addr in transport.datagrams] == [(CLIENT[0], 41000)]
