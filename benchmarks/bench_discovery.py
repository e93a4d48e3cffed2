"""Discovery cost in the network lab: how long a libca client and a p4p client take to
connect every PV of many IOCs with the settings the operator publishes, address lists
versus name servers, and how much search traffic the client sends doing it.

    sudo .venv/bin/python -m benchmarks.bench_discovery [--iocs 50 --pvs-per-ioc 40]

IOCs are rendered by the operator (pod mode, rsrv + QSRV2) and run as EPICS Base soft
IOCs (`python -m pvxslibs.ioc`) in lab pods with the env the renderer gives them, behind
their Service's DNAT. The client pod loads the directory the operator would publish for
them, minus NAME_SERVERS (address lists), minus ADDR_LIST (name servers), or whole.
Each (client, settings) runs in a fresh process; the datagrams it sends are counted by
iptables rules in its pod's namespace, and its search messages by a packet capture there.
Prints a table and writes docs/discovery-benchmark.md. Needs root (see docs/lab.md).

Internal roles, run inside the client pod by the benchmark itself:
``bench_discovery.py _client LIB PV_FILE TIMEOUT`` and ``bench_discovery.py _sniff ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the in-pod roles must start without the operator's imports
    from ioc_operator.allocation.plan import Rendered
    from ioc_operator.render import ResolvedPorts
    from ioc_testbed.lab import Lab, Pod
    from ioc_testbed.lab.servers import EpicsServer

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "discovery-benchmark.md"
NAMESPACE = "bench"
LIBS = ("libca", "libca-base7", "p4p")
VARIANTS = ("address lists", "name servers", "directory")
LAB_RANGE = "198.18.0.0/15"  # the only addresses lab traffic may go to
RECORD = "$(P)Sig{i:02}:Readback"  # with the prefix 20 characters, like real PV names

# ============================================================== in-pod role: the client


def _connected_summary(t0: float, times: Iterable[float], total: int,
                       timeout: float) -> dict[str, Any]:
    """Seconds from the first create to the 50th/90th/100th percent of connections."""
    rel = sorted(t - t0 for t in times)

    def at(share: float) -> float | None:
        need = max(1, math.ceil(total * share))
        return round(rel[need - 1], 3) if len(rel) >= need else None

    return {"total": total, "connected": len(rel), "timeout": timeout,
            "t50": at(0.5), "t90": at(0.9), "seconds": at(1.0)}


def _libca_connect(names: Sequence[str], timeout: float, base7: bool) -> dict[str, Any]:
    """Create every channel at once (searches are queued and batched by libca), then wait
    for the connection callbacks: no blocking per-channel calls."""
    if base7:
        import epicscorelibs.path.pyepics  # noqa: F401  (points pyepics at Base 7 libca)
    else:
        os.environ.pop("PYEPICS_LIBCA", None)  # pyepics' own bundled libca
    from epics import ca

    ca.initialize_libca()
    connected: dict[str, float] = {}
    everything = threading.Event()

    def on_connection(pvname: str = "", conn: bool = False, **_kw: Any) -> None:
        if conn and pvname not in connected:
            connected[pvname] = time.monotonic()
            if len(connected) == len(names):
                everything.set()

    t0 = time.monotonic()
    chids = [ca.create_channel(n, connect=False, auto_cb=False, callback=on_connection)
             for n in names]
    ca.flush_io()
    everything.wait(timeout)
    out = _connected_summary(t0, list(connected.values()), len(names), timeout)
    out["library"] = str(ca.find_libca())
    out["channels"] = len(chids)
    return out


def _p4p_connect(names: Sequence[str], timeout: float) -> dict[str, Any]:
    """One get per PV, all issued at once; a get completes once its channel connected.

    `Context.get(list)` would do the same but bounds only the gap between two
    completions; raw gets with a callback give per-PV times and one deadline."""
    from p4p.client import raw
    from p4p.client.thread import Context

    ctxt = Context("pva")
    done: dict[str, float] = {}
    failed: dict[str, str] = {}
    everything = threading.Event()

    def handler(name: str) -> Any:
        def on_done(value: Any) -> None:
            if isinstance(value, Exception):
                failed.setdefault(name, repr(value))
            elif name not in done:
                done[name] = time.monotonic()
            if len(done) + len(failed) >= len(names):
                everything.set()
        return on_done

    t0 = time.monotonic()
    ops = [raw.Context.get(ctxt, n, handler(n)) for n in names]
    everything.wait(timeout)
    out = _connected_summary(t0, list(done.values()), len(names), timeout)
    out["library"] = "p4p " + importlib.metadata.version("p4p")
    out["operations"] = len(ops)
    out["errors"] = sorted(set(failed.values()))[:3]
    return out


def client_main(argv: Sequence[str]) -> None:
    """``_client LIB PV_FILE TIMEOUT``: print one JSON line, then leave at once."""
    lib, pv_file, timeout = argv[0], argv[1], float(argv[2])
    names = Path(pv_file).read_text().split()
    # A backstop only: the connect phase itself waits at most `timeout`.
    threading.Timer(timeout + 20, lambda: os._exit(3)).start()
    if lib == "p4p":
        out = _p4p_connect(names, timeout)
    else:
        out = _libca_connect(names, timeout, base7=lib == "libca-base7")
    out["lib"] = lib
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip tearing down 2,000 channels: not part of the measurement


# ============================================================== in-pod role: the capture

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_RCVBUFFORCE = 33
CA_SEARCH, CA_CREATE_CHAN = 6, 18
PVA_SEARCH, PVA_CREATE_CHANNEL = 3, 7


@dataclass
class MessageCount:
    """Protocol messages found in a payload or stream."""

    searches: int = 0  # search messages
    names: int = 0  # PV names searched (a PVA search message can carry several)
    creates: int = 0  # create-channel messages
    complete: bool = True  # False when the bytes did not parse to the end

    def add(self, other: MessageCount) -> None:
        self.searches += other.searches
        self.names += other.names
        self.creates += other.creates
        self.complete &= other.complete


def parse_ca(data: bytes) -> MessageCount:
    """CA messages: 16-byte big-endian header (extended when size is 0xffff)."""
    out, pos = MessageCount(), 0
    while pos + 16 <= len(data):
        cmd, size, _dtype, count = struct.unpack_from(">HHHH", data, pos)
        head = 16
        if size == 0xFFFF and count == 0:
            if pos + 24 > len(data):
                break
            size = struct.unpack_from(">I", data, pos + 16)[0]
            head = 24
        out.searches += cmd == CA_SEARCH
        out.names += cmd == CA_SEARCH
        out.creates += cmd == CA_CREATE_CHAN
        pos += head + size
    out.complete = pos == len(data)
    return out


def _pva_size(data: bytes, pos: int, endian: str) -> tuple[int, int]:
    """PVA size encoding: one byte, or 0xfe and a 4-byte int; 0xff is null."""
    first = data[pos]
    if first == 0xFE:
        return struct.unpack_from(endian + "i", data, pos + 1)[0], pos + 5
    return (-1 if first == 0xFF else first), pos + 1


def _pva_search_names(payload: bytes, endian: str) -> int:
    """Channel count of a search request: after sequence id, flags, reserved, reply
    address and port comes the protocol list, then a 16-bit channel count."""
    pos = 4 + 1 + 3 + 16 + 2
    n_protocols, pos = _pva_size(payload, pos, endian)
    for _ in range(max(0, n_protocols)):
        length, pos = _pva_size(payload, pos, endian)
        pos += max(0, length)
    return int(struct.unpack_from(endian + "H", payload, pos)[0])


def parse_pva(data: bytes) -> MessageCount:
    """PVA messages: 8-byte header (magic 0xca, version, flags, command, size); control
    messages (flags bit 0) carry no payload; flags bit 7 is big-endian."""
    out, pos = MessageCount(), 0
    while pos + 8 <= len(data):
        if data[pos] != 0xCA:
            out.complete = False
            return out
        flags, cmd = data[pos + 2], data[pos + 3]
        endian = ">" if flags & 0x80 else "<"
        size = 0 if flags & 0x01 else struct.unpack_from(endian + "I", data, pos + 4)[0]
        payload = data[pos + 8:pos + 8 + size]
        if not flags & 0x01 and cmd == PVA_SEARCH:
            out.searches += 1
            with contextlib.suppress(struct.error, IndexError):
                out.names += _pva_search_names(payload, endian)
        out.creates += not flags & 0x01 and cmd == PVA_CREATE_CHANNEL
        pos += 8 + size
    out.complete = pos == len(data)
    return out


@dataclass
class TcpStream:
    """Outgoing bytes of one TCP connection, put back in order by sequence number."""

    isn: int | None = None
    segments: list[tuple[int, bytes]] = field(default_factory=list)

    def data(self) -> tuple[bytes, bool]:
        """The stream's bytes from its start, and whether no gap was found."""
        if not self.segments:
            return b"", True
        start = (self.isn + 1) if self.isn is not None else min(s for s, _ in self.segments)
        ordered = sorted(((seq - start) & 0xFFFFFFFF, chunk) for seq, chunk in self.segments)
        out, expected = bytearray(), 0
        for offset, chunk in ordered:
            if offset + len(chunk) <= expected:
                continue  # retransmission
            if offset > expected:
                return bytes(out), False  # lost in the capture: stop at the gap
            out += chunk[expected - offset:]
            expected = len(out)
        return bytes(out), True


