"""Operator benchmarks against a real control plane. Prints figures and writes them to
docs/benchmarks.md. Not part of the test run: `make bench` (or python -m ...).

- apply-to-ready: an IOC created until its StatefulSet, Service and status exist;
- cold start: the operator started with N IOCs present, until all are reconciled;
  its peak RSS, and its CPU while idle afterwards;
- directory update delay after an IOC is added or deleted with N IOCs present; with
  --name-service ADDR (the constant directory, the chart's default) the directory never
  changes, so instead: the delay until an added IOC's endpoints are in its status (what
  ioc-name-server's watch reads), and the directory's writes meanwhile (none expected).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from ioc_operator.kube import Kube, KubeError
from ioc_testbed.controlplane import ControlPlane, ensure_binaries
from ioc_testbed.operator_process import OperatorProcess

ROOT = Path(__file__).resolve().parents[1]
IOC_API = "epics-operator.io/v1alpha1"
NS = "bench"


NODE = "bench-node"
PROGRESS = "kopf.epics-operator.io/ioc_changed"
IDLE_SETTLE = 10
IDLE_WINDOW = 30


def ioc(name: str, mode: str = "pod") -> dict[str, Any]:
    spec: dict[str, Any] = {"image": "registry.example/ioc:1", "prefix": f"{name.upper()}:",
                            "network": {"mode": mode}}
    if mode == "host":
        spec["scheduling"] = {"nodeName": NODE}
    return {"apiVersion": IOC_API, "kind": "IOC", "metadata": {"name": name, "namespace": NS},
            "spec": spec}


def listed(addr_list: str, address: str) -> bool:
    """Whether an address list (EPICS_CA_ADDR_LIST) has an entry for ``address``, with or
    without a port. Whole entries: 198.19.5.1 is not listed because 198.19.5.17 is."""
    return any(entry.rpartition(":")[0] == address if ":" in entry else entry == address
               for entry in addr_list.split())


def wait(probe: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := probe():
            return result
        time.sleep(0.005)
    raise SystemExit(f"timed out waiting for {what}")


def ready(kube: Kube, name: str) -> bool:
    body = kube.get(IOC_API, "IOC", NS, name)
    if not body or not (body.get("status") or {}).get("endpoints"):
        return False
    host = body["spec"]["network"]["mode"] == "host"
    return bool(kube.get("apps/v1", "StatefulSet", NS, name)
                and (host or kube.get("v1", "Service", NS, name)))


def operator_env(name_service: str | None) -> dict[str, str]:
    """The operator's settings for the mode the bench measures. Always set: an address
    inherited from the caller's environment would switch the directory to the constant
    one behind the bench's back (an empty value means none)."""
    return {"IOC_OPERATOR_NAME_SERVICE_ADDRESS": name_service or ""}


def start_operator(kubeconfig: Path, log: Path, traced: bool = False,
                   name_service: str | None = None) -> OperatorProcess:
    env = operator_env(name_service)
    if not traced:
        return OperatorProcess(kubeconfig, log, env=env).start()
    env["IOC_BENCH_TRACEMALLOC_OUT"] = str(log.with_suffix(".tracemalloc"))
    return OperatorProcess(kubeconfig, log, env=env, module="benchmarks.traced_operator").start()


def _kopf_done(item: dict[str, Any]) -> bool:
    """kopf's diff base (status.lastHandled, <generation>-<digest>) is the current
    generation's and no handler progress is left."""
    notes = item["metadata"].get("annotations") or {}
    handled = str((item.get("status") or {}).get("lastHandled") or "")
    return (handled.split("-")[0] == str(item["metadata"].get("generation"))
            and not any(k.startswith(PROGRESS) for k in notes))


def _memory_profile(op: OperatorProcess, workdir: Path) -> Path:
    """Ask the traced operator for its allocation sites; print and return the file."""
    assert op.proc is not None
    out = (workdir / "operator-cold.log").with_suffix(".tracemalloc")
    out.unlink(missing_ok=True)
    os.kill(op.proc.pid, signal.SIGUSR1)
    wait(lambda: out.exists() and out.stat().st_size > 0, 120, "the tracemalloc dump")
    time.sleep(1)  # written in one call; let it finish
    print(out.read_text())
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench(n_latency: int, n_scale: int, workdir: Path, traced: bool = False,
          name_service: str | None = None) -> list[tuple[str, str, str]]:
    figures: list[tuple[str, str, str]] = []
    operators: list[OperatorProcess] = []
    try:
        return _bench(n_latency, n_scale, workdir, figures, operators, traced, name_service)
    finally:
        for op in operators:  # also when a wait times out
            op.stop()


