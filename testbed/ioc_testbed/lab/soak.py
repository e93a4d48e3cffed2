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

Bounded: the main loop ends after ``seconds``, each load process after ``seconds`` (its
own watchdog 30 s later), the wait for them after 40 s; every process it starts is
stopped by PID before ``run_soak`` returns (and by the lab's teardown whatever happens);
the ClusterIP's rules are removed. ``summary`` turns the samples into figures: medians of
the first and last tenth after the warm-up, and a least-squares trend per hour with a
95 % interval (two standard errors, widened for the samples' autocorrelation), judged
against a stated bound: *flat* if the whole interval is at or below it, *grows* if the
whole interval is above it, *undecided* otherwise (a longer run narrows the interval).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
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

__all__ = ["SoakConfig", "SoakResult", "client_errors", "percentile", "run_soak", "summary",
           "trend"]

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
    warmup: float = 120.0  # s of start-up left out of the trend and the "start" figures
    restart_every: float = 300.0  # s between IOC restarts (0: never)
    settle: float = 15.0  # s after an IOC is back in which client errors are the restart's
    churn_names: int = 10
    churn_pause: float = 0.2
    rss_bound: float = 1.0  # MB per hour: a trend whose interval lies above it is growth
    fd_bound: float = 1.0  # file descriptors per hour, likewise
    log: Callable[[str], None] = print


@dataclass
class SoakResult:
    config: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)  # t, proc -> rss, fds, cpu
    reports: list[dict[str, Any]] = field(default_factory=list)  # the load's lines
    restarts: list[tuple[float, float]] = field(default_factory=list)  # IOC down, back up
    alive: dict[str, bool] = field(default_factory=dict)
    load_exit: dict[str, int | None] = field(default_factory=dict)  # role -> exit code
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    duration: float = 0.0  # s from the start of the load to the last sample

    def series(self, proc: str, key: str, after: float = 0.0) -> list[tuple[float, float]]:
        return [(s["t"], s[proc][key]) for s in self.samples if s["t"] >= after and proc in s]

    def window_reports(self, role: str, start: float, end: float) -> list[dict[str, Any]]:
        """Reports of ``role`` whose window ends in [start, end)."""
        return [r for r in self.reports if r["role"] == role and start <= r["t"] < end]

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("config", "samples", "reports", "restarts",
                                              "alive", "load_exit", "stats", "duration")}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def trend(points: list[tuple[float, float]], bound: float) -> dict[str, Any]:
    """Least-squares slope per hour of (t seconds, value) points, its 95 % interval and a
    verdict against ``bound`` (per hour).

    The interval is two standard errors of the slope, widened by sqrt((1+r)/(1-r)) for
    the lag-1 autocorrelation r of the residuals (memory moves in steps, so neighbouring
    samples are not independent; r is clamped to [0, 0.95]). ``spread`` is the standard
    deviation of the points around the line."""
    n = len(points)
    out: dict[str, Any] = {"n": n, "slope": float("nan"), "low": float("nan"),
                           "high": float("nan"), "spread": float("nan"), "bound": bound,
                           "verdict": "too few samples"}
    if n < 6:
        return out
    ts = [t for t, _ in points]
    vs = [v for _, v in points]
    mt, mv = statistics.fmean(ts), statistics.fmean(vs)
    sxx = sum((t - mt) ** 2 for t in ts)
    if sxx <= 0:
        return out
    slope = sum((t - mt) * (v - mv) for t, v in points) / sxx
    res = [v - (mv + slope * (t - mt)) for t, v in points]
    ssr = sum(r * r for r in res)
    r1 = sum(a * b for a, b in itertools.pairwise(res)) / ssr if ssr > 0 else 0.0
    r1 = min(max(r1, 0.0), 0.95)
    se = math.sqrt(ssr / (n - 2) / sxx) * math.sqrt((1 + r1) / (1 - r1))
    slope_h, half = slope * 3600.0, 2.0 * se * 3600.0
    out.update(slope=slope_h, low=slope_h - half, high=slope_h + half,
               spread=statistics.pstdev(res), autocorrelation=r1)
    out["verdict"] = ("flat" if slope_h + half <= bound else
                      "grows" if slope_h - half > bound else "undecided")
    return out


