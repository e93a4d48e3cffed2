"""The gateway's client side: finds PVs on the IOC(s) behind it and relays traffic.

One `UpstreamChannel` per PV name, shared by every downstream channel of that name;
one `UpstreamSub` per distinct (type, count, mask) monitor of a PV, fanned out to every
downstream subscription that asked for the same thing (so N clients of a PV cost the
IOC one subscription). Channels nobody downstream uses for ``inactive_timeout`` seconds
are cleared on the IOC; names the IOC does not know are remembered for ``dead_timeout``
seconds so that repeated searches for them do not each cost an upstream search; names in
use when their IOC went away are searched for ``disconnect_timeout`` seconds.

Searches go by UDP unicast to the configured addresses only (never broadcast).
"""

from __future__ import annotations

import asyncio
import enum
import getpass
import heapq
import itertools
import logging
import math
import socket
import struct
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Protocol

import caproto as ca

from . import ca_wire as w
from .ratelog import RateLimitedLog

if TYPE_CHECKING:
    from .ca_downstream import DownChannel, DownCircuit

__all__ = ["Flusher", "State", "Upstream", "UpstreamChannel", "UpstreamCircuit", "UpstreamSub"]

log = logging.getLogger("ioc_ca_gateway.upstream")
rlog = RateLimitedLog(log)

SEARCH_FIRST_RETRY = 0.05  # s; doubles on every retry ...
SEARCH_MAX_RETRY = 1.0  # ... up to this: a returning IOC is noticed within a second
SEARCH_TICK = 0.025  # s; resolution of search retries and deadlines
MAX_WAITERS = 1024  # pending answers per name (a search storm must not grow memory) ...
MAX_WAITERS_TOTAL = 100_000  # ... and for all names together (~300 bytes each)
MAX_DEAD = 100_000  # names remembered as not on the IOC (the oldest go first)
UPSTREAM_HIGH_WATER = 4 * 1024 * 1024  # bytes queued to the IOC before clients wait
SEARCH_DATAGRAM_BYTES = 1024  # like libca: small enough never to fragment
SEARCH_BURST_DATAGRAMS = 32  # datagrams sent back to back, then ...
SEARCH_BURST_PAUSE = 0.005  # ... a pause (s): about 200 000 names/s at most
UDP_BUFFER_BYTES = 4 * 1024 * 1024  # asked for; the kernel caps it (net.core.rmem_max)

LookupCallback = Callable[["UpstreamChannel | None"], None]


class State(enum.Enum):
    SEARCHING = "searching"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


class Flushable(Protocol):
    def flush(self) -> None: ...