def _bench(n_latency: int, n_scale: int, workdir: Path, figures: list[tuple[str, str, str]],
           operators: list[OperatorProcess], traced: bool,
           name_service: str | None) -> list[tuple[str, str, str]]:
    with ControlPlane(bin_dir=ensure_binaries()) as plane:
        plane.apply_crds(sorted((ROOT / "crds").glob("*.yaml")))
        cfg = k8s.Configuration()
        k8s_config.load_kube_config(config_file=str(plane.kubeconfig), client_configuration=cfg)
        cfg.proxy = None
        cfg.connection_pool_maxsize = 32
        kube = Kube(k8s.ApiClient(cfg))
        kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        kube.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
                     "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.50"}]}})

        # 1. apply-to-ready, one IOC at a time
        op = start_operator(plane.kubeconfig, workdir / "operator-latency.log",
                            name_service=name_service)
        operators.append(op)
        time.sleep(2)  # the operator's watches start
        latencies = []
        for i in range(n_latency):
            name = f"lat-{i:04}"
            start = time.monotonic()
            kube.create(ioc(name, ("pod", "sidecar", "host")[i % 3]))
            wait(lambda name=name: ready(kube, name), 30, name)
            latencies.append((time.monotonic() - start) * 1000)
        figures += [
            ("apply-to-ready p50", f"{pct(latencies, 0.5):.0f} ms", f"{n_latency} IOCs, "
             "one at a time, modes rotating"),
            ("apply-to-ready p95", f"{pct(latencies, 0.95):.0f} ms", "target < 250 ms"),
        ]
        op.stop()

        # 2. cold start with n_scale IOCs present
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: kube.create(ioc(f"cold-{i:05}")), range(n_scale)))
        total = n_latency + n_scale
        start = time.monotonic()
        op = start_operator(plane.kubeconfig, workdir / "operator-cold.log", traced,
                            name_service)
        operators.append(op)

        def iocs() -> list[dict[str, Any]]:
            return kube.request("GET", f"/apis/{IOC_API}/namespaces/{NS}/iocs")["items"]

        def all_reconciled() -> bool:
            done = sum(1 for i in iocs() if (i.get("status") or {}).get("observedGeneration")
                       == i["metadata"]["generation"] and i["status"].get("endpoints"))
            return done == total

        wait(all_reconciled, 900, "cold start")
        cold = time.monotonic() - start
        figures.append(("cold start", f"{cold:.1f} s", f"{total} IOCs present; target < 60 s"))

        # Idle: once kopf has also recorded every handler as done (its diff base written,
        # no progress annotation left) and the StatefulSet controller's status writes
        # are through; the window before that is kopf's bookkeeping, not idling.
        def settled() -> bool:
            items = iocs()
            return sum(1 for i in items if _kopf_done(i)) == total

        wait(settled, 600, "kopf's bookkeeping")
        figures.append(("handlers recorded done", f"{time.monotonic() - start:.1f} s",
                        "kopf's diff base on every IOC, from the operator start"))
        time.sleep(IDLE_SETTLE)
        cpu0, t0 = op.cpu_seconds(), time.monotonic()
        time.sleep(IDLE_WINDOW)
        idle = (op.cpu_seconds() - cpu0) / (time.monotonic() - t0) * 100
        figures += [("peak RSS", f"{op.peak_rss_mb():.0f} MB", f"{total} IOCs; target < 150 MB"),
                    ("idle CPU", f"{idle:.1f} %", f"of one core, over {IDLE_WINDOW} s, "
                     f"{IDLE_SETTLE} s after kopf recorded every handler done; "
                     "target near zero")]
        if traced:
            figures.append(("memory profile", str(_memory_profile(op, workdir)), "tracemalloc"))
            return figures

        # 3. what clients wait for after an IOC is added or deleted, total IOCs present
        if name_service:
            figures += _name_service_updates(kube, total)
        else:
            figures += _directory_updates(kube, total)
        op.stop()
        with contextlib.suppress(KubeError):
            kube.delete("v1", "Namespace", None, NS)
    return figures


def _directory(kube: Kube) -> dict[str, Any]:
    return kube.get("v1", "ConfigMap", NS, "epics-client-env") or {}