def _proc(pid: int) -> dict[str, float] | None:
    """RSS (MB), open file descriptors and CPU seconds of a process (None if gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, StopIteration):
        return None
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return {"rss": rss / 1024, "fds": fds, "cpu": cpu}


def _log_tail(popen: subprocess.Popen[Any]) -> str:
    try:
        return Path(popen.log_path).read_text(errors="replace")[-2000:]  # type: ignore[attr-defined]
    except OSError:
        return ""


def _wait_tcp(popen: subprocess.Popen[Any], port: int, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise LabError(f"{what} exited: {_log_tail(popen)}")
        if port in listening_ports(popen.pid)["tcp"]:
            return
        time.sleep(0.05)
    raise LabError(f"{what} not listening on {port} after {timeout} s: {_log_tail(popen)}")


class _Site:
    """The IOC pod (soft IOC, gateway, bridge), the name server and the load pods."""

    def __init__(self, lab: Lab, cfg: SoakConfig) -> None:
        self.lab = lab
        self.cfg = cfg
        self.started: list[subprocess.Popen[Any]] = []
        self.load: dict[str, subprocess.Popen[bytes]] = {}
        self.names: LabNameService | None = None
        self.db = lab.tmpdir / "soak.db"
        self.db.write_text(DB + "".join(f'record(ao, "$(P)pv{i}") {{ field(VAL, "{i}") }}\n'
                                        for i in range(PVS)))
        try:
            self._start()
        except BaseException:
            self.close()  # what did start, by PID (the lab's teardown would too, later)
            raise

    def _start(self) -> None:
        lab = self.lab
        self.pod: Pod = lab.add_pod(0, name="soak-ioc")
        self.ioc = self.start_ioc()
        ip = self.pod.ip
        self.gateway = self._spawn(self.pod, [
            sys.executable, "-m", "ioc_operator.gateways.ca_gateway", "-sip", ip,
            "-cip", "127.0.0.1", "-cport", str(IOC_PORT)], {}, "soak-gateway")
        self.bridge = self._spawn(self.pod, [
            sys.executable, "-m", "ioc_operator.gateways.bridge", "--interface", ip,
            "--ca-addr-list", f"127.0.0.1:{IOC_PORT}", "--prefix", PREFIX], {},
            "soak-bridge")
        _wait_tcp(self.gateway, 5064, "gateway")
        _wait_tcp(self.bridge, 5075, "bridge")
        self.names = LabNameService(lab, node=0, cluster_ip=CLUSTER_IP, replicas=1)
        self.started.append(self.names.replicas[0].popen)
        self.names.set_iocs([{"name": "soak/ioc", "prefix": PREFIX, "ca": f"{ip}:5064",
                              "pva": f"{ip}:5075", "pvaSearch": f"{ip}:5076"}])
        self.env = name_service_env(NameService(CLUSTER_IP))

    def _spawn(self, where: Pod, argv: list[str], env: dict[str, str], tag: str,
               stdin: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
        popen = self.lab.spawn(where, argv, env, stdin=stdin,
                               log=self.lab.tmpdir / f"{tag}-{len(self.lab.processes)}.log")
        self.started.append(popen)
        return popen

    def start_ioc(self) -> subprocess.Popen[bytes]:
        # stdin a pipe: epicscorelibs.ioc runs its shell on it and exits when it closes
        popen = self._spawn(self.pod, [sys.executable, "-m", "epicscorelibs.ioc", "-m",
                                       f"P={PREFIX}", "-d", str(self.db)], IOC_ENV,
                            "soak-ioc", stdin=subprocess.PIPE)
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
                    "--seconds", f"{seconds:g}", "--report", f"{cfg.report:g}", "--prefix",
                    PREFIX, "--pvs", str(PVS), "--names", str(cfg.churn_names),
                    "--pause", f"{cfg.churn_pause:g}"]
            self.load[role] = self._spawn(pod, argv, self.env, f"soak-{role}")

    def processes(self) -> dict[str, subprocess.Popen[Any]]:
        assert self.names is not None
        return {"gateway": self.gateway, "bridge": self.bridge,
                "name server": self.names.replicas[0].popen}

    def reports(self) -> list[dict[str, Any]]:
        out = []
        for popen in self.load.values():
            text = Path(popen.log_path).read_text(errors="replace")  # type: ignore[attr-defined]
            for line in text.splitlines():
                if line.startswith('{"role"'):
                    try:
                        out.append(json.loads(line))
                    except ValueError:  # a line cut by the watchdog
                        continue
        return sorted(out, key=lambda r: float(r["t"]))

    def close(self) -> None:
        """Stop every process this site started, by PID, newest first; drop the Service."""
        for popen in reversed(self.started):
            self.lab.stop(popen)
        try:
            self.lab.remove_service(CLUSTER_IP)  # (nothing if it was never added)
        except LabError as exc:  # the namespaces go at the lab's teardown, rules with them
            self.cfg.log(f"soak: removing the name service's rules failed: {exc}")


def _gateway_stats(popen: subprocess.Popen[Any], timeout: float = 5.0) -> dict[str, int]:
    """The gateway's counters (SIGUSR1 makes it log them); {} if it does not answer."""
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
    try:
        _run(site, cfg, result)
    finally:
        site.close()
    return result