class Flusher:
    """Collects circuits with queued output and writes each once per batch.

    Every entry point (data received, datagram, timer) ends with `flush()`, so one
    upstream chunk of 100 monitor updates becomes one write per downstream client, not
    100. `mark` also schedules a flush as a safety net for paths that do not end in one.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.dirty: list[Flushable] = []
        self._scheduled = False

    def mark(self, circuit: Flushable) -> None:
        self.dirty.append(circuit)
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self.dirty = self.dirty, []
        for circuit in dirty:
            circuit.flush()


class UpstreamSub:
    """One monitor on the IOC, shared by downstream subscriptions with the same request."""

    __slots__ = ("channel", "circuit", "count", "data_type", "key", "last", "listeners",
                 "subid")

    def __init__(self, channel: UpstreamChannel, circuit: UpstreamCircuit, subid: int,
                 key: tuple[int, int, int]) -> None:
        self.channel = channel
        self.circuit = circuit
        self.subid = subid
        self.key = key
        self.data_type, self.count, _mask = key
        # (downstream circuit, downstream subscription id) -> (downstream cid, sid)
        self.listeners: dict[tuple[DownCircuit, int], tuple[int, int]] = {}
        self.last: tuple[int, int, int, bytes] | None = None  # type, count, status, payload


class _Waiter:
    """Someone waiting for a lookup: a search to answer or a channel to create."""

    __slots__ = ("callback", "deadline")

    def __init__(self, callback: LookupCallback, deadline: float) -> None:
        self.callback = callback
        self.deadline = deadline


class UpstreamChannel:
    """A PV on the IOC; connected while any downstream channel might want it."""

    __slots__ = (
        "access",
        "cid",
        "circuit",
        "give_up_at",
        "idle_since",
        "name",
        "native_count",
        "native_type",
        "next_action",
        "next_search",
        "persistent",
        "phase_deadline",
        "refused_by",
        "retry",
        "search_message",
        "sid",
        "state",
        "subs",
        "users",
        "waiter_due",
        "waiters",
    )

    def __init__(self, name: str, cid: int, give_up_at: float) -> None:
        self.name = name
        self.cid = cid
        self.state = State.SEARCHING
        self.circuit: UpstreamCircuit | None = None
        self.sid = 0
        self.native_type = 0
        self.native_count = 0
        self.access = 0
        self.users: set[DownChannel] = set()
        self.subs: dict[tuple[int, int, int], UpstreamSub] = {}
        self.waiters: dict[Hashable, _Waiter] = {}
        self.idle_since = time.monotonic()
        # While unresolved: when to search next, when the current connect attempt and the
        # whole lookup give up, when the first waiter expires, and the earliest of these.
        self.next_search = 0.0
        self.retry = SEARCH_FIRST_RETRY
        self.phase_deadline = math.inf
        self.give_up_at = give_up_at
        self.waiter_due = math.inf
        self.next_action = 0.0
        # DO_REPLY: an IOC without the name says so at once (rsrv, caproto and pcas do),
        # so a lookup of a name it lacks takes one round trip, not connect_timeout of
        # retries (a storm of unknown names cost the IOC five searches each).
        self.search_message = w.search_request(name, cid, w.DO_REPLY)
        self.refused_by: set[tuple[str, int]] = set()  # upstream servers that said no
        self.persistent = False  # looked for again after its IOC went: NOT_FOUND waits

    def __repr__(self) -> str:
        return f"<UpstreamChannel {self.name} {self.state.value}>"


class _Pending:
    """A downstream read or write waiting for the IOC's answer."""

    __slots__ = ("cid", "command", "down", "header", "ioid", "sid")

    def __init__(self, down: DownCircuit, command: int, ioid: int, cid: int, sid: int,
                 header: bytes) -> None:
        self.down = down
        self.command = command  # the reply's command (READ_NOTIFY, WRITE_NOTIFY or READ)
        self.ioid = ioid
        self.cid = cid
        self.sid = sid
        self.header = header  # the downstream request's header, echoed in errors