@dataclass
class Capture:
    """Outgoing EPICS packets of one namespace's eth0, summarised at the end."""

    ca_port: int
    pva_udp_port: int
    pva_tcp_port: int
    udp: dict[int, list[tuple[bytes, bytes]]] = field(default_factory=dict)
    tcp: dict[tuple[int, bytes, int], TcpStream] = field(default_factory=dict)
    other_udp: dict[str, int] = field(default_factory=dict)

    def packet(self, frame: bytes) -> None:
        if frame[12:14] != b"\x08\x00":
            return
        ihl = (frame[14] & 0x0F) * 4
        proto, dst = frame[23], frame[30:34]
        end = 14 + struct.unpack_from(">H", frame, 16)[0]
        l4 = 14 + ihl
        if proto == socket.IPPROTO_UDP:
            dport = struct.unpack_from(">H", frame, l4 + 2)[0]
            if dport in (self.ca_port, self.pva_udp_port):
                self.udp.setdefault(dport, []).append((dst, frame[l4 + 8:end]))
            else:  # anything else the client sends over UDP, for the record
                key = f"{socket.inet_ntoa(dst)}:{dport}"
                self.other_udp[key] = self.other_udp.get(key, 0) + 1
        elif proto == socket.IPPROTO_TCP:
            sport, dport, seq = struct.unpack_from(">HHI", frame, l4)
            if dport not in (self.ca_port, self.pva_tcp_port):
                return
            stream = self.tcp.setdefault((sport, dst, dport), TcpStream())
            syn, ack = frame[l4 + 13] & 0x02, frame[l4 + 13] & 0x10
            if syn and not ack:
                stream.isn = seq
            payload = frame[l4 + (frame[l4 + 12] >> 4) * 4:end]
            if payload:
                stream.segments.append((seq, payload))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"udp": {}, "tcp": {}, "other_udp": self.other_udp}
        for port, datagrams in self.udp.items():
            parse = parse_ca if port == self.ca_port else parse_pva
            count = MessageCount()
            for _dst, payload in datagrams:
                count.add(parse(payload))
            out["udp"][port] = {"datagrams": len(datagrams),
                                "destinations": len({d for d, _ in datagrams}),
                                "max_bytes": max(len(p) for _, p in datagrams),
                                "searches": count.searches, "names": count.names}
        for (_sport, _dst, port), stream in self.tcp.items():
            data, whole = stream.data()
            count = (parse_ca if port == self.ca_port else parse_pva)(data)
            row = out["tcp"].setdefault(port, {"connections": 0, "search_connections": 0,
                                               "searches": 0, "names": 0, "creates": 0,
                                               "gaps": 0})
            row["connections"] += stream.isn is not None
            row["search_connections"] += count.searches > 0
            row["searches"] += count.searches
            row["names"] += count.names
            row["creates"] += count.creates
            row["gaps"] += not whole
        return out