def _run(site: _Site, cfg: SoakConfig, result: SoakResult) -> None:
    procs = site.processes()
    t0 = time.time()
    start = time.monotonic()
    site.start_load(cfg.seconds)
    cfg.log(f"soak: {cfg.seconds:.0f} s, IOC restart every {cfg.restart_every:.0f} s, "
            f"samples every {cfg.sample:.0f} s")
    end = start + cfg.seconds
    next_sample = start
    next_restart = start + cfg.restart_every if cfg.restart_every > 0 else math.inf
    log_every = max(1, round(300 / cfg.sample))
    while (now := time.monotonic()) < end:
        if now >= next_restart:
            # only while there is time left to see the clients come back
            if now < end - cfg.settle - 2 * cfg.report:
                down = time.time() - t0
                site.restart_ioc()
                result.restarts.append((down, time.time() - t0))
                cfg.log(f"  {down:6.0f} s: IOC restarted")
            next_restart += cfg.restart_every
        if now >= next_sample:
            sample: dict[str, Any] = {"t": time.time() - t0, "load": os.getloadavg()[0]}
            for name, popen in procs.items():
                if popen.poll() is None and (figures := _proc(popen.pid)) is not None:
                    sample[name] = figures
            result.samples.append(sample)
            while next_sample <= time.monotonic():  # no burst of samples after a restart
                next_sample += cfg.sample
            if len(result.samples) % log_every == 1:
                cfg.log(f"  {sample['t']:6.0f} s: " + ", ".join(
                    f"{n} {v['rss']:.1f} MB {v['fds']} fds" for n, v in sample.items()
                    if isinstance(v, dict)))
        time.sleep(max(0.0, min(0.2, min(next_sample, next_restart, end) - time.monotonic())))
    result.duration = result.samples[-1]["t"] if result.samples else 0.0
    deadline = time.monotonic() + 40  # the load ends by itself after cfg.seconds
    while any(p.poll() is None for p in site.load.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    result.load_exit = {role: popen.poll() for role, popen in site.load.items()}
    result.reports = [{**r, "t": float(r["t"]) - t0} for r in site.reports()]
    result.alive = {name: popen.poll() is None for name, popen in procs.items()}
    if result.alive["gateway"]:
        result.stats["gateway"] = _gateway_stats(site.gateway)
    if result.alive["name server"] and site.names is not None:
        try:
            result.stats["name server"] = site.names.stats(0)
        except LabError:
            result.stats["name server"] = {}


def _in_restart(result: SoakResult, lo: float, hi: float) -> bool:
    """Whether the window (lo, hi] meets an IOC restart or the settle time after it."""
    settle = result.config["settle"]
    return any(lo < up + settle and hi > down for down, up in result.restarts)


def _latency(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99),
            "max": max(values, default=float("nan")), "n": len(values)}


