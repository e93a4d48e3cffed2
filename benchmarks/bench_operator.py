"""Operator benchmarks against a real control plane. Prints figures and writes them to
docs/benchmarks.md. Not part of the test run: `make bench` (or python -m ...).

- the API server's limit: a plain client (8 threads) writing what the operator writes
  for N IOCs (server-side apply of each rendered object, then the status patch);
- apply-to-ready: an IOC created until its StatefulSet, Service and status exist;
- cold start: the operator started with N IOCs present, until all are reconciled (seen
  through a watch: polling 1,000 IOCs would load what it measures); its peak RSS, the
  API requests it took, and its CPU while idle afterwards;
- directory update delay after an IOC is added or deleted with N IOCs present; with
  --name-service ADDR (the constant directory, the chart's default) the directory never
  changes, so instead: the delay until an added IOC's endpoints are in its status (what
  ioc-name-server's watch reads), and the directory's writes meanwhile (none expected).

With --baseline REV the operator of git revision REV is measured too, in the same run
on the same control plane, each in a namespace of its own: the figures side by side.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import re
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch

from ioc_operator import GROUP, VERSION
from ioc_operator.controller.conditions import merge_conditions
from ioc_operator.controller.kube import Kube
from ioc_operator.controller.reconcile import Observed, _outcome
from ioc_operator.model.config import OperatorConfig
from ioc_operator.model.validation import parse_ioc
from ioc_operator.render import render
from ioc_testbed.controlplane import ControlPlane, ensure_binaries
from ioc_testbed.operator_process import OperatorProcess
from ioc_testbed.waiting import wait_for

from .profiling import py_spy, top_functions

ROOT = Path(__file__).resolve().parents[1]
IOC_API = "epics-operator.io/v1alpha1"
NS = "bench"  # each operator measured gets bench-<label>
WORKERS = 8  # the plain client's threads


NODE = "bench-node"
PROGRESS = "kopf.epics-operator.io/ioc_changed"
IDLE_SETTLE = 10
IDLE_WINDOW = 30


def ioc(name: str, mode: str = "pod", ns: str = NS) -> dict[str, Any]:
    spec: dict[str, Any] = {"image": "registry.example/ioc:1", "prefix": f"{name.upper()}:",
                            "network": {"mode": mode}}
    if mode == "host":
        spec["scheduling"] = {"nodeName": NODE}
    return {"apiVersion": IOC_API, "kind": "IOC", "metadata": {"name": name, "namespace": ns},
            "spec": spec}


def listed(addr_list: str, address: str) -> bool:
    """Whether an address list (EPICS_CA_ADDR_LIST) has an entry for ``address``, with or
    without a port. Whole entries: 198.19.5.1 is not listed because 198.19.5.17 is."""
    return any(entry.rpartition(":")[0] == address if ":" in entry else entry == address
               for entry in addr_list.split())


def wait(probe: Any, timeout: float, what: str) -> Any:
    """ioc_testbed.waiting.wait_for, polling fast: the figures are latencies."""
    return wait_for(what, probe, timeout, interval=0.005)


def ready(kube: Kube, ns: str, name: str) -> bool:
    body = kube.get(IOC_API, "IOC", ns, name)
    if not body or not (body.get("status") or {}).get("endpoints"):
        return False
    host = body["spec"]["network"]["mode"] == "host"
    return bool(kube.get("apps/v1", "StatefulSet", ns, name)
                and (host or kube.get("v1", "Service", ns, name)))


def operator_env(name_service: str | None) -> dict[str, str]:
    """The operator's settings for the mode the bench measures. Always set: an address
    inherited from the caller's environment would switch the directory to the constant
    one behind the bench's back (an empty value means none)."""
    return {"IOC_OPERATOR_NAME_SERVICE_ADDRESS": name_service or ""}


def start_operator(kubeconfig: Path, log: Path, ns: str, traced: bool = False,
                   name_service: str | None = None,
                   pythonpath: Path | None = None) -> OperatorProcess:
    """The operator watching namespace `ns`; from `pythonpath` (a baseline's source)
    when given, else the installed one."""
    env = operator_env(name_service)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    args = ("run", "-n", ns)
    if not traced:
        return OperatorProcess(kubeconfig, log, args=args, env=env).start()
    env["IOC_BENCH_TRACEMALLOC_OUT"] = str(log.with_suffix(".tracemalloc"))
    return OperatorProcess(kubeconfig, log, args=args, env=env,
                           module="benchmarks.traced_operator").start()


