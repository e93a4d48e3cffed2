"""The name server's listeners (asyncio): CA over TCP and UDP, PVA over TCP and UDP.

Every search is answered from the resolver's cache when it can be, in the same loop
iteration; otherwise the client is answered when an IOC confirms the name. Answers name
the IOC's own address and port, never ours, so no channel ever goes through here.

Defences, because this listens on a network: every buffer is bounded (a stream that
holds more than one maximal message, or a client whose answers pile up, is paused or
closed), malformed input is counted and logged at a limited rate, never raised out of a
callback, and the number of circuits is capped.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..gateways import ca_wire as w
from ..gateways.ca_downstream import bind_udp
from ..gateways.limits import CircuitLimit
from ..gateways.ratelog import RateLimitedLog
from ..metrics import Collected, CollectorRegistry
from . import ca, pva
from .metrics import families
from .probe import UdpProber
from .resolver import Limits, Resolver
from .table import CA, IOC, PVA, Table

__all__ = ["NameServer", "ServerConfig"]

log = logging.getLogger("ioc_name_server")
rlog = RateLimitedLog(log)

TICK = 0.05  # s between housekeeping rounds (retries, timeouts, paced fan-outs)
CA_MAX_PENDING = 64 * 1024  # bytes of an unfinished CA message: far above any search
PVA_MAX_MESSAGE = 256 * 1024  # a PVA search of ~10,000 names; larger messages close
WRITE_HIGH = 256 * 1024  # bytes queued to a client before we stop reading from it
WRITE_HARD = 4 * 1024 * 1024  # beyond this, answers for it are dropped (it will re-ask)
PVA_CIDS_PER_TCP_RESPONSE = 8192
PVA_CIDS_PER_DATAGRAM = (pva.MAX_UDP - pva.response_size(0)) // 4


@dataclass
class ServerConfig:
    hosts: list[str] = field(default_factory=lambda: ["0.0.0.0"])
    ca_port: int = 5064  # TCP (name-server searches) and UDP (unicast searches)
    pva_port: int = 5075  # TCP
    pva_udp_port: int = 5076  # UDP
    # Clients outside these networks are answered only with IOCs marked external
    # (host-mode IOCs: node addresses). Empty: every client is inside.
    internal_networks: list[ipaddress.IPv4Network] = field(default_factory=list)
    max_circuits: int = 4096  # per protocol
    confirm_timeout: float = 1.0
    limits: Limits = field(default_factory=Limits)
    stats_interval: float = 60.0


class _Guid:
    """The name server's own PVA GUID (for "must reply" searches nobody answers)."""

    value = os.urandom(12)


def _is_internal(networks: list[ipaddress.IPv4Network], host: str) -> bool:
    if not networks:
        return True
    try:
        addr = ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return any(addr in net for net in networks)


