"""One bridged name: a caproto threading-client PV on the CA side, a p4p SharedPV on the
PVA side (docs/ca-pva-bridge.md), and the few changes to caproto's threading client that
make it fit a bridge (InlineContext).

Threads. Every CA callback (connection state, read replies, monitor updates) runs inline
on caproto's selector thread, so the SharedPV is opened, posted and closed in the order
the IOC sent things. PVA-side callbacks (first connect, last disconnect, put) come from
pvxs threads and only set attributes or hand work to the bridge's worker pool: a pvxs
thread never waits for CA, and nothing here calls into pvxs while holding a lock a pvxs
callback could need.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from typing import Any

import caproto as ca
import numpy
from caproto import SubscriptionType
from caproto._commands import read_from_bytestream
from caproto.threading.client import PV, Context, Subscription, VirtualCircuitManager
from p4p import Value
from p4p._p4p import SharedPV as _NativeSharedPV
from p4p.server import ServerOperation
from p4p.server.raw import SharedPV

from .bridge_nt import POSIX_TIME_AT_EPICS_EPOCH, NTSpec, TimeUpdate, alarm_fields, metadata_fields
from .ratelog import RateLimitedLog

__all__ = [
    "BridgeChannel",
    "ChannelState",
    "FastCircuitManager",
    "InlineContext",
    "InlineExecutor",
    "forget_pv",
]

log = logging.getLogger("ioc_operator.gateways.bridge")
rlog = RateLimitedLog(log)

CA_OP_TIMEOUT = 2.0  # seconds for a CA read issued from a callback (the channel is up)
TIME_MASK = SubscriptionType.DBE_VALUE | SubscriptionType.DBE_ALARM
PROPERTY_MASK = SubscriptionType.DBE_PROPERTY
# SharedPV.post without p4p's Python wrapper (it only applies the identity ``wrap``: the
# bridge's SharedPVs have no ``nt``).
_post = _NativeSharedPV.post


class ChannelState(enum.Enum):
    SEARCHING = "searching"  # CA search sent, no answer yet
    CONNECTING = "connecting"  # CA channel up, waiting for metadata and the first value
    CONNECTED = "connected"  # SharedPV open, mirroring the CA monitor
    DISCONNECTED = "disconnected"  # the IOC went away; caproto searches again
    DORMANT = "dormant"  # idle: no CA channel, SharedPV closed, name still listed
    DROPPED = "dropped"  # forgotten (not found, or shut down); never used again


_RELEASED = frozenset({ChannelState.DORMANT, ChannelState.DROPPED})  # no CA channel


class BridgeChannel:
    """Mirrors one CA channel into one SharedPV; shared by every PVA client of the name."""

    def __init__(self, name: str, ctx: Context, workers: Executor, *, read_only: bool,
                 put_timeout: float, publish: Callable[[BridgeChannel, bool], None],
                 puts: threading.BoundedSemaphore | None = None,
                 relayed: Callable[[], None] = lambda: None) -> None:
        self.name = name
        self.aliases: set[str] = {name}  # PVA names served by this CA channel (pvlist)
        self.state = ChannelState.SEARCHING
        self.created = time.monotonic()
        self.last_active = self.created
        self.in_use = False  # PVA clients attached (SharedPV first connect .. last disconnect)
        self.disconnected_at = 0.0  # monotonic time of the last CA disconnect
        self.claimable = threading.Event()  # set while the CA channel is connected
        self.spv = SharedPV(handler=_PVAHandler(self))
        self._ctx = ctx
        self._workers = workers
        self._publish = publish  # (self, True) when the CA channel is up, False when not
        self._relayed = relayed  # called for each update posted (the bridge's metrics)
        self._read_only = read_only
        self._put_timeout = put_timeout
        # Puts queued or running, all channels together: a client sending puts faster
        # than CA completes them must not grow the worker pool's queue without bound.
        self._puts = puts if puts is not None else threading.BoundedSemaphore(1000)
        self._lock = threading.Lock()  # state transitions vs. the sweeper; never held by pvxs
        self._spec: NTSpec | None = None
        self._metadata: dict[str, Any] = {}
        self._open = False
        self._pending: Any = None  # a DBR_TIME update that came before the metadata
        self._last_alarm: tuple[int, int] | None = None
        self._last_stamp: tuple[int, int] | None = None
        self._last_value: Any = None
        self._time_dbr = -1  # DBR_TIME_* id of the current spec (-1: none yet)
        self._decode: Any = None  # spec.time_decoder() of the current spec
        self._out: Value | None = None  # the Value every update is posted in (reused)
        self._subs: list[Subscription] = []
        self.pv: PV = self._new_pv()

    def _new_pv(self) -> PV:
        """A fresh caproto PV for the name (its CA search starts now)."""
        pv: PV = self._ctx.get_pvs(self.name, timeout=CA_OP_TIMEOUT)[0]
        # caproto keeps weak references to callbacks: bound methods of this object live as
        # long as the bridge's table holds it.
        pv.connection_state_callback.add_callback(self._on_connection_state, run=True)
        return pv

    def wake(self) -> None:
        """A dormant channel is wanted again: new CA channel (the SharedPV opens with its
        first value; clients that attached meanwhile wait for that)."""
        with self._lock:
            if self.state is not ChannelState.DORMANT:
                return
            self.state, self.created = ChannelState.SEARCHING, time.monotonic()
            self._subs = []
            self.pv = self._new_pv()
        log.info("waking %s", self.name)

    def __repr__(self) -> str:
        return f"<BridgeChannel {self.name} {self.state.value} in_use={self.in_use}>"

    def touch(self) -> None:
        self.last_active = time.monotonic()

    # ------------------------------------------------------------------ CA callbacks
    def _on_connection_state(self, pv: PV, state: str) -> None:
        if pv is not self.pv:
            return
        with _logged(self.name, "connection state"):
            if state == "connected":
                self._on_connected()
            elif state == "disconnected":
                self._on_disconnected()

    def _on_connected(self) -> None:
        with self._lock:
            if self.state in _RELEASED:
                return
            self.state = ChannelState.CONNECTING
            was_open, self._open = self._open, False
            self._set_spec(None)
        if was_open:  # connected twice without a disconnect in between: start afresh
            self.spv.close()
        chan = self.pv.channel
        log.info("CA channel %s connected (%s x%d, access %s)", self.name,
                 ca.ChannelType(chan.native_data_type).name, chan.native_data_count,
                 self.pv.access_rights)
        self._publish(self, True)
        self.claimable.set()
        # Metadata first: the first DBR_TIME update opens the SharedPV with it. Runs on
        # caproto's selector thread (InlineContext), so replies are handled in stream order.
        try:
            self.pv.read(data_type="control", wait=False, callback=self._on_ctrl,
                         timeout=CA_OP_TIMEOUT)
        except Exception as exc:  # the circuit died meanwhile: the next connect retries
            log.warning("CA read of %s metadata failed: %s", self.name, exc)
        if not self._subs:
            self._subscribe()

    def _subscribe(self) -> None:
        """DBR_TIME for value and alarm, DBR_CTRL on property change (units, limits,
        enum strings). caproto re-creates both after every reconnect."""
        time_sub = self.pv.subscribe(data_type="time", mask=TIME_MASK)
        prop_sub = self.pv.subscribe(data_type="control", mask=PROPERTY_MASK)
        self._subs = [time_sub, prop_sub]
        # FastCircuitManager hands DBR_TIME updates to _on_raw_update straight from the
        # bytes; _on_update gets the ones it declines, as caproto messages.
        time_sub.raw_update = weakref.WeakMethod(self._on_raw_update)
        time_sub.add_callback(self._on_update)
        prop_sub.add_callback(self._on_property)

    def _on_disconnected(self) -> None:
        with self._lock:
            if self.state in _RELEASED:  # (also how caproto confirms our ClearChannel)
                return
            self.state, self.disconnected_at = ChannelState.DISCONNECTED, time.monotonic()
            self._set_spec(None)
            was_open = self._open
            self._open = False
        self.claimable.clear()
        log.info("CA channel %s disconnected", self.name)
        self._publish(self, False)
        if was_open:
            self.spv.close()  # PVA clients see a disconnect and search again

    def _on_ctrl(self, response: Any) -> None:
        with _logged(self.name, "metadata"):
            self._set_metadata(response)

    def _set_metadata(self, response: Any) -> None:
        chan = self.pv.channel
        if chan is None or self.state is not ChannelState.CONNECTING:
            return
        spec = NTSpec.for_channel(ca.native_type(response.data_type), chan.native_data_count)
        self._metadata = metadata_fields(spec, response.metadata)
        pending = self._pending
        self._set_spec(spec)
        if pending is not None:
            self._apply_update(pending)

    def _set_spec(self, spec: NTSpec | None) -> None:
        """The NT the channel is served as (None: not known, after a (re)connect)."""
        self._spec, self._pending = spec, None
        self._time_dbr = spec.time_dbr if spec is not None else -1
        self._decode = spec.time_decoder() if spec is not None else None
        self._out = spec.type() if spec is not None else None

    def _on_property(self, _sub: Any, response: Any) -> None:
        """A DBR_CTRL update: post the metadata fields that changed (DBE_PROPERTY)."""
        with _logged(self.name, "property update"):
            self._update_metadata(response)

    def _update_metadata(self, response: Any) -> None:
        spec = self._spec
        if spec is None or ca.native_type(response.data_type) != spec.native:
            return
        fresh = metadata_fields(spec, response.metadata)
        changed = {k: v for k, v in fresh.items() if _differs(self._metadata.get(k), v)}
        self._metadata = fresh
        if changed and self._open:
            value = spec.type()
            for key, item in changed.items():
                value[key] = item
            self._post(value)

    def _on_raw_update(self, data_type: int, count: int, buf: bytearray, start: int,
                       end: int) -> bool:
        """A DBR_TIME monitor update straight from the circuit's bytes (FastCircuitManager):
        the hot path. False (nothing done) if it is not this spec's type, or before the
        metadata: then caproto's message comes to `_on_update`."""
        decode = self._decode
        if data_type != self._time_dbr or decode is None:
            return False
        try:
            update = decode(buf, start, end, count)
            if update is None:
                return False
            self._deliver(update)
        except Exception:
            log.exception("%s: update failed", self.name)
        return True

    def _on_update(self, _sub: Any, response: Any) -> None:
        try:  # (no context manager: monitor updates come here until the metadata is in)
            self._apply_update(response)
        except Exception:
            log.exception("%s: update failed", self.name)

    def _apply_update(self, response: Any) -> None:
        """A DBR_TIME update as a caproto message (a put's read-back, or a monitor update
        before the metadata came): keep it for later or deliver it."""
        spec = self._spec
        if response.header.data_type != self._time_dbr or spec is None:
            self._pending = response  # metadata not there yet (connect or reconnect)
            return
        md = response.metadata
        self._deliver((spec.value_of(response.data), md.severity, md.status,
                       md.secondsSinceEpoch, md.nanoSeconds))

    def _deliver(self, update: TimeUpdate) -> None:
        """Open the SharedPV with the first update, post the later ones as deltas.

        One posted Value per CA update: value and timeStamp, alarm fields only when they
        changed; an update identical to the last one posted (same timestamp, alarm and
        value, as after a put's read-back) is not posted twice. The Value is reused
        (filled, posted, unmarked): pvxs copies what it keeps.
        """
        value, severity, status, seconds, nanoseconds = update
        alarm = (severity, status)
        stamp = (seconds, nanoseconds)
        if self._open:
            if stamp == self._last_stamp and alarm == self._last_alarm \
                    and _same_value(value, self._last_value):
                return
            out, spec = self._out, self._spec
            if out is None or spec is None:
                return
            out[spec.value_key] = value
            out["timeStamp.secondsPastEpoch"] = seconds + POSIX_TIME_AT_EPICS_EPOCH
            out["timeStamp.nanoseconds"] = nanoseconds
            if alarm != self._last_alarm:
                for key, item in alarm_fields(severity, status).items():
                    out[key] = item
            self._last_alarm, self._last_stamp, self._last_value = alarm, stamp, value
            try:
                _post(self.spv, out)
                self._relayed()
            except Exception as exc:  # closed by a disconnect or drop in between
                log.debug("post to %s skipped: %s", self.name, exc)
            finally:
                out.unmark()
            return
        spec = self._spec
        if spec is None:
            return
        initial = spec.initial(self._metadata, value, severity, status, seconds, nanoseconds)
        with self._lock:
            if self.state is not ChannelState.CONNECTING:
                return
            self.state, self._open = ChannelState.CONNECTED, True
            self._last_alarm, self._last_stamp, self._last_value = alarm, stamp, value
            self.spv.open(initial)
        self._relayed()
        log.debug("serving %s as %s", self.name, spec.type_id)

    def _post(self, value: Value) -> None:
        try:
            self.spv.post(value)
        except Exception as exc:  # closed by a disconnect or drop in between
            log.debug("post to %s skipped: %s", self.name, exc)

    # ------------------------------------------------------------------ PVA put
    def submit_put(self, op: ServerOperation) -> None:
        """Hand a PVA put to the worker pool (it waits for CA; pvxs threads must not)."""
        if not self._puts.acquire(blocking=False):
            rlog.warning("puts", "put to %s refused: too many puts waiting", self.name)
            op.done(error="the CA-to-PVA bridge is busy: too many puts waiting")
            return
        try:
            self._workers.submit(self._put_and_release, op)
        except RuntimeError:  # shutting down
            self._puts.release()
            op.done(error="the CA-to-PVA bridge is stopping")

    def _put_and_release(self, op: ServerOperation) -> None:
        try:
            self.put(op)
        finally:
            self._puts.release()

    def put(self, op: ServerOperation) -> None:
        """Forward a PVA put as a CA put with completion, then read the value back so a
        get right after the put sees it (on caproto's callback thread, so in order with
        monitor updates). Runs on a bridge worker thread."""
        if self._read_only:
            op.done(error="the CA-to-PVA bridge is read-only")
            return
        spec, pv = self._spec, self.pv
        if spec is None or self.state is not ChannelState.CONNECTED:
            op.done(error=f"{self.name}: CA channel not connected")
            return
        if pv.access_rights is not None and not pv.access_rights & ca.AccessRights.WRITE:
            op.done(error=f"{self.name}: no CA write access")
            return
        try:
            data = spec.put_data(op.value())
            reply = pv.write(data, wait=True, timeout=self._put_timeout)
        except Exception as exc:
            log.info("put to %s failed: %s", self.name, exc)
            op.done(error=f"{self.name}: {exc}")
            return
        if not reply.status.success:
            op.done(error=f"{self.name}: CA put failed: {reply.status.description}")
            return
        log.debug("put to %s: %r", self.name, data)
        readback = threading.Event()

        def read_back(response: Any) -> None:
            self._on_update(None, response)
            readback.set()

        try:
            pv.read(data_type="time", wait=False, callback=read_back, timeout=self._put_timeout)
        except Exception as exc:
            log.debug("read-back of %s failed: %s", self.name, exc)
        readback.wait(self._put_timeout)  # the put itself succeeded either way
        op.done()

    # ------------------------------------------------------------------ drop
    def _release_ca(self) -> bool:
        """Cancel the subscriptions and forget the CA channel (under ``_lock``). False,
        changing nothing, while caproto is creating the channel."""
        if _creating(self.pv):
            return False
        for sub in self._subs:  # while the channel is still open, then clear it
            sub.clear()
        self._subs = []
        forget_pv(self._ctx, self.pv)
        return True

    def sleep(self) -> bool:
        """Idle: drop the CA channel but keep the name listed (DORMANT), so the next
        client is claimed at once and wakes it. False: try again later."""
        with self._lock:
            if self.state not in (ChannelState.CONNECTED, ChannelState.CONNECTING):
                return self.state is ChannelState.DORMANT
            if not self._release_ca():
                return False
            self.state, was_open, self._open = ChannelState.DORMANT, self._open, False
            self._set_spec(None)
        self.claimable.clear()
        if was_open:
            self.spv.close()
        return True

    def drop(self) -> bool:
        """Forget the CA channel, unlist the name and close the SharedPV for good. False
        while the CA channel is being created (try again later)."""
        with self._lock:
            if self.state is ChannelState.DROPPED:
                return True
            if self.state is not ChannelState.DORMANT and not self._release_ca():
                return False
            self.state, was_open, self._open = ChannelState.DROPPED, self._open, False
        self.claimable.clear()
        self._publish(self, False)
        if was_open or self.in_use:
            self.spv.close()
        return True