def baseline_source(rev: str, workdir: Path) -> Path:
    """The operator package of git revision `rev`, unpacked; its path for PYTHONPATH."""
    out = workdir / f"baseline-{rev}"
    out.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "operator", "crds"],
                             check=True, capture_output=True, timeout=60).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True, timeout=60)
    return out / "operator"


def _kopf_done(item: dict[str, Any]) -> bool:
    """kopf's diff base (status.lastHandled, <generation>-<digest>) is the current
    generation's and no handler progress is left."""
    notes = item["metadata"].get("annotations") or {}
    handled = str((item.get("status") or {}).get("lastHandled") or "")
    return (handled.split("-")[0] == str(item["metadata"].get("generation"))
            and not any(k.startswith(PROGRESS) for k in notes))


def _reconciled(item: dict[str, Any]) -> bool:
    status = item.get("status") or {}
    return bool(status.get("observedGeneration") == item["metadata"]["generation"]
                and status.get("endpoints"))


class IOCWatch:
    """The IOCs of a namespace as a watch delivers them: one LIST, then events. A
    completion check that lists 1,000 IOCs every few ms loads the API server (and the
    operator's CPU share) it measures: ~29 CPU-seconds per cold start, once."""

    def __init__(self, kube: Kube, ns: str) -> None:
        self.api = k8s.CustomObjectsApi(kube.api)
        self.ns = ns
        listing = self.api.list_namespaced_custom_object(GROUP, VERSION, ns, "iocs")
        self.items = {i["metadata"]["uid"]: i for i in listing["items"]}
        self.version = listing["metadata"]["resourceVersion"]

    def until(self, done: Callable[[dict[str, Any]], bool], total: int, timeout: float,
              what: str) -> float:
        """Follow the watch until `done` holds for `total` IOCs; the monotonic time of
        the event that made it so."""
        deadline = time.monotonic() + timeout
        while sum(1 for i in self.items.values() if done(i)) < total:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SystemExit(f"timed out waiting for {what}")
            stream = k8s_watch.Watch().stream(
                self.api.list_namespaced_custom_object, GROUP, VERSION, self.ns, "iocs",
                resource_version=self.version, timeout_seconds=max(1, min(60, int(left))))
            for event in stream:
                obj = event["object"]
                self.version = obj["metadata"]["resourceVersion"]
                if event["type"] == "DELETED":
                    self.items.pop(obj["metadata"]["uid"], None)
                else:
                    self.items[obj["metadata"]["uid"]] = obj
                if done(obj) and sum(1 for i in self.items.values() if done(i)) >= total:
                    break
        return time.monotonic()


def request_counts(kube: Kube) -> collections.Counter[tuple[str, str]]:
    """apiserver_request_total by (verb, resource), from the API server's metrics."""
    text = kube.request("GET", "/metrics")
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in str(text).splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        resource = labels.get("resource", "") + (
            f"/{labels['subresource']}" if labels.get("subresource") else "")
        counts[(labels.get("verb", ""), resource)] += int(float(line.rsplit(" ", 1)[1]))
    return counts


def _memory_profile(op: OperatorProcess, workdir: Path) -> Path:
    """Ask the traced operator for its allocation sites; print and return the file."""
    assert op.proc is not None
    out = (workdir / "operator-cold-after.log").with_suffix(".tracemalloc")
    out.unlink(missing_ok=True)
    os.kill(op.proc.pid, signal.SIGUSR1)
    wait(lambda: out.exists() and out.stat().st_size > 0, 120, "the tracemalloc dump")
    time.sleep(1)  # written in one call; let it finish
    print(out.read_text())
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


Figures = dict[str, tuple[str, str]]  # figure -> (value, conditions)


