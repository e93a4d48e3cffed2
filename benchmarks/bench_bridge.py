"""CA-to-PVA bridge benchmark in the network lab (root). Prints figures and writes them into
docs/ca-pva-bridge.md (between the BENCHMARK markers). Not part of the test run:

    sudo .venv/bin/python -m benchmarks.bench_bridge [--gets 2000] [--seconds 5] \
        [--repeat 3] [--kinds pcaspy,caproto] [--no-write] [--monitor-only] \
        [--profile DIR]

One IOC pod runs a CA-only IOC on 127.0.0.1:15064 (sidecar mode) and the bridge on the pod
IP. Measured, for each IOC kind (pcaspy = C++ CAS, caproto = Python), each figure the
median of --repeat runs:

- get latency, median and p99 of --gets sequential gets: CA straight to the IOC (pyepics
  on libca, and caproto's threading client) from inside the IOC pod, against p4p through
  the bridge from the same pod and from a pod on another node; and, as the reference for
  what PVA itself costs, p4p against a native pvxs server serving the same structure;
- monitor updates per second the client receives while the pcaspy IOC writes one PV as
  fast as it can (CA straight, and p4p through the bridge), the IOC's own write rate, the
  bridge's CPU seconds per 1,000 updates it delivered (utime+stime of all its threads
  from /proc/<pid>/stat, over exactly the client's counting window) and the client's own
  (the p4p client pops updates in batches from a queue of 1,000: see CLIENT).

--monitor-only measures only the monitor rows (pcaspy IOC) and writes nothing; --profile DIR
also records the bridge with py-spy (all threads, native frames) during each of its
monitor runs, into DIR as speedscope JSON (py-spy's sampling costs the bridge some CPU:
profiled runs are not the figures).
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
import threading
import time
from pathlib import Path
from typing import Any

from ioc_testbed.bridge_lab import pva_env, start_bridge, start_ioc
from ioc_testbed.lab import Lab, LabError, Pod
from ioc_testbed.lab.netns import listening_ports

from .profiling import py_spy

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ca-pva-bridge.md"
BEGIN, END = "<!-- BENCHMARK:BEGIN -->", "<!-- BENCHMARK:END -->"
PREFIX = "BENCH:"
CA_DIRECT = {"EPICS_CA_ADDR_LIST": "127.0.0.1:15064", "EPICS_CA_AUTO_ADDR_LIST": "NO"}

# Runs in a lab pod: one measurement, one JSON line out.
CLIENT = '''\
import json, os, statistics, sys, threading, time

args = json.loads(sys.argv[1])
lib, op, name, go_pv = args["lib"], args["op"], args["pv"], args.get("go")


def pct(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed_gets(get, n):
    for _ in range(50):  # warm up: connection, caches
        get()
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        get()
        lat.append((time.perf_counter() - t0) * 1e6)
    return {"median_us": statistics.median(lat), "p99_us": pct(lat, 0.99), "n": n}


class Counter:
    """Updates received and the last one; written by one thread, read by the main one
    (an off-by-one between the two fields is noise over tens of thousands of updates)."""

    def __init__(self, to_int=int):
        self.n, self.last, self.to_int = 0, None, to_int

    def add(self, value):
        self.n += 1
        self.last = value

    def read(self):
        last = self.last
        return self.n, (self.to_int(last) if last is not None else None)


def cpu_seconds():
    """utime + stime of this process (all threads)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def count_updates(subscribe, go, seconds):
    """Subscribe, then start the IOC's writer for the ramp-up plus the window (a
    subscription added under load trips a caproto server bug) and count what arrives."""
    counter = Counter()
    stop = subscribe(counter)
    deadline = time.monotonic() + 10
    while not counter.n and time.monotonic() < deadline:
        time.sleep(0.01)
    for attempt in range(3):  # a put can wait behind a backlog the IOC is still sending
        try:
            go(int(seconds) + 2)
            break
        except Exception:
            if attempt == 2:
                raise
    time.sleep(1.0)  # ramp up
    n0, v0 = counter.read()
    t0, m0, c0 = time.perf_counter(), time.monotonic(), cpu_seconds()
    time.sleep(seconds)
    n1, v1 = counter.read()
    elapsed, m1, c1 = time.perf_counter() - t0, time.monotonic(), cpu_seconds()
    time.sleep(1.5)  # the writer stops by itself
    stop()
    produced = (v1 - v0) if v0 is not None and v1 is not None else 0
    # CLOCK_MONOTONIC is one clock for all network namespaces: the harness reads the
    # bridge's CPU time over exactly [m0, m1].
    return {"updates": n1 - n0, "per_s": (n1 - n0) / elapsed, "ioc_per_s": produced / elapsed,
            "seconds": elapsed, "window": [m0, m1], "client_cpu": c1 - c0}


