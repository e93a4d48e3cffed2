"""The name service against the per-IOC directory, side by side in one run of the lab.

    sudo .venv/bin/python -m benchmarks.bench_name_server [--iocs 50 --pvs-per-ioc 40]
        [--large-iocs 200 --large-pvs-per-ioc 50] [--repeat 3]

IOCs are rendered by the operator and run as EPICS Base soft IOCs in lab pods behind
their Services (as benchmarks/bench_discovery.py runs them, whose machinery this
reuses); the large set runs *lightweight* soft IOCs: the same IOC without the
CAP_IPC_LOCK and CAP_SYS_NICE root has here, so it does not lock its memory
(39 instead of 91 MB each). ioc-name-server runs in a pod of its own node behind a
ClusterIP, its table holding what the IOCs' status would say. A client pod on another
node connects every PV, in a fresh process per run, with libca (pyepics) and p4p:

* **name service, cold**: the constant directory (the name service in NAME_SERVERS and
  ADDR_LIST), the name server just restarted (nothing cached);
* **name service, warm**: the same again (answers cached);
* **address lists** / **name servers**: the per-IOC directory's ADDR_LIST or
  NAME_SERVERS of every IOC (what the operator publishes without a name service).

Search traffic is counted in the client pod (iptables counters and a packet capture,
bench_discovery's); searches reaching IOCs are the client's own for per-IOC lists, the
name server's confirmation searches for the name service (its counters). Then the name
server alone: searches answered per second and CPU per 1,000 searches (load generated
from a client pod, names cached), memory with 100,000 names cached (an IOC holding
100,000 records), and how fast running clients reach a new IOC, with the name server's
answers to waiting clients and without (the clients' own search backoff).

Writes the figures block of docs/name-server.md. Needs root (see docs/lab.md). Internal
role, run in a pod: ``bench_name_server.py _load MODE TARGET NAMES_FILE SECONDS``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import statistics
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the in-pod role must start without the lab's imports
    from benchmarks.bench_discovery import BenchIOC, PacketCounters, Row
    from ioc_operator.render import ResolvedPorts
    from ioc_testbed.lab import Lab, Pod
    from ioc_testbed.lab.nameservice import LabNameService

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "name-server.md"
START = "<!-- figures: written by benchmarks/bench_name_server.py, do not edit -->"
END = "<!-- end of figures -->"
CLUSTER_IP = "198.19.0.53"
LIBS = ("libca", "p4p")
SETTINGS = ("name service, cold", "name service, warm", "address lists", "name servers")
CA_PORT, PVA_PORT, PVA_UDP_PORT = 5064, 5075, 5076

# ============================================================== in-pod role: load


def _ca_search(name: str, cid: int) -> bytes:
    raw = name.encode() + b"\0" * (8 - len(name) % 8)
    return struct.pack(">HHHHII", 6, len(raw), 5, 13, cid, cid) + raw


CA_VERSION = struct.pack(">HHHHII", 0, 0, 0, 13, 0, 0)


def _wait_readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def _windowed(sock: socket.socket, requests: Sequence[bytes], sizes: Sequence[int],
              answers: Any, seconds: float, window: int = 4000) -> dict[str, Any]:
    """Send `requests` round and round with at most `window` names unanswered;
    `answers(data)` counts the answers in what was received. Over UDP a lost answer would
    close the window for good: after 0.5 s without any, it opens again."""
    sent = answered = k = 0
    t0 = time.monotonic()
    last_answer = t0
    while time.monotonic() - t0 < seconds:
        while sent - answered < window:
            try:
                sock.send(requests[k % len(requests)])
            except BlockingIOError:
                break
            sent += sizes[k % len(requests)]
            k += 1
        if not _wait_readable(sock, 0.05):
            if time.monotonic() - last_answer > 0.5:
                answered = sent
            continue
        for _ in range(1000):
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                break
            answered += answers(data)
            last_answer = time.monotonic()
    return {"sent": sent, "answered": answered, "seconds": time.monotonic() - t0}


def _batches(names: Sequence[str], batch: int) -> list[tuple[int, Sequence[str]]]:
    return [(i, names[i:i + batch]) for i in range(0, len(names), batch)]


def _udp_socket(target: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind(("0.0.0.0", 0))
    sock.connect((target, port))
    sock.setblocking(False)
    return sock


def _ca_udp(target: str, names: Sequence[str], seconds: float,
            port: int = CA_PORT) -> dict[str, Any]:
    """Datagrams of 25 searches, as libca packs them; a reply is a VERSION, then 24
    bytes per answer."""
    batches = _batches(names, 25)
    requests = [CA_VERSION + b"".join(_ca_search(n, i + k) for k, n in enumerate(part))
                for i, part in batches]
    return _windowed(_udp_socket(target, port), requests, [len(p) for _, p in batches],
                     lambda data: (len(data) - 16) // 24, seconds)


def _ca_tcp(target: str, names: Sequence[str], seconds: float,
            port: int = CA_PORT) -> dict[str, Any]:
    """libca's name-server circuit: one search message per name, written 100 at a time
    (a short write is finished before anything else); 16 bytes per answer."""
    sock = socket.create_connection((target, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.recv(16)  # the server's VERSION
    sock.sendall(CA_VERSION)
    batches = _batches(names, 100)
    requests = [b"".join(_ca_search(n, i + k) for k, n in enumerate(part))
                for i, part in batches]
    received = bytearray()

    class Stream:
        """send() of whole requests on a blocking socket; recv() without waiting."""

        def send(self, data: bytes) -> None:
            sock.sendall(data)

        def recv(self, size: int) -> bytes:
            sock.setblocking(False)
            try:
                return sock.recv(size)
            finally:
                sock.settimeout(5)

        def fileno(self) -> int:
            return sock.fileno()

    def answers(data: bytes) -> int:
        received.extend(data)
        whole = len(received) // 16
        del received[:whole * 16]
        return whole

    return _windowed(Stream(), requests, [len(p) for _, p in batches],  # type: ignore[arg-type]
                     answers, seconds)


def _pva_udp(target: str, names: Sequence[str], seconds: float,
             port: int = PVA_UDP_PORT) -> dict[str, Any]:
    """Search messages of 50 names; a response is 49 bytes, then 4 per cid."""
    from ioc_operator.nameserver import pva

    sock = _udp_socket(target, port)
    port = sock.getsockname()[1]
    batches = _batches(names, 50)
    requests = [pva.encode_search(i, [(i + k, n) for k, n in enumerate(part)], port,
                                  must_reply=False) for i, part in batches]
    return _windowed(sock, requests, [len(p) for _, p in batches],
                     lambda data: (len(data) - 49) // 4, seconds)


def _ca_fill(target: str, names: Sequence[str], seconds: float) -> dict[str, Any]:
    """Ask every name once until answered (re-asking the rest every 1.5 s): fills the
    name server's cache."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    sock.connect((target, CA_PORT))
    sock.setblocking(False)
    waiting = set(range(len(names)))
    t0 = time.monotonic()
    while waiting and time.monotonic() - t0 < seconds:
        order = sorted(waiting)
        for i in range(0, len(order), 25):
            datagram = CA_VERSION + b"".join(_ca_search(names[c], c) for c in order[i:i + 25])
            while True:
                try:
                    sock.send(datagram)
                    break
                except BlockingIOError:
                    _wait_readable(sock, 0.01)
            if i % 2500 == 0:
                time.sleep(0.02)  # about 100,000 names/s, below the probe budget's burst
        round_end = time.monotonic() + 1.5
        while time.monotonic() < round_end and waiting:
            if not _wait_readable(sock, 0.1):
                continue
            with contextlib.suppress(BlockingIOError):
                data = sock.recv(65536)
                for pos in range(16, len(data) - 23, 24):
                    waiting.discard(struct.unpack_from(">I", data, pos + 12)[0])
    return {"sent": len(names), "answered": len(names) - len(waiting),
            "seconds": time.monotonic() - t0}