def bench(n_latency: int, n_scale: int, workdir: Path, traced: bool = False,
          name_service: str | None = None, baseline: str | None = None,
          spy: bool = False) -> tuple[Figures, dict[str, Figures]]:
    """The API server's limit, and the figures of each operator measured (`baseline`
    first, when given, then the installed one)."""
    operators: list[OperatorProcess] = []
    versions: list[tuple[str, Path | None]] = [("after", None)]
    if baseline:
        versions.insert(0, ("before", baseline_source(baseline, workdir)))
    try:
        with ControlPlane(bin_dir=ensure_binaries()) as plane:
            plane.apply_crds(sorted((ROOT / "crds").glob("*.yaml")))
            cfg = k8s.Configuration()
            k8s_config.load_kube_config(config_file=str(plane.kubeconfig),
                                        client_configuration=cfg)
            cfg.proxy = None
            cfg.connection_pool_maxsize = 32
            kube = Kube(k8s.ApiClient(cfg))
            kube.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
                         "status": {"addresses": [{"type": "InternalIP",
                                                   "address": "198.18.0.50"}]}})
            limit = api_limit(kube, n_latency + n_scale)
            results = {}
            for label, pythonpath in versions:
                # Each operator under its own CRD: the API server fills in the defaults
                # of fields an older model does not know, which it would refuse.
                crds = (pythonpath.parent if pythonpath else ROOT) / "crds"
                plane.apply_crds(sorted(crds.glob("*.yaml")))
                results[label] = _bench(plane, kube, label, pythonpath, n_latency, n_scale,
                                        workdir, operators, traced, name_service, spy)
            return limit, results
    finally:
        for op in operators:  # also when a wait times out
            op.stop()


def api_limit(kube: Kube, total: int) -> Figures:
    """What the API server allows: a plain client with WORKERS threads applies the
    objects the operator renders for `total` pod-mode IOCs (server-side apply), then
    patches each IOC's status as the operator would. Nothing else runs meanwhile."""
    ns = f"{NS}-limit"
    kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    with ThreadPoolExecutor(WORKERS) as pool:
        bodies = list(pool.map(lambda i: kube.create(ioc(f"cold-{i:05}", ns=ns)),
                               range(total)))
    config = OperatorConfig()
    requests = collections.Counter[str]()

    def write(body: dict[str, Any]) -> None:
        parsed = parse_ioc(body)
        applied = [kube.apply(obj) for obj in render(parsed, config)]
        svc = next(o for o in applied if o["kind"] == "Service")
        outcome = _outcome(parsed, Observed(address=svc["spec"]["clusterIP"]),
                           body["metadata"]["generation"], None)
        conds = merge_conditions([], outcome.conditions, body["metadata"]["generation"],
                                 "2026-01-01T00:00:00Z")
        kube.patch_status(IOC_API, "IOC", ns, body["metadata"]["name"],
                          {**outcome.status, "conditions": conds})
        requests["n"] += len(applied) + 1

    start = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(write, bodies))
    took = time.monotonic() - start
    return {"API server limit": (
        f"{took:.1f} s", f"{total} IOCs: {requests['n']} requests (server-side apply of "
        f"each rendered object, then the status patch) from a plain client, "
        f"{WORKERS} threads")}