def _directory_updates(kube: Kube, total: int) -> list[tuple[str, str, str]]:
    """The per-IOC directory: from a create (delete) until its ClusterIP is (no longer)
    an entry of the namespace's EPICS_CA_ADDR_LIST."""

    def in_directory(ip: str) -> bool:
        return listed((_directory(kube).get("data") or {}).get("EPICS_CA_ADDR_LIST", ""), ip)

    adds, deletes = [], []
    for i in range(5):
        name = f"dir-{i}"
        start = time.monotonic()
        kube.create(ioc(name))
        svc = wait(lambda name=name: kube.get("v1", "Service", NS, name), 30, "service")
        ip = svc["spec"]["clusterIP"]
        wait(lambda ip=ip: in_directory(ip), 60, "directory add")
        adds.append(time.monotonic() - start)
        start = time.monotonic()
        kube.delete(IOC_API, "IOC", NS, name)
        wait(lambda ip=ip: not in_directory(ip), 60, "directory delete")
        deletes.append(time.monotonic() - start)
    return [
        ("directory update after add", f"{statistics.median(adds) * 1000:.0f} ms",
         f"median of 5, {total} IOCs present; target < 2 s"),
        ("directory update after delete", f"{statistics.median(deletes) * 1000:.0f} ms",
         f"median of 5, {total} IOCs present; target < 2 s"),
    ]


def _name_service_updates(kube: Kube, total: int) -> list[tuple[str, str, str]]:
    """The constant directory: clients learn of an IOC from ioc-name-server, whose watch
    reads status.endpoints; so the operator's part is the time until they are written.
    A deleted IOC leaves the name server's table with its DELETED watch event, which the
    operator takes no part in. The directory itself must not be written at all."""
    version = _directory(kube).get("metadata", {}).get("resourceVersion")
    if version is None:
        raise SystemExit("no constant directory in the namespace")
    adds = []
    for i in range(5):
        name = f"dir-{i}"
        start = time.monotonic()
        kube.create(ioc(name))
        wait(lambda name=name: ((kube.get(IOC_API, "IOC", NS, name) or {}).get("status")
                                or {}).get("endpoints"), 60, "endpoints in the status")
        adds.append(time.monotonic() - start)
        kube.delete(IOC_API, "IOC", NS, name)
        wait(lambda name=name: kube.get(IOC_API, "IOC", NS, name) is None, 60, "IOC deleted")
    time.sleep(2)  # a write the adds and deletes caused would be through by now
    writes = _directory(kube).get("metadata", {}).get("resourceVersion") != version
    return [
        ("endpoints in status after add", f"{statistics.median(adds) * 1000:.0f} ms",
         f"median of 5, {total} IOCs present (what the name server's watch reads)"),
        ("directory rewritten by adds and deletes", "yes" if writes else "no",
         "constant directory (--name-service); expected: no"),
    ]


START = "<!-- figures: written by benchmarks/bench_operator.py, do not edit -->"
END = "<!-- end of figures -->"


def write_doc(figures: list[tuple[str, str, str]], args: argparse.Namespace) -> None:
    """Replace the figures block of docs/benchmarks.md; the notes around it stay."""
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    block = [START,
             "Measured by `make bench` (`python -m benchmarks.bench_operator`) against a real",
             "etcd + kube-apiserver v1.37.2 started on 127.0.0.1 (no kubelet: readiness means",
             "the StatefulSet, Service and IOC status exist).", "",
             f"Machine: {machine}. Run: {time.strftime('%Y-%m-%d')}, "
             f"--latency {args.latency} --scale {args.scale}"
             + (f" --name-service {args.name_service} (constant directory)."
                if args.name_service else " (per-IOC directory)."), "",
             "| figure | value | conditions |", "|---|---|---|"]
    block += [f"| {a} | {b} | {c} |" for a, b, c in figures]
    block.append(END)
    out = ROOT / "docs" / "benchmarks.md"
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + "\n".join(block) + rest.split(END, 1)[1]
    else:
        title, _, body = text.partition("\n")
        text = f"{title}\n\n" + "\n".join(block) + "\n" + body
    out.write_text(text)
    print(f"written to {out}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--latency", type=int, default=200, help="IOCs for apply-to-ready")
    p.add_argument("--scale", type=int, default=800, help="extra IOCs present for cold start")
    p.add_argument("--name-service", metavar="ADDR",
                   help="run the operator with this name service address (the constant "
                   "directory); default: the per-IOC directory")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--profile-memory", action="store_true",
                   help="run the cold start under tracemalloc and print the allocation "
                   "sites (slower: figures not written)")
    args = p.parse_args()
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"ioc-bench-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    figures = bench(args.latency, args.scale, workdir, args.profile_memory, args.name_service)
    for name, value, cond in figures:
        print(f"{name:32} {value:>10}   {cond}")
    print(f"operator logs: {workdir}")
    if not (args.no_write or args.profile_memory):
        write_doc(figures, args)


if __name__ == "__main__":
    main()