def summary(result: SoakResult) -> dict[str, Any]:
    """Every figure of the run: per process start/end/max and trend of RSS and fds, CPU;
    latency percentiles; the load's counts and errors (inside and outside restarts)."""
    cfg = result.config
    t_end = result.duration
    warm, period = cfg["warmup"], cfg["report"]
    span = max(3 * cfg["sample"], (t_end - warm) * 0.1)  # a tenth, 3 samples at least
    bounds = {"rss": cfg["rss_bound"], "fds": cfg["fd_bound"]}
    out: dict[str, Any] = {"span": span, "procs": {}, "latency": {}, "monitors": {},
                           "churn": {}, "load": {}}
    for proc in ("gateway", "bridge", "name server"):
        figures: dict[str, Any] = {}
        for key in ("rss", "fds"):
            points = result.series(proc, key, warm)
            first = [v for t, v in points if t < warm + span]
            last = [v for t, v in points if t > t_end - span]
            figures[key] = {"start": statistics.median(first) if first else float("nan"),
                            "end": statistics.median(last) if last else float("nan"),
                            "max": max((v for _, v in points), default=float("nan")),
                            "trend": trend(points, bounds[key])}
        cpu = result.series(proc, "cpu", warm)

        def busy(points: list[tuple[float, float]]) -> float:
            if len(points) < 2 or points[-1][0] <= points[0][0]:
                return float("nan")
            return 100 * (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])

        figures["cpu"] = {"start": busy([p for p in cpu if p[0] < warm + span]),
                          "end": busy([p for p in cpu if p[0] > t_end - span]),
                          "all": busy(cpu)}
        out["procs"][proc] = figures

    def latency_of(role: str, key: str) -> dict[str, Any]:
        reports = result.window_reports(role, warm + period, t_end + 2 * period)
        steady = [r for r in reports if not _in_restart(result, r["t"] - period, r["t"])]
        return {
            "start": _latency([x for r in steady if r["t"] <= warm + span for x in r[key]]),
            "end": _latency([x for r in steady if r["t"] > t_end - span for x in r[key]]),
            "steady": _latency([x for r in steady for x in r[key]]),
            "all": _latency([x for r in reports for x in r[key]]),
        }

    for proto in ("ca", "pva"):
        out["latency"][proto] = latency_of("latency", proto)
    out["latency"]["search"] = latency_of("ca-churn", "search")
    failures: dict[str, dict[str, int]] = {}
    for r in result.window_reports("latency", 0, math.inf):
        where = "restart" if _in_restart(result, r["t"] - period, r["t"]) else "outside"
        for proto, n in r["failures"].items():
            failures.setdefault(proto, {"restart": 0, "outside": 0})[where] += n
    for proto in ("ca", "pva"):
        out["latency"][proto]["failures"] = failures.get(proto, {"restart": 0, "outside": 0})
    for role in ("ca-monitor", "pva-monitor"):
        every = result.window_reports(role, 0, math.inf)
        after = [r for r in every if r["t"] > warm + period]
        steady = [r for r in after if not _in_restart(result, r["t"] - period, r["t"])]
        out["monitors"][role] = {
            "rate": sum(r["updates"] for r in after) / (len(after) * period) if after else 0.0,
            "steady_rate": (sum(r["updates"] for r in steady) / (len(steady) * period)
                            if steady else 0.0),
            "changes": every[-1]["changes"] if every else 0,  # cumulative
            "last_window": every[-1]["updates"] if every else 0,
            "connected": bool(every and every[-1]["connected"])}
    for role in ("ca-churn", "pva-churn"):
        data: dict[str, Any] = {"cycles": 0, "channels": 0, "restart": 0, "outside": 0,
                                "why": {}}
        for r in result.window_reports(role, 0, math.inf):
            data["cycles"] += r["cycles"]
            data["channels"] += r["channels"]
            where = "restart" if _in_restart(result, r["t"] - period, r["t"]) else "outside"
            data[where] += r["errors"]
            for k, v in r["why"].items():
                data["why"][k] = data["why"].get(k, 0) + v
        out["churn"][role] = data
    expected = int(t_end // period) - 1
    for role in ROLES:
        out["load"][role] = {"reports": len(result.window_reports(role, 0, math.inf)),
                             "expected_at_least": max(0, expected),
                             "exit": result.load_exit.get(role)}
    # The sampler (like everything else on the machine) may stop for a while: a gap of
    # more than two periods between samples is shown, not hidden.
    times = [s["t"] for s in result.samples]
    out["stalls"] = [(a, b - a) for a, b in itertools.pairwise(times) if b - a > 2 * cfg["sample"]]
    loads = [s["load"] for s in result.samples if "load" in s]
    out["loadavg"] = {"mean": statistics.fmean(loads) if loads else float("nan"),
                      "max": max(loads, default=float("nan"))}
    return out


def client_errors(figures: dict[str, Any]) -> dict[str, int]:
    """Client errors outside and inside IOC restarts (with their settle time), all roles."""
    out = {"outside": 0, "restart": 0}
    for data in figures["churn"].values():
        for k in out:
            out[k] += data[k]
    for proto in ("ca", "pva"):
        for k in out:
            out[k] += figures["latency"][proto]["failures"][k]
    return out