class _PVAHandler:
    """SharedPV handler: called on pvxs threads, so it only records and hands work off."""

    def __init__(self, channel: BridgeChannel) -> None:
        self._channel = channel

    def onFirstConnect(self, _pv: SharedPV) -> None:
        self._channel.in_use = True
        self._channel.touch()
        self._channel.wake()  # a client found a dormant name (never waits for CA)

    def onLastDisconnect(self, _pv: SharedPV) -> None:
        self._channel.in_use = False
        self._channel.touch()

    def put(self, _pv: SharedPV, op: ServerOperation) -> None:
        self._channel.touch()
        self._channel.submit_put(op)


@contextlib.contextmanager
def _logged(name: str, what: str) -> Iterator[None]:
    """caproto's executors keep a callback's exception in a future nobody reads: log it."""
    try:
        yield
    except Exception:
        log.exception("%s: %s failed", name, what)


def _differs(old: Any, new: Any) -> bool:
    if isinstance(old, list | numpy.ndarray) or isinstance(new, list | numpy.ndarray):
        return list(old if old is not None else []) != list(new)
    return bool(old != new)


def _same_value(new: Any, old: Any) -> bool:
    """Whether two PVA values (as `NTSpec.value_of` gives them) are equal."""
    if isinstance(new, numpy.ndarray) or isinstance(old, numpy.ndarray):
        return old is not None and bool(numpy.array_equal(new, old))
    return bool(new == old)