def _bench(plane: ControlPlane, kube: Kube, label: str, pythonpath: Path | None,
           n_latency: int, n_scale: int, workdir: Path,
           operators: list[OperatorProcess], traced: bool,
           name_service: str | None, spy: bool = False) -> Figures:
    figures: Figures = {}
    ns = f"{NS}-{label}"
    kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})

    # 1. apply-to-ready, one IOC at a time
    op = start_operator(plane.kubeconfig, workdir / f"operator-latency-{label}.log", ns,
                        name_service=name_service, pythonpath=pythonpath)
    operators.append(op)
    time.sleep(2)  # the operator's watches start
    latencies = []
    for i in range(n_latency):
        name = f"lat-{i:04}"
        start = time.monotonic()
        kube.create(ioc(name, ("pod", "sidecar", "host")[i % 3], ns))
        wait(lambda name=name: ready(kube, ns, name), 30, name)
        latencies.append((time.monotonic() - start) * 1000)
    figures["apply-to-ready p50"] = (f"{pct(latencies, 0.5):.0f} ms",
                                     f"{n_latency} IOCs, one at a time, modes rotating")
    figures["apply-to-ready p95"] = (f"{pct(latencies, 0.95):.0f} ms", "target < 250 ms")
    op.stop()

    # 2. cold start with n_scale IOCs more present
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(lambda i: kube.create(ioc(f"cold-{i:05}", ns=ns)), range(n_scale)))
    total = n_latency + n_scale
    watcher = IOCWatch(kube, ns)
    before = request_counts(kube)
    start = time.monotonic()
    op = start_operator(plane.kubeconfig, workdir / f"operator-cold-{label}.log", ns,
                        traced, name_service, pythonpath)
    operators.append(op)
    assert op.proc is not None
    collapsed = workdir / f"cold-{label}.collapsed"
    sampler = py_spy(op.proc.pid, collapsed, "raw", nonblocking=True) if spy else None
    cold = watcher.until(_reconciled, total, 900, "cold start") - start
    if sampler is not None:
        sampler.send_signal(signal.SIGINT)
        sampler.wait(60)
        print(f"{label}: where the operator's CPU went in the cold start (py-spy):")
        print(top_functions(collapsed.read_text()))
    figures["cold start"] = (f"{cold:.1f} s", f"{total} IOCs present; target: within 2x "
                             "of the API server limit")
    cpu_cold = op.cpu_seconds()

    # Idle: once kopf has also recorded every handler as done (its diff base written,
    # no progress annotation left) and the StatefulSet controller's status writes
    # are through; the window before that is kopf's bookkeeping, not idling.
    done = watcher.until(_kopf_done, total, 600, "kopf's bookkeeping") - start
    figures["handlers recorded done"] = (f"{done:.1f} s", "kopf's diff base on every "
                                         "IOC, from the operator start")
    counts = request_counts(kube)
    used = counts - before
    print(f"{label}: API requests from the operator start until every handler was "
          "recorded done (all clients, by verb and resource):")
    for (verb, resource), n in used.most_common(20):
        print(f"  {n:7} {verb:7} {resource}")
    figures["API requests per IOC"] = (
        f"{sum(used.values()) / total:.1f}",
        "cold start until kopf's bookkeeping is done, all clients (the StatefulSet "
        "controller's too), per IOC present")
    figures["operator CPU for the cold start"] = (f"{cpu_cold:.1f} s", "user + system")
    time.sleep(IDLE_SETTLE)
    cpu0, t0 = op.cpu_seconds(), time.monotonic()
    time.sleep(IDLE_WINDOW)
    idle = (op.cpu_seconds() - cpu0) / (time.monotonic() - t0) * 100
    figures["peak RSS"] = (f"{op.peak_rss_mb():.0f} MB", f"{total} IOCs; target < 150 MB")
    figures["idle CPU"] = (f"{idle:.1f} %", f"of one core, over {IDLE_WINDOW} s, "
                           f"{IDLE_SETTLE} s after kopf recorded every handler done; "
                           "target near zero")
    if traced:
        figures["memory profile"] = (str(_memory_profile(op, workdir)), "tracemalloc")
        return figures

    # 3. what clients wait for after an IOC is added or deleted, total IOCs present
    if name_service:
        figures.update(_name_service_updates(kube, ns, total))
    else:
        figures.update(_directory_updates(kube, ns, total))
    op.stop()
    return figures


def _directory(kube: Kube, ns: str) -> dict[str, Any]:
    return kube.get("v1", "ConfigMap", ns, "epics-client-env") or {}


def _directory_updates(kube: Kube, ns: str, total: int) -> Figures:
    """The per-IOC directory: from a create (delete) until its ClusterIP is (no longer)
    an entry of the namespace's EPICS_CA_ADDR_LIST."""

    def in_directory(ip: str) -> bool:
        return listed((_directory(kube, ns).get("data") or {}).get("EPICS_CA_ADDR_LIST", ""),
                      ip)

    adds, deletes = [], []
    for i in range(5):
        name = f"dir-{i}"
        start = time.monotonic()
        kube.create(ioc(name, ns=ns))
        svc = wait(lambda name=name: kube.get("v1", "Service", ns, name), 30, "service")
        ip = svc["spec"]["clusterIP"]
        wait(lambda ip=ip: in_directory(ip), 60, "directory add")
        adds.append(time.monotonic() - start)
        start = time.monotonic()
        kube.delete(IOC_API, "IOC", ns, name)
        wait(lambda ip=ip: not in_directory(ip), 60, "directory delete")
        deletes.append(time.monotonic() - start)
    return {
        "directory update after add": (f"{statistics.median(adds) * 1000:.0f} ms",
                                       f"median of 5, {total} IOCs present; target < 2 s"),
        "directory update after delete": (f"{statistics.median(deletes) * 1000:.0f} ms",
                                          f"median of 5, {total} IOCs present; target < 2 s"),
    }


