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
from .ratelog import RateLimitedLog

if TYPE_CHECKING:
    from .ca_gateway import Gateway

__all__ = ["DownChannel", "DownCircuit", "SearchServer"]

log = logging.getLogger("ioc_ca_gateway.server")
rlog = RateLimitedLog(log)

MAX_UDP_REPLY = 1400  # bytes per search reply datagram (below a typical MTU)
WRITE_HIGH_WATER = 4 * 1024 * 1024  # bytes queued to a slow client before updates coalesce
# ... and requests from it wait; a client that still has this much queued (replies to
# reads it sent before) is not reading at all: its circuit is closed.
WRITE_HARD_LIMIT = 64 * 1024 * 1024
MAX_INFLIGHT = 256  # reads and put-callbacks of one circuit waiting for the IOC
MAX_SUBS_PER_CHANNEL = 256  # subscriptions of one client channel (a display's widgets)
MAX_NAME_TEXT = 256  # bytes kept of a client's host and user name
# Unfinished requests buffered for all client circuits together: a peer dribbling a
# large put must not make thousands of them add up.
MAX_BUFFERED = 256 * 1024 * 1024


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
    """One client TCP circuit.

    Flow control, as rsrv does it by blocking: while the client does not read its
    answers (asyncio's high-water mark), or has MAX_INFLIGHT reads and put-callbacks
    waiting for the IOC, or the IOC does not read ours, no further request of this
    client is handled and its socket is not read, so TCP pushes back on it; monitor
    updates then coalesce to the newest per subscription.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.transport: asyncio.Transport | None = None
        self.framer = w.StreamFramer(gateway.config.max_message_bytes)
        self.channels: dict[int, DownChannel] = {}  # by sid
        self.peer = "?"
        self.host = "?"
        self.port = 0  # the local port clients reached us on (search replies name it)
        self.client_version = 0
        self.host_name = ""
        self.user_name = ""
        self.closed = False
        self.hold = False  # monitor updates coalesce instead of being written
        self.inflight = 0  # requests relayed to the IOC, not answered yet
        self.subscriptions = 0
        self._counted = False  # holds a place in the gateway's circuit count
        self._paused = False
        self._events_off = False
        self._reading = True
        self._resume_scheduled = False
        self._held: dict[int, bytes] = {}  # subscription id -> latest update while held
        self._sids = itertools.count(1)
        self._out: list[bytes] = []
        self._dirty = False
        self._sock: trsock.TransportSocket | None = None

    # ------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        self.host = str(peer[0])
        refusal = self.gw.admit(self)
        if refusal:
            self.gw.count("circuits_refused")
            rlog.warning(("circuits", self.host), "client circuit from %s refused: %s",
                         self.peer, refusal)
            self.closed = True
            transport.close()
            return
        self._counted = True
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self.port = (transport.get_extra_info("sockname") or ("", 0))[1]
        log.info("client circuit from %s", self.peer)
        # Like rsrv, announce our version first: libca sends TCP searches to a name
        # server only after it has seen a version >= 12 on the circuit.
        self.queue(w.version_message())
        self.gw.flusher.flush()

    def data_received(self, data: bytes) -> None:
        self._feed(data)
        self.gw.flusher.flush()
        self._ack_at_once()

    def _feed(self, data: bytes) -> None:
        framer = self.framer
        before = framer.pending()
        try:
            framer.feed(data, self._on_message, self._stalled)
        except Exception as exc:
            self.gw.count("bad_messages")
            # A ValueError is the framer refusing bytes; anything else is our bug.
            rlog.log(logging.WARNING, ("bad", self.host), "client %s: %s; closing the "
                     "circuit", self.peer, exc, exc_info=not isinstance(exc, ValueError))
            self.close()
        self.gw.buffered += framer.pending() - before
        if self.gw.buffered > MAX_BUFFERED and framer.pending() and not self.closed:
            self.gw.count("circuits_closed")
            rlog.warning(("buffered", self.host), "client %s: %d bytes of unfinished "
                         "requests buffered for all clients; closing this one", self.peer,
                         self.gw.buffered)
            self.close()
        if self._stalled():
            self._set_reading(False)

    def _stalled(self) -> bool:
        """Whether requests must wait (see the class docstring)."""
        return (self.closed or self._paused or self.inflight >= MAX_INFLIGHT
                or self.gw.upstream.congested > 0)

    def _set_reading(self, reading: bool) -> None:
        if reading == self._reading or self.transport is None:
            return
        self._reading = reading
        with contextlib.suppress(RuntimeError):  # closing meanwhile
            if reading:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def resume_requests(self) -> None:
        """Something that stalled this circuit cleared: handle what waits, soon (not
        from inside the callback that cleared it)."""
        if not self._reading and not self._resume_scheduled and not self.closed:
            self._resume_scheduled = True
            self.gw.loop.call_soon(self._resume)

    def _resume(self) -> None:
        self._resume_scheduled = False
        if self.closed or self._stalled():
            return
        self._set_reading(True)
        self._feed(b"")  # the requests that waited in the framer
        self.gw.flusher.flush()

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
        if not self._counted:
            return
        self._counted = False
        self.gw.release(self)
        self.gw.buffered -= self.framer.pending()
        self.framer = w.StreamFramer(0)
        log.info("client circuit from %s closed (%d channel(s))", self.peer,
                 len(self.channels))
        for chan in list(self.channels.values()):
            self._drop_channel(chan)
        self.gw.channels -= len(self.channels)
        self.channels.clear()
        self._held.clear()
        self.gw.flusher.flush()

    def pause_writing(self) -> None:
        # The client reads slower than answers come: keep only the newest update per
        # subscription (what rsrv does for slow clients) instead of buffering all, and
        # leave its further requests in its socket.
        self._paused = True
        self.hold = True
        self._set_reading(False)

    def resume_writing(self) -> None:
        self._paused = False
        self._release()
        self.resume_requests()

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
        transport = self.transport
        if self._out and not self.closed and transport is not None:
            transport.writelines(self._out)
            if transport.get_write_buffer_size() > WRITE_HARD_LIMIT:
                self.gw.count("circuits_closed")
                rlog.warning(("slow", self.host), "client %s reads nothing: %d bytes "
                             "queued for it; closing its circuit", self.peer,
                             transport.get_write_buffer_size())
                self.close()
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

    def request_done(self) -> None:
        """A relayed read or put-callback was answered (or its IOC went away)."""
        self.inflight -= 1
        if self.inflight == MAX_INFLIGHT // 2:
            self.resume_requests()

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
            self._search(payload, p1, count, data_type)
        elif command == w.CREATE_CHAN:
            self._create(payload, p1)
        elif command == w.CLEAR_CHANNEL:
            self._clear(p1, p2)
        elif command == w.ECHO:
            self.queue(w.pack(w.ECHO, 0, 0, 0, 0))
        elif command == w.VERSION:
            self.client_version = count
        elif command == w.HOST_NAME:
            self.host_name = w.decode_name(payload[:MAX_NAME_TEXT])
        elif command == w.CLIENT_NAME:
            self.user_name = w.decode_name(payload[:MAX_NAME_TEXT])
        elif command == w.EVENTS_OFF:
            self._events_off = True
            self.hold = True
        elif command == w.EVENTS_ON:
            self._events_off = False
            self._release()
        elif command != w.READ_SYNC:  # READ_SYNC is obsolete: nothing to answer
            self.gw.count("ignored_messages")
            rlog.debug(("cmd", command), "client %s: ignored command %d", self.peer, command)

    # ------------------------------------------------------------ name service
    def _search(self, payload: bytes, cid: int, version: int, reply_flag: int) -> None:
        """A SEARCH over TCP (libca's EPICS_CA_NAME_SERVERS): answered on this circuit."""
        name = w.pv_name(payload)
        self.gw.tcp_searches += 1

        def answer(chan: UpstreamChannel | None) -> None:
            if self.closed:
                return
            if chan is not None:
                self.gw.search_answers += 1
                log.debug("TCP search %s from %s: found", name, self.peer)
                self.queue(w.search_reply_tcp(self.port, cid))
            elif reply_flag == w.DO_REPLY:
                self.queue(w.not_found(reply_flag, version, cid))

        if name is None:
            self.gw.count("bad_names")
            answer(None)
        elif not self.gw.pvlist.allowed(name):
            answer(None)
        elif self.gw.may_look_up(name, self.host):
            self.gw.upstream.lookup(name, answer, key=(self, cid), patient=True)

    # ------------------------------------------------------------ channels
    def _create(self, payload: bytes, cid: int) -> None:
        name = w.pv_name(payload)
        if name is None or not self.gw.pvlist.allowed(name):
            if name is None:
                self.gw.count("bad_names")
            log.info("client %s: %s denied by the pvlist", self.peer, name)
            self.queue(w.caproto_bytes(ca.CreateChFailResponse(cid)))
            return

        def created(upstream: UpstreamChannel | None) -> None:
            if self.closed:
                return
            if upstream is None:
                self.queue(w.caproto_bytes(ca.CreateChFailResponse(cid)))
                return
            if self.gw.channels >= self.gw.config.max_channels:
                self.gw.count("channels_refused")
                rlog.warning(("channels", self.host), "client %s: %d channels open "
                             "(-max_channels); refusing %s", self.peer, self.gw.channels,
                             name)
                self.queue(w.caproto_bytes(ca.CreateChFailResponse(cid)))
                return
            chan = DownChannel(self, next(self._sids) & 0xFFFFFFFF, cid, upstream)
            chan.access = self.gw.rights(upstream.access)
            self.channels[chan.sid] = chan
            self.gw.channels += 1
            self.gw.upstream.attach(upstream, chan)
            log.debug("client %s (%s@%s): channel %s", self.peer, self.user_name,
                      self.host_name, name)
            self.queue(w.pack(w.ACCESS_RIGHTS, 0, 0, cid, chan.access))
            self.queue(w.pack(w.CREATE_CHAN, upstream.native_type, upstream.native_count,
                              cid, chan.sid))

        if not self.gw.may_look_up(name, self.host) \
                or not self.gw.upstream.lookup(name, created, key=(self, "create", cid)):
            self.queue(w.caproto_bytes(ca.CreateChFailResponse(cid)))

    def _clear(self, sid: int, cid: int) -> None:
        chan = self.channels.pop(sid, None)
        if chan is not None:
            self.gw.channels -= 1
            self._drop_channel(chan)
        self.queue(w.pack(w.CLEAR_CHANNEL, 0, 0, sid, cid))

    def _drop_channel(self, chan: DownChannel) -> None:
        for subid, sub in chan.subs.items():
            self._held.pop(subid, None)
            sub.circuit.unsubscribe(sub, self, subid)
        self._forget_subs(chan)
        self.gw.upstream.detach(chan.upstream, chan)

    def _forget_subs(self, chan: DownChannel) -> None:
        self.subscriptions -= len(chan.subs)
        self.gw.subscriptions -= len(chan.subs)
        chan.subs.clear()

    def channel_lost(self, chan: DownChannel) -> None:
        """The IOC side went away: tell the client, which searches for the PV again."""
        if self.channels.pop(chan.sid, None) is None:
            return
        self.gw.channels -= 1
        for subid in chan.subs:
            self._held.pop(subid, None)
        self._forget_subs(chan)
        if not self.closed:
            self.queue(w.pack(w.SERVER_DISCONN, 0, 0, chan.cid, 0))

    def access_changed(self, chan: DownChannel) -> None:
        chan.access = self.gw.rights(chan.upstream.access)
        self.queue(w.pack(w.ACCESS_RIGHTS, 0, 0, chan.cid, chan.access))

    def _channel(self, command: int, data_type: int, count: int, sid: int, ident: int,
                 size: int = 0) -> DownChannel | None:
        """The channel a request names, if it exists and the type is a DBR type (an
        IOC is never asked for a type that does not exist); else the client is told."""
        chan = self.channels.get(sid)
        if chan is None or data_type not in w.DBR_TYPES:
            header = w.request_header(command, data_type, count, sid, ident, size)
            if chan is None:
                self.queue(w.error_message(header, 0, w.ECA_BADCHID, "bad channel id"))
            else:
                self.queue(w.error_message(header, chan.cid, w.ECA_BADTYPE,
                                           "bad DBR type"))
            return None
        return chan

    # ------------------------------------------------------------ data
    def _read(self, command: int, data_type: int, count: int, sid: int, ioid: int) -> None:
        chan = self._channel(command, data_type, count, sid, ioid)
        if chan is None:
            return
        upstream = chan.upstream
        assert upstream.circuit is not None
        header = w.request_header(command, data_type, count, sid, ioid)
        self.inflight += 1
        upstream.circuit.read(upstream, data_type, count, self, ioid, chan.cid, sid, header,
                              command)

    def _write(self, command: int, data_type: int, count: int, sid: int, ioid: int,
               payload: bytes) -> None:
        chan = self._channel(command, data_type, count, sid, ioid, len(payload))
        if chan is None:
            return
        if len(payload) < w.dbr_size(data_type, count):
            # A short payload would reach the IOC as a malformed message, and an IOC
            # may close the circuit it came on: every client's channels (caproto does).
            self.gw.count("bad_messages")
            header = w.request_header(command, data_type, count, sid, ioid, len(payload))
            self.queue(w.error_message(header, chan.cid, w.ECA_BADCOUNT,
                                       "payload shorter than its type and count need"))
            return
        if not chan.access & w.ACCESS_WRITE:
            self.gw.count("puts_refused")
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
        notify = command == w.WRITE_NOTIFY
        if notify:
            self.inflight += 1
        upstream.circuit.write(upstream, data_type, count, payload, self if notify else None,
                               ioid, chan.cid, sid, header)

    def _subscribe(self, data_type: int, count: int, sid: int, subid: int,
                   request: bytes) -> None:
        chan = self._channel(w.EVENT_ADD, data_type, count, sid, subid, len(request))
        if chan is None:
            return
        old = chan.subs.pop(subid, None)
        upstream = chan.upstream
        assert upstream.circuit is not None
        if old is not None:  # a client re-using a subscription id replaces it
            self.subscriptions -= 1
            self.gw.subscriptions -= 1
            upstream.circuit.unsubscribe(old, self, subid)
        refusal = ""
        if len(chan.subs) >= MAX_SUBS_PER_CHANNEL:
            refusal = f"{len(chan.subs)} subscriptions on this channel"
        elif self.gw.subscriptions >= self.gw.config.max_subscriptions:
            refusal = f"{self.gw.subscriptions} subscriptions in all (-max_subscriptions)"
        if refusal:
            self.gw.count("subscriptions_refused")
            rlog.warning(("subs", self.host), "client %s: %s; refusing one on %s", self.peer,
                         refusal, upstream.name)
            header = w.request_header(w.EVENT_ADD, data_type, count, sid, subid, len(request))
            self.queue(w.error_message(header, chan.cid, w.ECA_ALLOCMEM, refusal))
            return
        # Only the 16 bytes the request has (a longer payload is not passed to the IOC).
        request = request[:w.EVENT_REQUEST_SIZE].ljust(w.EVENT_REQUEST_SIZE, b"\0")
        chan.subs[subid] = upstream.circuit.subscribe(upstream, data_type, count, request,
                                                      self, subid, chan.cid, sid)
        self.subscriptions += 1
        self.gw.subscriptions += 1

    def _unsubscribe(self, data_type: int, count: int, sid: int, subid: int) -> None:
        chan = self.channels.get(sid)
        sub = chan.subs.pop(subid, None) if chan is not None else None
        if chan is None or sub is None:
            header = w.request_header(w.EVENT_CANCEL, data_type, count, sid, subid)
            self.queue(w.error_message(header, chan.cid if chan else 0,
                                       w.ECA_BADMONID, "bad monitor id"))
            return
        self.subscriptions -= 1
        self.gw.subscriptions -= 1
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
        if not self.gw.datagram_budget.take(addr[0]):
            # A flood: dropped before any parsing, so the socket's backlog drains and
            # other clients' searches do not wait behind it.
            self.gw.count("datagrams_dropped")
            rlog.warning(("flood", addr[0]), "search datagrams from %s dropped: more than "
                         "%d per second", addr[0], self.gw.datagram_budget.rate)
            return
        sequence = 0
        replies: list[bytes] = []
        for command, _type, count, p1, _p2, payload in w.iter_datagram(data):
            if command == w.VERSION:
                sequence = p1  # CA >= 4.11 numbers its search datagrams here
            elif command == w.SEARCH and count >= 4:  # older clients cannot use CA 4.13
                self._search(payload, p1, addr, sequence, replies)
            else:
                self.gw.count("ignored_messages")
        if replies:
            self._send(addr, sequence, replies)
        self.gw.flusher.flush()

    def _search(self, payload: bytes, cid: int, addr: tuple[str, int], sequence: int,
                replies: list[bytes]) -> None:
        name = w.pv_name(payload)
        self.gw.udp_searches += 1
        if name is None:
            self.gw.count("bad_names")
            return
        if not self.gw.pvlist.allowed(name):
            return
        if self.gw.upstream.known(name) is not None:  # cached: answer in this datagram
            self.gw.search_answers += 1
            replies.append(w.search_reply_udp(self.port, cid))
            return
        if not self.gw.may_look_up(name, addr[0]):
            return

        def answer(chan: UpstreamChannel | None) -> None:
            if chan is not None:
                self.gw.search_answers += 1
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