class InlineExecutor(Executor):
    """Runs caproto callbacks at once, on the thread that decoded the message.

    caproto's threading client hands every callback to a ThreadPoolExecutor per circuit:
    one Future, one queue hop and one GIL hand-over per monitor update, and an unbounded
    queue when callbacks are slower than the socket. Run inline, the selector thread reads
    the next message only after the last one was posted to PVA, so a slow bridge makes TCP
    push back and the IOC's CA server coalesce updates (as CA flow control intends)
    instead of a backlog growing in the bridge. Callbacks must therefore never wait for
    the selector thread (none here does).
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # like a pool: the exception goes into the future
            future.set_exception(exc)
        return future


_HEADER = struct.Struct(">HHHHII")  # CA message header: command, payload size, data type,
# data count, parameter 1, parameter 2 (for EVENT_ADD: status, subscription id)
_HEADER_SIZE = _HEADER.size
_EVENT_ADD = 1
_EXTENDED = 0xFFFF  # payload size marking an extended header


class FastCircuitManager(VirtualCircuitManager):
    """caproto's circuit manager with a short path for monitor updates.

    caproto parses everything one ``recv`` returned into message objects first (a
    header, a ctypes metadata struct, a numpy array and three memoryviews per update),
    then validates every EventAddResponse against the circuit's and the channel's state
    machines and dispatches it through the Subscription: ~30 enum hashes and a dozen
    isinstance checks per update, more than the rest of the bridge's work. And when the
    bridge fell behind, one read held tens of thousands of updates, all alive at once as
    objects (the garbage collector then traversed them again and again).

    (caproto's ``VirtualCircuit.recv`` also re-slices its buffer after every message,
    quadratic in the bytes one read returns: ~0.5 ms per update with a backlog.)

    Here messages are handled one after the other as they are parsed, in stream order,
    through offsets into one buffer (linear time; the unparsed rest is kept once). A
    monitor update for a live subscription (known, not being cancelled, with a payload)
    changes no state: if the subscription has a ``raw_update`` handler (a weak method
    taking data type, element count, the bytes and the payload's start and end) that
    accepts it, no message object is made at all; otherwise it goes straight to the
    subscription's callbacks. Every other message takes caproto's path.
    """

    __slots__ = ()

    def received(self, bytes_recv: bytes, address: Any) -> Any:
        if not bytes_recv:
            return super().received(bytes_recv, address)  # caproto's disconnect handling
        self.last_tcp_receipt = time.monotonic()
        circuit = self.circuit
        # (writable: caproto's ctypes structs are made with from_buffer)
        data = circuit._data + bytes_recv if circuit._data else bytearray(bytes_recv)
        size, offset, needed = len(data), 0, 0
        view = memoryview(data)
        subscriptions = self.subscriptions
        unpack_from = _HEADER.unpack_from
        try:
            while size - offset >= _HEADER_SIZE:
                command, payload, data_type, count, _, sid = unpack_from(data, offset)
                end = offset + _HEADER_SIZE + payload
                if command == _EVENT_ADD and 0 < payload < _EXTENDED and end <= size:
                    sub = subscriptions.get(sid)
                    if (sub is not None and sid in circuit.event_add_commands
                            and sid not in circuit.event_cancel_commands):
                        ref = getattr(sub, "raw_update", None)
                        handler = ref() if ref is not None else None
                        if handler is not None and handler(data_type, count, data,
                                                           offset + _HEADER_SIZE, end):
                            offset = end
                            continue
                rest, message, needed = read_from_bytestream(view[offset:], circuit.their_role)
                if message is ca.NEED_DATA:
                    break
                offset = size - len(rest)
                self._process_command(message)
            else:
                needed = _HEADER_SIZE - (size - offset)
        finally:
            # Parsed messages keep views into ``data``; it is never written again.
            circuit._data = bytearray(view[offset:])
        return needed

    def _process_command(self, command: Any) -> None:
        if type(command) is ca.EventAddResponse and command.header.payload_size:
            sid = command.subscriptionid
            sub = self.subscriptions.get(sid)
            circuit = self.circuit
            if (sub is not None and sid in circuit.event_add_commands
                    and sid not in circuit.event_cancel_commands):
                for ref in list(sub.callbacks.values()):
                    callback = ref()
                    if callback is not None:
                        callback(sub, command)
                return
        super()._process_command(command)


class InlineContext(Context):
    """A caproto threading Context for the bridge: callbacks run inline on the selector
    thread (InlineExecutor), circuits parse as they go and monitor updates take a short
    path (FastCircuitManager), and PVs can be forgotten (`forget_pv`)."""

    def reconnect(self, keys: Any) -> None:
        """After a circuit died: search again for its PVs, except forgotten ones (their
        channel may still be listed on the dead circuit)."""
        keys = list(keys)
        with self.pv_cache_lock:
            known = [key for key in keys if key in self.pvs]
        super().reconnect(known)

    def get_circuit_manager(self, address: Any, priority: int) -> Any:
        cm = super().get_circuit_manager(address, priority)
        if not isinstance(cm.user_callback_executor, InlineExecutor):
            pool, cm.user_callback_executor = cm.user_callback_executor, InlineExecutor()
            pool.shutdown(wait=False)
            # A subclass that adds no state, only behaviour: the object stays as caproto
            # built it (handshake done, anything half-parsed kept in circuit._data).
            cm.__class__ = FastCircuitManager
        return cm


def forget_pv(ctx: Context, pv: PV) -> bool:
    """Remove a PV from a caproto threading Context and clear its CA channel.

    caproto has no public call for this: ``PV.go_idle()`` clears the channel but keeps the
    PV, caproto re-creates channels of idle PVs when their circuit dies, and every revival
    leaves an entry behind. So this edits caproto's (1.x threading client) tables:

    * here, under the Context's lock: ``ctx.pvs`` and ``ctx.pvs_needing_circuits``, and
      the broadcaster's unanswered search, so no search result or ``get_pvs`` finds it;
    * on the selector thread, when the server confirms the ClearChannel: the circuit
      manager's ``pvs`` and ``channels`` entries (the confirmation is routed through them,
      and caproto iterates them, on that thread, when the circuit dies);
    * `InlineContext.reconnect` skips forgotten PVs whose circuit died before that.

    Returns False, changing nothing, while the channel is being created (CreateChan sent,
    no reply yet): its reply needs the PV where caproto put it.
    """
    if _creating(pv):
        return False
    cm = pv.circuit_manager
    chan = pv.channel
    with ctx.pv_cache_lock:
        if ctx.pvs.get((pv.name, pv.priority)) is pv:
            del ctx.pvs[(pv.name, pv.priority)]
        waiting = ctx.pvs_needing_circuits.get(pv.name)
        if waiting is not None:
            waiting.discard(pv)
            if not waiting:
                del ctx.pvs_needing_circuits[pv.name]
    ctx.broadcaster.cancel(pv.name)
    if cm is not None and not cm.dead.is_set() and chan is not None and pv.connected:
        cids = [cid for cid, owner in list(cm.pvs.items()) if owner is pv]
        pv.connection_state_callback.add_callback(_cleared_callback(cm, cids))
        with contextlib.suppress(Exception):  # the circuit died meanwhile: nothing to clear
            cm.send(chan.clear())
    return True


def _creating(pv: PV) -> bool:
    """CreateChan sent on a live circuit, no reply yet."""
    cm = pv.circuit_manager
    return (cm is not None and not cm.dead.is_set() and pv.circuit_ready.is_set()
            and not pv.channel_ready.is_set())


_KEEP: set[Any] = set()  # strong references for the one-shot callbacks below


def _cleared_callback(cm: Any, cids: list[int]) -> Callable[[PV, str], None]:
    """A one-shot connection-state callback for a forgotten PV: when the server confirms
    the ClearChannel (caproto reports 'disconnected', on the selector thread, after it
    looked the PV up), drop the circuit manager's entries for it. If the circuit died
    instead, caproto is iterating those tables right now: leave them, they die with it."""

    def _cleared(_pv: PV, state: str) -> None:
        if state != "disconnected":
            return
        _KEEP.discard(_cleared)
        if cm.dead.is_set():
            return
        for cid in cids:
            cm.pvs.pop(cid, None)
            cm.channels.pop(cid, None)

    _KEEP.add(_cleared)
    return _cleared
