"""The gateway's server side: CA clients connect here (UDP search and TCP circuits).

Unlike caproto's own server, a circuit here accepts SEARCH messages over TCP and answers
them on the same circuit the way rsrv's ``search_reply_tcp`` does, which is what libca
(CA >= 4.12) sends to the hosts in ``EPICS_CA_NAME_SERVERS``. Every search, over UDP or
TCP, is answered only once the IOC behind the gateway has the PV.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from asyncio import trsock
from typing import TYPE_CHECKING

import caproto as ca

from . import ca_wire as w
from .ca_upstream import UpstreamChannel, UpstreamSub, enlarge_receive_buffer

if TYPE_CHECKING:
    from .ca_gateway import Gateway

__all__ = ["DownChannel", "DownCircuit", "SearchServer"]

log = logging.getLogger("ioc_ca_gateway.server")

MAX_UDP_REPLY = 1400  # bytes per search reply datagram (below a typical MTU)
WRITE_HIGH_WATER = 4 * 1024 * 1024  # bytes queued to a slow client before updates coalesce


class DownChannel:
    """A client's channel on a circuit, bound to the shared upstream channel."""

    __slots__ = ("access", "cid", "circuit", "sid", "subs", "upstream")

    def __init__(self, circuit: DownCircuit, sid: int, cid: int,
                 upstream: UpstreamChannel) -> None:
        self.circuit = circuit
        self.sid = sid
        self.cid = cid
        self.upstream = upstream
        self.access = 0
        self.subs: dict[int, UpstreamSub] = {}  # downstream subscription id -> monitor