def sniff_main(argv: Sequence[str]) -> None:
    """``_sniff IFACE CA_PORT PVA_UDP PVA_TCP MAX_S``: capture outgoing packets until
    stdin closes (or MAX_S passes), then print one JSON summary line."""
    iface, max_s = argv[0], float(argv[4])
    capture = Capture(int(argv[1]), int(argv[2]), int(argv[3]))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)  # bursts of 10^4 packets
    sock.bind((iface, 0))
    sock.setblocking(False)
    print("capturing", flush=True)
    deadline, packets = time.monotonic() + max_s, 0
    stdin_open = True
    while stdin_open and time.monotonic() < deadline:
        ready, _, _ = select.select([sock, sys.stdin], [], [], 0.5)
        if sys.stdin in ready:
            stdin_open = bool(os.read(sys.stdin.fileno(), 4096))
        for _ in range(10_000):  # drain what is queued, bounded
            try:
                frame, addr = sock.recvfrom(1 << 18)  # GSO frames reach 64 KiB
            except BlockingIOError:
                break
            if addr[2] == PACKET_OUTGOING:
                packets += 1
                capture.packet(frame)
    stats = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
    summary = capture.summary()
    summary["packets"] = packets
    summary["dropped"] = struct.unpack("II", stats)[1]
    print(json.dumps(summary), flush=True)


# ============================================================== the lab side


@dataclass
class BenchIOC:
    name: str
    prefix: str
    pvs: list[str]
    server: EpicsServer
    cluster_ip: str
    client_env: dict[str, str]


def ioc_manifest(index: int) -> dict[str, Any]:
    name = f"bd-{index:03}"
    return {"apiVersion": "epics-operator.io/v1alpha1", "kind": "IOC",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"image": "lab", "prefix": f"BD{index:03}:", "network": {"mode": "pod"},
                     "servers": {"ca": {"implementation": "rsrv"},
                                 "pva": {"implementation": "pvxs"}}}}


def database(pvs_per_ioc: int) -> str:
    """Passive ao records: discovery cost only, no scan load on the 2 cores."""
    return "".join(f'record(ao, "{RECORD.format(i=i)}") {{\n    field(VAL, "{i}")\n'
                   f'    field(PINI, "YES")\n}}\n' for i in range(pvs_per_ioc))


def record_names(prefix: str, pvs_per_ioc: int) -> list[str]:
    return [prefix + RECORD.format(i=i).removeprefix("$(P)") for i in range(pvs_per_ioc)]


def spawn_ioc(lab: Lab, rendered: Rendered, node: int, db: Path) -> EpicsServer:
    """Place one rendered IOC as the lab runner would, with our database: its pod, the
    IOC container's env exactly as rendered, `python -m pvxslibs.ioc` (rsrv + QSRV2).
    The lab runner's servers load a fixed 4-record database, hence this."""
    from ioc_testbed.lab.runner import container_env, server_kind
    from ioc_testbed.lab.servers import EpicsServer

    ioc = rendered.ioc
    if server_kind(ioc) != "softioc-pvxs":
        raise SystemExit(f"{ioc.metadata.name}: expected rsrv + QSRV2, got {server_kind(ioc)}")
    pod_spec = next(o for o in rendered.objects if o["kind"] == "StatefulSet")[
        "spec"]["template"]["spec"]
    pod = lab.add_pod(node, name=ioc.metadata.name)
    add_guard(lab, pod)
    env = container_env(pod_spec["containers"][0], pod.ip, lab.nodes[node].ip)
    popen = lab.spawn(pod, [sys.executable, "-m", "pvxslibs.ioc", "-m",
                            f"P={ioc.spec.prefix}", "-d", str(db)], env,
                      log=lab.tmpdir / f"{ioc.metadata.name}.log")
    return EpicsServer(lab=lab, kind="softioc-pvxs", prefix=ioc.spec.prefix, ns=pod.ns,
                       env=env, popen=popen, protocols=("ca", "pva"))


def publish(lab: Lab, rendered: Rendered, server: EpicsServer, cluster_ip: str,
            pvs_per_ioc: int) -> BenchIOC:
    """The Service as kube-proxy DNAT, and the client settings the operator publishes."""
    from ioc_operator.discovery.clientenv import for_ioc

    service = next(o for o in rendered.objects if o["kind"] == "Service")
    ports = [(p["protocol"].lower(), int(p["port"]), int(p["targetPort"]))
             for p in service["spec"]["ports"]]
    backend = lab.pods[rendered.ioc.metadata.name].ip
    lab.add_service(cluster_ip, ports, backend)
    env = for_ioc(rendered.ioc.spec, cluster_ip, rendered.ports).env()
    return BenchIOC(rendered.ioc.metadata.name, server.prefix,
                    record_names(server.prefix, pvs_per_ioc), server, cluster_ip, env)