def load_main(argv: Sequence[str]) -> None:
    mode, target, names_file, seconds = argv[0], argv[1], argv[2], float(argv[3])
    names = Path(names_file).read_text().split()
    runner = {"ca-udp": _ca_udp, "ca-tcp": _ca_tcp, "pva-udp": _pva_udp,
              "ca-fill": _ca_fill}[mode]
    sys.stdout.write(json.dumps(runner(target, names, seconds)) + "\n")
    sys.stdout.flush()
    os._exit(0)


# ============================================================== the lab side


@dataclass
class Cell:
    row: Row
    reaching: int  # PV name searches that reached IOCs
    ns_cpu: float  # name server CPU seconds during the run

    def messages(self) -> int:
        """Search messages the client sent: datagrams plus TCP search messages."""
        return self.row.udp_datagrams() + self.row.tcp_searches()[0]


def table_entries(iocs: Sequence[BenchIOC]) -> list[dict[str, Any]]:
    """What the operator's status says of each IOC (see nameserver/kubewatch.py)."""
    return [{"name": f"bench/{i.name}", "prefix": i.prefix, "ca": f"{i.cluster_ip}:{CA_PORT}",
             "pva": f"{i.cluster_ip}:{PVA_PORT}", "pvaSearch": f"{i.cluster_ip}:{PVA_UDP_PORT}"}
            for i in iocs]