class DownCircuit(asyncio.Protocol):
    """One client TCP circuit."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.transport: asyncio.Transport | None = None
        self.framer = w.StreamFramer()
        self.channels: dict[int, DownChannel] = {}  # by sid
        self.peer = "?"
        self.port = 0  # the local port clients reached us on (search replies name it)
        self.client_version = 0
        self.host_name = ""
        self.user_name = ""
        self.closed = False
        self.hold = False  # monitor updates coalesce instead of being written
        self._paused = False
        self._events_off = False
        self._held: dict[int, bytes] = {}  # subscription id -> latest update while held
        self._sids = itertools.count(1)
        self._out: list[bytes] = []
        self._dirty = False
        self._sock: trsock.TransportSocket | None = None

    # ------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        self.port = (transport.get_extra_info("sockname") or ("", 0))[1]
        self.gw.circuits.add(self)
        log.info("client circuit from %s", self.peer)
        # Like rsrv, announce our version first: libca sends TCP searches to a name
        # server only after it has seen a version >= 12 on the circuit.
        self.queue(w.version_message())
        self.gw.flusher.flush()

    def data_received(self, data: bytes) -> None:
        try:
            self.framer.feed(data, self._on_message)
        except Exception:
            log.exception("client %s: bad message; closing the circuit", self.peer)
            self.close()
        self.gw.flusher.flush()
        self._ack_at_once()

    def _ack_at_once(self) -> None:
        # Having just answered, the kernel treats the circuit as interactive and holds
        # back ACKs for the client's next requests until we answer those too. A client
        # that writes a burst on a non-blocking socket without waiting (caproto's
        # threading client: one create-channel write per search reply datagram) then
        # finds its send buffer full whenever this loop is busy, and loses the rest of
        # its channels (docs/ca-gateway.md, "Search replies").
        if self._sock is not None and not self.closed:
            with contextlib.suppress(OSError):  # reset by the peer meanwhile
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gw.circuits.discard(self)
        log.info("client circuit from %s closed (%d channel(s))", self.peer,
                 len(self.channels))
        for chan in list(self.channels.values()):
            self._drop_channel(chan)
        self.channels.clear()
        self._held.clear()
        self.gw.flusher.flush()

    def pause_writing(self) -> None:
        # The client reads slower than updates arrive: keep only the newest update per
        # subscription (what rsrv does for slow clients) instead of buffering all.
        self._paused = True
        self.hold = True

    def resume_writing(self) -> None:
        self._paused = False
        self._release()

    # ------------------------------------------------------------ output
    def queue(self, message: bytes) -> None:
        self._out.append(message)
        if not self._dirty:
            self._dirty = True
            self.gw.flusher.mark(self)

    def queue_event(self, subid: int, message: bytes) -> None:
        """A monitor update: written, or held as the latest one while flow-controlled."""
        if self.hold:
            self._held[subid] = message
            return
        self._out.append(message)
        if not self._dirty:
            self._dirty = True
            self.gw.flusher.mark(self)

    def flush(self) -> None:
        self._dirty = False
        if self._out and not self.closed and self.transport is not None:
            self.transport.writelines(self._out)
        self._out = []

    def _release(self) -> None:
        self.hold = self._paused or self._events_off
        if not self.hold and self._held:
            held, self._held = self._held, {}
            for message in held.values():
                self.queue(message)

    def close(self) -> None:
        self.closed = True  # from now on nothing is queued or answered
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------ dispatch
    def _on_message(self, command: int, data_type: int, count: int, p1: int, p2: int,
                    payload: bytes) -> None:
        if command == w.READ_NOTIFY or command == w.READ:
            self._read(command, data_type, count, p1, p2)
        elif command == w.EVENT_ADD:
            self._subscribe(data_type, count, p1, p2, payload)
        elif command == w.WRITE_NOTIFY or command == w.WRITE:
            self._write(command, data_type, count, p1, p2, payload)
        elif command == w.EVENT_CANCEL:
            self._unsubscribe(data_type, count, p1, p2)
        elif command == w.SEARCH:
            self._search(w.decode_name(payload), p1, count, data_type)
        elif command == w.CREATE_CHAN:
            self._create(w.decode_name(payload), p1)
        elif command == w.CLEAR_CHANNEL:
            self._clear(p1, p2)
        elif command == w.ECHO:
            self.queue(w.pack(w.ECHO, 0, 0, 0, 0))
        elif command == w.VERSION:
            self.client_version = count
        elif command == w.HOST_NAME:
            self.host_name = w.decode_name(payload)
        elif command == w.CLIENT_NAME:
            self.user_name = w.decode_name(payload)
        elif command == w.EVENTS_OFF:
            self._events_off = True
            self.hold = True
        elif command == w.EVENTS_ON:
            self._events_off = False
            self._release()
        elif command != w.READ_SYNC:  # READ_SYNC is obsolete: nothing to answer
            log.debug("client %s: ignored command %d", self.peer, command)

    # ------------------------------------------------------------ name service
    def _search(self, name: str, cid: int, version: int, reply_flag: int) -> None:
        """A SEARCH over TCP (libca's EPICS_CA_NAME_SERVERS): answered on this circuit."""

        def answer(chan: UpstreamChannel | None) -> None:
            if self.closed:
                return
            if chan is not None:
                log.debug("TCP search %s from %s: found", name, self.peer)
                self.queue(w.search_reply_tcp(self.port, cid))
            elif reply_flag == w.DO_REPLY:
                self.queue(w.not_found(reply_flag, version, cid))

        if not self.gw.pvlist.allowed(name):
            answer(None)
            return
        self.gw.upstream.lookup(name, answer, key=(self, cid), patient=True)

    # ------------------------------------------------------------ channels
    def _create(self, name: str, cid: int) -> None:
        if not self.gw.pvlist.allowed(name):
            log.info("client %s: %s denied by the pvlist", self.peer, name)
            self.queue(w.caproto_bytes(ca.CreateChFailResponse(cid)))
            return

        def created(upstream: UpstreamChannel | None) -> None:
            if self.closed:
                return
            if upstream is None:
                self.queue(w.caproto_bytes(ca.CreateChFailResponse(cid)))
                return
            chan = DownChannel(self, next(self._sids) & 0xFFFFFFFF, cid, upstream)
            chan.access = self.gw.rights(upstream.access)
            self.channels[chan.sid] = chan
            self.gw.upstream.attach(upstream, chan)
            log.debug("client %s (%s@%s): channel %s", self.peer, self.user_name,
                      self.host_name, name)
            self.queue(w.pack(w.ACCESS_RIGHTS, 0, 0, cid, chan.access))
            self.queue(w.pack(w.CREATE_CHAN, upstream.native_type, upstream.native_count,
                              cid, chan.sid))

        self.gw.upstream.lookup(name, created)

    def _clear(self, sid: int, cid: int) -> None:
        chan = self.channels.pop(sid, None)
        if chan is not None:
            self._drop_channel(chan)
        self.queue(w.pack(w.CLEAR_CHANNEL, 0, 0, sid, cid))

    def _drop_channel(self, chan: DownChannel) -> None:
        for subid, sub in chan.subs.items():
            sub.circuit.unsubscribe(sub, self, subid)
        chan.subs.clear()
        self.gw.upstream.detach(chan.upstream, chan)

    def channel_lost(self, chan: DownChannel) -> None:
        """The IOC side went away: tell the client, which searches for the PV again."""
        if self.channels.pop(chan.sid, None) is None or self.closed:
            return
        for subid in chan.subs:
            self._held.pop(subid, None)
        chan.subs.clear()
        self.queue(w.pack(w.SERVER_DISCONN, 0, 0, chan.cid, 0))

    def access_changed(self, chan: DownChannel) -> None:
        chan.access = self.gw.rights(chan.upstream.access)
        self.queue(w.pack(w.ACCESS_RIGHTS, 0, 0, chan.cid, chan.access))

    def _channel(self, command: int, data_type: int, count: int, sid: int, ident: int,
                 size: int = 0) -> DownChannel | None:
        chan = self.channels.get(sid)
        if chan is None:
            header = w.request_header(command, data_type, count, sid, ident, size)
            self.queue(w.error_message(header, 0, w.ECA_BADCHID, "bad channel id"))
        return chan

    # ------------------------------------------------------------ data
    def _read(self, command: int, data_type: int, count: int, sid: int, ioid: int) -> None:
        chan = self._channel(command, data_type, count, sid, ioid)
        if chan is None:
            return
        upstream = chan.upstream
        assert upstream.circuit is not None
        header = w.request_header(command, data_type, count, sid, ioid)
        upstream.circuit.read(upstream, data_type, count, self, ioid, chan.cid, sid, header,
                              command)

    def _write(self, command: int, data_type: int, count: int, sid: int, ioid: int,
               payload: bytes) -> None:
        chan = self._channel(command, data_type, count, sid, ioid, len(payload))
        if chan is None:
            return
        if not chan.access & w.ACCESS_WRITE:
            if command == w.WRITE_NOTIFY:  # as rsrv's putNotifyErrorReply
                self.queue(w.pack(w.WRITE_NOTIFY, data_type, count, w.ECA_NOWTACCESS, ioid))
            else:
                header = w.request_header(command, data_type, count, sid, ioid, len(payload))
                self.queue(w.error_message(header, chan.cid, w.ECA_NOWTACCESS,
                                           "no write access (gateway)"))
            return
        upstream = chan.upstream
        assert upstream.circuit is not None
        header = w.request_header(command, data_type, count, sid, ioid, len(payload))
        upstream.circuit.write(upstream, data_type, count, payload,
                               self if command == w.WRITE_NOTIFY else None, ioid, chan.cid,
                               sid, header)

    def _subscribe(self, data_type: int, count: int, sid: int, subid: int,
                   request: bytes) -> None:
        chan = self._channel(w.EVENT_ADD, data_type, count, sid, subid, len(request))
        if chan is None:
            return
        old = chan.subs.pop(subid, None)
        upstream = chan.upstream
        assert upstream.circuit is not None
        if old is not None:  # a client re-using a subscription id replaces it
            upstream.circuit.unsubscribe(old, self, subid)
        chan.subs[subid] = upstream.circuit.subscribe(upstream, data_type, count, request,
                                                      self, subid, chan.cid, sid)

    def _unsubscribe(self, data_type: int, count: int, sid: int, subid: int) -> None:
        chan = self.channels.get(sid)
        sub = chan.subs.pop(subid, None) if chan is not None else None
        if chan is None or sub is None:
            header = w.request_header(w.EVENT_CANCEL, data_type, count, sid, subid)
            self.queue(w.error_message(header, chan.cid if chan else 0,
                                       w.ECA_BADMONID, "bad monitor id"))
            return
        self._held.pop(subid, None)
        sub.circuit.unsubscribe(sub, self, subid)
        # The confirmation echoes the subscription's own header (rsrv event_cancel_reply).
        self.queue(w.pack(w.EVENT_ADD, sub.data_type, sub.count, sid, subid))


class SearchServer(asyncio.DatagramProtocol):
    """UDP name resolution on one interface: answers only names the IOC has."""

    def __init__(self, gateway: Gateway, port: int) -> None:
        self.gw = gateway
        self.port = port  # our TCP port, named in every reply
        self.transport: asyncio.DatagramTransport | None = None
        # Answers that waited for the IOC, per (client address, its datagram's sequence
        # number), sent at the next flush: one datagram per client datagram, as rsrv
        # answers. One datagram per name made caproto's threading client send one
        # create-channel write per name, which a small socket buffer cannot take
        # (see docs/ca-gateway.md, "Search replies").
        self._answers: dict[tuple[tuple[str, int], int], list[bytes]] = {}
        self._dirty = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        log.debug("search socket: %s", exc)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        sequence = 0
        replies: list[bytes] = []
        for command, _type, count, p1, _p2, payload in w.iter_datagram(data):
            if command == w.VERSION:
                sequence = p1  # CA >= 4.11 numbers its search datagrams here
            elif command == w.SEARCH and count >= 4:  # older clients cannot use CA 4.13
                self._search(w.decode_name(payload), p1, addr, sequence, replies)
        if replies:
            self._send(addr, sequence, replies)
        self.gw.flusher.flush()

    def _search(self, name: str, cid: int, addr: tuple[str, int], sequence: int,
                replies: list[bytes]) -> None:
        if not self.gw.pvlist.allowed(name):
            return
        if self.gw.upstream.known(name) is not None:  # cached: answer in this datagram
            replies.append(w.search_reply_udp(self.port, cid))
            return

        def answer(chan: UpstreamChannel | None) -> None:
            if chan is not None:
                log.debug("UDP search %s from %s:%d: found", name, *addr)
                self._answers.setdefault((addr, sequence), []).append(
                    w.search_reply_udp(self.port, cid))
                if not self._dirty:
                    self._dirty = True
                    self.gw.flusher.mark(self)

        self.gw.upstream.lookup(name, answer, key=(addr, cid), patient=True)

    def flush(self) -> None:
        """Send the answers collected since the last flush, packed per client datagram."""
        self._dirty = False
        answers, self._answers = self._answers, {}
        for (addr, sequence), replies in answers.items():
            self._send(addr, sequence, replies)

    def _send(self, addr: tuple[str, int], sequence: int, replies: list[bytes]) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        version = w.version_message(0, sequence)
        datagram = version
        for reply in replies:
            if len(datagram) + len(reply) > MAX_UDP_REPLY:
                self.transport.sendto(datagram, addr)
                datagram = version
            datagram += reply
        self.transport.sendto(datagram, addr)


def bind_udp(host: str, port: int) -> socket.socket:
    """A UDP socket on (host, port), exclusively: sharing the port with SO_REUSEPORT
    would make unicast searches land on one socket or the other at random."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    enlarge_receive_buffer(sock)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock

