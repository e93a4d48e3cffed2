"""CA gateway benchmark in a lab pod: direct to the IOC on loopback vs through
ioc-ca-gateway on the pod IP. Needs root (network namespaces). Prints the figures and
writes them into docs/ca-gateway.md (between the bench markers).

    sudo .venv/bin/python -m benchmarks.bench_ca_gateway [--gets 2000] [--records 3000]

- get latency: median and p99 of sequential gets (DBR_DOUBLE), with a minimal raw CA
  client (socket + struct, so the client adds as little as possible) and with pyepics;
- monitor updates per second sustained: an EPICS Base soft IOC scans ``--records`` calc
  records every 0.1 s (10 x records updates/s offered); one client subscribes to all of
  them (DBR_TIME_DOUBLE) and counts what arrives over ``--seconds``;
- gateway CPU seconds per 1000 updates, from /proc/<pid>/stat over the same window.

Everything (IOC, gateway, client) runs in one pod; the client is in the same pod as
the IOC so that the direct path exists at all (the IOC listens on 127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ioc_testbed.lab import EpicsServer, Lab, LabError
from ioc_testbed.lab.netns import listening_ports

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ca-gateway.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
IOC_PORT, GW_PORT = 15064, 5064
PREFIX = "BENCH:"
IOC_ENV = {
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_SERVER_PORT": str(IOC_PORT),
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
}

RAW_CLIENT = r'''
"""Minimal CA client for the benchmark.

argv: direct_host direct_port gateway_host gateway_port gets records seconds gateway_pid
Gets alternate between the two paths, so load changes on the machine hit both alike.
"""
import json
import os
import socket
import statistics
import struct
import sys
import time

import caproto as ca

DIRECT = (sys.argv[1], int(sys.argv[2]))
GATEWAY = (sys.argv[3], int(sys.argv[4]))
GETS, RECORDS, SECONDS = int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
GW_PID = int(sys.argv[8])
HEADER = struct.Struct(">HHHHII")
CLK = os.sysconf("SC_CLK_TCK")


class Circuit:
    def __init__(self, address):
        self.sock = socket.create_connection(address, timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.sock.sendall(bytes(ca.VersionRequest(0, 13)) + bytes(ca.HostNameRequest("bench"))
                          + bytes(ca.ClientNameRequest("bench")))

    def messages(self):
        "Yield (command, type, count, p1, p2, payload size) of every complete message."
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("closed")
        buf = self.buf + data if self.buf else data
        pos, end = 0, len(buf)
        while end - pos >= 16:
            cmd, size, dtype, count, p1, p2 = HEADER.unpack_from(buf, pos)
            body = pos + 16
            if size == 0xFFFF:
                size, count = struct.unpack_from(">II", buf, body)
                body += 8
            if body + size > end:
                break
            yield cmd, dtype, count, p1, p2, size
            pos = body + size
        self.buf = buf[pos:]

    def create(self, names):
        self.sock.sendall(b"".join(bytes(ca.CreateChanRequest(n, i, 13))
                                   for i, n in enumerate(names)))
        sids, deadline = {}, time.monotonic() + 60
        while len(sids) < len(names):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(sids)}/{len(names)} channels created")
            for cmd, _t, _c, p1, p2, _s in self.messages():
                if cmd == 18:
                    sids[p1] = p2
        return [sids[i] for i in range(len(names))]

    def get(self, sid, ioid):
        t0 = time.perf_counter()
        self.sock.sendall(HEADER.pack(15, 0, 6, 1, sid, ioid))
        done = False
        while not done:
            for cmd, _t, _c, _p1, p2, _s in self.messages():
                done = done or (cmd == 15 and p2 == ioid)
        return time.perf_counter() - t0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def summary(times):
    times = sorted(times)
    return {"median_ms": statistics.median(times) * 1e3,
            "p99_ms": times[int(0.99 * (len(times) - 1))] * 1e3}


def latency():
    direct, gateway = Circuit(DIRECT), Circuit(GATEWAY)
    (d_sid,), (g_sid,) = direct.create(["BENCH:lat"]), gateway.create(["BENCH:lat"])
    times = {"direct": [], "gateway": []}
    for ioid in range(GETS + 50):
        pair = [("direct", direct, d_sid), ("gateway", gateway, g_sid)]
        for path, circuit, sid in pair if ioid % 2 else pair[::-1]:
            dt = circuit.get(sid, ioid)
            if ioid >= 50:  # warm-up
                times[path].append(dt)
    return {path: summary(t) for path, t in times.items()}


def monitors(address):
    circuit = Circuit(address)
    sids = circuit.create([f"BENCH:c{i}" for i in range(RECORDS)])
    request = struct.pack(">fffHxx", 0.0, 0.0, 0.0, 5)  # DBE_VALUE | DBE_ALARM
    circuit.sock.sendall(b"".join(HEADER.pack(1, 16, 20, 1, sid, i) + request
                                  for i, sid in enumerate(sids)))
    circuit.sock.settimeout(1.0)

    def count_for(seconds):
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                n += sum(1 for m in circuit.messages() if m[0] == 1 and m[5])
            except socket.timeout:
                pass
        return n

    count_for(1.5)  # initial values and ramp-up
    cpu0, t0 = cpu_seconds(GW_PID), time.monotonic()
    n = count_for(SECONDS)
    elapsed, cpu = time.monotonic() - t0, cpu_seconds(GW_PID) - cpu0
    circuit.sock.close()
    return {"updates": n, "seconds": elapsed, "rate": n / elapsed,
            "gateway_cpu_s": cpu, "cpu_per_1000": cpu / max(n, 1) * 1000,
            "gateway_cpu_pct": 100 * cpu / elapsed}


result = {"get": latency()}
result["monitor"] = {"direct": monitors(DIRECT), "gateway": monitors(GATEWAY)}
print(json.dumps(result), flush=True)
os._exit(0)
'''

PYEPICS_CLIENT = r'''
"""libca (pyepics) get latency. argv: gets."""
import json
import os
import statistics
import sys
import time

from epics import ca

GETS = int(sys.argv[1])
chid = ca.create_channel("BENCH:lat", connect=False, auto_cb=False)
assert ca.connect_channel(chid, timeout=10)
ca.get(chid, timeout=5)
times = []
for _ in range(GETS):
    t0 = time.perf_counter()
    ca.get(chid, timeout=5)
    times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({"median_ms": statistics.median(times) * 1e3,
                  "p99_ms": times[int(0.99 * (len(times) - 1))] * 1e3}), flush=True)
os._exit(0)
'''


def database(records: int) -> str:
    lines = ['record(ao, "$(P)lat") {', '    field(VAL, "1.5")', "}"]
    for i in range(records):
        lines += [f'record(calc, "$(P)c{i}") {{', '    field(SCAN, ".1 second")',
                  f'    field(INPA, "$(P)c{i} NPP")', '    field(CALC, "A+1")', "}"]
    return "\n".join(lines) + "\n"


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LabError(f"process exited with {proc.returncode}")
        if port in listening_ports(proc.pid)["tcp"]:
            return
        time.sleep(0.05)
    raise LabError(f"nothing listening on {port} after {timeout} s")


def run_json(lab: Lab, pod: Any, argv: list[str], env: dict[str, str],
             timeout: float) -> dict[str, Any]:
    proc = lab.exec(pod, argv, env, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise LabError(f"no result from {argv[1]} (rc {proc.returncode}): {proc.stderr[-2000:]}")


def bench(args: argparse.Namespace) -> dict[str, Any]:
    with Lab(nodes=1) as lab:
        pod = lab.add_pod(0, name="bench")
        db = lab.tmpdir / "bench.db"
        db.write_text(database(args.records))
        ioc_proc = lab.spawn(pod, [sys.executable, "-m", "epicscorelibs.ioc", "-m",
                                   f"P={PREFIX}", "-d", str(db)], IOC_ENV)
        EpicsServer(lab=lab, kind="softioc-classic", prefix=PREFIX, ns=pod.ns, env=IOC_ENV,
                    popen=ioc_proc, protocols=("ca", "pva")).wait_ready(60)
        gateway = lab.spawn(pod, [sys.executable, "-m", "ioc_operator.gateways.ca_gateway",
                                  "-sip", pod.ip, "-sport", str(GW_PORT), "-cip", "127.0.0.1",
                                  "-cport", str(IOC_PORT)], {}, stdin=subprocess.DEVNULL)
        wait_listening(gateway, GW_PORT)
        raw = lab.tmpdir / "raw_client.py"
        raw.write_text(RAW_CLIENT)
        libca = lab.tmpdir / "pyepics_client.py"
        libca.write_text(PYEPICS_CLIENT)
        budget = args.gets * 0.05 + args.seconds * 4 + 120
        out: dict[str, Any] = run_json(
            lab, pod, [sys.executable, str(raw), "127.0.0.1", str(IOC_PORT), pod.ip,
                       str(GW_PORT), str(args.gets), str(args.records), str(args.seconds),
                       str(gateway.pid)], {}, budget)
        # libca gets: two rounds per path, alternating, so drifting load hits both alike
        rounds: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
        for _ in range(2):
            for path, address in (("direct", f"127.0.0.1:{IOC_PORT}"),
                                  ("gateway", f"{pod.ip}:{GW_PORT}")):
                env = {"EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CA_ADDR_LIST": address}
                rounds[path].append(run_json(
                    lab, pod, [sys.executable, str(libca), str(args.gets // 2)], env, budget))
        out["pyepics_get"] = {path: {k: statistics.mean(r[k] for r in runs)
                                     for k in ("median_ms", "p99_ms")}
                              for path, runs in rounds.items()}
        out["gateway_log"] = Path(gateway.log_path).read_text()[-2000:]  # type: ignore[attr-defined]
        return out


def figures(out: dict[str, Any], args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    get, libca, mon = out["get"], out["pyepics_get"], out["monitor"]
    offered = args.records * 10

    def ms(row: dict[str, float], key: str) -> str:
        return f"{row[key]:.3f} ms"

    def added(rows: dict[str, dict[str, float]], key: str) -> str:
        return f"{rows['gateway'][key] - rows['direct'][key]:+.3f} ms"

    return [
        ("get latency, median (raw client)", ms(get["direct"], "median_ms"),
         ms(get["gateway"], "median_ms"), f"{added(get, 'median_ms')}; target < +1 ms"),
        ("get latency, p99 (raw client)", ms(get["direct"], "p99_ms"),
         ms(get["gateway"], "p99_ms"), f"{added(get, 'p99_ms')}; {args.gets} gets per path"),
        ("get latency, median (pyepics)", ms(libca["direct"], "median_ms"),
         ms(libca["gateway"], "median_ms"), added(libca, "median_ms")),
        ("get latency, p99 (pyepics)", ms(libca["direct"], "p99_ms"),
         ms(libca["gateway"], "p99_ms"), f"{added(libca, 'p99_ms')}; ca.get() with libca"),
        ("monitor updates/s received", f"{mon['direct']['rate']:,.0f}",
         f"{mon['gateway']['rate']:,.0f}",
         f"{offered:,}/s offered ({args.records} records at 10 Hz); target >= 10,000/s"),
        ("gateway CPU s per 1000 updates", "-",
         f"{mon['gateway']['cpu_per_1000']:.4f} s",
         f"the gateway used {mon['gateway']['gateway_cpu_pct']:.0f} % of one core"),
    ]


def write_doc(rows: list[tuple[str, str, str, str]], args: argparse.Namespace) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    lines = [START, "",
             f"Measured by `python -m benchmarks.bench_ca_gateway` on {machine}; "
             f"run {time.strftime('%Y-%m-%d')}, --gets {args.gets} --records {args.records} "
             f"--seconds {args.seconds}. IOC, gateway and client share the machine's cores.",
             "", "| figure | direct (127.0.0.1) | through the gateway | notes |",
             "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {n} |" for a, b, c, n in rows]
    lines += ["", END]
    text = DOC.read_text() if DOC.exists() else f"# CA gateway\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _m: "\n".join(lines),
                  text, flags=re.S)
    DOC.write_text(text)
    print(f"written to {DOC}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gets", type=int, default=2000, help="sequential gets per client")
    parser.add_argument("--records", type=int, default=10000,
                        help="calc records scanned at 10 Hz (offered monitor load / 10)")
    parser.add_argument("--seconds", type=float, default=5.0, help="monitor window")
    parser.add_argument("--no-write", action="store_true", help="do not update the doc")
    args = parser.parse_args()
    out = bench(args)
    rows = figures(out, args)
    print(f"{'figure':34} {'direct':>12} {'gateway':>12}   notes")
    for name, direct, via, notes in rows:
        print(f"{name:34} {direct:>12} {via:>12}   {notes}")
    print(json.dumps({k: v for k, v in out.items() if k != "gateway_log"}, indent=1))
    if not args.no_write:
        write_doc(rows, args)


if __name__ == "__main__":
    main()
