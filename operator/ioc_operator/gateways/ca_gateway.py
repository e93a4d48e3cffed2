"""ioc-ca-gateway: a Channel Access gateway for the sidecar network mode (caproto-based).

In sidecar mode the IOC's CA server listens on loopback (EPICS_CAS_INTF_ADDR_LIST=127.0.0.1,
EPICS_CAS_SERVER_PORT=15064) and this process serves CA on the pod IP:

    ioc-ca-gateway -sip $(POD_IP) -sport 5064 -cip 127.0.0.1 -cport 15064 \\
        [-pvlist FILE] [-ro] [-inactive_timeout 60] [-v]

Clients find PVs by UDP unicast search (EPICS_CA_ADDR_LIST) and by TCP name-server
search (EPICS_CA_NAME_SERVERS, libca); both are answered only for names the IOC has.
Gets, puts (with and without callback) and monitors are relayed with the client's own
DBR type and count, so every DBR_TIME/DBR_CTRL field and array length reaches the client
exactly as the IOC sent it. Flags mirror EPICS' C++ ca-gateway where they overlap, so
either image can be used; see docs/ca-gateway.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..metrics import Collected, CollectorRegistry, MetricsServer, port_arg
from .ca_downstream import DownCircuit, SearchServer, bind_udp
from .ca_pvlist import PVList, PVListError, load_pvlist
from .ca_upstream import Flusher, Upstream
from .ca_wire import ACCESS_READ, ACCESS_WRITE
from .ca_wire import MAX_PAYLOAD as MAX_UPSTREAM_MESSAGE
from .limits import Buckets, CircuitLimit
from .metrics import ca_gateway_families
from .ratelog import RateLimitedLog

__all__ = ["Gateway", "GatewayConfig", "main", "parse_args", "serve"]

log = logging.getLogger("ioc_ca_gateway")
rlog = RateLimitedLog(log)

DEFAULT_PORT = 5064
# Per client address: search datagrams taken (more are dropped unread) and names it may
# have looked up on the IOC (cached names are answered whatever the rate). libca sends
# a few hundred datagrams to connect 10,000 channels.
DATAGRAM_RATE, DATAGRAM_BURST = 1_000, 2_000
LOOKUP_RATE, LOOKUP_BURST = 1_000, 10_000


@dataclass
class GatewayConfig:
    """Everything the command line decides."""

    server_hosts: list[str] = field(default_factory=lambda: ["0.0.0.0"])
    server_port: int = DEFAULT_PORT
    upstream: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 5064)])
    pvlist: PVList = field(default_factory=PVList)
    read_only: bool = False
    inactive_timeout: float = 60.0
    connect_timeout: float = 1.0
    dead_timeout: float = 2.0
    disconnect_timeout: float = 300.0
    verbosity: int = 0
    # Bounds (docs/ca-gateway.md, "Limits under load"): what one gateway holds at most.
    max_circuits: int = 1024  # client TCP circuits; one client host a quarter of them
    max_channels: int = 200_000  # client channels, all circuits together
    max_subscriptions: int = 200_000  # client subscriptions, all circuits together
    max_lookups: int = 20_000  # names being looked up on the IOC at once
    max_message_bytes: int = 16 * 1024 * 1024  # largest request from a client (a put)
    metrics_port: int = 0  # Prometheus metrics on this TCP port (0: none)


class Gateway:
    """The running gateway: servers on the client side, `Upstream` on the IOC side."""

    def __init__(self, config: GatewayConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.pvlist = config.pvlist
        self.flusher = Flusher(loop)
        self.upstream = Upstream(loop, self.flusher, config.upstream,
                                 connect_timeout=config.connect_timeout,
                                 dead_timeout=config.dead_timeout,
                                 inactive_timeout=config.inactive_timeout,
                                 disconnect_timeout=config.disconnect_timeout,
                                 max_lookups=config.max_lookups, count=self.count)
        self.upstream.on_uncongested = self._uncongested
        self.circuits: set[DownCircuit] = set()
        self.limit = CircuitLimit(config.max_circuits, "-max_circuits")
        self.datagram_budget = Buckets(DATAGRAM_RATE, DATAGRAM_BURST)
        self.lookup_budget = Buckets(LOOKUP_RATE, LOOKUP_BURST)
        self.channels = 0  # client channels, all circuits
        self.subscriptions = 0  # client subscriptions, all circuits
        self.buffered = 0  # bytes of unfinished client requests, all circuits
        self.stats: Counter[str] = Counter()  # what was refused, dropped or ignored
        # Client searches (UDP, TCP) and those answered: plain ints on the hot path,
        # read by the metrics at scrape time (gateways/metrics.py)
        self.udp_searches = 0
        self.tcp_searches = 0
        self.search_answers = 0
        self.registry = CollectorRegistry()
        self.registry.register(Collected(lambda: ca_gateway_families(self)))
        # -ro removes write access whatever the IOC grants; read access is the IOC's.
        self._mask = ACCESS_READ | (0 if config.read_only else ACCESS_WRITE)
        self._servers: list[asyncio.Server] = []
        self._udp: list[asyncio.DatagramTransport] = []
        self._sweeper: asyncio.TimerHandle | None = None

    def count(self, key: str) -> None:
        self.stats[key] += 1

    def admit(self, circuit: DownCircuit) -> str:
        """Take a client circuit into the count; why not, if it may not stay."""
        refusal = self.limit.admit(circuit.host)
        if not refusal:
            self.circuits.add(circuit)
        return refusal

    def may_look_up(self, name: str, host: str) -> bool:
        """Whether ``host`` may have ``name`` looked up now (a name not cached)."""
        if self.upstream.known(name) is not None or self.lookup_budget.take(host):
            return True
        self.count("lookups_throttled")
        rlog.warning(("throttled", host), "%s asks for more than %d new names per second; "
                     "ignoring %r", host, LOOKUP_RATE, name[:80])
        return False

    def release(self, circuit: DownCircuit) -> None:
        self.circuits.discard(circuit)
        self.limit.release(circuit.host)

    def _uncongested(self) -> None:
        for circuit in list(self.circuits):
            circuit.resume_requests()

    def snapshot(self) -> dict[str, int]:
        """Sizes and counters (SIGUSR1 logs them)."""
        return {"circuits": len(self.circuits), "channels": self.channels,
                "subscriptions": self.subscriptions, "buffered": self.buffered,
                **self.upstream.stats(), **self.stats}

    def log_stats(self) -> None:
        log.warning("stats %s", " ".join(f"{k}={v}" for k, v in self.snapshot().items()))

    def rights(self, upstream_access: int) -> int:
        """What a client may do: the IOC's access rights, minus writes under -ro."""
        return upstream_access & self._mask

    async def start(self) -> None:
        cfg = self.config
        await self.upstream.start()
        for host in cfg.server_hosts:
            server = await self.loop.create_server(
                lambda: DownCircuit(self), host, cfg.server_port, reuse_address=True,
                backlog=128)
            self._servers.append(server)
            transport, _ = await self.loop.create_datagram_endpoint(
                lambda: SearchServer(self, cfg.server_port),
                sock=bind_udp(host, cfg.server_port))
            self._udp.append(transport)  # type: ignore[arg-type]
            log.info("serving CA on %s:%d (TCP and UDP)", host, cfg.server_port)
        upstream = " ".join(f"{h}:{p}" for h, p in cfg.upstream)
        log.info("upstream address list: %s; pvlist: %d allow, %d deny (%s first); "
                 "read-only: %s; inactive timeout %.1f s", upstream, len(cfg.pvlist.allow),
                 len(cfg.pvlist.deny), "ALLOW" if cfg.pvlist.allow_first else "DENY",
                 cfg.read_only, cfg.inactive_timeout)
        for warning in cfg.pvlist.ignored:
            log.warning("pvlist %s", warning)
        self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        # Sweep often enough that an idle channel lives at most ~25 % past its timeout.
        period = min(5.0, max(0.1, self.config.inactive_timeout / 4))
        self._sweeper = self.loop.call_later(period, self._sweep)

    def _sweep(self) -> None:
        self.upstream.sweep()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("clients %d, upstream %s", len(self.circuits), self.upstream.stats())
        self._schedule_sweep()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            server.close()
        for transport in self._udp:
            transport.close()
        for circuit in list(self.circuits):
            circuit.close()
        self.upstream.close()
        for server in self._servers:
            await server.wait_closed()
        await asyncio.sleep(0)  # let transports run their connection_lost callbacks


