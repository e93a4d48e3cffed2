"""ioc-name-server: answers CA and PVA name searches for many IOCs at one address.

    ioc-name-server --table iocs.yaml                 # a file (docs/name-server.md)
    ioc-name-server --kubernetes [-n NS ...]          # IOC objects' status (read-only)

Clients list only this server (EPICS_CA_NAME_SERVERS, EPICS_CA_ADDR_LIST,
EPICS_PVA_NAME_SERVERS, EPICS_PVA_ADDR_LIST) and connect straight to the IOC each
answer names. The listeners open once the table is loaded, so a TCP readiness probe
on the CA port tells when answers are complete.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..metrics import MetricsServer, port_arg
from .resolver import Limits
from .server import NameServer, ServerConfig
from .table import Table, TableError
from .tablefile import TableFile, load_table

__all__ = ["build_parser", "main", "serve"]

log = logging.getLogger("ioc_name_server")


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive count")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"{text} is not a port")
    return value


def _network(text: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text, strict=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ioc-name-server",
        description="One address for all of EPICS: answers CA and PVA name searches "
                    "with the address of the IOC that holds each name.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--table", type=Path, metavar="FILE",
                        help="YAML table of IOCs (re-read when it changes, and on SIGHUP)")
    source.add_argument("--kubernetes", action="store_true",
                        help="watch the IOC objects' status (read-only)")
    p.add_argument("-n", "--namespace", action="append", default=[],
                   help="with --kubernetes: this namespace only (repeatable; "
                        "default: all namespaces)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then "
                                        "$KUBECONFIG or ~/.kube/config)")
    p.add_argument("--listen", action="append", default=[], metavar="ADDR",
                   help="address to listen on (repeatable; default 0.0.0.0)")
    p.add_argument("--ca-port", type=_port, default=5064, help="CA TCP and UDP (5064)")
    p.add_argument("--pva-port", type=_port, default=5075, help="PVA TCP (5075)")
    p.add_argument("--pva-udp-port", type=_port, default=5076, help="PVA UDP (5076)")
    p.add_argument("--internal-network", action="append", default=[], type=_network,
                   metavar="CIDR",
                   help="clients in these networks are answered with every IOC; others "
                        "only with IOCs reachable from outside (host mode). Default: "
                        "every client is inside")
    limits = Limits()
    p.add_argument("--confirm-timeout", type=_positive, default=1.0, metavar="S",
                   help="how long an IOC has to confirm a name (1.0)")
    p.add_argument("--cache-size", type=_count, default=limits.cache_size, metavar="N",
                   help=f"answers kept per protocol ({limits.cache_size})")
    p.add_argument("--negative-ttl", type=_positive, default=limits.negative_ttl,
                   metavar="S", help=f"how long a name nobody has is not looked for again "
                                     f"({limits.negative_ttl})")
    p.add_argument("--revalidate-after", type=_positive, default=limits.revalidate_after,
                   metavar="S", help=f"a cached answer older than this is confirmed again "
                                     f"with the IOC when a client asks for it "
                                     f"({limits.revalidate_after})")
    p.add_argument("--park-ttl", type=_positive, default=limits.park_ttl, metavar="S",
                   help=f"how long clients waiting for a name are remembered, to be "
                        f"answered when an IOC confirms it ({limits.park_ttl:.0f})")
    p.add_argument("--max-waiting", type=_count, default=limits.max_parked, metavar="N",
                   help=f"names with clients waiting ({limits.max_parked})")
    p.add_argument("--retry-max", type=_positive, default=limits.retry_max, metavar="S",
                   help=f"longest gap between confirmations of a waited-for name whose IOC "
                        f"does not answer yet ({limits.retry_max})")
    p.add_argument("--probe-rate", type=_positive, default=limits.probe_rate, metavar="N",
                   help=f"confirmation searches per second sent to IOCs, all together "
                        f"({limits.probe_rate:.0f})")
    p.add_argument("--max-circuits", type=_count, default=4096, metavar="N",
                   help="TCP clients per protocol (4096)")
    p.add_argument("--stats-interval", type=_positive, default=60.0, metavar="S",
                   help="log counters every S seconds at -v (60); also on SIGUSR1")
    p.add_argument("--metrics-port", type=port_arg, default=0, metavar="PORT",
                   help="serve Prometheus metrics on this TCP port, all addresses "
                        "(docs/metrics.md); 0, the default: none")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="-v: table changes and counters; -vv: every answer")
    return p


def config_from(args: argparse.Namespace) -> ServerConfig:
    base = Limits()
    limits = Limits(cache_size=args.cache_size, negative_ttl=args.negative_ttl,
                    park_ttl=args.park_ttl, max_parked=args.max_waiting,
                    retry_max=max(args.retry_max, base.retry_first),
                    probe_rate=args.probe_rate, revalidate_after=args.revalidate_after,
                    probe_burst=max(base.probe_burst, args.probe_rate / 4))
    return ServerConfig(hosts=args.listen or ["0.0.0.0"], ca_port=args.ca_port,
                        pva_port=args.pva_port, pva_udp_port=args.pva_udp_port,
                        internal_networks=args.internal_network,
                        max_circuits=args.max_circuits, confirm_timeout=args.confirm_timeout,
                        limits=limits, stats_interval=args.stats_interval)


def _kube_api_client(kubeconfig: str | None):  # type: ignore[no-untyped-def]
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)


async def serve(args: argparse.Namespace,
                on_ready: Callable[[NameServer], None] | None = None) -> None:
    """Load the table, open the listeners, run until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    table = Table()
    server = NameServer(config_from(args), table)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, server.log_stats)
    source_stop: Callable[[], None]
    if args.table is not None:
        tablefile = TableFile(args.table, table)
        tablefile.load()
        tablefile.start()
        loop.add_signal_handler(signal.SIGHUP, tablefile.load)
        source_stop = tablefile.stop
    else:
        from .kubewatch import KubeWatch

        watch = KubeWatch(loop, table, args.namespace or None, _kube_api_client(args.kubeconfig))
        watch.start()
        source_stop = watch.stop
        log.info("listing IOCs in %s", ", ".join(args.namespace) or "all namespaces")
        synced = asyncio.ensure_future(watch.synced.wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({synced, stopped}, return_when=asyncio.FIRST_COMPLETED)
        synced.cancel()
        stopped.cancel()
        if stop.is_set():
            source_stop()
            return
    metrics: MetricsServer | None = None
    try:
        await server.start()
        if args.metrics_port:
            metrics = MetricsServer(server.registry, args.metrics_port)
            log.info("metrics on port %d", metrics.port)
        if on_ready is not None:
            on_ready(server)
        await stop.wait()
        log.info("stopping")
    finally:
        if metrics is not None:
            metrics.stop()
        source_stop()
        await server.stop()
        server.log_stats()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.namespace and not args.kubernetes:
        parser.error("--namespace needs --kubernetes")
    if args.table is not None:
        try:
            load_table(args.table)
        except (OSError, TableError) as exc:
            parser.error(f"--table {args.table}: {exc}")
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.verbose < 2:
        logging.getLogger("kubernetes").setLevel(logging.WARNING)
    try:
        asyncio.run(serve(args))
    except OSError as exc:  # a port taken, an address not ours
        log.error("cannot serve: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