class UpstreamCircuit(asyncio.Protocol):
    """A TCP circuit to one IOC (one per server address)."""

    def __init__(self, hub: Upstream, address: tuple[str, int]) -> None:
        self.hub = hub
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.framer = w.StreamFramer()
        self.version = 0
        self.channels: dict[int, UpstreamChannel] = {}  # by gateway cid
        self.subs: dict[int, UpstreamSub] = {}
        self.pending: dict[int, _Pending] = {}
        self.to_create: list[UpstreamChannel] = []
        self.idle_since = time.monotonic()
        self.closed = False
        self.congested = False
        self._ids = itertools.count(1)
        self._out: list[bytes] = []
        self._dirty = False

    # ------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=UPSTREAM_HIGH_WATER)  # type: ignore[attr-defined]
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small requests must not wait for Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        log.info("upstream circuit to %s:%d connected", *self.address)
        self.queue(w.caproto_bytes(ca.VersionRequest(0, w.CA_MINOR_VERSION)))
        self.queue(w.caproto_bytes(ca.HostNameRequest(self.hub.host_name)))
        self.queue(w.caproto_bytes(ca.ClientNameRequest(self.hub.user_name)))
        for chan in self.to_create:
            self._send_create(chan)
        self.to_create.clear()
        self.hub.flusher.flush()

    def data_received(self, data: bytes) -> None:
        try:
            self.framer.feed(data, self._on_message)
        except Exception:
            log.exception("upstream circuit %s:%d: bad message; closing", *self.address)
            self.close()
        self.hub.flusher.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.resume_writing()
        self.hub.circuit_lost(self, exc)
        self.hub.flusher.flush()

    def pause_writing(self) -> None:
        # The IOC reads slower than clients send: their requests wait (DownCircuit).
        if not self.congested:
            self.congested = True
            self.hub.congested += 1

    def resume_writing(self) -> None:
        if self.congested:
            self.congested = False
            self.hub.congested -= 1
            if not self.hub.congested:
                self.hub.on_uncongested()

    # ------------------------------------------------------------ output
    def queue(self, message: bytes) -> None:
        self._out.append(message)
        if not self._dirty:
            self._dirty = True
            self.hub.flusher.mark(self)

    def flush(self) -> None:
        self._dirty = False
        if self._out and self.transport is not None and not self.closed:
            self.transport.writelines(self._out)
        if self.transport is not None:
            self._out = []

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------ requests
    def create(self, chan: UpstreamChannel) -> None:
        self.channels[chan.cid] = chan
        chan.circuit = self
        if self.transport is None:
            self.to_create.append(chan)
        else:
            self._send_create(chan)

    def _send_create(self, chan: UpstreamChannel) -> None:
        self.queue(w.caproto_bytes(ca.CreateChanRequest(chan.name, chan.cid,
                                                        w.CA_MINOR_VERSION)))

    def clear(self, chan: UpstreamChannel) -> None:
        """Clear a channel on the IOC and forget it."""
        self.channels.pop(chan.cid, None)
        for sub in chan.subs.values():
            self.subs.pop(sub.subid, None)
        chan.subs.clear()
        if chan.state is State.CONNECTED and not self.closed:
            self.queue(w.caproto_bytes(ca.ClearChannelRequest(chan.sid, chan.cid)))
        if not self.channels:
            self.idle_since = time.monotonic()

    def _count(self, chan: UpstreamChannel, count: int) -> int:
        # count 0 means "the current length" since CA 4.13; older servers need a number.
        return count if count or self.version >= 13 else chan.native_count

    def read(self, chan: UpstreamChannel, data_type: int, count: int, down: DownCircuit,
             ioid: int, cid: int, sid: int, header: bytes, reply: int) -> None:
        upstream_ioid = next(self._ids) & 0xFFFFFFFF
        self.pending[upstream_ioid] = _Pending(down, reply, ioid, cid, sid, header)
        self.queue(w.pack(w.READ_NOTIFY, data_type, self._count(chan, count), chan.sid,
                          upstream_ioid))

    def write(self, chan: UpstreamChannel, data_type: int, count: int, payload: bytes,
              down: DownCircuit | None, ioid: int, cid: int, sid: int, header: bytes) -> None:
        """WRITE_NOTIFY when ``down`` waits for the completion, else a plain WRITE."""
        if down is None:
            self.queue(w.pack(w.WRITE, data_type, count, chan.sid, ioid, payload))
            return
        upstream_ioid = next(self._ids) & 0xFFFFFFFF
        self.pending[upstream_ioid] = _Pending(down, w.WRITE_NOTIFY, ioid, cid, sid, header)
        self.queue(w.pack(w.WRITE_NOTIFY, data_type, count, chan.sid, upstream_ioid, payload))

    def subscribe(self, chan: UpstreamChannel, data_type: int, count: int, request: bytes,
                  down: DownCircuit, subid: int, cid: int, sid: int) -> UpstreamSub:
        """Attach a downstream subscription to the matching upstream monitor (made on
        first use); a late joiner gets the cached latest update straight away."""
        mask = struct.unpack_from(">H", request, 12)[0] if len(request) >= 14 else 0
        key = (data_type, count, mask)
        sub = chan.subs.get(key)
        if sub is None:
            sub = UpstreamSub(chan, self, next(self._ids) & 0xFFFFFFFF, key)
            chan.subs[key] = sub
            self.subs[sub.subid] = sub
            self.queue(w.pack(w.EVENT_ADD, data_type, self._count(chan, count), chan.sid,
                              sub.subid, request))
        sub.listeners[(down, subid)] = (cid, sid)
        if sub.last is not None:
            dtype, dcount, status, payload = sub.last
            down.queue_event(subid, w.pack(w.EVENT_ADD, dtype, dcount, status, subid, payload))
        return sub

    def unsubscribe(self, sub: UpstreamSub, down: DownCircuit, subid: int) -> None:
        sub.listeners.pop((down, subid), None)
        if sub.listeners:
            return
        chan = sub.channel
        if chan.subs.get(sub.key) is sub:
            del chan.subs[sub.key]
        if self.subs.pop(sub.subid, None) is not None and chan.state is State.CONNECTED:
            self.queue(w.pack(w.EVENT_CANCEL, sub.data_type, sub.count, chan.sid, sub.subid))

    # ------------------------------------------------------------ responses
    def _on_message(self, command: int, data_type: int, count: int, p1: int, p2: int,
                    payload: bytes) -> None:
        if command == w.EVENT_ADD:  # the hot path: a monitor update to fan out
            sub = self.subs.get(p2)
            if sub is None:  # a cancel confirmation, or an update racing it
                return
            sub.last = (data_type, count, p1, payload)
            hub = self.hub
            hub.updates_in += 1
            hub.updates_out += len(sub.listeners)
            size = len(payload)
            if size < w.LARGE and count < w.LARGE:
                pack_header = w.pack_header
                for down, subid in sub.listeners:
                    down.queue_event(subid, pack_header(w.EVENT_ADD, size, data_type, count,
                                                        p1, subid) + payload)
            else:
                for down, subid in sub.listeners:
                    down.queue_event(subid, w.pack(w.EVENT_ADD, data_type, count, p1, subid,
                                                   payload))
        elif command in (w.READ_NOTIFY, w.WRITE_NOTIFY):
            pending = self.pending.pop(p2, None)
            if pending is not None:
                pending.down.request_done()
                if not pending.down.closed:
                    status = pending.sid if pending.command == w.READ else p1
                    pending.down.queue(w.pack(pending.command, data_type, count, status,
                                              pending.ioid, payload))
        elif command == w.CREATE_CHAN:
            self._created(p1, p2, data_type, count)
        elif command == w.ACCESS_RIGHTS:
            chan = self.channels.get(p1)
            if chan is not None:
                self.hub.access_changed(chan, p2)
        elif command in (w.CREATE_CH_FAIL, w.SERVER_DISCONN):
            chan = self.channels.get(p1)
            if chan is not None:
                log.info("IOC %s %s", "refused" if command == w.CREATE_CH_FAIL
                         else "disconnected", chan.name)
                self.hub.channel_lost(chan)
        elif command == w.ERROR:
            self._error(p1, p2, payload)
        elif command == w.VERSION:
            self.version = count
        elif command == w.ECHO:
            pass  # answer to our own echo; liveness is the TCP connection itself
        elif command != w.CLEAR_CHANNEL:
            log.debug("upstream %s:%d: ignored command %d", *self.address, command)

    def _created(self, cid: int, sid: int, data_type: int, count: int) -> None:
        chan = self.channels.get(cid)
        if chan is None or chan.state is not State.CONNECTING:
            # We gave up on it (deadline) before the IOC answered: do not leak it there.
            self.queue(w.caproto_bytes(ca.ClearChannelRequest(sid, cid)))
            return
        chan.sid, chan.native_type, chan.native_count = sid, data_type, count
        self.hub.channel_connected(chan)

    def _error(self, cid: int, status: int, payload: bytes) -> None:
        """Route an ERROR to the downstream request that caused it."""
        if len(payload) < w.HEADER_SIZE:
            return
        command, size, data_type, count, _sid, ident = w.unpack_header(payload, 0)
        offset = w.EXTENDED_SIZE if size == w.LARGE else w.HEADER_SIZE
        text = w.decode_name(payload[offset:])
        if command in (w.READ_NOTIFY, w.WRITE_NOTIFY):
            pending = self.pending.pop(ident, None)
            if pending is not None:
                pending.down.request_done()
                if not pending.down.closed:
                    pending.down.queue(w.error_message(pending.header, pending.cid, status,
                                                       text))
                return
        elif command == w.EVENT_ADD:
            sub = self.subs.get(ident)
            if sub is not None:
                for (down, subid), (down_cid, down_sid) in sub.listeners.items():
                    header = w.request_header(w.EVENT_ADD, data_type, count, down_sid, subid, 16)
                    down.queue(w.error_message(header, down_cid, status, text))
                return
        chan = self.channels.get(cid)
        log.warning("IOC error for %s: %s (status %d)", chan.name if chan else f"cid {cid}",
                    text, status)


