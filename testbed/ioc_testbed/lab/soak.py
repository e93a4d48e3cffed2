"""The soak: the CA gateway, the CA-to-PVA bridge and the name server under a long mixed
load in the lab, with memory, file descriptors, CPU and latency sampled.

    result = run_soak(SoakConfig(seconds=3600, restart_every=300))

One IOC pod as sidecar mode runs it: an EPICS Base soft IOC (rsrv, CA on
127.0.0.1:15064; its PVA server on loopback too) whose ``tick`` updates at about 1 kHz,
with ``value`` and ``pv0`` .. ``pv199`` writable; the CA gateway and the bridge on the
pod IP. One name server behind a ClusterIP knows the IOC by the gateway's and the
bridge's addresses. Client pods on the other node run ioc_testbed.lab.soak_load with
only the name service's directory: libca and p4p monitors of ``tick``, CA and PVA
clients that connect, read, put, subscribe and disconnect over and over, and a latency
probe. The IOC is restarted every ``restart_every`` seconds behind the gateway and the
bridge. Used by benchmarks/soak.py (an hour) and tests/lab/test_soak.py (CI, minutes).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ioc_operator.discovery.clientenv import NameService, name_service_env

from .nameservice import LabNameService
from .netns import Lab, LabError, Pod, listening_ports

__all__ = ["SoakConfig", "SoakResult", "percentile", "run_soak"]

IOC_PORT = 15064
CLUSTER_IP = "198.19.0.53"
PREFIX = "SOAK:"
PVS = 200
IOC_ENV = {  # sidecar mode: the IOC's servers on loopback only
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1", "EPICS_CAS_SERVER_PORT": str(IOC_PORT),
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO", "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1", "EPICS_PVAS_SERVER_PORT": "15075",
    "EPICS_PVAS_BROADCAST_PORT": "15076",
    # tick's CA links reach the IOC's own server here
    "EPICS_CA_ADDR_LIST": f"127.0.0.1:{IOC_PORT}", "EPICS_CA_AUTO_ADDR_LIST": "NO",
}
DB = """\
# tick and tock hand the turn to each other after ODLY through CA links (put by the
# dbCa task once the writer has finished processing): tick updates at about 1 kHz.
record(calcout, "$(P)tick") {
    field(CALC, "A+1")
    field(INPA, "$(P)tick NPP")
    field(ODLY, "0.0004")
    field(OOPT, "Every Time")
    field(OUT, "$(P)tock.PROC CA")
    field(PINI, "YES")
}
record(calcout, "$(P)tock") {
    field(ODLY, "0.0004")
    field(OOPT, "Every Time")
    field(OUT, "$(P)tick.PROC CA")
}
# Starts (and restarts) the turns: once a second, if tick has not moved (CA links drop
# puts until they are connected, so the first turns after iocInit are lost).
record(calcout, "$(P)watch") {
    field(SCAN, "1 second")
    field(INPA, "$(P)tick NPP")
    field(CALC, "C:=(A=B);B:=A;C")
    field(OOPT, "When Non-zero")
    field(OUT, "$(P)tick.PROC CA")
}
record(ao, "$(P)value") {
    field(VAL, "1.5")
    field(PINI, "YES")
}
"""
ROLES = ("ca-monitor", "pva-monitor", "ca-churn", "pva-churn", "latency")


@dataclass
class SoakConfig:
    seconds: float = 3600.0
    sample: float = 10.0  # s between samples of memory, fds and CPU
    report: float = 10.0  # s per load report (latency windows)
    warmup: float = 60.0  # s of start-up not counted as "start"
    restart_every: float = 300.0  # s between IOC restarts (0: never)
    churn_names: int = 10
    churn_pause: float = 0.2
    log: Callable[[str], None] = print


@dataclass
class SoakResult:
    config: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)  # t, proc -> rss, fds, cpu
    reports: list[dict[str, Any]] = field(default_factory=list)  # the load's lines
    restarts: list[float] = field(default_factory=list)  # t of each IOC restart
    alive: dict[str, bool] = field(default_factory=dict)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def series(self, proc: str, key: str, after: float = 0.0) -> list[tuple[float, float]]:
        return [(s["t"], s[proc][key]) for s in self.samples if s["t"] >= after and proc in s]

    def window_reports(self, role: str, start: float, end: float) -> list[dict[str, Any]]:
        return [r for r in self.reports if r["role"] == role and start <= r["t"] < end]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def slope_per_hour(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope (per hour) and the spread of the points around the line."""
    if len(points) < 3:
        return 0.0, 0.0
    ts = [t for t, _ in points]
    vs = [v for _, v in points]
    mt, mv = statistics.fmean(ts), statistics.fmean(vs)
    var = sum((t - mt) ** 2 for t in ts)
    slope = sum((t - mt) * (v - mv) for t, v in points) / var if var else 0.0
    residuals = [v - (mv + slope * (t - mt)) for t, v in points]
    return slope * 3600.0, statistics.pstdev(residuals)