def start_iocs(lab: Lab, args: argparse.Namespace) -> tuple[list[BenchIOC], ResolvedPorts]:
    """Render and start every IOC, a wave at a time so 2 cores are not swamped by
    interpreters starting at once; each wave is waited for (bounded) before the next."""
    from ioc_operator.allocation.plan import render_all
    from ioc_operator.model.validation import parse_ioc
    from ioc_testbed.lab.runner import SERVICE_RANGE

    db = lab.tmpdir / "discovery.db"
    db.write_text(database(args.pvs_per_ioc))
    rendered = render_all([parse_ioc(ioc_manifest(i)) for i in range(args.iocs)])
    addresses = (str(a) for a in SERVICE_RANGE.hosts())
    iocs: list[BenchIOC] = []
    for first in range(0, len(rendered), args.start_batch):
        wave = rendered[first:first + args.start_batch]
        servers = [spawn_ioc(lab, r, (first + k) % args.ioc_nodes, db)
                   for k, r in enumerate(wave)]
        for r, server in zip(wave, servers, strict=True):
            server.wait_ready(timeout=120)
            iocs.append(publish(lab, r, server, next(addresses), args.pvs_per_ioc))
        print(f"  {len(iocs)}/{len(rendered)} IOCs running", flush=True)
    return iocs, rendered[0].ports


# ------------------------------------------------------------- process accounting


def status_mb(pid: int, key: str = "VmRSS") -> float:
    """A memory figure of /proc/<pid>/status (VmRSS, RssAnon, VmLck) in MB."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    with contextlib.suppress(OSError, IndexError), open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def iocs_cpu(iocs: Sequence[BenchIOC]) -> float:
    return sum(cpu_seconds(i.server.pid) for i in iocs)


# ------------------------------------------------------------- settings variants


def variants(directory: Mapping[str, str], protocol: str) -> dict[str, dict[str, str]]:
    """The directory's variables of one protocol, three ways."""
    mine = {k: v for k, v in directory.items() if k.startswith(f"EPICS_{protocol}_")}
    addr = f"EPICS_{protocol}_ADDR_LIST"
    name_servers = f"EPICS_{protocol}_NAME_SERVERS"
    if name_servers not in mine:
        raise SystemExit(f"the directory has no {name_servers}: {sorted(mine)}")
    return {
        "address lists": {k: v for k, v in mine.items() if k != name_servers},
        "name servers": {**mine, addr: ""},  # AUTO_ADDR_LIST stays NO
        "directory": dict(mine),
    }


# ------------------------------------------------------------- counters and capture

COUNTERS = ("ca-udp", "pva-udp", "ca-syn", "pva-syn", "udp-all", "dns", "guard")


def iptables(lab: Lab, where: Pod, args: Sequence[str]) -> str:
    proc = lab.exec(where, ["iptables", "-w", "5", *args], timeout=20)
    if proc.returncode:
        raise SystemExit(f"iptables {' '.join(args)} in {where.name}: {proc.stderr.strip()}")
    return proc.stdout


def add_guard(lab: Lab, where: Pod) -> None:
    """Reject, inside the pod, whatever is addressed outside the lab's range. libca asks
    the host's resolver (outside the lab) for the names of the servers it connects to;
    the lab's nodes have no route there, but nothing may even leave the pod for it."""
    iptables(lab, where, ["-A", "OUTPUT", "-o", "eth0", "!", "-d", LAB_RANGE, "-m", "comment",
                          "--comment", "guard", "-j", "REJECT"])


def read_counters(lab: Lab, where: Pod) -> dict[str, int]:
    """Packet counts of the commented rules in a pod's OUTPUT chain."""
    text = iptables(lab, where, ["-L", "OUTPUT", "-n", "-v", "-x"])
    return {m.group(2): int(m.group(1)) for m in
            re.finditer(r"^\s*(\d+)\s+\d+\s.*/\* (\S+) \*/", text, re.MULTILINE)}


class PacketCounters:
    """Counting-only iptables rules (no target) on the client pod's OUTPUT to eth0:
    they count packets as the kernel sends them, whatever the library does."""

    def __init__(self, lab: Lab, pod: Pod, ports: ResolvedPorts) -> None:
        self.lab, self.pod = lab, pod
        matches = {
            "ca-udp": f"-p udp --dport {ports.ca}",
            "pva-udp": f"-p udp --dport {ports.pva_broadcast}",
            "ca-syn": f"-p tcp --syn --dport {ports.ca}",
            "pva-syn": f"-p tcp --syn --dport {ports.pva_server}",
            "udp-all": "-p udp",
            "dns": "-p udp --dport 53",
        }
        # At the head of the chain: the lab's pods accept lab traffic in rules of their
        # own first, so appended counting rules counted nothing.
        for position, (name, match) in enumerate(matches.items(), 1):
            iptables(lab, pod, ["-I", "OUTPUT", str(position), "-o", "eth0", *match.split(),
                                "-m", "comment", "--comment", name])
        add_guard(lab, pod)  # last: the counting rules above see every packet

    def read(self) -> dict[str, int]:
        found = read_counters(self.lab, self.pod)
        return {name: found.get(name, 0) for name in COUNTERS}


@contextlib.contextmanager
def capture(lab: Lab, pod: Pod, ports: ResolvedPorts, out: dict[str, Any]) -> Iterator[None]:
    """Run the packet capture in the client pod around a block; its summary into `out`."""
    proc = lab.spawn(pod, [sys.executable, str(Path(__file__).resolve()), "_sniff", "eth0",
                           str(ports.ca), str(ports.pva_broadcast), str(ports.pva_server),
                           "600"], {}, log=lab.tmpdir / f"sniff-{len(lab.processes)}.log")
    log: Path = proc.log_path  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while "capturing" not in log.read_text() and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"capture failed: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    try:
        yield
    finally:
        if proc.stdin:
            proc.stdin.close()  # the capture's signal to summarise and exit
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        lab.stop(proc)  # by PID; a no-op when it has exited
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")]
        out.update(json.loads(lines[-1]) if lines else {"error": log.read_text()[-2000:]})


# ------------------------------------------------------------- one measurement