class _SearchProtocol(asyncio.DatagramProtocol):
    def __init__(self, hub: Upstream) -> None:
        self.hub = hub

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.hub.search_reply(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable: the IOC is not running (yet); searches time out.
        log.debug("upstream search socket: %s", exc)


class Upstream:
    """Name lookups, circuits and channel life cycle on the IOC side.

    A lookup searches until ``connect_timeout``; a name the IOC does not have is then
    remembered as dead for ``dead_timeout``. A name that was connected and in use when
    its IOC went away is looked for much longer (``disconnect_timeout``): the searches
    clients send meanwhile are kept and answered the moment the IOC is back, instead of
    waiting for the clients' next search after their exponential backoff.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, flusher: Flusher,
                 addresses: list[tuple[str, int]], *, connect_timeout: float,
                 dead_timeout: float, inactive_timeout: float,
                 disconnect_timeout: float, max_lookups: int = 20_000,
                 count: Callable[[str], None] = lambda _key: None) -> None:
        self.loop = loop
        self.flusher = flusher
        self.addresses = addresses
        self.max_lookups = max_lookups
        self.count = count  # the gateway's counters
        self.congested = 0  # upstream circuits the IOC does not read fast enough
        # Monitor updates from the IOC, and copies of them queued to clients (a client
        # that does not read gets only the latest of each subscription): plain ints,
        # read by the metrics at scrape time
        self.updates_in = 0
        self.updates_out = 0
        self.on_uncongested: Callable[[], None] = lambda: None
        self.waiting = 0  # waiters of all lookups together
        # Search replies are taken only from where searches go: anyone on the network
        # can reach our upstream UDP socket, and a forged reply would make us serve
        # channels of a server of its choosing.
        self.senders: set[str] = set()
        self.connect_timeout = connect_timeout
        self.dead_timeout = dead_timeout
        self.inactive_timeout = inactive_timeout
        self.disconnect_timeout = disconnect_timeout
        self.channels: dict[str, UpstreamChannel] = {}
        self.unresolved: dict[int, UpstreamChannel] = {}  # searching or connecting, by cid
        self.circuits: dict[tuple[str, int], UpstreamCircuit] = {}
        self.dead: dict[str, float] = {}  # name -> monotonic expiry of the negative cache
        self.host_name = socket.gethostname()
        self.user_name = _user_name()
        self._cids = itertools.count(1)
        self._udp: asyncio.DatagramTransport | None = None
        self._to_search: list[UpstreamChannel] = []
        self._pacing = False
        self._agenda: list[tuple[float, int, UpstreamChannel]] = []  # heap of next actions
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for host, _port in self.addresses:
            infos = await self.loop.getaddrinfo(host, None, family=socket.AF_INET,
                                                type=socket.SOCK_DGRAM)
            self.senders.update(str(info[4][0]) for info in infos)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        enlarge_receive_buffer(sock)
        sock.bind(("0.0.0.0", 0))
        transport, _ = await self.loop.create_datagram_endpoint(
            lambda: _SearchProtocol(self), sock=sock)
        self._udp = transport  # type: ignore[assignment]

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for circuit in list(self.circuits.values()):
            circuit.close()
        if self._udp is not None:
            self._udp.close()

    # ------------------------------------------------------------ lookups
    def lookup(self, name: str, callback: LookupCallback, *, key: Hashable,
               patient: bool = False) -> bool:
        """Call ``callback`` with the connected channel for ``name``, or with None if the
        IOC does not have it: at once when known, else when the search settles.

        ``key`` de-duplicates waiters (a client repeating a search is one waiter).
        A ``patient`` waiter (a search to answer) waits as long as the lookup runs,
        which for a name lost with its IOC is ``disconnect_timeout``; others (a channel
        being created) get None after ``connect_timeout``.

        False, and no callback ever, when the lookup cannot be taken: MAX_WAITERS wait
        for this name or MAX_WAITERS_TOTAL for all, or ``max_lookups`` names are being
        looked up (a search storm: clients search again, the storm passes).
        """
        chan = self.channels.get(name)
        if chan is not None and chan.state is State.CONNECTED:
            callback(chan)
            return True
        now = time.monotonic()
        if chan is None:
            expiry = self.dead.get(name)
            if expiry is not None:
                if expiry > now:
                    callback(None)
                    return True
                del self.dead[name]
        if chan is None or key not in chan.waiters:
            full = ""
            if self.waiting >= MAX_WAITERS_TOTAL:
                full = f"{self.waiting} searches and channels waiting in all"
            elif chan is not None and len(chan.waiters) >= MAX_WAITERS:
                full = f"{len(chan.waiters)} waiting for one name"
            elif chan is None and len(self.unresolved) >= self.max_lookups:
                full = f"{len(self.unresolved)} names being looked up (-max_lookups)"
            if full:
                self.count("lookups_refused")
                rlog.warning(("storm", full[-12:]), "search storm: %s; ignoring %r", full,
                             name[:80])
                return False
        if chan is None:
            chan = self._start(name, now + self.connect_timeout)
        deadline = chan.give_up_at if patient else now + self.connect_timeout
        if key not in chan.waiters:
            self.waiting += 1
        chan.waiters[key] = _Waiter(callback, deadline)
        if deadline < chan.waiter_due:
            chan.waiter_due = deadline
            self._schedule(chan)
        return True

    def known(self, name: str) -> UpstreamChannel | None:
        """The connected channel for ``name``, if there is one (the search fast path)."""
        chan = self.channels.get(name)
        return chan if chan is not None and chan.state is State.CONNECTED else None

    def _start(self, name: str, give_up_at: float) -> UpstreamChannel:
        chan = UpstreamChannel(name, next(self._cids) & 0xFFFFFFFF, give_up_at)
        self.channels[name] = chan
        self.unresolved[chan.cid] = chan
        log.debug("searching upstream for %s", name)
        self._queue_search(chan)
        return chan

    def _queue_search(self, chan: UpstreamChannel) -> None:
        self._to_search.append(chan)
        if len(self._to_search) == 1 and not self._pacing:
            self.loop.call_soon(self._send_searches)

    def _send_searches(self) -> None:
        """Send queued searches, packed into datagrams and paced: a burst of thousands
        of names would overflow the IOC's UDP receive buffer and be lost."""
        self._pacing = False
        now = time.monotonic()
        version = w.version_message()
        datagram, sent, taken = version, 0, 0
        for chan in self._to_search:
            if sent >= SEARCH_BURST_DATAGRAMS:
                break
            taken += 1
            if chan.state is not State.SEARCHING or chan.next_search > now \
                    or self.unresolved.get(chan.cid) is not chan:
                continue  # resolved meanwhile, or queued twice
            chan.next_search = now + chan.retry
            chan.retry = min(chan.retry * 2, SEARCH_MAX_RETRY)
            self._schedule(chan)
            if len(datagram) + len(chan.search_message) > SEARCH_DATAGRAM_BYTES:
                self._sendto(datagram)
                sent += 1
                datagram = version
            datagram += chan.search_message
        if len(datagram) > len(version):
            self._sendto(datagram)
        del self._to_search[:taken]
        if self._to_search:  # the rest after a short pause
            self._pacing = True
            self.loop.call_later(SEARCH_BURST_PAUSE, self._send_searches)

    def _sendto(self, datagram: bytes) -> None:
        assert self._udp is not None
        for address in self.addresses:
            self._udp.sendto(datagram, address)

    # ------------------------------------------------------------ the agenda
    def _schedule(self, chan: UpstreamChannel) -> None:
        """(Re)compute when ``chan`` next needs attention and put that on the agenda."""
        due = min(chan.give_up_at, chan.waiter_due,
                  chan.next_search if chan.state is State.SEARCHING else chan.phase_deadline)
        chan.next_action = due
        heapq.heappush(self._agenda, (due, next(self._seq), chan))
        if self._timer is None:
            self._timer = self.loop.call_later(SEARCH_TICK, self._tick)

    def _tick(self) -> None:
        """Run every action that is due; stale agenda entries are skipped."""
        self._timer = None
        now = time.monotonic()
        agenda = self._agenda
        while agenda and agenda[0][0] <= now:
            due, _, chan = heapq.heappop(agenda)
            if due == chan.next_action and self.unresolved.get(chan.cid) is chan:
                self._act(chan, now)
        if agenda and self._timer is None:
            self._timer = self.loop.call_later(SEARCH_TICK, self._tick)
        self.flusher.flush()

    def _act(self, chan: UpstreamChannel, now: float) -> None:
        if now >= chan.give_up_at:
            log.info("%s: not found upstream", chan.name)
            self._fail(chan, negative=True)
            return
        if now >= chan.waiter_due:
            self._expire_waiters(chan, now)
        if chan.state is State.CONNECTING and now >= chan.phase_deadline:
            log.info("%s: no answer from the IOC at %s:%d; searching again", chan.name,
                     *(chan.circuit.address if chan.circuit else ("?", 0)))
            self._search_again(chan)
        if chan.state is State.SEARCHING and now >= chan.next_search:
            self._queue_search(chan)
        else:
            self._schedule(chan)

    def _expire_waiters(self, chan: UpstreamChannel, now: float) -> None:
        expired = [k for k, waiter in chan.waiters.items() if waiter.deadline <= now]
        self.waiting -= len(expired)
        for key in expired:
            chan.waiters.pop(key).callback(None)
        chan.waiter_due = min((x.deadline for x in chan.waiters.values()), default=math.inf)

    def _search_again(self, chan: UpstreamChannel) -> None:
        if chan.circuit is not None:
            chan.circuit.channels.pop(chan.cid, None)
            chan.circuit = None
        chan.state = State.SEARCHING
        chan.phase_deadline = math.inf
        chan.retry = SEARCH_FIRST_RETRY
        chan.next_search = time.monotonic()

    # ------------------------------------------------------------ search replies
    def search_reply(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[0] not in self.senders:
            self.count("forged_replies")
            rlog.warning(("forged", addr[0]), "search reply from %s:%d ignored: not an "
                         "upstream address", *addr[:2])
            return
        for command, port, _count, ip, cid, _payload in w.iter_datagram(data):
            if command == w.NOT_FOUND:
                self._not_found(cid, addr)
                continue
            if command != w.SEARCH:
                continue
            chan = self.unresolved.get(cid)
            if chan is None or chan.state is not State.SEARCHING:
                continue  # a duplicate answer (another address, or a retry)
            host = addr[0] if ip == w.ANY_ADDRESS else socket.inet_ntoa(struct.pack(">I", ip))
            self._connect(chan, (host, port))
        self.flusher.flush()

    def _not_found(self, cid: int, addr: tuple[str, int]) -> None:
        """An upstream server does not have the name: the lookup fails once every
        configured server has said so (one, in sidecar mode)."""
        chan = self.unresolved.get(cid)
        if chan is None or chan.state is not State.SEARCHING or chan.persistent:
            return
        chan.refused_by.add((addr[0], addr[1]))
        if len(chan.refused_by) >= len(self.addresses):
            log.debug("%s: not on the IOC", chan.name)
            self._fail(chan, negative=True)

    def _connect(self, chan: UpstreamChannel, address: tuple[str, int]) -> None:
        chan.state = State.CONNECTING
        chan.phase_deadline = time.monotonic() + self.connect_timeout
        self._schedule(chan)
        circuit = self.circuits.get(address)
        if circuit is None:
            circuit = UpstreamCircuit(self, address)
            self.circuits[address] = circuit
            task = self.loop.create_task(self._open(circuit))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        circuit.create(chan)

    async def _open(self, circuit: UpstreamCircuit) -> None:
        host, port = circuit.address
        try:
            await asyncio.wait_for(
                self.loop.create_connection(lambda: circuit, host, port),
                timeout=max(self.connect_timeout, 1.0))
        except (OSError, TimeoutError) as exc:
            log.warning("cannot connect to IOC at %s:%d: %s", host, port, exc)
            circuit.closed = True
            self.circuit_lost(circuit, exc)
            self.flusher.flush()

    # ------------------------------------------------------------ channel events
    def channel_connected(self, chan: UpstreamChannel) -> None:
        chan.state = State.CONNECTED
        chan.idle_since = time.monotonic()
        self.unresolved.pop(chan.cid, None)
        log.info("connected upstream %s (type %d, count %d)", chan.name, chan.native_type,
                 chan.native_count)
        waiters, chan.waiters = chan.waiters, {}
        self.waiting -= len(waiters)
        for waiter in waiters.values():
            waiter.callback(chan)

    def access_changed(self, chan: UpstreamChannel, access: int) -> None:
        chan.access = access
        for user in list(chan.users):
            user.circuit.access_changed(user)

    def channel_lost(self, chan: UpstreamChannel) -> None:
        """The IOC dropped or refused a channel. Downstream channels are disconnected
        (clients search again); a name that was in use is looked for until it is back."""
        if chan.state is State.CONNECTING:  # refused: the IOC does not serve it after all
            self._fail(chan, negative=True)
            return
        users = list(chan.users)
        chan.users.clear()
        self._fail(chan, negative=False)
        for user in users:
            user.circuit.channel_lost(user)
        if users and self.disconnect_timeout > 0 and chan.name not in self.channels:
            # (a restarting IOC may answer NOT_FOUND before its records are loaded)
            self._start(chan.name, time.monotonic() + self.disconnect_timeout).persistent = True

    def _fail(self, chan: UpstreamChannel, *, negative: bool) -> None:
        chan.state = State.CLOSED
        self.unresolved.pop(chan.cid, None)
        if self.channels.get(chan.name) is chan:
            del self.channels[chan.name]
        if chan.circuit is not None:
            chan.circuit.clear(chan)
        if negative and self.dead_timeout > 0:
            self.dead.pop(chan.name, None)  # re-inserted last: the dict stays in expiry order
            self.dead[chan.name] = time.monotonic() + self.dead_timeout
            while len(self.dead) > MAX_DEAD:
                del self.dead[next(iter(self.dead))]
        waiters, chan.waiters = chan.waiters, {}
        self.waiting -= len(waiters)
        for waiter in waiters.values():
            waiter.callback(None)

    def circuit_lost(self, circuit: UpstreamCircuit, exc: BaseException | None) -> None:
        if self.circuits.get(circuit.address) is circuit:
            del self.circuits[circuit.address]
        if circuit.channels:
            log.warning("lost IOC at %s:%d (%s): disconnecting %d channel(s)",
                        *circuit.address, exc or "closed", len(circuit.channels))
        self._close_clients_of(circuit)
        for chan in list(circuit.channels.values()):
            if chan.state is State.CONNECTING:
                self._search_again(chan)  # the IOC may be starting: keep trying
                self._schedule(chan)
            else:
                self.channel_lost(chan)
        circuit.channels.clear()
        for pending in circuit.pending.values():
            pending.down.request_done()  # the client's channel is gone with the IOC
        circuit.pending.clear()
        circuit.subs.clear()

    def _close_clients_of(self, circuit: UpstreamCircuit) -> None:
        """Close client circuits that only carried channels of a lost IOC.

        To such a client the gateway then looks exactly like the IOC dying, and every
        client library searches again after a lost circuit. The per-channel alternative
        (SERVER_DISCONN, used for mixed circuits) is honoured by libca, but caproto's
        client leaves the channel disconnected for good after it.
        """
        users: dict[DownCircuit, int] = {}
        for chan in circuit.channels.values():
            for user in chan.users:
                users[user.circuit] = users.get(user.circuit, 0) + 1
        for down, lost in users.items():
            if lost == len(down.channels):
                down.close()

    # ------------------------------------------------------------ users and idling
    def attach(self, chan: UpstreamChannel, user: DownChannel) -> None:
        chan.users.add(user)

    def detach(self, chan: UpstreamChannel, user: DownChannel) -> None:
        chan.users.discard(user)
        if not chan.users:
            chan.idle_since = time.monotonic()

    def sweep(self) -> None:
        """Drop channels unused for inactive_timeout, then circuits without channels."""
        now = time.monotonic()
        limit = self.inactive_timeout
        for chan in list(self.channels.values()):
            if chan.state is State.CONNECTED and not chan.users \
                    and now - chan.idle_since >= limit:
                log.info("dropping idle upstream channel %s (unused for %.1f s)", chan.name,
                         now - chan.idle_since)
                del self.channels[chan.name]
                if chan.circuit is not None:
                    chan.circuit.clear(chan)  # while still CONNECTED: sends the clear
                chan.state = State.CLOSED
        for circuit in list(self.circuits.values()):
            if circuit.transport is not None and not circuit.channels \
                    and now - circuit.idle_since >= limit:
                log.info("closing idle upstream circuit to %s:%d", *circuit.address)
                del self.circuits[circuit.address]
                circuit.close()
        dead = self.dead  # in expiry order (see _fail)
        while dead:
            name = next(iter(dead))
            if dead[name] > now:
                break
            del dead[name]
        self.flusher.flush()

    def stats(self) -> dict[str, int]:
        return {"upstream_channels": sum(c.state is State.CONNECTED
                                         for c in self.channels.values()),
                "unresolved": len(self.unresolved), "upstream_circuits": len(self.circuits),
                "dead": len(self.dead), "waiting": self.waiting,
                "congested": self.congested}


def enlarge_receive_buffer(sock: socket.socket) -> None:
    """Room for a burst of search datagrams (thousands of names at once)."""
    for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if option is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER_BYTES)
            return
        except OSError:  # SO_RCVBUFFORCE needs CAP_NET_ADMIN
            continue


def _user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container uid without a passwd entry
        return "ca-gateway"
