"""What the name server's Prometheus metrics cost: two name servers side by side, one
with `--metrics-port` (scraped every --scrape-interval s, far more often than
Prometheus' usual 15-60 s) and one without, under bench_name_server's own search
loads (CA UDP, CA TCP, PVA UDP), taken in turn, several rounds.

    .venv/bin/python -m benchmarks.bench_metrics_cost [--names 2000 --seconds 4 --rounds 3]
        [--baseline REV] [--pin]

--pin runs the name servers on the last CPU and the load on the first (fewer moves
between cores on a small machine; other work there still competes).

--in-process measures instead what a busy shared machine cannot upset much: the CPU
time (process_time) the name server's own listeners take per answer, fed searches
directly (CA UDP datagrams of 25 names, CA TCP circuits of 100 searches per read, PVA
UDP datagrams of 50 names; transports that discard what is written), this commit's
code against --baseline REV's, in alternate child processes, best of --rounds; and the
cost of one scrape (collecting the registry and rendering the text format).

--baseline REV adds a third name server: the operator package of an older commit (from
`git archive`), e.g. one from before the metrics, whose listeners did not count answers.

Everything on 127.0.0.1, no root, no lab: each name server runs in a process of its
own with its names cached (as bench_name_server warms its cache before measuring), so
the load measures answering only. Prints answers per second and the name server's CPU
per 1,000 answers for each, and the cost of a scrape. Internal role:
``bench_metrics_cost.py _serve METRICS_PORT NAMES_FILE``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from benchmarks.bench_name_server import _ca_tcp, _ca_udp, _pva_udp

HOST = "127.0.0.1"
MODES = ("ca-udp", "ca-tcp", "pva-udp")


# ============================================================== role: one name server

def serve_main(metrics_port: int, names_file: str) -> None:
    from ioc_operator.metrics import MetricsServer
    from ioc_operator.nameserver.resolver import Limits
    from ioc_operator.nameserver.server import NameServer, ServerConfig
    from ioc_operator.nameserver.table import CA, IOC, PVA, Endpoint, Table

    names = Path(names_file).read_text().split()

    async def main() -> None:
        table = Table()
        # An IOC on loopback where nothing answers: the answers are all cached, and
        # never revalidated during the run, so no search leaves the host.
        ioc = IOC(key="bench/ioc", prefix="BENCH:", ca=Endpoint(HOST, 9),
                  pva=Endpoint(HOST, 9))
        table.put(ioc)
        limits = Limits(cache_size=2 * len(names) + 10, revalidate_after=1e9)
        server = NameServer(ServerConfig(hosts=[HOST], ca_port=0, pva_port=0, pva_udp_port=0,
                                         limits=limits, stats_interval=1e9), table)
        await server.start()
        for name in names:
            server.resolver.remember(CA, name, ioc)
            server.resolver.remember(PVA, name, ioc)
        metrics = MetricsServer(server.registry, 0, HOST) if metrics_port >= 0 else None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print(json.dumps({"ca": server.bound["ca-tcp"][0][1],
                          "ca_udp": server.bound["ca-udp"][0][1],
                          "pva_udp": server.bound["pva-udp"][0][1],
                          "metrics": metrics.port if metrics else None}), flush=True)
        await stop.wait()
        if metrics is not None:
            metrics.stop()
        await server.stop()

    asyncio.run(main())


# ============================================================== role: in-process feed

class _Sink:
    """A transport that takes everything and sends nothing."""

    def sendto(self, data: bytes, addr: Any = None) -> None:
        pass

    def writelines(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": (HOST, 40000)}.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None) -> None:
        pass


def feed_main(n_names: int, answers: int) -> None:
    import struct

    from ioc_operator.nameserver import ca, pva
    from ioc_operator.nameserver.resolver import Limits
    from ioc_operator.nameserver.server import CaCircuit, CaUdp, NameServer, PvaUdp, ServerConfig
    from ioc_operator.nameserver.table import CA, IOC, PVA, Endpoint, Table

    names = [f"BENCH:pv{i:06d}" for i in range(n_names)]
    version = struct.pack(">HHHHII", 0, 0, 0, 13, 0, 0)

    async def main() -> dict[str, float]:
        table = Table()
        ioc = IOC(key="bench/ioc", prefix="BENCH:", ca=Endpoint(HOST, 9), pva=Endpoint(HOST, 9))
        table.put(ioc)
        server = NameServer(ServerConfig(limits=Limits(cache_size=2 * n_names + 10,
                                                       revalidate_after=1e9)), table)
        for name in names:
            server.resolver.remember(CA, name, ioc)
            server.resolver.remember(PVA, name, ioc)
        out: dict[str, float] = {}
        ca_udp = CaUdp(server)
        ca_udp.connection_made(_Sink())  # type: ignore[arg-type]
        datagrams = [version + b"".join(ca.search_request(n, i + k)
                                        for k, n in enumerate(names[i:i + 25]))
                     for i in range(0, n_names, 25)]
        pva_udp = PvaUdp(server)
        pva_udp.connection_made(_Sink())  # type: ignore[arg-type]
        pva_datagrams = [pva.encode_search(i, [(i + k, n) for k, n in
                                              enumerate(names[i:i + 50])], 40000,
                                           must_reply=False)
                         for i in range(0, n_names, 50)]
        circuit = CaCircuit(server)
        circuit.connection_made(_Sink())  # type: ignore[arg-type]
        chunks = [b"".join(ca.search_request(n, i + k) for k, n in enumerate(names[i:i + 100]))
                  for i in range(0, n_names, 100)]
        for mode, feed, per in (
                ("ca-udp", lambda d: ca_udp.datagram_received(d, (HOST, 40000)), datagrams),
                ("ca-tcp", circuit.data_received, chunks),
                ("pva-udp", lambda d: pva_udp.datagram_received(d, (HOST, 40000)),
                 pva_datagrams)):
            rounds = max(1, answers // n_names)
            t0 = time.process_time()
            for _ in range(rounds):
                for item in per:
                    feed(item)
                    server.flush()  # the loop's next iteration sends what was answered
            out[mode] = (time.process_time() - t0) / (rounds * n_names) * 1e6
        registry = getattr(server, "registry", None)
        if registry is not None:
            from prometheus_client import generate_latest

            t0 = time.process_time()
            for _ in range(200):
                generate_latest(registry)
            out["scrape_us"] = (time.process_time() - t0) / 200 * 1e6
        return out

    print(json.dumps(asyncio.run(main())), flush=True)


def baseline_tree(rev: str, tmp: str) -> Path:
    """The operator package of git revision `rev`, unpacked under `tmp` (once)."""
    tree = Path(tmp) / "baseline"
    if not tree.exists():
        tree.mkdir()
        archive = subprocess.run(["git", "archive", rev, "operator"], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree / "operator"


def in_process(args: argparse.Namespace, tmp: str) -> None:
    trees: dict[str, Path | None] = {"this commit": None}
    if args.baseline:
        trees = {args.baseline[:10]: baseline_tree(args.baseline, tmp), **trees}
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in trees}
    for r in range(args.rounds):
        for label, package in (trees.items() if r % 2 == 0 else reversed(trees.items())):
            env = dict(os.environ)
            if package is not None:
                env["PYTHONPATH"] = f"{package}{os.pathsep}{ROOT}"
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_metrics_cost", "_feed",
                 str(args.names), str(args.answers)],
                capture_output=True, text=True, cwd=ROOT, env=env, check=True)
            runs[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"name server listeners fed in process, {args.names} names cached, "
          f"{args.answers} answers per load and run; CPU us per answer, best (median) "
          f"of {args.rounds} runs each")
    first = next(iter(trees))
    print(f"{'load':8} " + " ".join(f"{label:>22}" for label in trees) + "   change")
    for mode in MODES:
        best = {label: min(x[mode] for x in runs[label]) for label in trees}
        med = {label: statistics.median(x[mode] for x in runs[label]) for label in trees}
        cells = " ".join(f"{best[label]:10.3f} ({med[label]:8.3f})" for label in trees)
        change = "" if len(trees) == 1 else (
            f"   {(best['this commit'] / best[first] - 1) * 100:+5.1f}% best, "
            f"{(med['this commit'] / med[first] - 1) * 100:+5.1f}% median")
        print(f"{mode:8} {cells}{change}")
    scrape = [x["scrape_us"] for x in runs["this commit"] if "scrape_us" in x]
    if scrape:
        print(f"one scrape (collect + text format): {min(scrape):.0f} us best, "
              f"{statistics.median(scrape):.0f} us median")


# ============================================================== the side by side

def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


ROOT = Path(__file__).resolve().parents[1]


class Server:
    def __init__(self, label: str, metrics: bool, names_file: Path,
                 package: Path | None = None, cpu: int | None = None) -> None:
        self.label = label
        env = dict(os.environ)
        if package is not None:  # an older ioc_operator, ahead of the installed one
            env["PYTHONPATH"] = f"{package}{os.pathsep}{ROOT}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_metrics_cost", "_serve",
             "0" if metrics else "-1", str(names_file)],
            stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env,
            preexec_fn=None if cpu is None else lambda: os.sched_setaffinity(0, {cpu}))
        assert self.proc.stdout is not None
        self.ports: dict[str, Any] = json.loads(self.proc.stdout.readline())

    def load(self, mode: str, names: Sequence[str], seconds: float) -> dict[str, float]:
        run = {"ca-udp": lambda: _ca_udp(HOST, names, seconds, port=self.ports["ca_udp"]),
               "ca-tcp": lambda: _ca_tcp(HOST, names, seconds, port=self.ports["ca"]),
               "pva-udp": lambda: _pva_udp(HOST, names, seconds, port=self.ports["pva_udp"])}
        cpu0 = cpu_seconds(self.proc.pid)
        out = run[mode]()
        cpu = cpu_seconds(self.proc.pid) - cpu0
        return {"per_s": out["answered"] / out["seconds"],
                "cpu_per_1000": cpu / max(1, out["answered"]) * 1000}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Scraper(threading.Thread):
    """Scrapes one endpoint every `interval` seconds until stopped; keeps each time."""

    def __init__(self, url: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = url, interval
        self.times: list[float] = []
        self.size = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            t0 = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=5) as response:
                self.size = len(response.read())
            self.times.append(time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_serve"]:
        serve_main(int(argv[1]), argv[2])
        return
    if argv[:1] == ["_feed"]:
        feed_main(int(argv[1]), int(argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--names", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scrape-interval", type=float, default=1.0)
    p.add_argument("--baseline", metavar="REV",
                   help="also run the name server of this commit (metrics off)")
    p.add_argument("--pin", action="store_true",
                   help="name servers on the last CPU, the load on the first")
    p.add_argument("--in-process", action="store_true",
                   help="CPU per answer of the listeners fed directly (see above)")
    p.add_argument("--answers", type=int, default=200_000,
                   help="with --in-process: answers per load and run")
    args = p.parse_args(argv)
    if args.in_process:
        with TemporaryDirectory() as tmp:
            in_process(args, tmp)
        return
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu = cpus[-1] if args.pin and len(cpus) > 1 else None
    if server_cpu is not None:
        os.sched_setaffinity(0, {cpus[0]})
    names = [f"BENCH:pv{i:06d}" for i in range(args.names)]
    with TemporaryDirectory() as tmp:
        names_file = Path(tmp) / "names.txt"
        names_file.write_text("\n".join(names) + "\n")
        servers = [Server("metrics off", False, names_file, cpu=server_cpu),
                   Server("metrics on", True, names_file, cpu=server_cpu)]
        if args.baseline:
            servers.insert(0, Server(f"{args.baseline[:10]}", False, names_file,
                                     baseline_tree(args.baseline, tmp), cpu=server_cpu))
        on = servers[-1]
        scraper = Scraper(f"http://{HOST}:{on.ports['metrics']}/metrics", args.scrape_interval)
        scraper.start()
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        try:
            for r in range(args.rounds):
                for mode in MODES:
                    # alternate the order, so none always runs on a warmer host
                    for server in servers if r % 2 == 0 else servers[::-1]:
                        results.setdefault((server.label, mode), []).append(
                            server.load(mode, names, args.seconds))
        finally:
            scraper.halt.set()
            scraper.join()
            for server in servers:
                server.stop()
    print(f"name server, {args.names} names cached, {args.rounds} rounds of "
          f"{args.seconds:.0f} s per load and server (medians); metrics scraped every "
          f"{args.scrape_interval:g} s" + (f"; servers on CPU {server_cpu}, load on CPU "
                                            f"{cpus[0]}" if server_cpu is not None else ""))
    first = servers[0].label
    print(f"{'load':8} {'server':12} {'answers/s':>10} {'CPU ms per 1000 answers':>24}"
          f"   (change against {first})")
    for mode in MODES:
        base: dict[str, float] = {}
        for server in servers:
            rows = results[(server.label, mode)]
            a = statistics.median(x["per_s"] for x in rows)
            c = statistics.median(x["cpu_per_1000"] for x in rows) * 1000
            base = base or {"a": a, "c": c}
            change = ("" if server.label == first else
                      f"   {(a / base['a'] - 1) * 100:+5.1f}% answers/s, "
                      f"{(c / base['c'] - 1) * 100:+5.1f}% CPU")
            print(f"{mode:8} {server.label:12} {a:10,.0f} {c:24.2f}{change}")
    if scraper.times:
        print(f"scrapes: {len(scraper.times)}, median {statistics.median(scraper.times) * 1000:.1f}"
              f" ms, max {max(scraper.times) * 1000:.1f} ms, {scraper.size} bytes")


if __name__ == "__main__":
    main()