@dataclass
class Row:
    lib: str
    settings: str
    iocs: int
    result: dict[str, Any]
    counters: dict[str, int]
    sniff: dict[str, Any]
    ioc_cpu: float
    seconds_runs: list[float | None] = field(default_factory=list)  # every repeat
    datagram_runs: list[int] = field(default_factory=list)

    @property
    def protocol(self) -> str:
        return "pva" if self.lib == "p4p" else "ca"

    def udp_datagrams(self) -> int:
        return self.counters[f"{self.protocol}-udp"]

    def tcp_connections(self) -> int:
        return self.counters[f"{self.protocol}-syn"]

    def _captured(self, kind: str, key: str) -> int:
        """A capture figure ("udp" or "tcp"), summed over the ports it was seen on."""
        return sum(int(port.get(key, 0)) for port in self.sniff.get(kind, {}).values())

    def udp_names(self) -> int:
        return self._captured("udp", "names")

    def tcp_searches(self) -> tuple[int, int, int]:
        """(search messages, names searched, connections that carried searches) on TCP."""
        return (self._captured("tcp", "searches"), self._captured("tcp", "names"),
                self._captured("tcp", "search_connections"))


def run_client(lab: Lab, pod: Pod, lib: str, env: Mapping[str, str], names: Sequence[str],
               timeout: float) -> dict[str, Any]:
    pv_file = lab.tmpdir / f"pvs-{len(names)}.txt"
    pv_file.write_text("\n".join(names) + "\n")
    argv = [sys.executable, str(Path(__file__).resolve()), "_client", lib, str(pv_file),
            str(timeout)]
    proc = lab.exec(pod, argv, env, timeout=timeout + 60)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"total": len(names), "connected": 0, "seconds": None,
                "error": f"rc {proc.returncode}: {proc.stderr[-1000:]}"}
    return dict(json.loads(lines[-1]))


def measure(lab: Lab, pod: Pod, counters: PacketCounters, ports: ResolvedPorts,
            iocs: Sequence[BenchIOC], lib: str, settings: str, env: Mapping[str, str],
            timeout: float) -> Row:
    """One fresh client process, counters read before and after, capture around it."""
    names = [pv for i in iocs for pv in i.pvs]
    before, cpu0 = counters.read(), iocs_cpu(iocs)
    sniff: dict[str, Any] = {}
    with capture(lab, pod, ports, sniff):
        result = run_client(lab, pod, lib, env, names, timeout)
        time.sleep(0.2)  # packets sent just before exit reach the capture
    after = counters.read()
    return Row(lib, settings, len(iocs), result,
               {k: after[k] - before[k] for k in COUNTERS}, sniff, iocs_cpu(iocs) - cpu0)


# ------------------------------------------------------------- output

HEADER = ("| client | settings | IOCs | PVs connected | seconds (all) | t50 / t90 s "
          "| UDP search datagrams | names per datagram | datagrams per PV "
          "| TCP connections | TCP search messages | IOC CPU s |")