def _name_service_updates(kube: Kube, ns: str, total: int) -> Figures:
    """The constant directory: clients learn of an IOC from ioc-name-server, whose watch
    reads status.endpoints; so the operator's part is the time until they are written.
    A deleted IOC leaves the name server's table with its DELETED watch event, which the
    operator takes no part in. The directory itself must not be written at all."""
    version = _directory(kube, ns).get("metadata", {}).get("resourceVersion")
    if version is None:
        raise SystemExit("no constant directory in the namespace")
    adds = []
    for i in range(5):
        name = f"dir-{i}"
        start = time.monotonic()
        kube.create(ioc(name, ns=ns))
        wait(lambda name=name: ((kube.get(IOC_API, "IOC", ns, name) or {}).get("status")
                                or {}).get("endpoints"), 60, "endpoints in the status")
        adds.append(time.monotonic() - start)
        kube.delete(IOC_API, "IOC", ns, name)
        wait(lambda name=name: kube.get(IOC_API, "IOC", ns, name) is None, 60, "IOC deleted")
    time.sleep(2)  # a write the adds and deletes caused would be through by now
    writes = _directory(kube, ns).get("metadata", {}).get("resourceVersion") != version
    return {
        "endpoints in status after add": (
            f"{statistics.median(adds) * 1000:.0f} ms",
            f"median of 5, {total} IOCs present (what the name server's watch reads)"),
        "directory rewritten by adds and deletes": (
            "yes" if writes else "no", "constant directory (--name-service); expected: no"),
    }


START = "<!-- figures: written by benchmarks/bench_operator.py, do not edit -->"
END = "<!-- end of figures -->"


def table(limit: Figures, results: dict[str, Figures], baseline: str | None) -> list[str]:
    labels = list(results)
    head = " | ".join(f"{label} ({baseline})" if label == "before" else label
                      for label in labels)
    rows = [f"| figure | {head} | conditions |", "|---|" + "---|" * len(labels) + "---|"]
    for name, (value, cond) in limit.items():
        rows.append(f"| {name} | " + " | ".join(value for _ in labels) + f" | {cond} |")
    names = list(dict.fromkeys(n for figures in results.values() for n in figures))
    for name in names:
        values = [results[label].get(name, ("", ""))[0] for label in labels]
        cond = next(results[label][name][1] for label in labels if name in results[label])
        rows.append(f"| {name} | " + " | ".join(values) + f" | {cond} |")
    return rows


def write_doc(rows: list[str], args: argparse.Namespace) -> None:
    """Replace the figures block of docs/benchmarks.md; the notes around it stay."""
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    block = [START,
             "Measured by `make bench` (`python -m benchmarks.bench_operator`) against a real",
             "etcd + kube-apiserver v1.37.2 started on 127.0.0.1 (no kubelet: readiness means",
             "the StatefulSet, Service and IOC status exist). Each operator watches a",
             "namespace of its own on the same control plane, in the same run.", "",
             f"Machine: {machine}. Run: {time.strftime('%Y-%m-%d')}, "
             f"--latency {args.latency} --scale {args.scale}"
             + (f" --baseline {args.baseline}" if args.baseline else "")
             + (f" --name-service {args.name_service} (constant directory)."
                if args.name_service else " (per-IOC directory)."), "", *rows, END]
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
    p.add_argument("--baseline", metavar="REV",
                   help="also measure the operator of this git revision, side by side")
    p.add_argument("--name-service", metavar="ADDR",
                   help="run the operator with this name service address (the constant "
                   "directory); default: the per-IOC directory")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--profile-memory", action="store_true",
                   help="run the cold start under tracemalloc and print the allocation "
                   "sites (slower: figures not written)")
    p.add_argument("--profile-cpu", action="store_true",
                   help="sample the operator with py-spy during the cold start and print "
                   "where its time went (sampling costs it some CPU: figures not written)")
    args = p.parse_args()
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"ioc-bench-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    limit, results = bench(args.latency, args.scale, workdir, args.profile_memory,
                           args.name_service, args.baseline, args.profile_cpu)
    rows = table(limit, results, args.baseline)
    print("\n".join(rows))
    print(f"operator logs: {workdir}")
    if not (args.no_write or args.profile_memory or args.profile_cpu):
        write_doc(rows, args)


if __name__ == "__main__":
    main()