def constant_env(protocol: str) -> dict[str, str]:
    from ioc_operator.discovery.clientenv import NameService, name_service_env

    return {k: v for k, v in name_service_env(NameService(CLUSTER_IP)).items()
            if k.startswith(f"EPICS_{protocol}_")}


@contextlib.contextmanager
def unlocked(lab: Lab) -> Iterator[None]:
    """IOCs started meanwhile run without CAP_IPC_LOCK and CAP_SYS_NICE: EPICS then uses
    no real-time priorities and does not lock its memory (iocInit's mlockall)."""
    wrapper = lab.tmpdir / "python-unlocked"
    wrapper.write_text("#!/bin/sh\nexec setpriv --bounding-set=-ipc_lock,-sys_nice "
                       f'--inh-caps=-ipc_lock,-sys_nice -- {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    saved = sys.executable
    sys.executable = str(wrapper)  # what bench_discovery.spawn_ioc starts
    try:
        yield
    finally:
        sys.executable = saved


def ns_pid(service: LabNameService) -> int:
    return service.replicas[0].popen.pid


def cell(lab: Lab, client: Pod, counters: PacketCounters, ports: ResolvedPorts,
         iocs: Sequence[BenchIOC], service: LabNameService, lib: str, settings: str,
         env: dict[str, str], timeout: float) -> Cell:
    from benchmarks import bench_discovery as bd

    protocol = "pva" if lib == "p4p" else "ca"
    if settings.endswith("cold"):
        service.kill(0)
        service.restart(0)
    stats0, cpu0 = service.stats(0), bd.cpu_seconds(ns_pid(service))
    row = bd.measure(lab, client, counters, ports, iocs, lib, settings, env, timeout)
    stats1, cpu1 = service.stats(0), bd.cpu_seconds(ns_pid(service))
    if settings.startswith("name service"):
        reaching = stats1[f"probes_{protocol}"] - stats0[f"probes_{protocol}"]
    else:
        reaching = row.udp_names() + row.tcp_searches()[1]
    return Cell(row, reaching, cpu1 - cpu0 if settings.startswith("name service") else 0.0)


def median_cell(cells: Sequence[Cell]) -> Cell:
    from benchmarks import bench_discovery as bd

    row = bd.median_row([c.row for c in cells])
    return next(c for c in cells if c.row is row)


CELL_HEADER = ("| client | settings | IOCs | PVs connected | seconds (all) "
               "| search messages per PV at the client | UDP datagrams + TCP search messages "
               "| names searched per PV | searches reaching IOCs (per PV) "
               "| name server CPU s |")


def cell_line(c: Cell) -> str:
    from benchmarks import bench_discovery as bd

    r, row = c.row.result, c.row
    total = max(1, r.get("total", 0))
    seconds = bd.spread(row.seconds_runs, bd.fmt_seconds(r.get("seconds")))
    if r.get("seconds") is None:
        seconds = f"timeout {r.get('timeout', '?')} s"
    ns_cpu = f"{c.ns_cpu:.2f}" if row.settings.startswith("name service") else "-"
    names = row.udp_names() + row.tcp_searches()[1]
    return (f"| {row.lib} | {row.settings} | {row.iocs} | {r.get('connected', 0)} / "
            f"{r.get('total', 0)} | {seconds} | {c.messages() / total:.2f} "
            f"| {row.udp_datagrams()} + {row.tcp_searches()[0]} | {names / total:.1f} "
            f"| {c.reaching} ({c.reaching / total:.1f}) | {ns_cpu} |")


def connect_all(lab: Lab, args: argparse.Namespace, n_iocs: int, pvs_per_ioc: int,
                lightweight: bool, repeat: int, info: dict[str, Any]) -> list[Cell]:
    """One set of IOCs, the name server, a client: every (client, settings) cell."""
    from benchmarks import bench_discovery as bd
    from ioc_operator.discovery.directory import directory_env
    from ioc_testbed.lab.nameservice import LabNameService

    setup = argparse.Namespace(iocs=n_iocs, pvs_per_ioc=pvs_per_ioc,
                               start_batch=args.start_batch, ioc_nodes=args.ioc_nodes)
    start = time.monotonic()
    with unlocked(lab) if lightweight else contextlib.nullcontext():
        iocs, ports = bd.start_iocs(lab, setup)
    rss = sum(bd.status_mb(i.server.pid) for i in iocs)
    key = f"{n_iocs}x{pvs_per_ioc}"
    info[key] = {"start_s": time.monotonic() - start, "rss_each": rss / len(iocs),
                 "lightweight": lightweight}
    print(f"{len(iocs)} IOCs up in {info[key]['start_s']:.0f} s, "
          f"{info[key]['rss_each']:.0f} MB each", flush=True)
    service = LabNameService(lab, node=args.ioc_nodes, cluster_ip=CLUSTER_IP, replicas=1)
    service.set_iocs(table_entries(iocs))
    client = lab.add_pod(args.ioc_nodes + 1, name=f"client-{key}")
    counters = bd.PacketCounters(lab, client, ports)
    directory = directory_env(i.client_env for i in iocs)
    cells: list[Cell] = []
    for lib in LIBS:
        protocol = "PVA" if lib == "p4p" else "CA"
        per_ioc = bd.variants(directory, protocol)
        envs = {"name service, cold": constant_env(protocol),
                "name service, warm": constant_env(protocol),
                "address lists": per_ioc["address lists"],
                "name servers": per_ioc["name servers"]}
        runs: dict[str, list[Cell]] = {s: [] for s in SETTINGS}
        for _ in range(repeat):
            for settings in SETTINGS:
                runs[settings].append(cell(lab, client, counters, ports, iocs, service,
                                           lib, settings, envs[settings], args.timeout))
        for settings in SETTINGS:
            cells.append(median_cell(runs[settings]))
            print(cell_line(cells[-1]), flush=True)
    if not args.skip_name_server and not lightweight:
        name_server_figures(lab, args, iocs, service, client, info)
    return cells


# ------------------------------------------------------------- the name server alone


def run_load(lab: Lab, pod: Pod, mode: str, names: Sequence[str], seconds: float
             ) -> dict[str, Any]:
    path = lab.tmpdir / f"load-{mode}-{len(names)}.txt"
    path.write_text("\n".join(names) + "\n")
    argv = [sys.executable, str(Path(__file__).resolve()), "_load", mode, CLUSTER_IP,
            str(path), str(seconds)]
    proc = lab.exec(pod, argv, {}, timeout=seconds + 120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"load {mode} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return dict(json.loads(lines[-1]))


def name_server_figures(lab: Lab, args: argparse.Namespace, iocs: Sequence[BenchIOC],
                        service: LabNameService, client: Pod, info: dict[str, Any]) -> None:
    from benchmarks import bench_discovery as bd

    names = [pv for i in iocs for pv in i.pvs]
    pid = ns_pid(service)
    # names cached first: the load measures answering, not the IOCs
    run_load(lab, client, "ca-fill", names, 30)
    with contextlib.suppress(SystemExit):
        run_load(lab, client, "pva-udp", names, 3)
    throughput = {}
    for mode in ("ca-udp", "ca-tcp", "pva-udp"):
        cpu0, t0 = bd.cpu_seconds(pid), time.monotonic()
        out = run_load(lab, client, mode, names, args.load_seconds)
        cpu, wall = bd.cpu_seconds(pid) - cpu0, time.monotonic() - t0
        throughput[mode] = {"answered": out["answered"], "seconds": out["seconds"],
                            "per_s": out["answered"] / out["seconds"], "cpu_s": cpu,
                            "wall": wall,
                            "per_cpu_s": out["answered"] / cpu if cpu else 0.0,
                            "cpu_per_1000": cpu / max(1, out["answered"]) * 1000}
        print(f"  {mode}: {throughput[mode]['per_s']:.0f} answers/s, "
              f"{throughput[mode]['per_cpu_s']:.0f} per CPU second", flush=True)
    info["throughput"] = throughput
    info["memory"] = memory_with_cached_names(lab, args, service, client)
    info["new_ioc"] = new_ioc_latency(lab, args, iocs, service, client)


def memory_with_cached_names(lab: Lab, args: argparse.Namespace, service: LabNameService,
                             client: Pod) -> dict[str, Any]:
    """One IOC holding N records; every name asked once through the name server."""
    from benchmarks import bench_discovery as bd
    from ioc_operator.allocation.plan import render_all
    from ioc_operator.model.validation import parse_ioc

    n = args.cached_names
    service.kill(0)
    service.restart(0)
    pid = ns_pid(service)
    before = bd.status_mb(pid)
    db = lab.tmpdir / "big.db"
    db.write_text(bd.database(n))
    (rendered,) = render_all([parse_ioc(bd.ioc_manifest(900))])
    with unlocked(lab):
        server = bd.spawn_ioc(lab, rendered, 0, db)
        server.wait_ready(timeout=600)
    big = bd.publish(lab, rendered, server, "198.19.2.200", n)
    service.set_iocs([*table_entries_of(service), *table_entries([big])])
    out = run_load(lab, client, "ca-fill", big.pvs, 240)
    stats = service.stats(0)
    after, peak = bd.status_mb(pid), bd.status_mb(pid, "VmHWM")
    print(f"  {stats['cached_ca']} names cached: RSS {before:.0f} -> {after:.0f} MB "
          f"(peak {peak:.0f})", flush=True)
    server.stop()
    return {"names": n, "answered": out["answered"], "fill_s": out["seconds"],
            "cached": stats["cached_ca"], "rss_before": before, "rss_after": after,
            "rss_peak": peak, "probes": stats["probes_ca"]}


def table_entries_of(service: LabNameService) -> list[dict[str, Any]]:
    import yaml

    return list((yaml.safe_load(service.table.read_text()) or {}).get("iocs") or [])


def new_ioc_latency(lab: Lab, args: argparse.Namespace, iocs: Sequence[BenchIOC],
                    service: LabNameService, client: Pod) -> dict[str, Any]:
    """Running clients (libca, p4p) waiting for a PV of an IOC that does not exist yet;
    the IOC starts after `--wait` s, then the table learns it. Seconds from the table
    write to the first value, with the name server answering waiting clients, and with
    that off (--park-ttl tiny: the clients' own search backoff decides)."""
    from benchmarks import bench_discovery as bd
    from ioc_operator.allocation.plan import render_all
    from ioc_operator.model.validation import parse_ioc
    from ioc_testbed.lab.running_client import read_events, start_watch

    base = table_entries_of(service)
    out: dict[str, Any] = {}
    index = 1000
    for mode, extra, wait in [(m, x, w) for w in args.waits for m, x in (
            ("answers waiting clients", []),
            ("clients' own backoff", ["--park-ttl", "0.001"]))]:
        service.args = list(extra)
        service.kill(0)
        service.restart(0)
        times: dict[str, list[float | None]] = {"libca": [], "p4p": []}
        for _ in range(args.new_ioc_trials):
            index += 1
            (rendered,) = render_all([parse_ioc(bd.ioc_manifest(index))])
            pv = bd.record_names(rendered.ioc.spec.prefix, 1)[0]
            env = {**constant_env("CA"), **constant_env("PVA")}
            watchers = {"libca": start_watch(lab, client, "pyepics", [pv], env, 240),
                        "p4p": start_watch(lab, client, "p4p", [pv], env, 240)}
            time.sleep(wait)
            db = lab.tmpdir / "new.db"
            db.write_text(bd.database(1))
            with unlocked(lab):
                server = bd.spawn_ioc(lab, rendered, 0, db)
                server.wait_ready(timeout=120)
            new = bd.publish(lab, rendered, server, f"198.19.3.{index - 1000}", 1)
            base.extend(table_entries([new]))
            learned = service.set_iocs(base)
            deadline = time.monotonic() + args.reach_timeout
            reached: dict[str, float | None] = dict.fromkeys(watchers)
            while time.monotonic() < deadline and not all(reached.values()):
                reached = {lib: read_events(w).first(pv, "value") for lib, w in
                           watchers.items()}
                time.sleep(0.05)
            for lib, t in reached.items():
                times[lib].append(round(t - learned, 2) if t else None)
                lab.stop(watchers[lib])
            print(f"  new IOC ({mode}, {wait:.0f} s): " + ", ".join(
                f"{lib} {times[lib][-1]}" for lib in times), flush=True)
        out[f"{mode}, after {wait:.0f} s"] = times
    service.args = []
    service.kill(0)
    service.restart(0)
    return out


# ------------------------------------------------------------- output


def replace_block(text: str, block: list[str]) -> str:
    if START in text and END in text:
        head, rest = text.split(START, 1)
        return head + "\n".join(block) + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n" + "\n".join(block) + "\n"


def fmt_times(values: Sequence[float | None]) -> str:
    known = [v for v in values if v is not None]
    missing = len(values) - len(known)
    text = ", ".join(f"{v:.2f}" for v in known)
    if known:
        text = f"median {statistics.median(known):.2f} ({text})"
    return text + (f", {missing} not within the bound" if missing else "")


def figures(cells: Sequence[Cell], info: dict[str, Any], args: argparse.Namespace
            ) -> list[str]:
    out = [START, "",
           f"Run {time.strftime('%Y-%m-%d %H:%M')} by `sudo .venv/bin/python -m "
           f"benchmarks.bench_name_server {' '.join(args.argv)}`, "
           f"{info['total_s']:.0f} s. Machine: {info['machine']}; other processes used "
           f"{info['others_cpu']:.0f} % of one core during the run (seconds and CPU "
           "figures are pessimistic by that much; counts are not).", "",
           "Versions: " + "; ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".",
           ""]
    for key, meta in info.items():
        if isinstance(meta, dict) and "start_s" in meta:
            kind = ("lightweight soft IOCs (memory not locked)" if meta["lightweight"]
                    else "soft IOCs")
            out.append(f"* {key.replace('x', ' IOCs x ')} PVs: {kind}, {meta['rss_each']:.0f}"
                       f" MB each, started in {meta['start_s']:.0f} s.")
    out += ["", "### Connecting every PV", "", CELL_HEADER,
            "|---|---|---|---|---|---|---|---|---|---|"]
    out += [cell_line(c) for c in cells]
    out += ["", "*Search messages per PV at the client*: UDP search datagrams plus TCP "
            "search messages the client sent, divided by the PVs (target <= 1.1). *Names "
            "searched per PV*: PV names in those messages (a CA datagram holds about 25, "
            "a PVA search message up to about 50; libca and pvxs send every name both "
            "ways when both lists name a server). "
            "*Searches reaching IOCs*: PV name searches IOCs received: the client's own "
            "with per-IOC lists (every name to every IOC listed), the name server's "
            "confirmations with the name service (one per name, none once cached). "
            "Seconds: median of the repeats, range in parentheses."]
    if "throughput" in info:
        out += ["", "### The name server alone", "",
                "| load | answers per second | CPU s per 1,000 searches "
                "| answers per CPU second (one core) |", "|---|---|---|---|"]
        labels = {"ca-udp": "CA over UDP, 25 names per datagram (as libca packs them)",
                  "ca-tcp": "CA over TCP, one message per name (libca's name-server "
                            "circuit)",
                  "pva-udp": "PVA over UDP, 50 names per search message"}
        for mode, t in info["throughput"].items():
            out.append(f"| {labels[mode]} | {t['per_s']:,.0f} | {t['cpu_per_1000']:.3f} "
                       f"| {t['per_cpu_s']:,.0f} |")
        out += ["", "Names cached; one load generator process in a client pod on "
                f"another node, {args.load_seconds:.0f} s each, at most 4,000 names "
                "unanswered. The name server is one asyncio process (one core)."]
        m = info["memory"]
        out += ["", f"Memory with {m['cached']:,} names cached (an IOC holding "
                f"{m['names']:,} records, every name asked once, {m['answered']:,} "
                f"answered in {m['fill_s']:.1f} s, {m['probes']:,} confirmation "
                f"searches): RSS {m['rss_before']:.0f} MB before, {m['rss_after']:.0f} "
                f"MB after, peak {m['rss_peak']:.0f} MB."]
        out += ["", "Running clients reaching a new IOC: a libca and a p4p client wait for "
                "a PV of an IOC that does not exist; after the time shown the IOC starts "
                "and the table learns it. Seconds from the table learning the IOC to the "
                "first value, with the name server answering the waiting clients, and "
                "with that off (`--park-ttl 0.001`: the clients' own search backoff "
                "decides):", ""]
        for key, per_lib in info["new_ioc"].items():
            for lib, values in per_lib.items():
                out.append(f"* {key}, {lib}: {fmt_times(values)}")
    out += ["", *info["notes"], END]
    return out


# ------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iocs", type=int, default=50)
    p.add_argument("--pvs-per-ioc", type=int, default=40)
    p.add_argument("--large-iocs", type=int, default=200,
                   help="lightweight IOCs of the second set (0: none)")
    p.add_argument("--large-pvs-per-ioc", type=int, default=50)
    p.add_argument("--ioc-nodes", type=int, default=2)
    p.add_argument("--start-batch", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--large-repeat", type=int, default=1)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--load-seconds", type=float, default=8.0)
    p.add_argument("--cached-names", type=int, default=100_000)
    p.add_argument("--waits", default="15,90",
                   help="seconds clients wait for a new IOC's PV before it starts")
    p.add_argument("--new-ioc-trials", type=int, default=2)
    p.add_argument("--reach-timeout", type=float, default=120.0)
    p.add_argument("--skip-name-server", action="store_true")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    args.argv = list(argv)
    args.waits = [float(w) for w in args.waits.split(",") if w]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_load":
        return load_main(argv[1:])
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the lab needs root: sudo .venv/bin/python -m "
                         "benchmarks.bench_name_server")
    from benchmarks import bench_discovery as bd
    from ioc_testbed.lab import Lab
    from ioc_testbed.lab.netns import cleanup_stale

    cleanup_stale()
    start, busy0, own0 = time.monotonic(), bd.busy_seconds(), bd.own_seconds()
    info: dict[str, Any] = {"machine": bd.machine(), "versions": bd.versions(), "notes": []}
    cells: list[Cell] = []
    sets = [(args.iocs, args.pvs_per_ioc, False, args.repeat)]
    if args.large_iocs:
        sets.append((args.large_iocs, args.large_pvs_per_ioc, True, args.large_repeat))
    for n_iocs, pvs, lightweight, repeat in sets:
        with Lab(nodes=args.ioc_nodes + 2) as lab:  # IOCs, the name server, the client
            these = connect_all(lab, args, n_iocs, pvs, lightweight, repeat, info)
            info["notes"] += [note for c in these for note in bd.row_notes(c.row)]
            cells += these
    info["total_s"] = time.monotonic() - start
    others = (bd.busy_seconds() - busy0) - (bd.own_seconds() - own0)
    info["others_cpu"] = max(0.0, others) / info["total_s"] * 100
    block = figures(cells, info, args)
    print("\n".join(block))
    if not args.no_write:
        DOC.write_text(replace_block(DOC.read_text() if DOC.exists() else "", block))
        print(f"written to {DOC}")


if __name__ == "__main__":
    main()