if lib == "p4p":
    from p4p.client.thread import Context
    ctx = Context("pva", nt=False)
    if op == "get":
        out = timed_gets(lambda: ctx.get(name, timeout=5.0), args["n"])
    else:
        from p4p import _p4p
        from p4p.client.raw import Context as RawContext
        raw = RawContext("pva", useenv=True, nt=False)  # (raw default: no env)
        pop = _p4p.ClientMonitor.pop  # what Subscription.pop calls, without its wrapper

        def sub(counter):
            # p4p's raw API, popped in batches by one Python thread: pvxs's client thread
            # queues updates (queueSize 1000, asked of the server too, so neither side
            # squashes them) without calling into Python per update; every update is
            # still received and popped as a p4p Value. (A callback per update made the
            # client cost ~40 us of CPU per update, more than half the bridge's.)
            counter.to_int = lambda v: int(v["value"])
            s = raw.monitor(name, lambda: None, request="record[queueSize=1000]")
            stopped = threading.Event()

            def poll():
                add = counter.add
                while not stopped.wait(0.002):
                    while True:
                        v = pop(s)
                        if v is None or isinstance(v, Exception):
                            break
                        add(v)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()

            def stop():
                stopped.set()
                poller.join(5)
                s.close()
            return stop
        out = count_updates(sub, lambda v: ctx.put(go_pv, v, timeout=10.0), args["seconds"])
elif lib == "pyepics":
    import epicscorelibs.path.pyepics  # noqa: F401  (libca of EPICS 7)
    from epics import ca
    chid = ca.create_channel(name, connect=True, auto_cb=False)
    if op == "get":
        out = timed_gets(lambda: ca.get(chid, timeout=5.0), args["n"])
    else:
        def sub(counter):
            keep = ca.create_subscription(chid, callback=lambda value=None, **kw:
                                          counter.add(int(value)))
            return lambda keep=keep: None
        go_chid = ca.create_channel(go_pv, connect=True, auto_cb=False)
        out = count_updates(sub, lambda v: ca.put(go_chid, v, wait=True, timeout=10.0),
                            args["seconds"])
else:  # caproto threading client
    from caproto.threading.client import Context
    ctx = Context()
    pv, = ctx.get_pvs(name, timeout=5.0)
    pv.wait_for_connection(timeout=5.0)
    if op == "get":
        out = timed_gets(lambda: pv.read(timeout=5.0), args["n"])
    else:
        def sub(counter):
            s = pv.subscribe()
            def on_update(sub, response):
                counter.add(int(response.data[0]))
            s.add_callback(on_update)
            return s.clear
        go, = ctx.get_pvs(go_pv, timeout=5.0)
        out = count_updates(sub, lambda v: go.write([v], wait=True, timeout=10.0),
                            args["seconds"])