class _Output:
    """Bytes for one TCP client, written once per loop iteration; reading stops while
    the client does not read its answers."""

    def __init__(self, server: NameServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.closed = False
        self.peer = "?"
        self.host = ""
        self.internal = True
        self._dirty = False

    def opened(self, transport: asyncio.BaseTransport) -> bool:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.host = str(peer[0])
        self.peer = f"{peer[0]}:{peer[1]}"
        self.internal = _is_internal(self.server.config.internal_networks, self.host)
        transport.set_write_buffer_limits(high=WRITE_HIGH)  # type: ignore[attr-defined]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return True

    def queue(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            return
        if self.transport.get_write_buffer_size() > WRITE_HARD:
            self.server.stats["answers_dropped"] += 1
            return
        self.out.append(data)
        if not self._dirty:
            self._dirty = True
            self.server.mark(self)

    def flush(self) -> None:
        self._dirty = False
        if self.out and not self.closed and self.transport is not None:
            self.transport.writelines(self.out)
        self.out = []

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()


class _TcpAsker:
    """A client on a TCP circuit waiting for a name (see resolver.Asker)."""

    __slots__ = ("cid", "circuit", "key", "sequence")

    def __init__(self, circuit: CaCircuit | PvaCircuit, cid: int, sequence: int = 0) -> None:
        self.circuit = circuit
        self.cid = cid
        self.sequence = sequence
        self.key: Hashable = (id(circuit), cid)

    def answer(self, ioc: IOC) -> None:
        self.circuit.answer(ioc, [self.cid], self.sequence)

    def alive(self) -> bool:
        return not self.circuit.output.closed


class _UdpAsker:
    """A client that searched over UDP, waiting for a name."""

    __slots__ = ("addr", "cid", "key", "listener", "sequence")

    def __init__(self, listener: _UdpListener, addr: tuple[str, int], cid: int,
                 sequence: int) -> None:
        self.listener = listener
        self.addr = addr
        self.cid = cid
        self.sequence = sequence
        self.key: Hashable = (addr, cid)

    def answer(self, ioc: IOC) -> None:
        internal = _is_internal(self.listener.server.config.internal_networks, self.addr[0])
        self.listener.answer(self.addr, self.sequence, ioc, self.cid, internal)

    def alive(self) -> bool:
        return True


class _UdpListener(asyncio.DatagramProtocol):
    """A UDP search port. Answers found in one loop iteration are sent together, one
    datagram (or more) per client and IOC: caproto's threading client gives every name
    of a datagram the last reply's address, and pvxs reads one message per datagram."""

    def __init__(self, server: NameServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        # (client, IOC) -> (the client's sequence number, answers: messages or cids)
        self._replies: dict[tuple[tuple[str, int], IOC], tuple[int, list[Any]]] = {}
        self._dirty = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        log.debug("%s: %s", type(self).__name__, exc)

    answers = ""  # the counter of this protocol's answers (server.stats)

    def answer(self, addr: tuple[str, int], sequence: int, ioc: IOC, cid: int,
               internal: bool) -> None:
        item = self._item(ioc, cid)
        if item is None or not (internal or ioc.external):
            return
        entry = self._replies.get((addr, ioc))
        if entry is None:
            self._replies[(addr, ioc)] = (sequence, [item])
        else:
            entry[1].append(item)
        if not self._dirty:
            self._dirty = True
            self.server.mark(self)

    def flush(self) -> None:
        self._dirty = False
        replies, self._replies = self._replies, {}
        if self.transport is None or self.transport.is_closing():
            return
        answered = 0  # counted here, once per flush, not per answer (the hot path)
        for (addr, ioc), (sequence, items) in replies.items():
            answered += len(items)
            for datagram in self._datagrams(ioc, sequence, items):
                self.transport.sendto(datagram, addr)
        self.server.stats[self.answers] += answered

    def _item(self, ioc: IOC, cid: int) -> Any:
        """What one answer adds to a reply (None: this IOC does not serve the protocol)."""
        raise NotImplementedError

    def _datagrams(self, ioc: IOC, sequence: int, items: list[Any]) -> list[bytes]:
        raise NotImplementedError


class _Circuit(asyncio.Protocol):
    """A client's TCP connection: bounded in number, its output flow-controlled, closed
    on the first byte that is not the protocol."""

    proto = ""

    def __init__(self, server: NameServer) -> None:
        self.server = server
        self.output = _Output(server)
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        out = self.output
        out.opened(transport)
        refusal = self.server.limits[self.proto].admit(out.host)
        if refusal:
            self.server.stats["circuits_refused"] += 1
            rlog.warning((self.proto, "max", out.host), "%s: %s, refusing %s",
                         self.proto.upper(), refusal, out.peer)
            out.close()
            return
        self._counted = True
        self.server.circuits[self.proto].add(self)
        log.debug("%s circuit from %s", self.proto.upper(), out.peer)
        for message in self.greeting():
            out.queue(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.output.closed = True
        self.server.circuits[self.proto].discard(self)
        if self._counted:
            self._counted = False
            self.server.limits[self.proto].release(self.output.host)

    def pause_writing(self) -> None:
        self.output.pause_writing()

    def resume_writing(self) -> None:
        self.output.resume_writing()

    def data_received(self, data: bytes) -> None:
        try:
            self.feed(data)
        except Exception as exc:
            self.server.stats["bad_messages"] += 1
            rlog.warning((self.proto, "bad", self.output.host), "%s client %s: %s; closing",
                         self.proto.upper(), self.output.peer, exc)
            self.output.close()

    def greeting(self) -> list[bytes]:
        raise NotImplementedError

    def feed(self, data: bytes) -> None:
        raise NotImplementedError


# ============================================================================ CA
class CaCircuit(_Circuit):
    """A client's TCP circuit: libca's EPICS_CA_NAME_SERVERS searches."""

    proto = CA

    def __init__(self, server: NameServer) -> None:
        super().__init__(server)
        self.framer = w.StreamFramer()
        self.client_version = 0

    def greeting(self) -> list[bytes]:
        return [ca.version()]

    def feed(self, data: bytes) -> None:
        self.framer.feed(data, self._message)
        if self.framer.pending() > CA_MAX_PENDING:
            raise ValueError(f"{self.framer.pending()} bytes without a whole message")

    def _message(self, command: int, data_type: int, count: int, p1: int, p2: int,
                 payload: bytes) -> None:
        if command == w.SEARCH:
            search = ca.stream_search(data_type, count, p1, payload)
            if search is None:
                self.server.stats["bad_names"] += 1
                return
            self.server.stats["ca_tcp_searches"] += 1
            ioc = self.server.lookup(CA, search.name, self.output.internal,
                                     lambda: _TcpAsker(self, search.cid), self.output.host)
            if ioc is not None:
                self.answer(ioc, [search.cid])
            elif search.reply and self.server.resolver.negative_hit(CA, search.name):
                self.output.queue(ca.not_found(search))
        elif command == w.ECHO:
            self.output.queue(ca.echo())
        elif command == w.VERSION:
            self.client_version = count
        elif command == w.CREATE_CHAN:
            self.output.queue(ca.create_channel_failed(p1))
        elif command not in (w.CLIENT_NAME, w.HOST_NAME, w.EVENTS_ON, w.EVENTS_OFF,
                             w.READ_SYNC):
            self.server.stats["ignored_messages"] += 1
            rlog.debug(("ca-cmd", command), "CA client %s: ignored command %d",
                       self.output.peer, command)

    def answer(self, ioc: IOC, cids: list[int], sequence: int = 0) -> None:
        endpoint = ioc.ca
        if endpoint is None or not (self.output.internal or ioc.external):
            return
        self.server.stats["ca_answers"] += len(cids)
        for cid in cids:
            self.output.queue(ca.search_reply_tcp(endpoint.ip, endpoint.port, cid))


class CaUdp(_UdpListener):
    """CA unicast searches (EPICS_CA_ADDR_LIST)."""

    answers = "ca_answers"

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        server = self.server
        try:
            sequence, searches, ignored = ca.parse_datagram(data)
        except Exception as exc:  # iter_datagram is total; this is a safety net
            server.stats["bad_messages"] += 1
            rlog.warning(("ca-udp-bad", addr[0]), "CA UDP from %s: %s", addr[0], exc)
            return
        if ignored:
            server.stats["ignored_messages"] += ignored
        if not searches:
            return
        server.stats["ca_udp_searches"] += len(searches)
        internal = _is_internal(server.config.internal_networks, addr[0])
        resolver = server.resolver
        not_found: list[bytes] = []
        for search in searches:
            ioc = resolver.cached(CA, search.name)
            if ioc is None:
                ioc = server.lookup(CA, search.name, internal,
                                    lambda s=search: _UdpAsker(self, addr, s.cid, sequence),
                                    addr[0])
            if ioc is not None:
                self.answer(addr, sequence, ioc, search.cid, internal)
            elif search.reply and resolver.negative_hit(CA, search.name):
                not_found.append(ca.not_found(search))
        if not_found and self.transport is not None:
            for datagram in ca.pack_datagrams(sequence, not_found):
                self.transport.sendto(datagram, addr)

    def _item(self, ioc: IOC, cid: int) -> bytes | None:
        endpoint = ioc.ca
        return None if endpoint is None else ca.search_reply_udp(endpoint.ip, endpoint.port,
                                                                 cid)

    def _datagrams(self, ioc: IOC, sequence: int, items: list[Any]) -> list[bytes]:
        out = ca.pack_datagrams(sequence, items)
        self.server.stats["ca_udp_datagrams_out"] += len(out)
        return out


# ============================================================================ PVA
class PvaCircuit(_Circuit):
    """A client's TCP connection: pvxs's EPICS_PVA_NAME_SERVERS searches."""

    proto = PVA

    def __init__(self, server: NameServer) -> None:
        super().__init__(server)
        self.parser = pva.StreamParser(PVA_MAX_MESSAGE)
        self.validated = False

    def greeting(self) -> list[bytes]:
        return [pva.set_byte_order(True), pva.connection_validation_request(True)]

    def feed(self, data: bytes) -> None:
        for head, payload in self.parser.feed(data):
            self._message(head, payload)

    def _message(self, head: pva.Header, payload: bytes) -> None:
        if head.control:
            return  # byte order, markers: nothing to answer
        if head.segmented:
            raise pva.ProtocolError("segmented message (a name server needs none)")
        command = head.command
        if command == pva.SEARCH:
            self._search(pva.decode_search(payload, head.big_endian))
        elif command == pva.CONNECTION_VALIDATION:
            self.validated = True
            self.output.queue(pva.connection_validated(True))
        elif command == pva.ECHO:
            self.output.queue(pva.echo(payload[:1024], True))
        else:
            self.server.stats["ignored_messages"] += 1
            rlog.debug(("pva-cmd", command), "PVA client %s: ignored command %d",
                       self.output.peer, command)

    def _search(self, request: pva.SearchRequest) -> None:
        server = self.server
        server.stats["pva_tcp_searches"] += len(request.names)
        server.stats["bad_names"] += request.skipped
        if not request.tcp:
            return
        groups: dict[IOC, list[int]] = {}
        resolver = server.resolver
        seq = request.sequence
        for cid, name in request.names:
            ioc = resolver.cached(PVA, name)
            if ioc is None:
                ioc = server.lookup(PVA, name, self.output.internal,
                                    lambda c=cid: _TcpAsker(self, c, seq), self.output.host)
            if ioc is not None:
                groups.setdefault(ioc, []).append(cid)
        for ioc, cids in groups.items():
            self.answer(ioc, cids, seq)
        if not groups and request.must_reply:
            self.output.queue(pva.encode_search_response(
                _Guid.value, seq, None, server.config.pva_port, [], big_endian=True,
                found=False))

    def answer(self, ioc: IOC, cids: list[int], sequence: int) -> None:
        endpoint = ioc.pva
        if endpoint is None or not (self.output.internal or ioc.external):
            return
        self.server.stats["pva_answers"] += len(cids)
        for i in range(0, len(cids), PVA_CIDS_PER_TCP_RESPONSE):
            self.output.queue(pva.encode_search_response(
                ioc.guid, sequence, endpoint.host, endpoint.port,
                cids[i:i + PVA_CIDS_PER_TCP_RESPONSE], big_endian=True))


class PvaUdp(_UdpListener):
    """PVA unicast searches (EPICS_PVA_ADDR_LIST: pvAccessCPP clients, pvxs without
    name servers)."""

    answers = "pva_answers"

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        server = self.server
        for head, payload in pva.iter_datagram(data):
            if head.command != pva.SEARCH:
                server.stats["ignored_messages"] += 1
                continue
            try:
                request = pva.decode_search(payload, head.big_endian)
            except pva.ProtocolError as exc:
                server.stats["bad_messages"] += 1
                rlog.warning(("pva-udp-bad", addr[0]), "PVA UDP search from %s: %s",
                             addr[0], exc)
                continue
            self._search(request, addr)

    def _search(self, request: pva.SearchRequest, addr: tuple[str, int]) -> None:
        server = self.server
        server.stats["pva_udp_searches"] += len(request.names)
        server.stats["bad_names"] += request.skipped
        if not request.tcp or not request.reply_port:
            return
        # Replies go to the sender's address (never to another host named in the
        # payload: that would make us a reflector), at the port the client asked for.
        reply_to = (addr[0], request.reply_port)
        internal = _is_internal(server.config.internal_networks, addr[0])
        resolver = server.resolver
        seq = request.sequence
        answered = False
        for cid, name in request.names:
            ioc = resolver.cached(PVA, name)
            if ioc is None:
                ioc = server.lookup(PVA, name, internal,
                                    lambda c=cid: _UdpAsker(self, reply_to, c, seq), addr[0])
            if ioc is not None:
                answered = True
                self.answer(reply_to, seq, ioc, cid, internal)
        if not answered and request.must_reply and self.transport is not None:
            self.transport.sendto(pva.encode_search_response(
                _Guid.value, seq, None, server.config.pva_port, [], big_endian=True,
                found=False), reply_to)

    def _item(self, ioc: IOC, cid: int) -> int | None:
        return None if ioc.pva is None else cid

    def _datagrams(self, ioc: IOC, sequence: int, items: list[Any]) -> list[bytes]:
        endpoint = ioc.pva
        assert endpoint is not None
        out = [pva.encode_search_response(ioc.guid, sequence, endpoint.host, endpoint.port,
                                          items[i:i + PVA_CIDS_PER_DATAGRAM], big_endian=True)
               for i in range(0, len(items), PVA_CIDS_PER_DATAGRAM)]
        self.server.stats["pva_udp_datagrams_out"] += len(out)
        return out


# ============================================================================ server
class NameServer:
    """Table + resolver + prober + listeners."""

    def __init__(self, config: ServerConfig, table: Table | None = None) -> None:
        self.config = config
        self.table = table if table is not None else Table()
        self.loop = asyncio.get_running_loop()
        self.prober = UdpProber(self.loop, self._probe_result, timeout=config.confirm_timeout)
        self.resolver = Resolver(self.table, self.prober, config.limits)
        self.circuits: dict[str, set[_Circuit]] = {CA: set(), PVA: set()}
        # per protocol, one client host a quarter of them; the descriptor limit is
        # shared by both protocols
        self.limits = {proto: CircuitLimit(config.max_circuits, f"{proto} circuits", 2)
                       for proto in (CA, PVA)}
        self.stats: dict[str, int] = dict.fromkeys(
            ("ca_udp_searches", "ca_tcp_searches", "pva_udp_searches", "pva_tcp_searches",
             "ca_answers", "pva_answers", "ca_udp_datagrams_out", "pva_udp_datagrams_out",
             "bad_messages", "bad_names", "ignored_messages", "answers_dropped",
             "outside_refused", "circuits_refused"),
            0)
        self._dirty: list[_Output | _UdpListener] = []
        self._flush_scheduled = False
        self._servers: list[asyncio.AbstractServer] = []
        self._udp: list[asyncio.BaseTransport] = []
        self._ticker: asyncio.Task[None] | None = None
        self.started = time.monotonic()
        self.bound: dict[str, list[tuple[str, int]]] = {}
        # Prometheus metrics: this server's figures, read when scraped (metrics.py)
        self.registry = CollectorRegistry()
        self.registry.register(Collected(lambda: families(self)))

    # ------------------------------------------------------------------ plumbing
    def _probe_result(self, proto: str, name: str, ioc: IOC, found: bool | None) -> None:
        self.resolver.probe_result(proto, name, ioc, found)
        self.schedule_flush()

    def lookup(self, proto: str, name: str, internal: bool, asker,  # type: ignore[no-untyped-def]
               client: str) -> IOC | None:
        """The answer for `client` (its address), or None (it is answered later if an
        IOC confirms the name). `asker` makes the waiting client only when needed."""
        ioc = self.resolver.resolve(proto, name, asker(), client)
        if ioc is not None and not internal and not ioc.external:
            self.stats["outside_refused"] += 1
            return None
        return ioc

    def mark(self, item: _Output | _UdpListener) -> None:
        self._dirty.append(item)
        self.schedule_flush()

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        for item in dirty:
            item.flush()

    async def _tick(self) -> None:
        next_stats = time.monotonic() + self.config.stats_interval
        while True:
            await asyncio.sleep(TICK)
            try:
                self.prober.tick()
                self.resolver.tick()
                self.flush()
                if time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + self.config.stats_interval
                    self.log_stats()
            except Exception:  # housekeeping must go on; say what broke, not too often
                rlog.log(logging.ERROR, "tick", "name server housekeeping failed",
                         exc_info=True)

    def snapshot(self) -> dict[str, int]:
        return {**self.stats, **self.resolver.stats, **self.resolver.sizes(),
                "iocs": len(self.table),
                "ca_circuits": len(self.circuits[CA]), "pva_circuits": len(self.circuits[PVA]),
                "probes_ca": self.prober.sent[CA], "probes_pva": self.prober.sent[PVA],
                "probe_datagrams": sum(self.prober.datagrams.values()),
                "probes_pending": len(self.prober.pending)}

    def log_stats(self) -> None:
        log.info("stats %s", " ".join(f"{k}={v}" for k, v in self.snapshot().items()))

    # ------------------------------------------------------------------ start/stop
    async def start(self) -> None:
        cfg = self.config
        await self.prober.start()
        for host in cfg.hosts:
            for proto, port, factory in ((CA, cfg.ca_port, CaCircuit),
                                         (PVA, cfg.pva_port, PvaCircuit)):
                server = await self.loop.create_server(
                    lambda f=factory: f(self), host, port, reuse_address=True, backlog=256)
                self._servers.append(server)
                self.bound.setdefault(f"{proto}-tcp", []).extend(
                    s.getsockname()[:2] for s in server.sockets)
            for proto, port, udp_factory in ((CA, cfg.ca_port, CaUdp),
                                             (PVA, cfg.pva_udp_port, PvaUdp)):
                transport, _ = await self.loop.create_datagram_endpoint(
                    lambda f=udp_factory: f(self), sock=bind_udp(host, port))
                self._udp.append(transport)
                self.bound.setdefault(f"{proto}-udp", []).append(
                    transport.get_extra_info("sockname")[:2])
        self._ticker = self.loop.create_task(self._tick())
        log.info("answering for %d IOC(s): CA on %s (TCP and UDP), PVA on TCP %s, UDP %s",
                 len(self.table), _fmt(self.bound.get("ca-tcp", [])),
                 _fmt(self.bound.get("pva-tcp", [])), _fmt(self.bound.get("pva-udp", [])))

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        for server in self._servers:
            server.close()
        for transport in self._udp:
            transport.close()
        for circuits in self.circuits.values():
            for circuit in list(circuits):
                circuit.output.close()
        self.prober.close()
        for server in self._servers:
            await server.wait_closed()
        await asyncio.sleep(0)


def _fmt(addrs: Iterable[tuple[str, int]]) -> str:
    return " ".join(f"{h}:{p}" for h, p in addrs) or "-"