def _proc(pid: int) -> dict[str, float]:
    """RSS (MB), open file descriptors and CPU seconds of a process."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return {"rss": rss / 1024, "fds": fds, "cpu": cpu}


def _wait_tcp(popen: subprocess.Popen[Any], port: int, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise LabError(f"{what} exited: {Path(popen.log_path).read_text()[-2000:]}")  # type: ignore[attr-defined]
        if port in listening_ports(popen.pid)["tcp"]:
            return
        time.sleep(0.05)
    raise LabError(f"{what} not listening on {port} after {timeout} s")


class _Site:
    def __init__(self, lab: Lab, cfg: SoakConfig) -> None:
        self.lab = lab
        self.cfg = cfg
        self.db = lab.tmpdir / "soak.db"
        self.db.write_text(DB + "".join(f'record(ao, "$(P)pv{i}") {{ field(VAL, "{i}") }}\n'
                                        for i in range(PVS)))
        self.pod: Pod = lab.add_pod(0, name="soak-ioc")
        self.ioc = self.start_ioc()
        ip = self.pod.ip
        self.gateway = lab.spawn(self.pod, [
            sys.executable, "-m", "ioc_operator.gateways.ca_gateway", "-sip", ip,
            "-cip", "127.0.0.1", "-cport", str(IOC_PORT)], {}, stdin=subprocess.DEVNULL,
            log=lab.tmpdir / "soak-gateway.log")
        self.bridge = lab.spawn(self.pod, [
            sys.executable, "-m", "ioc_operator.gateways.bridge", "--interface", ip,
            "--ca-addr-list", f"127.0.0.1:{IOC_PORT}", "--prefix", PREFIX], {},
            stdin=subprocess.DEVNULL, log=lab.tmpdir / "soak-bridge.log")
        _wait_tcp(self.gateway, 5064, "gateway")
        _wait_tcp(self.bridge, 5075, "bridge")
        self.names = LabNameService(lab, node=0, cluster_ip=CLUSTER_IP, replicas=1)
        self.names.set_iocs([{"name": "soak/ioc", "prefix": PREFIX, "ca": f"{ip}:5064",
                              "pva": f"{ip}:5075", "pvaSearch": f"{ip}:5076"}])
        self.env = name_service_env(NameService(CLUSTER_IP))
        self.load: dict[str, subprocess.Popen[bytes]] = {}

    def start_ioc(self) -> subprocess.Popen[bytes]:
        popen = self.lab.spawn(self.pod, [sys.executable, "-m", "epicscorelibs.ioc", "-m",
                                          f"P={PREFIX}", "-d", str(self.db)], IOC_ENV,
                               stdin=subprocess.PIPE,
                               log=self.lab.tmpdir / f"soak-ioc-{len(self.lab.processes)}.log")
        _wait_tcp(popen, IOC_PORT, "soft IOC")
        return popen

    def restart_ioc(self) -> None:
        self.lab.stop(self.ioc)
        time.sleep(1.0)  # a restart, not a blip: clients see the IOC gone
        self.ioc = self.start_ioc()

    def start_load(self, seconds: float) -> None:
        cfg = self.cfg
        for role in ROLES:
            pod = self.lab.add_pod(1, name=f"soak-{role}")
            argv = [sys.executable, "-m", "ioc_testbed.lab.soak_load", "--role", role,
                    "--seconds", str(seconds), "--report", str(cfg.report), "--prefix",
                    PREFIX, "--pvs", str(PVS), "--names", str(cfg.churn_names),
                    "--pause", str(cfg.churn_pause)]
            self.load[role] = self.lab.spawn(pod, argv, self.env, stdin=subprocess.DEVNULL,
                                             log=self.lab.tmpdir / f"soak-{role}.log")

    def processes(self) -> dict[str, subprocess.Popen[Any]]:
        return {"gateway": self.gateway, "bridge": self.bridge,
                "name server": self.names.replicas[0].popen}

    def reports(self) -> list[dict[str, Any]]:
        out = []
        for popen in self.load.values():
            text = Path(popen.log_path).read_text(errors="replace")  # type: ignore[attr-defined]
            out += [json.loads(line) for line in text.splitlines() if line.startswith('{"role"')]
        return sorted(out, key=lambda r: float(r["t"]))


def _gateway_stats(popen: subprocess.Popen[Any], timeout: float = 5.0) -> dict[str, int]:
    import re
    import signal

    path = Path(popen.log_path)  # type: ignore[attr-defined]
    before = path.read_text(errors="replace").count(" stats ")
    popen.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace")
        if text.count(" stats ") > before:
            line = text[text.rindex(" stats "):].splitlines()[0]
            return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
        time.sleep(0.05)
    return {}


def run_soak(cfg: SoakConfig, lab: Lab | None = None) -> SoakResult:
    """Run the soak in ``lab`` (a new two-node lab if None); bounded by cfg.seconds."""
    if lab is None:
        with Lab(nodes=2) as own:
            return run_soak(cfg, own)
    result = SoakResult(config={k: v for k, v in vars(cfg).items() if k != "log"})
    site = _Site(lab, cfg)
    procs = site.processes()
    site.start_load(cfg.seconds)
    t0 = time.time()
    cfg.log(f"soak: {cfg.seconds:.0f} s, IOC restart every {cfg.restart_every:.0f} s, "
            f"samples every {cfg.sample:.0f} s")
    next_sample = time.monotonic()
    next_restart = time.monotonic() + cfg.restart_every if cfg.restart_every else float("inf")
    end = time.monotonic() + cfg.seconds
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_restart and now < end - cfg.report:
            site.restart_ioc()
            result.restarts.append(time.time() - t0)
            next_restart += cfg.restart_every
            cfg.log(f"  {time.time() - t0:6.0f} s: IOC restarted")
        if now >= next_sample:
            sample: dict[str, Any] = {"t": time.time() - t0}
            for name, popen in procs.items():
                if popen.poll() is None:
                    sample[name] = _proc(popen.pid)
            result.samples.append(sample)
            next_sample += cfg.sample
            if len(result.samples) % max(1, int(300 / cfg.sample)) == 1:
                cfg.log(f"  {sample['t']:6.0f} s: " + ", ".join(
                    f"{n} {v['rss']:.1f} MB {v['fds']} fds" for n, v in sample.items()
                    if n != "t"))
        time.sleep(min(0.2, max(0.0, min(next_sample, end) - time.monotonic())))
    deadline = time.monotonic() + 40
    while any(p.poll() is None for p in site.load.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    result.reports = [{**r, "t": float(r["t"]) - t0} for r in site.reports()]
    result.alive = {name: popen.poll() is None for name, popen in procs.items()}
    if result.alive["gateway"]:
        result.stats["gateway"] = _gateway_stats(site.gateway)
    if result.alive["name server"]:
        result.stats["name server"] = site.names.stats(0)
    for popen in site.load.values():
        lab.stop(popen)
    return result


def summary(result: SoakResult) -> dict[str, Any]:
    """Start (first windows after the warm-up) and end (last windows) of every figure."""
    cfg = result.config
    t_end = max((s["t"] for s in result.samples), default=0.0)
    warm = cfg["warmup"]
    span = max(cfg["report"] * 3, (t_end - warm) * 0.1)  # a tenth of the run, 3 windows min
    out: dict[str, Any] = {"procs": {}, "latency": {}, "monitors": {}, "churn": {}}
    for proc in ("gateway", "bridge", "name server"):
        figures: dict[str, Any] = {}
        for key in ("rss", "fds"):
            points = result.series(proc, key, warm)
            first = [v for t, v in points if t < warm + span]
            last = [v for t, v in points if t >= t_end - span]
            slope, noise = slope_per_hour(points)
            figures[key] = {"start": statistics.median(first) if first else float("nan"),
                            "end": statistics.median(last) if last else float("nan"),
                            "max": max((v for _, v in points), default=float("nan")),
                            "slope_per_hour": slope, "noise": noise}
        cpu = result.series(proc, "cpu")
        if len(cpu) >= 2 and cpu[-1][0] > cpu[0][0]:
            figures["cpu_percent"] = 100 * (cpu[-1][1] - cpu[0][1]) / (cpu[-1][0] - cpu[0][0])
        out["procs"][proc] = figures
    for proto in ("ca", "pva"):
        start = [x for r in result.window_reports("latency", warm, warm + span)
                 for x in r[proto]]
        endw = [x for r in result.window_reports("latency", t_end - span, t_end + 60)
                for x in r[proto]]
        failures = sum(r["failures"][proto] for r in result.window_reports("latency", 0, 1e9))
        out["latency"][proto] = {
            "start": (percentile(start, 50), percentile(start, 99), len(start)),
            "end": (percentile(endw, 50), percentile(endw, 99), len(endw)),
            "failures": failures}
    for role in ("ca-monitor", "pva-monitor"):
        reports = result.window_reports(role, warm, 1e9)
        updates = sum(r["updates"] for r in reports)
        seconds = len(reports) * cfg["report"]
        every = result.window_reports(role, 0, 1e9)
        out["monitors"][role] = {"rate": updates / seconds if seconds else 0.0,
                                 "changes": every[-1]["changes"] if every else 0,  # cumulative
                                 "last_window": reports[-1]["updates"] if reports else 0}
    for role in ("ca-churn", "pva-churn"):
        reports = result.window_reports(role, 0, 1e9)
        why: dict[str, int] = {}
        for r in reports:
            for k, v in r["why"].items():
                why[k] = why.get(k, 0) + v
        out["churn"][role] = {"cycles": sum(r["cycles"] for r in reports),
                              "channels": sum(r["channels"] for r in reports),
                              "errors": sum(r["errors"] for r in reports), "why": why}
    return out
