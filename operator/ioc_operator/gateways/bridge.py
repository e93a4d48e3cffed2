"""CA-to-PVA bridge: serves a Channel-Access-only IOC's PVs over PV Access.

    ioc-ca-pva-bridge --interface 198.18.16.2 --server-port 5075 --broadcast-port 5076 \\
        --ca-addr-list 127.0.0.1:15064 [--read-only] [--inactive-timeout 60] \\
        [--pvlist FILE] [-v]

A p4p (pvxs) server bound only to ``--interface`` answers PVA searches (UDP on the
broadcast port, TCP name-server searches on the server port) for the names the IOC has;
a caproto threading client looks them up over CA at ``--ca-addr-list`` only. Each name is
served as a Normative Type (bridge_nt), puts are forwarded to CA, monitors mirrored, and
CA channels nobody used for ``--inactive-timeout`` seconds are dropped. See
docs/ca-pva-bridge.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from caproto.client import common as ca_common
from caproto.threading.client import SharedBroadcaster
from p4p.asLib.pvlist import PVList
from p4p.server import DynamicProvider, Server, StaticProvider
from p4p.server.raw import SharedPV

from ..metrics import MetricsServer, port_arg
from .bridge_channel import BridgeChannel, ChannelState, InlineContext
from .ca_wire import name_ok
from .metrics import BridgeMetrics
from .ratelog import RateLimitedLog

__all__ = ["Bridge", "BridgeConfig", "SearchBudget", "main", "parse_args"]

log = logging.getLogger("ioc_operator.gateways.bridge")
rlog = RateLimitedLog(log)

# CA names the IOC did not answer within LOOKUP_TIMEOUT are "absent" for NEGATIVE_TTL: PVA
# searches for them are not claimed and do not cause CA searches until then. Short, so a
# record added or an IOC restarted with more records is served soon.
LOOKUP_TIMEOUT = 1.0
NEGATIVE_TTL = 5.0
NEGATIVE_MAX = 20000  # absent names remembered at most (a search storm cannot grow memory)
MAX_CHANNELS = 20_000  # names bridged at once (connected, being looked up, dormant)
MAX_PUTS = 1000  # PVA puts waiting for or in CA at once; more fail at once
# A PVA search runs on a pvxs server thread (UDP worker, or the TCP loop for name-server
# searches), and waiting there for CA stalls that thread; but a pvxs client whose first
# search goes unanswered searches again only after a full turn of its search buckets
# (6 s or more, measured). So a search for a name not yet connected waits up to
# SEARCH_WAIT for its CA channel (the first one on a new CA circuit takes ~70 ms, later
# ones a few ms), and all such waits together take at most SEARCH_BUDGET per second;
# past that the static provider claims the name at the client's next search.
SEARCH_WAIT = 0.1
SEARCH_BUDGET = 0.3
SWEEP_PERIOD = 0.5
# A channel whose IOC went away stays (caproto searching once a second on loopback) so it
# is back the moment the IOC is; only after this long without IOC and PVA client is it
# forgotten (a name the restarted IOC no longer has is not searched for ever).
FORGET_DISCONNECTED_AFTER = 600.0
# caproto re-searches lost channels with a back-off capped at 5 s, and after 8 minutes
# only once a minute; the IOC is on loopback, so searching once a second costs nothing
# and brings a restarted IOC back within ~1 s.
CA_MAX_SEARCH_INTERVAL = 1.0
CA_SEARCH_RETIREMENT = 10 * 365 * 24 * 3600.0


@dataclass(frozen=True)
class BridgeConfig:
    interface: str
    server_port: int = 5075
    broadcast_port: int = 5076
    ca_addr_list: str = "127.0.0.1:5064"
    read_only: bool = False
    inactive_timeout: float = 60.0
    pvlist: str | None = None  # pvlist text (pvagw / CA gateway syntax)
    put_timeout: float = 5.0
    # Names the IOC is known to serve (its PV prefixes). Only searches for these may
    # wait for their CA lookup; empty: every name may.
    prefixes: tuple[str, ...] = ()
    max_channels: int = MAX_CHANNELS

    def expected(self, name: str) -> bool:
        return not self.prefixes or name.startswith(self.prefixes)

    def pva_conf(self) -> dict[str, str]:
        """EPICS_PVAS_* for the p4p server: only the given interface and ports."""
        return {
            "EPICS_PVAS_INTF_ADDR_LIST": self.interface,
            "EPICS_PVAS_SERVER_PORT": str(self.server_port),
            "EPICS_PVAS_BROADCAST_PORT": str(self.broadcast_port),
        }

    def ca_env(self) -> dict[str, str]:
        """EPICS_CA_* for the caproto client: the list only, never broadcast."""
        return {"EPICS_CA_ADDR_LIST": self.ca_addr_list, "EPICS_CA_AUTO_ADDR_LIST": "NO"}


class SearchBudget:
    """How long PVA search handling may still block, per call and per second."""

    def __init__(self, per_call: float = SEARCH_WAIT, per_second: float = SEARCH_BUDGET) -> None:
        self._per_call = per_call
        self._per_second = per_second
        self._window = time.monotonic()
        self._used = 0.0
        self._lock = threading.Lock()

    def allowance(self) -> float:
        with self._lock:
            now = time.monotonic()
            if now - self._window >= 1.0:
                self._window, self._used = now, 0.0
            return max(0.0, min(self._per_call, self._per_second - self._used))

    def spend(self, seconds: float) -> None:
        with self._lock:
            self._used += seconds


class Bridge:
    """The p4p DynamicProvider handler and the owner of every bridged channel."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        os.environ.update(config.ca_env())  # caproto reads the address list at each send
        ca_common.MAX_RETRY_SEARCHES_INTERVAL = CA_MAX_SEARCH_INTERVAL
        ca_common.SEARCH_RETIREMENT_AGE = CA_SEARCH_RETIREMENT
        # client_name is explicit: getpass.getuser() fails for a UID without a passwd
        # entry (the sidecar runs as 65532 on a read-only root filesystem).
        self.ctx = InlineContext(SharedBroadcaster(), timeout=LOOKUP_TIMEOUT,
                                 host_name=socket.gethostname(), client_name="ca-pva-bridge")
        self._pvlist = PVList(config.pvlist) if config.pvlist is not None else None
        self._workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="bridge-put")
        self._channels: dict[str, BridgeChannel] = {}  # by CA name
        self._absent: dict[str, float] = {}  # CA name -> monotonic expiry
        self._lock = threading.Lock()  # the two tables; never held while waiting for anything
        self._budget = SearchBudget()
        self._stop = threading.Event()
        self._puts = threading.BoundedSemaphore(MAX_PUTS)
        self.refused: dict[str, int] = {"names": 0, "channels": 0}
        self.metrics = BridgeMetrics(self._channel_list, lambda: len(self._published),
                                     self.refused)
        self._sweeper = threading.Thread(target=self._sweep_loop, name="bridge-sweep",
                                         daemon=True)
        # Two providers (see testChannel): the dynamic one is asked first (order 0) and
        # starts CA lookups, the static one (order 1) lists every name whose CA channel
        # is connected. _published mirrors the static one's names.
        self.provider = DynamicProvider("ca-pva-bridge-search", self)
        self.static = StaticProvider("ca-pva-bridge")
        self._published: dict[str, BridgeChannel] = {}  # by PVA name
        self._publish_lock = threading.Lock()  # never taken on a pvxs thread
        self.server: Server | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Bridge:
        conf = self.config.pva_conf()
        self.server = Server(providers=[(self.provider, 0), (self.static, 1)], conf=conf,
                             useenv=True)
        effective = self.server.conf()
        log.info("PVA server: %s", {k: v for k, v in effective.items()
                                     if k.startswith("EPICS_PVAS_")})
        port = int(effective.get("EPICS_PVAS_SERVER_PORT", "0"))
        if port != self.config.server_port:
            self.server.stop()
            raise OSError(f"PVA server could not bind TCP {self.config.interface}:"
                          f"{self.config.server_port} (pvxs fell back to {port})")
        self._sweeper.start()
        return self

    def close(self) -> None:
        """Stop serving: PVA server first (clients see a disconnect), then CA."""
        self._stop.set()
        if self.server is not None:
            self.server.stop()
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
        for channel in channels:
            channel.drop()
        self._workers.shutdown(wait=False, cancel_futures=True)
        self.ctx.disconnect(wait=False)
        if self._sweeper.is_alive():
            self._sweeper.join(timeout=2 * SWEEP_PERIOD)

    # ------------------------------------------------------------------ name mapping
    def upstream(self, name: str, host: str = "") -> str | None:
        """The CA name for a PVA name, or None if the pvlist denies it."""
        if self._pvlist is None:
            return name
        ca_name, _asg, _asl = self._pvlist.compute(name.encode(), host)
        return ca_name

    def _channel(self, ca_name: str, alias: str, *,
                 create: bool = True) -> BridgeChannel | None:
        """The channel for a CA name, created (CA search started) if ``create`` and the
        name was not found absent recently; else None."""
        with self._lock:
            channel = self._channels.get(ca_name)
            if channel is not None:
                channel.aliases.add(alias)
                return channel
            if not create:
                return None
            if self._absent.get(ca_name, 0.0) > time.monotonic():
                return None
            if len(self._channels) >= self.config.max_channels:
                self.refused["channels"] += 1
                rlog.warning("channels", "%d names bridged (--max-channels): %s not looked "
                             "up", len(self._channels), ca_name[:80])
                return None
            self._absent.pop(ca_name, None)
            channel = BridgeChannel(ca_name, self.ctx, self._workers,
                                    read_only=self.config.read_only,
                                    put_timeout=self.config.put_timeout,
                                    publish=self._publish, puts=self._puts,
                                    relayed=self.metrics.relayed)
            channel.aliases.add(alias)
            self._channels[ca_name] = channel
        log.debug("looking up %s over CA", ca_name)
        return channel

    def _publish(self, channel: BridgeChannel, up: bool) -> None:
        """List (or unlist) a channel's PVA names in the static provider. Called on
        caproto's callback thread or the sweeper, never on a pvxs thread: removing a name
        closes its SharedPV, which waits for the pvxs server loop."""
        with self._lock:
            names = sorted(channel.aliases)
        with self._publish_lock:
            for name in names:
                current = self._published.get(name)
                if up and current is None:
                    self.static.add(name, channel.spv)
                    self._published[name] = channel
                elif not up and current is channel:
                    del self._published[name]
                    self.static.remove(name)

    def _channel_list(self) -> list[BridgeChannel]:
        with self._lock:
            return list(self._channels.values())

    # ------------------------------------------------------------------ DynamicProvider
    def testChannel(self, name: str) -> bool:
        """PVA search of one name (pvxs asks the providers in turn), counted."""
        self.metrics.searches.inc()
        found = self._test_channel(name)
        if found:
            self.metrics.answers.inc()
        return found

    def _test_channel(self, name: str) -> bool:
        """PVA search: claim the name if its CA channel is connected, else start (or wait,
        within the search budget, for) its CA lookup.

        False is cached by p4p for 10 s (and DynamicProvider.NotYet is claimed, not
        deferred, by p4p 4.3), so a name that connects later is answered by the static
        provider, which is asked right after this in the same search.
        """
        ca_name = self.upstream(name)
        if ca_name is None:
            return False  # denied by the pvlist
        if not name_ok(ca_name):  # caproto would raise: no IOC holds such a name
            self.refused["names"] += 1
            return False
        channel = self._channel(ca_name, name)
        if channel is None:
            return False  # absent a moment ago
        channel.touch()
        if channel.claimable.is_set():
            return True
        channel.wake()  # if dormant (the static provider lists it: claimed either way)
        # Clients with per-IOC address lists send every name to every IOC: a search
        # batch full of other IOCs' names must not spend the wait budget before this
        # IOC's own names come up (they would be answered only at the client's next
        # search, 6 s or more later). Other names are looked up without waiting.
        wait = self._budget.allowance() if self.config.expected(name) else 0.0
        if wait > 0.0:
            start = time.monotonic()
            channel.claimable.wait(wait)
            self._budget.spend(time.monotonic() - start)
        return channel.claimable.is_set()

    def makeChannel(self, name: str, peer: str) -> SharedPV | None:
        """A PVA client creates a channel: hand it the name's SharedPV (shared by all
        clients of the name; it opens when the CA channel has its first value)."""
        host = peer.rsplit(":", 1)[0]
        ca_name = self.upstream(name, host)
        channel = self._channel(ca_name, name, create=False) \
            if ca_name and name_ok(ca_name) else None
        if channel is None:
            # Denied, or dropped since the search. No SharedPV: p4p prints a TypeError and
            # the client gets "no such channel" and searches again.
            log.info("PVA channel %s for %s refused", name, peer)
            return None
        channel.touch()
        log.debug("PVA channel %s for %s", name, peer)
        return channel.spv

    # ------------------------------------------------------------------ housekeeping
    def _sweep_loop(self) -> None:
        while not self._stop.wait(SWEEP_PERIOD):
            try:
                self.sweep()
            except Exception:  # keep sweeping; a bug here must not stop the bridge
                log.exception("sweep failed")

    def sweep(self, now: float | None = None) -> None:
        """Forget names the IOC did not answer; put channels nobody used for the inactive
        timeout to sleep (connected: CA channel dropped, name kept) or forget them (while
        the IOC is away: caproto would otherwise search for them forever)."""
        now = time.monotonic() if now is None else now
        absent: list[str] = []
        gone: list[str] = []
        idle: list[BridgeChannel] = []
        with self._lock:
            for ca_name, channel in self._channels.items():
                state = channel.state
                if state is ChannelState.SEARCHING:
                    if now - channel.created > LOOKUP_TIMEOUT:
                        absent.append(ca_name)
                elif channel.in_use or state is ChannelState.DORMANT \
                        or now - channel.last_active <= self.config.inactive_timeout:
                    continue
                elif state is ChannelState.DISCONNECTED:
                    if now - channel.disconnected_at > FORGET_DISCONNECTED_AFTER:
                        gone.append(ca_name)
                else:
                    idle.append(channel)
            self._prune_absent(now)
        for ca_name in absent:
            if self._forget(ca_name, "not found over CA"):
                with self._lock:
                    self._absent[ca_name] = now + NEGATIVE_TTL
        for ca_name in gone:
            self._forget(ca_name, f"IOC away for {FORGET_DISCONNECTED_AFTER:g} s")
        for channel in idle:
            if channel.sleep():
                log.info("dropped CA channel %s: idle for %g s", channel.name,
                         self.config.inactive_timeout)

    def _forget(self, ca_name: str, why: str) -> bool:
        with self._lock:
            channel = self._channels.get(ca_name)
        if channel is None or not channel.drop():
            return False
        with self._lock:
            if self._channels.get(ca_name) is channel:
                del self._channels[ca_name]
        log.info("dropped %s: %s", ca_name, why)
        return True

    def _prune_absent(self, now: float) -> None:
        if len(self._absent) < NEGATIVE_MAX:
            return
        self._absent = {k: t for k, t in self._absent.items() if t > now}
        if len(self._absent) >= NEGATIVE_MAX:
            self._absent.clear()