def _split(values: Sequence[str]) -> list[str]:
    """Flags may be repeated and each may hold a space-separated list."""
    return [item for value in values for item in value.split()]


def _address(entry: str, default_port: int) -> tuple[str, int]:
    host, sep, port = entry.rpartition(":")
    if not sep:
        return entry, default_port
    return host, int(port)


def _count(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ioc-ca-gateway",
        description="Channel Access gateway for an IOC whose CA server is on loopback.",
        allow_abbrev=False)
    parser.add_argument("-sip", action="append", default=[], metavar="ADDR",
                        help="interface to serve on (repeatable; default 0.0.0.0)")
    parser.add_argument("-sport", type=int, default=DEFAULT_PORT,
                        help="TCP and UDP port to serve on (default 5064)")
    parser.add_argument("-cip", action="append", default=[], metavar="ADDRS",
                        help='upstream address list, e.g. "127.0.0.1" (searched by UDP '
                             'unicast, never broadcast; entries may be host:port)')
    parser.add_argument("-cport", type=int, default=DEFAULT_PORT,
                        help="upstream server port for -cip entries without one")
    parser.add_argument("-pvlist", type=Path, help="ca-gateway style pvlist file")
    parser.add_argument("-ro", action="store_true", help="refuse every write")
    parser.add_argument("-inactive_timeout", type=_positive, default=60.0, metavar="S",
                        help="drop upstream channels unused for S seconds (default 60)")
    parser.add_argument("-connect_timeout", type=_positive, default=1.0, metavar="S",
                        help="how long to look for a PV upstream (default 1)")
    parser.add_argument("-dead_timeout", type=float, default=2.0, metavar="S",
                        help="how long a PV not found upstream is not searched for again "
                             "(default 2)")
    parser.add_argument("-disconnect_timeout", type=float, default=300.0, metavar="S",
                        help="how long to keep looking for PVs in use whose IOC went away, "
                             "answering clients' searches as soon as it is back (default 300)")
    limits = GatewayConfig()
    parser.add_argument("-max_circuits", type=_count, default=limits.max_circuits,
                        metavar="N", help="client TCP circuits at once, one client host a "
                        f"quarter of them (default {limits.max_circuits})")
    parser.add_argument("-max_channels", type=_count, default=limits.max_channels,
                        metavar="N", help="client channels at once, all clients together "
                        f"(default {limits.max_channels})")
    parser.add_argument("-max_subscriptions", type=_count, default=limits.max_subscriptions,
                        metavar="N", help="client subscriptions at once, all clients "
                        f"together (default {limits.max_subscriptions})")
    parser.add_argument("-max_lookups", type=_count, default=limits.max_lookups, metavar="N",
                        help="names searched for on the IOC at once; searches for further "
                        f"new names are ignored (default {limits.max_lookups})")
    parser.add_argument("-max_message_bytes", type=_count, default=limits.max_message_bytes,
                        metavar="N", help="largest request a client may send; a larger one "
                        f"closes its circuit (default {limits.max_message_bytes})")
    parser.add_argument("-metrics_port", "--metrics-port", dest="metrics_port", type=port_arg,
                        default=0, metavar="PORT",
                        help="serve Prometheus metrics on this TCP port, all addresses "
                        "(docs/metrics.md; not a ca-gateway flag); 0, the default: none")
    parser.add_argument("-v", action="count", default=0, help="log activity (-v -v: debug)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> GatewayConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        pvlist = load_pvlist(args.pvlist)
    except (OSError, PVListError) as exc:
        parser.error(f"-pvlist {args.pvlist}: {exc}")
    try:
        upstream = [_address(e, args.cport) for e in _split(args.cip or ["127.0.0.1"])]
    except ValueError as exc:
        parser.error(f"-cip: {exc}")
    return GatewayConfig(
        server_hosts=_split(args.sip) or ["0.0.0.0"],
        server_port=args.sport,
        upstream=upstream,
        pvlist=pvlist,
        read_only=args.ro,
        inactive_timeout=args.inactive_timeout,
        connect_timeout=args.connect_timeout,
        dead_timeout=max(0.0, args.dead_timeout),
        disconnect_timeout=max(0.0, args.disconnect_timeout),
        verbosity=args.v,
        max_circuits=args.max_circuits,
        max_channels=args.max_channels,
        max_subscriptions=args.max_subscriptions,
        max_lookups=args.max_lookups,
        max_message_bytes=min(args.max_message_bytes, MAX_UPSTREAM_MESSAGE),
        metrics_port=args.metrics_port,
    )


async def serve(config: GatewayConfig,
                on_ready: Callable[[Gateway], None] | None = None) -> None:
    """Run the gateway until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gateway = Gateway(config, loop)
    loop.add_signal_handler(signal.SIGUSR1, gateway.log_stats)
    metrics: MetricsServer | None = None
    try:
        await gateway.start()
        if config.metrics_port:
            metrics = MetricsServer(gateway.registry, config.metrics_port)
            log.info("metrics on port %d", metrics.port)
        if on_ready is not None:
            on_ready(gateway)
        await stop.wait()
        log.info("stopping")
    finally:
        if metrics is not None:
            metrics.stop()
        await gateway.stop()


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(config.verbosity, logging.DEBUG)
    logging.basicConfig(level=level,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        stream=sys.stderr)
    try:
        asyncio.run(serve(config))
    except OSError as exc:  # e.g. the port is taken or the address is not ours
        log.error("cannot serve: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