sys.stdout.write(json.dumps(out) + "\\n")
sys.stdout.flush()
os._exit(0)
'''


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """Samples a process's CPU seconds every ``period`` s, to read them over a window
    known only afterwards (the client reports it)."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), cpu_seconds(self.pid)))
            self._stop.wait(self.period)

    def between(self, t0: float, t1: float) -> float:
        def at(t: float) -> float:
            earlier = [s for s in self.samples if s[0] <= t]
            later = [s for s in self.samples if s[0] >= t]
            (ta, ca), (tb, cb) = (earlier or self.samples)[-1], (later or self.samples[-1:])[0]
            return ca if tb == ta else ca + (cb - ca) * (t - ta) / (tb - ta)
        return at(t1) - at(t0)


def measure(lab: Lab, pod: Pod, env: dict[str, str], args: dict[str, Any],
            timeout: float = 120.0) -> dict[str, Any]:
    script = lab.tmpdir / "bench_client.py"
    if not script.exists():
        script.write_text(CLIENT)
    proc = lab.exec(pod, [sys.executable, str(script), json.dumps(args)], env, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise LabError(f"bench client failed (rc {proc.returncode}): {proc.stderr[-2000:]}")


def bench_kind(lab: Lab, kind: str, gets: int, seconds: float, repeat: int, *,
               monitor_only: bool = False,
               profile: Path | None = None) -> list[tuple[str, str, str]]:
    pod = lab.add_pod(0, name=f"ioc-{kind}")
    remote = lab.add_pod(1, name=f"client-{kind}")
    ioc = start_ioc(lab, pod, kind, PREFIX)
    bridge = start_bridge(lab, pod)
    via_bridge = pva_env(pod.ip, name_server=True)
    rows: list[tuple[str, str, str]] = []
    for label, where, lib, env in (
        ("CA direct, pyepics (libca 7.0)", pod, "pyepics", CA_DIRECT),
        ("CA direct, caproto threading client", pod, "caproto", CA_DIRECT),
        ("PVA via bridge, p4p, same pod", pod, "p4p", via_bridge),
        ("PVA via bridge, p4p, other node", remote, "p4p", via_bridge),
    ):
        if monitor_only:
            break
        runs = [measure(lab, where, env, {"lib": lib, "op": "get",
                                          "pv": PREFIX + "temperature", "n": gets})
                for _ in range(repeat)]
        rows.append(_get_row(f"{kind}: get, {label}", runs, gets))
    if kind == "pcaspy":  # the only test IOC that can write fast (see bridge_lab)
        for label, where, lib, env in (
            ("CA direct, pyepics, same pod", pod, "pyepics", CA_DIRECT),
            ("PVA via bridge, p4p, same pod", pod, "p4p", via_bridge),
            ("PVA via bridge, p4p, other node", remote, "p4p", via_bridge),
        ):
            rows.append(_monitor_row(lab, f"{kind}: monitor, {label}", where, lib, env,
                                     bridge.pid, seconds, repeat,
                                     profile=profile if lib == "p4p" else None))
    lab.stop(bridge)
    lab.stop(ioc)
    return rows


def _monitor_row(lab: Lab, name: str, where: Pod, lib: str, env: dict[str, str],
                 bridge_pid: int, seconds: float, repeat: int,
                 profile: Path | None = None) -> tuple[str, str, str]:
    rates, ioc_rates, cpu_per_k, client_per_k = [], [], [], []
    for run in range(repeat):
        spy = None
        if profile is not None:  # from the ramp-up on; py-spy stops by itself
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            spy = py_spy(bridge_pid, profile / f"{slug}-{run}.speedscope.json", "speedscope",
                         seconds + 2, rate=200, native=True)
        with CpuSampler(bridge_pid) as cpu:
            res = measure(lab, where, env, {"lib": lib, "op": "monitor", "pv": PREFIX + "fast",
                                            "go": PREFIX + "go", "seconds": seconds})
        if spy is not None:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(timeout=5)
        rates.append(res["per_s"])
        ioc_rates.append(res["ioc_per_s"])
        cpu_per_k.append(cpu.between(*res["window"]) / max(res["updates"], 1) * 1000)
        client_per_k.append(res["client_cpu"] / max(res["updates"], 1) * 1000)
        print(f"  run {run + 1}: {res['per_s']:,.0f} updates/s, IOC {res['ioc_per_s']:,.0f}/s"
              + (f", bridge CPU {cpu_per_k[-1]:.4f} s per 1,000" if lib == "p4p" else "")
              + f", client CPU {client_per_k[-1]:.4f} s per 1,000", flush=True)
        time.sleep(3)  # let the IOC's send queues drain before the next run
    note = (f"median (min-max) of {repeat} runs of {seconds:g} s: {min(rates):,.0f}-"
            f"{max(rates):,.0f}; the IOC wrote {statistics.median(ioc_rates):,.0f}/s")
    if lib == "p4p":
        note += (f"; bridge CPU {statistics.median(cpu_per_k):.3f} s per 1,000 updates "
                 "delivered (utime+stime, all threads)")
    note += f"; client CPU {statistics.median(client_per_k):.3f} s per 1,000"
    row = (name, f"{statistics.median(rates):,.0f} updates/s", note)
    print(*row, sep="  ", flush=True)
    return row


def _get_row(name: str, runs: list[dict[str, Any]], gets: int) -> tuple[str, str, str]:
    median = statistics.median(r["median_us"] for r in runs)
    p99 = statistics.median(r["p99_us"] for r in runs)
    row = (name, f"{median:.0f} µs / {p99:.0f} µs",
           f"median / p99 of {gets} sequential gets; median of {len(runs)} runs "
           f"(medians {min(r['median_us'] for r in runs):.0f}-"
           f"{max(r['median_us'] for r in runs):.0f} µs)")
    print(*row, sep="  ", flush=True)
    return row


# A native PVA server (p4p/pvxs SharedPV) serving the very structure and metadata the
# bridge serves for the pcaspy IOC's temperature (a DBR_DOUBLE): the reference for gets.
REFERENCE_SERVER = """\
import sys, time
from caproto import ChannelType
from caproto._dbr import DBR_CTRL_DOUBLE
from p4p.server import Server
from p4p.server.raw import SharedPV
from ioc_operator.gateways.bridge_nt import NTSpec, metadata_fields

spec = NTSpec.for_channel(ChannelType.DOUBLE, 1)
ctrl = DBR_CTRL_DOUBLE(precision=3, units=b"mm", lower_disp_limit=-20.0,
                       upper_disp_limit=20.0, lower_alarm_limit=-9.0, upper_alarm_limit=9.0,
                       lower_warning_limit=-5.0, upper_warning_limit=5.0)
pv = SharedPV(initial=spec.initial(metadata_fields(spec, ctrl), 1.5, 0, 0, 1, 0))
with Server(providers=[{"REF:temperature": pv}]):
    print("reference server running", flush=True)
    while True:
        time.sleep(1)
"""


def bench_reference(lab: Lab, gets: int, repeat: int) -> list[tuple[str, str, str]]:
    """p4p gets from a native PVA server serving the same structure: what the PVA client,
    the NT's size and the network cost without any bridge."""
    pod = lab.add_pod(0, name="ioc-pva")
    remote = lab.add_pod(1, name="client-pva")
    script = lab.tmpdir / "reference_server.py"
    script.write_text(REFERENCE_SERVER)
    server = lab.spawn(pod, [sys.executable, str(script)], {"EPICS_PVAS_INTF_ADDR_LIST": pod.ip})
    deadline = time.monotonic() + 20
    while 5075 not in listening_ports(server.pid)["tcp"]:
        if time.monotonic() > deadline or server.poll() is not None:
            raise LabError("reference PVA server did not start")
        time.sleep(0.05)
    env = pva_env(pod.ip, name_server=True)
    args = {"lib": "p4p", "op": "get", "pv": "REF:temperature", "n": gets}
    rows = [_get_row(f"reference: get, native PVA server (pvxs), p4p, {label}",
                     [measure(lab, where, env, args) for _ in range(repeat)], gets)
            for label, where in (("same pod", pod), ("other node", remote))]
    lab.stop(server)
    return rows


def write_doc(rows: list[tuple[str, str, str]], args: argparse.Namespace,
              load: float) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    lines = [BEGIN, "",
             f"Measured by `python -m benchmarks.bench_bridge --gets {args.gets} "
             f"--seconds {args.seconds:g} --repeat {args.repeat}` on "
             f"{time.strftime('%Y-%m-%d')}; {machine}; load average before the run "
             f"{load:.2f}. IOC, bridge and clients share these cores.", "",
             "| figure | value | conditions |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", END]
    text = DOC.read_text() if DOC.exists() else f"# CA-to-PVA bridge\n\n{BEGIN}\n{END}\n"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    DOC.write_text(pattern.sub(lambda _m: "\n".join(lines), text))
    print(f"written to {DOC}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gets", type=int, default=2000, help="sequential gets per client")
    p.add_argument("--seconds", type=float, default=5.0, help="monitor window")
    p.add_argument("--kinds", default="pcaspy,caproto", help="IOC kinds, comma-separated")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure (median reported)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--monitor-only", action="store_true",
                   help="only the monitor rows (pcaspy IOC); implies --no-write")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="py-spy the bridge during its monitor runs (speedscope files in DIR)")
    args = p.parse_args()
    if args.monitor_only:
        args.no_write, args.kinds = True, "pcaspy"
    rows: list[tuple[str, str, str]] = []
    load = os.getloadavg()[0]
    with Lab(nodes=2) as lab:
        if not args.monitor_only:
            rows += bench_reference(lab, args.gets, args.repeat)
        for kind in args.kinds.split(","):
            rows += bench_kind(lab, kind, args.gets, args.seconds, args.repeat,
                               monitor_only=args.monitor_only, profile=args.profile)
    width = max(len(r[0]) for r in rows)
    for name, value, cond in rows:
        print(f"{name:{width}}  {value:>22}   {cond}")
    if not args.no_write:
        write_doc(rows, args, load)


if __name__ == "__main__":
    main()