# ---------------------------------------------------------------------------- CLI
def _interface(text: str) -> str:
    try:
        addr = ipaddress.IPv4Address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from None
    if addr.is_unspecified:
        raise argparse.ArgumentTypeError("bind one interface address, not 0.0.0.0")
    return text


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port {text} is out of range")
    return port


def _seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ioc-ca-pva-bridge",
        description="Serve a Channel-Access-only IOC's PVs over PV Access (Normative Types).")
    parser.add_argument("--interface", type=_interface, required=True,
                        help="the one IPv4 address the PVA server binds (the pod IP)")
    parser.add_argument("--server-port", type=_port, default=5075,
                        help="PVA TCP port, also answers name-server searches (5075)")
    parser.add_argument("--broadcast-port", type=_port, default=5076,
                        help="PVA UDP search port (5076)")
    parser.add_argument("--ca-addr-list", default="127.0.0.1:5064",
                        help="where the IOC's CA server is: EPICS_CA_ADDR_LIST of the CA "
                             "client (AUTO_ADDR_LIST=NO)")
    parser.add_argument("--read-only", action="store_true", help="refuse every PVA put")
    parser.add_argument("--inactive-timeout", type=_seconds, default=60.0,
                        help="drop CA channels no PVA client used for this long (60 s)")
    parser.add_argument("--pvlist", type=Path,
                        help="pvlist file (ALLOW / DENY / ALIAS lines, pvagw syntax)")
    parser.add_argument("--put-timeout", type=_seconds, default=5.0,
                        help="seconds a CA put may take before the PVA put fails (5 s)")
    parser.add_argument("--prefix", action="append", default=[],
                        help="PV prefix the IOC serves (repeatable): searches for these "
                             "names are answered first; others are still bridged")
    parser.add_argument("--max-channels", type=int, default=MAX_CHANNELS,
                        help="names bridged at once; searches for more new names are not "
                             f"answered until some are dropped ({MAX_CHANNELS})")
    parser.add_argument("--metrics-port", type=port_arg, default=0, metavar="PORT",
                        help="serve Prometheus metrics on this TCP port, all addresses "
                             "(docs/metrics.md); 0, the default: none")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: connections and drops, -vv: every search and put")
    return parser.parse_args(argv)


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 \
        else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # caproto's own loggers are chatty at INFO (every channel state change).
    logging.getLogger("caproto").setLevel(logging.WARNING if verbosity < 3 else logging.DEBUG)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _configure_logging(args.verbose)
    try:
        pvlist = args.pvlist.read_text() if args.pvlist else None
        if pvlist is not None:
            PVList(pvlist)  # syntax check now, not at the first search
    except (OSError, UnicodeDecodeError, RuntimeError, ValueError) as exc:
        log.error("cannot use --pvlist %s: %s", args.pvlist, exc)
        return 2
    config = BridgeConfig(
        interface=args.interface,
        server_port=args.server_port,
        broadcast_port=args.broadcast_port,
        ca_addr_list=args.ca_addr_list,
        read_only=args.read_only,
        inactive_timeout=args.inactive_timeout,
        pvlist=pvlist,
        put_timeout=args.put_timeout,
        prefixes=tuple(args.prefix),
        max_channels=max(1, args.max_channels),
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        bridge = Bridge(config).start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    try:
        metrics = (MetricsServer(bridge.metrics.registry, args.metrics_port)
                   if args.metrics_port else None)
    except OSError as exc:
        log.error("cannot serve metrics on port %d: %s", args.metrics_port, exc)
        bridge.close()
        return 1
    log.warning("bridging CA %s to PVA %s:%d (UDP %d)%s", config.ca_addr_list,
                config.interface, config.server_port, config.broadcast_port,
                ", read-only" if config.read_only else "")
    while not stop.wait(3600):
        pass
    if metrics is not None:
        metrics.stop()
    bridge.close()
    log.warning("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
