"""Confirmation searches: the name server asks an IOC by UDP unicast whether it has a name.

UDP search works for every server kind the operator runs (rsrv, caproto, pcas; QSRV2,
p4p, QSRV1, and the sidecar gateways), where TCP search does not (caproto's CA server
and classic PVA servers cannot answer it). The searches ask for a reply either way
(CA DO_REPLY, PVA "must reply"), so an IOC without the name says so at once and only a
silent IOC costs the timeout. Names asked of one IOC in the same loop iteration share
datagrams. Each IOC's answer is reported to the resolver; no answer after a few tries
counts as "does not have it".

Searches leave from a few sockets in turn. Where two processes share an IOC's UDP port
(in sidecar mode the IOC's own pvxs client listens on 5076 next to pvagw's server), the
kernel hands each datagram to one of them by a hash of the addresses and ports: from a
single source port every search would land on the same socket, perhaps the one that
never answers (measured: about half of all source ports). A retry leaves from another
source port, and the one an IOC last answered on is used first next time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import socket
from collections import deque
from collections.abc import Callable

from ..gateways.ca_upstream import enlarge_receive_buffer
from . import ca, pva
from .table import CA, IOC, PVA

__all__ = ["UdpProber"]

log = logging.getLogger("ioc_name_server.probe")

Result = Callable[[str, str, IOC, "bool | None"], None]  # proto, name, ioc, found
SOCKETS = 8  # per protocol, used in turn


class _Probe:
    __slots__ = ("cid", "due", "first", "ioc", "name", "proto", "tries")

    def __init__(self, proto: str, ioc: IOC, name: str, cid: int) -> None:
        self.proto = proto
        self.ioc = ioc
        self.name = name
        self.cid = cid
        self.tries = 0
        self.first = 0.0  # when first sent
        self.due = 0.0


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, int], None], index: int) -> None:
        self.on_datagram = on_datagram
        self.index = index
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.on_datagram(data, self.index)
        except Exception:  # an IOC's reply we cannot read must not stop the others
            log.exception("confirmation reply from %s:%d", *addr[:2])

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable: that IOC is not running; its probes time out.
        log.debug("confirmation socket: %s", exc)


class UdpProber:
    """Sends confirmation searches and reports answers to `on_result`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_result: Result, *,
                 timeout: float = 1.0, first_retry: float = 0.2, host: str = "0.0.0.0",
                 max_pending: int = 200_000) -> None:
        self.loop = loop
        self.on_result = on_result
        self.timeout = timeout
        self.first_retry = first_retry
        self.host = host
        self.max_pending = max_pending
        start = random.randrange(1 << 30)  # another replica's ids differ
        self._ids = itertools.count(start)
        self._seq = itertools.count(start)
        self.pending: dict[int, _Probe] = {}  # by cid (both protocols: ids never collide)
        self._pva_batches: dict[int, list[int]] = {}  # PVA search sequence -> its cids
        self._pva_sent: deque[tuple[float, int]] = deque()  # (when, sequence), to expire
        self._due: deque[_Probe] = deque()  # in send order, so deadlines are in order
        self._queue: dict[tuple[str, IOC], list[_Probe]] = {}
        self._flush_scheduled = False
        self._sockets: dict[str, list[_Socket]] = {CA: [], PVA: []}
        self._turn = itertools.count()
        self._answered_on: dict[tuple[str, IOC], int] = {}  # socket an IOC last answered
        self._answered_limit = 1024
        self.sent = {CA: 0, PVA: 0}  # names asked (each try counts)
        self.datagrams = {CA: 0, PVA: 0}
        self.dropped = 0

    async def start(self) -> None:
        for proto, handler in ((CA, self._ca_reply), (PVA, self._pva_reply)):
            for index in range(SOCKETS):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                enlarge_receive_buffer(sock)
                sock.bind((self.host, 0))
                sock.setblocking(False)
                _, protocol = await self.loop.create_datagram_endpoint(
                    lambda h=handler, i=index: _Socket(h, i), sock=sock)
                self._sockets[proto].append(protocol)  # type: ignore[arg-type]

    def close(self) -> None:
        for socks in self._sockets.values():
            for sock in socks:
                if sock.transport is not None:
                    sock.transport.close()

    # ------------------------------------------------------------------ sending
    def probe(self, proto: str, ioc: IOC, name: str) -> None:
        if len(self.pending) >= self.max_pending:
            self.dropped += 1
            self.on_result(proto, name, ioc, None)
            return
        probe = _Probe(proto, ioc, name, next(self._ids) & 0xFFFFFFFF)
        self.pending[probe.cid] = probe
        self._enqueue(probe)

    def _enqueue(self, probe: _Probe) -> None:
        self._queue.setdefault((probe.proto, probe.ioc), []).append(probe)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        queue, self._queue = self._queue, {}
        now = self.loop.time()
        for (proto, ioc), probes in queue.items():
            target = ioc.search_endpoint(proto)
            socks = self._sockets[proto]
            if target is None or not socks:
                continue
            probes = [p for p in probes if self.pending.get(p.cid) is p]
            if not probes:
                continue
            known = self._answered_on.get((proto, ioc))
            first = all(p.tries == 0 for p in probes)
            sock = socks[known if known is not None and first
                         else next(self._turn) % len(socks)]
            if sock.transport is None:
                continue
            for probe in probes:
                if probe.tries == 0:
                    probe.first = now
                probe.tries += 1
                gap = self.first_retry * (2 ** (probe.tries - 1))
                probe.due = min(now + gap, probe.first + self.timeout)
                self._due.append(probe)
            addr = (target.host, target.port)
            if proto == CA:
                requests = [ca.search_request(p.name, p.cid) for p in probes]
                datagrams = ca.confirmation_datagrams(next(self._seq) & 0xFFFFFFFF, requests)
            else:
                datagrams = self._pva_datagrams(probes, sock)
            for datagram in datagrams:
                sock.transport.sendto(datagram, addr)
            self.sent[proto] += len(probes)
            self.datagrams[proto] += len(datagrams)

    def _pva_datagrams(self, probes: list[_Probe], sock: _Socket) -> list[bytes]:
        assert sock.transport is not None
        port = sock.transport.get_extra_info("sockname")[1]
        out = []
        batch: list[_Probe] = []
        size = 64
        for probe in [*probes, None]:
            if probe is not None and size + 8 + len(probe.name) < pva.MAX_UDP:
                batch.append(probe)
                size += 8 + len(probe.name)
                continue
            if batch:
                seq = next(self._seq) & 0xFFFFFFFF
                self._pva_batches[seq] = [p.cid for p in batch]
                self._pva_sent.append((self.loop.time(), seq))
                out.append(pva.encode_search(seq, [(p.cid, p.name) for p in batch], port))
            batch, size = ([probe], 64 + 8 + len(probe.name)) if probe is not None else ([], 64)
        return out

    # ------------------------------------------------------------------ answers
    def _report(self, cid: int, found: bool | None, via: int | None = None) -> None:
        probe = self.pending.pop(cid, None)
        if probe is None:
            return
        if via is not None:
            self._answered_on[(probe.proto, probe.ioc)] = via
        self.on_result(probe.proto, probe.name, probe.ioc, found)

    def _ca_reply(self, data: bytes, via: int) -> None:
        for cid, found in ca.parse_confirmation(data):
            self._report(cid, found, via)

    def _pva_reply(self, data: bytes, via: int) -> None:
        for head, payload in pva.iter_datagram(data):
            if head.command != pva.SEARCH_RESPONSE:
                continue
            try:
                response = pva.decode_search_response(payload, head.big_endian)
            except pva.ProtocolError:
                continue
            found = set(response.cids) if response.found else set()
            for cid in found:
                self._report(cid, True, via)
            # "must reply": one response lists every name of the search it has.
            for cid in self._pva_batches.pop(response.sequence, ()):
                if cid not in found:
                    self._report(cid, False, via)

    # ------------------------------------------------------------------ timeouts
    def tick(self) -> None:
        now = self.loop.time()
        due = self._due
        while due and due[0].due <= now:
            probe = due.popleft()
            if self.pending.get(probe.cid) is not probe or probe.due > now:
                continue
            if now - probe.first >= self.timeout or not probe.ioc.live:
                self._report(probe.cid, None)
            else:
                self._enqueue(probe)  # the same cid: a late first answer still counts
        sent = self._pva_sent
        while sent and sent[0][0] < now - 2 * self.timeout:
            self._pva_batches.pop(sent.popleft()[1], None)  # its IOC never answered
        if len(self._answered_on) > self._answered_limit:  # forget IOCs that are gone
            self._answered_on = {k: v for k, v in self._answered_on.items() if k[1].live}
            self._answered_limit = max(1024, 2 * len(self._answered_on))