def fmt_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def median_row(runs: Sequence[Row]) -> Row:
    """The run with the median time to connect everything (timeouts count as slowest),
    remembering every run's time and datagram count."""
    ordered = sorted(runs, key=lambda r: (r.result.get("seconds") is None,
                                          r.result.get("seconds") or 0.0))
    row = ordered[(len(ordered) - 1) // 2]
    row.seconds_runs = [r.result.get("seconds") for r in runs]
    row.datagram_runs = [r.udp_datagrams() for r in runs]
    return row


def spread(values: Sequence[float | None], text: str) -> str:
    """`text`, followed by the range over repeats when they differ."""
    known = [v for v in values if v is not None]
    if len(known) < 2 or min(known) == max(known):
        return text
    fmt = "{:.0f}" if all(float(v).is_integer() for v in known) else "{:.2f}"
    return f"{text} ({fmt.format(min(known))}-{fmt.format(max(known))})"


def table_line(row: Row) -> str:
    r = row.result
    total, connected = r.get("total", 0), r.get("connected", 0)
    datagrams = row.udp_datagrams()
    per_datagram = f"{row.udp_names() / datagrams:.1f}" if datagrams else "-"
    searches, names, conns = row.tcp_searches()
    tcp_search = f"{searches} ({names} names, {conns} conns)" if searches else "0"
    seconds = spread(row.seconds_runs, fmt_seconds(r.get("seconds")))
    if r.get("seconds") is None:
        seconds = f"timeout {r.get('timeout', '?')} s"
    dg_text = spread(row.datagram_runs, str(datagrams))
    return (f"| {row.lib} | {row.settings} | {row.iocs} | {connected} / {total} | {seconds} "
            f"| {fmt_seconds(r.get('t50'))} / {fmt_seconds(r.get('t90'))} | {dg_text} "
            f"| {per_datagram} | {datagrams / max(1, total):.2f} | {row.tcp_connections()} "
            f"| {tcp_search} | {row.ioc_cpu:.2f} |")


def library_version(path: Path) -> str:
    """The EPICS release a library was built from, read from its version strings."""
    with contextlib.suppress(OSError):
        found = re.search(rb"EPICS (R?\d+\.\d+\.\d+[\w.-]*)", path.read_bytes())
        if found:
            return found.group(1).decode()
    return "?"


def versions() -> dict[str, str]:
    import epics
    import epicscorelibs.path

    meta = importlib.metadata.version
    core = Path(epicscorelibs.path.lib_path)
    bundled = Path(epics.__file__).parent / "clibs" / "linux64"
    return {
        "EPICS Base (epicscorelibs)": f"{library_version(next(core.glob('libCom.so*')))} "
                                      f"(epicscorelibs {meta('epicscorelibs')})",
        "pvxslibs (IOC's QSRV2, p4p's client)": meta("pvxslibs"),
        "p4p": meta("p4p"),
        "pyepics": f"{meta('pyepics')}, its bundled libca from EPICS Base "
                   f"{library_version(next(bundled.glob('libCom*.so*')))}",
    }


def machine() -> str:
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    return (f"{platform.machine()}, {os.cpu_count()} cores, kernel {platform.release()}, "
            f"Python {platform.python_version()}; 1-min load average before the lab: {load}")


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds of this process and its reaped children (IOCs, clients, captures)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def other_benchmarks() -> list[str]:
    """Other `benchmarks.*` runs on the machine now: they share the 2 cores with us."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            found |= {a.decode() for a in args if a.startswith(b"benchmarks.")
                      and a != b"benchmarks.bench_discovery"}
    return sorted(found)


def names_per_pv(row: Row) -> float:
    """PV names the client searched for (UDP and TCP together) per PV."""
    return (row.udp_names() + row.tcp_searches()[1]) / max(1, row.result.get("total", 0))


def scaling_table(rows: Sequence[Row]) -> list[str]:
    """Per PV: datagrams, and names searched, against the number of IOCs listed."""
    counts = sorted({r.iocs for r in rows})
    lines = ["| client | settings | " + " | ".join(f"{n} IOCs" for n in counts) + " |",
             "|---|---|" + "---|" * len(counts)]
    for lib in dict.fromkeys(r.lib for r in rows):
        for settings in dict.fromkeys(r.settings for r in rows):
            cells = {r.iocs: r for r in rows if r.lib == lib and r.settings == settings}
            lines.append(f"| {lib} | {settings} | " + " | ".join(
                f"{c.udp_datagrams() / max(1, c.result.get('total', 0)):.2f} dg, "
                f"{names_per_pv(c):.0f} names" if (c := cells.get(n)) else "-"
                for n in counts) + " |")
    return lines


def interpretation(rows: Sequence[Row], n_iocs: int) -> list[str]:
    """The full-size figures in words, one bullet per client."""
    out = []
    for lib in dict.fromkeys(r.lib for r in rows):
        mine = {r.settings: r for r in rows if r.lib == lib and r.iocs == n_iocs}
        addr, ns, both = (mine.get(v) for v in VARIANTS)
        if not (addr and ns):
            continue
        total = addr.result.get("total", 0)
        searches, ns_names, conns = ns.tcp_searches()
        text = (f"* **{lib}**, {n_iocs} IOCs, {total} PVs. Address lists: "
                f"{addr.udp_datagrams()} datagrams ({addr.udp_datagrams() / max(1, total):.2f}"
                f" per PV) carrying {addr.udp_names()} name searches, "
                f"{fmt_seconds(addr.result.get('seconds'))} s. Name servers: "
                f"{ns.udp_datagrams()} datagrams, {searches} search messages on {conns} TCP "
                f"connections carrying {ns_names} name searches, "
                f"{fmt_seconds(ns.result.get('seconds'))} s.")
        if both:
            text += (f" Whole directory: {names_per_pv(both):.0f} name searches per PV "
                     f"(both ways), {fmt_seconds(both.result.get('seconds'))} s.")
        out.append(text)
    return out


def per_message(rows: Sequence[Row], lib: str, settings: str, tcp: bool) -> float:
    """Names per search datagram (UDP) or per TCP search message, over every IOC count."""
    mine = [r for r in rows if r.lib == lib and r.settings == settings]
    if tcp:
        messages = sum(r.tcp_searches()[0] for r in mine)
        names = sum(r.tcp_searches()[1] for r in mine)
    else:
        messages, names = sum(r.udp_datagrams() for r in mine), sum(r.udp_names() for r in mine)
    return names / messages if messages else 0.0


def largest_datagram(rows: Sequence[Row], lib: str) -> int:
    return max((int(port.get("max_bytes", 0)) for r in rows if r.lib == lib
                for port in r.sniff.get("udp", {}).values()), default=0)


def mechanisms(rows: Sequence[Row], n_iocs: int) -> list[str]:
    """How the clients search, in words, with this run's numbers filled in."""
    libs = list(dict.fromkeys(r.lib for r in rows))
    udp = ", ".join(f"{lib} {per_message(rows, lib, 'address lists', False):.0f} names "
                    f"in up to {largest_datagram(rows, lib)} bytes" for lib in libs)
    tcp = ", ".join(f"{lib} {per_message(rows, lib, 'name servers', True):.0f}"
                    for lib in libs)
    full = [r for r in rows if r.iocs == n_iocs and r.settings == "address lists"]
    per_pv = ", ".join(f"{r.lib} {r.udp_datagrams() / max(1, r.result.get('total', 0)):.1f}"
                       for r in full)
    seconds = [r.result.get("seconds") for r in rows if r.iocs == n_iocs]
    slowest = max((t for t in seconds if t is not None), default=None)
    total = n_iocs * (full[0].result.get("total", 0) // max(1, n_iocs)) if full else 0
    return [
        "How the clients search, as the counts show:", "",
        "* **Address lists.** Both libraries pack several searches into one datagram "
        f"(here: {udp} of UDP payload, so longer PV names fit fewer) and send every "
        "datagram to every address of "
        "`EPICS_*_ADDR_LIST`. Every name is asked of every IOC: names searched = PVs x IOCs, "
        "and datagrams per PV = IOCs / names per datagram, which grows linearly with the "
        f"number of IOCs listed (see the scaling table; at {n_iocs} IOCs: {per_pv} per PV, "
        "ten times that at ten times the IOCs). Every IOC receives and examines every "
        "datagram, including all the names it does not have.",
        "* **Name servers.** No UDP at all, but no fewer searches: neither library asks just "
        "one name server, each search goes to every server in `EPICS_*_NAME_SERVERS` over "
        f"TCP (names per TCP search message: {tcp}). Because the operator lists each IOC as "
        "its own name server, the fan-out is the same PVs x IOCs as with address lists. It "
        "travels on TCP connections that are opened once and then also carry the channels "
        "(as many TCP connections as with address lists: one per IOC), so there is no "
        "datagram to lose and no UDP retry timer to wait for. A single name server answering "
        "for all IOCs would make it one search per PV (not measured here).",
        "* **The directory as published** holds both lists, and a client loading all of it "
        "searches both ways: twice the search traffic of either, and no faster.",
        "* **Time.** The lab loses no packets (a count above PVs x IOCs is a client "
        "repeating a search whose answer had not arrived yet), and the median run connects "
        f"{total} PVs in at most {fmt_seconds(slowest)} s whatever the settings. "
        "These seconds are lab figures, not a forecast for a facility network, where a lost "
        "UDP search is repeated only after the client's back-off timer. The counts are what "
        "scales: a client connecting ten times the PVs over ten times the IOCs sends a "
        "hundred times the search traffic, with address lists and with these name servers "
        "alike.",
    ]


def write_doc(rows: Sequence[Row], info: dict[str, Any], args: argparse.Namespace) -> None:
    subsets = args.subsets or '""'
    command = (f"sudo .venv/bin/python -m benchmarks.bench_discovery --iocs {args.iocs} "
               f"--pvs-per-ioc {args.pvs_per_ioc} --subsets {subsets} --repeat {args.repeat}")
    lines = [
        "# Discovery cost at facility scale", "",
        f"Measured by `{command}` in the network lab (docs/lab.md), "
        f"{info['total_s']:.0f} s for the whole run.", "",
        f"Run {time.strftime('%Y-%m-%d %H:%M')}. Machine: {info['machine']}; after the run: "
        f"{info['load_after']}.", "",
    ]
    lines += [f"Other processes used {info['others_cpu']:.0f} % of one core on average "
              f"during the run (of {os.cpu_count()} cores)"
              + (f", among them {', '.join(info['others'])}" if info["others"] else "")
              + "; seconds and CPU figures are pessimistic by that much, counts are not "
              "affected.", ""]
    lines += ["Versions:", "", *[f"* {k}: {v}" for k, v in info["versions"].items()], ""]
    lines += [
        "## Set-up", "",
        f"{args.iocs} IOCs rendered by the operator (`network.mode: pod`, rsrv + QSRV2) run "
        f"as EPICS Base soft IOCs (`python -m pvxslibs.ioc`) with {args.pvs_per_ioc} passive "
        f"`ao` records each ({args.iocs * args.pvs_per_ioc} PVs, names like "
        f"`BD000:Sig00:Readback`, 20 characters), each in its own pod namespace with the env "
        f"the renderer gives the IOC container, spread over {args.ioc_nodes} nodes, each "
        "behind its Service's ClusterIP (DNAT in every node, as kube-proxy). The client pod "
        "is on a node of its own and loads the directory the operator would publish for "
        "these IOCs (`directory_env` over their client settings):", "",
        "* **address lists**: the directory without `EPICS_*_NAME_SERVERS` "
        "(ADDR_LIST = every ClusterIP, AUTO_ADDR_LIST=NO);",
        "* **name servers**: the directory with `EPICS_*_ADDR_LIST` empty "
        "(NAME_SERVERS = every ClusterIP:TCP port, AUTO_ADDR_LIST=NO);",
        "* **directory**: the directory as published, both lists.", "",
        "With fewer IOCs (the smaller IOC counts in the table) the client lists only the "
        "first N IOCs and connects only their PVs.", "",
        f"IOCs: {info['start_s']:.0f} s to start all {args.iocs} (waves of "
        f"{args.start_batch}); RSS {info['rss_total'] / 1024:.1f} GB in total, "
        f"{info['rss_each']:.0f} MB per IOC process, {info['anon_each']:.0f} MB of it "
        f"anonymous: the IOC locks its memory ({info['locked_each'] / 1024:.1f} GB VmLck "
        "each: iocInit calls mlockall when it may use real-time priorities, as root here), "
        "which makes its thread stacks resident. Idle CPU of all IOCs together: "
        f"{info['idle_cpu']:.1f} % of one core. "
        f"{args.iocs} such IOCs ran on this machine without trouble.", "",
        "Clients, each run a fresh process in the client pod: **libca** = pyepics' "
        "low-level `ca.create_channel` for every PV at once, then waiting for the "
        "connection callbacks, on pyepics' bundled libca; **libca-base7** = the same on "
        "epicscorelibs' libca; **p4p** = `p4p.client.thread.Context('pva')`, a get per PV "
        "issued at once (a get completes once its channel has connected). *seconds* = "
        "from the first create to the last connection (libca) or get (p4p), bounded by "
        f"{args.timeout:.0f} s; median of {args.repeat} runs, range in parentheses.", "",
        "Counted in the client pod's namespace: *UDP search datagrams* = packets to UDP "
        "5064 (CA) / 5076 (PVA) counted by iptables rules on OUTPUT (what the kernel sent); "
        "*names per datagram* = PV names in those datagrams, from a packet capture in the "
        "same namespace; *TCP connections* = SYNs to 5064 / 5075 (name-server and channel "
        "connections together); *TCP search messages* = CA_PROTO_SEARCH / PVA search "
        "messages in the client's TCP streams (reassembled from the capture), with the PV "
        "names they carry and the connections that carried them. *IOC CPU s* = CPU seconds "
        "all IOC processes used during the run (search, channel creation and, for p4p, the "
        "get). The capture lost no packet unless a note says so.", "",
        "## Figures", "", HEADER, "|" + "---|" * (HEADER.count("|") - 1),
        *[table_line(r) for r in rows], "",
        *info["notes"], "",
        "Per PV, by number of IOCs listed (dg = UDP search datagrams, names = PV name "
        "searches sent, UDP and TCP together):", "",
        *scaling_table(rows), "",
        "## What it means", "",
        *interpretation(rows, args.iocs), "", *mechanisms(rows, args.iocs),
    ]
    DOC.write_text("\n".join(lines) + "\n")
    print(f"written to {DOC}")


# ------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iocs", type=int, default=50)
    p.add_argument("--pvs-per-ioc", type=int, default=40)
    p.add_argument("--ioc-nodes", type=int, default=2, help="nodes the IOC pods spread over")
    p.add_argument("--start-batch", type=int, default=10, help="IOCs started at once")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per client run")
    p.add_argument("--libs", default=",".join(LIBS),
                   help="libca, libca-base7 (pyepics on Base 7 libca), p4p")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--repeat", type=int, default=3, help="runs per cell; the median is shown")
    p.add_argument("--subsets", default="10,25",
                   help="also measure with only the first N IOCs listed, e.g. 10,25")
    p.add_argument("--no-write", action="store_true", help="do not write the doc")
    p.add_argument("--raw", type=Path, help="also dump every row's raw figures as JSON here")
    return p.parse_args(argv)


def bench(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    from ioc_operator.discovery.directory import directory_env
    from ioc_testbed.lab import Lab
    from ioc_testbed.lab.netns import cleanup_stale

    cleanup_stale()
    info: dict[str, Any] = {"machine": machine(), "versions": versions(), "notes": [],
                            "others": other_benchmarks()}
    rows: list[Row] = []
    counts = sorted({args.iocs, *(int(n) for n in args.subsets.split(",") if n)})
    with Lab(nodes=args.ioc_nodes + 1) as lab:
        start = time.monotonic()
        iocs, ports = start_iocs(lab, args)
        info["start_s"] = time.monotonic() - start
        rss = [status_mb(i.server.pid) for i in iocs]
        info["rss_total"], info["rss_each"] = sum(rss), sum(rss) / len(rss)
        info["anon_each"] = sum(status_mb(i.server.pid, "RssAnon") for i in iocs) / len(iocs)
        info["locked_each"] = sum(status_mb(i.server.pid, "VmLck") for i in iocs) / len(iocs)
        time.sleep(2)  # PINI and start-up work done before idle CPU is sampled
        cpu0, t0 = iocs_cpu(iocs), time.monotonic()
        time.sleep(5)
        info["idle_cpu"] = (iocs_cpu(iocs) - cpu0) / (time.monotonic() - t0) * 100
        print(f"{len(iocs)} IOCs up in {info['start_s']:.0f} s, RSS {info['rss_total']:.0f} MB,"
              f" idle CPU {info['idle_cpu']:.1f} %", flush=True)
        client = lab.add_pod(args.ioc_nodes, name="client")
        counters = PacketCounters(lab, client, ports)
        for n in counts:
            subset = iocs[:n]
            directory = directory_env(i.client_env for i in subset)
            for lib in args.libs.split(","):
                envs = variants(directory, "PVA" if lib == "p4p" else "CA")
                for settings in args.variants.split(","):
                    row = median_row([measure(lab, client, counters, ports, subset, lib,
                                              settings, envs[settings], args.timeout)
                                      for _ in range(args.repeat)])
                    rows.append(row)
                    print(table_line(row), flush=True)
                    info["notes"] += row_notes(row)
        info["notes"] += guard_note(rows)
        blocked = sum(read_counters(lab, lab.pods[i.name]).get("guard", 0) for i in iocs)
        if blocked:
            info["notes"].append(f"* The IOC pods tried to send {blocked} packets outside "
                                 "the lab; the pods' guard rule rejected them.")
        with open("/proc/loadavg") as f:
            info["load_after"] = f.read().split()[0]
    return rows, info


def row_notes(row: Row) -> list[str]:
    """What deserves a footnote: errors, capture losses, traffic outside the lab."""
    where = f"{row.lib} / {row.settings} / {row.iocs} IOCs"
    notes = []
    if row.result.get("error") or row.result.get("errors"):
        notes.append(f"* {where}: {row.result.get('error') or row.result.get('errors')}")
    if row.sniff.get("dropped") or row.sniff.get("error"):
        notes.append(f"* {where}: the capture lost {row.sniff.get('dropped', '?')} packets "
                     f"{row.sniff.get('error', '')}; its message counts are a lower bound.")
    return notes


def guard_note(rows: Sequence[Row]) -> list[str]:
    """One footnote for what the guard rule rejected in the client pod, per client."""
    blocked = [r for r in rows if r.counters.get("guard")]
    if not blocked:
        return []
    per_ioc: dict[str, set[float]] = {}
    for r in blocked:
        per_ioc.setdefault(r.lib, set()).add(round(r.counters["guard"] / r.iocs, 1))
    dns = sum(r.counters.get("dns", 0) for r in blocked)
    total = sum(r.counters["guard"] for r in blocked)
    libs = "; ".join(f"{lib}: {'/'.join(f'{v:g}' for v in sorted(v))} per IOC listed"
                     for lib, v in per_ioc.items())
    return [f"* Packets to addresses outside the lab ({libs}; {dns} of all {total} were DNS "
            "queries to the host's resolver, from the client looking up the names of the "
            "servers it connected to) were rejected inside the client pod by a guard rule; "
            "the lab never lets them out, and no search depends on them."]


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_client":
        return client_main(argv[1:])
    if argv and argv[0] == "_sniff":
        return sniff_main(argv[1:])
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the lab needs root: sudo .venv/bin/python -m benchmarks.bench_discovery")
    start, busy0, own0 = time.monotonic(), busy_seconds(), own_seconds()
    rows, info = bench(args)  # the lab is closed and its processes reaped on return
    info["total_s"] = time.monotonic() - start
    others = (busy_seconds() - busy0) - (own_seconds() - own0)
    info["others_cpu"] = max(0.0, others) / info["total_s"] * 100  # % of one core
    info["others"] = sorted({*info["others"], *other_benchmarks()})
    print(f"\n{HEADER}")
    for row in rows:
        print(table_line(row))
    print(f"\ntotal {info['total_s']:.0f} s; load average after: {info['load_after']}; "
          f"other processes used {info['others_cpu']:.0f} % of one core meanwhile")
    if args.raw:
        args.raw.write_text(json.dumps([vars(r) for r in rows], indent=1, default=str))
    if not args.no_write:
        write_doc(rows, info, args)


if __name__ == "__main__":
    main()
