"""Real-node benchmarks: what a user waits for after `kubectl apply`, on real pods.

A cluster of the test bed (control plane and two nodes, the project's images, the
chart's operator and name service), then, per network mode, N IOCs (EPICS Base soft
IOC, rsrv + QSRV2; host-mode ones on beamline-01) created one at a time:

- Running: the IOC's pod Running with its containers started (as the watch sees it);
- Ready: the IOC's Ready condition True (the operator saw the pod ready);
- first read: a client that was already running in a pod on beamline-02, whose only
  settings are `envFrom: epics-client-env`, and that had been asking for one of the new
  IOC's PVs since before the apply (libca through pyepics, and p4p), reads it.

All three are measured from the moment the IOC is created; then the IOC is deleted and
the time until its pod is gone measured (the next one starts after). Also the node start
and teardown times. Prints figures and writes them to docs/real-node.md (root; `make
bench-node` or python -m benchmarks.bench_real_node).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch

from ioc_testbed.cluster import Cluster
from ioc_testbed.helm import Helm, build_helm
from ioc_testbed.incluster import CLIENT_IMAGE as IMAGE
from ioc_testbed.incluster import NAME_SERVICE_IP, ClientPod, Kubectl, Watch
from ioc_testbed.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
IOC_API = ("epics-operator.io", "v1alpha1", "iocs")
NS = "bench-node"
READ_TIMEOUT = 30.0

class Watcher:
    """First time each pod is Running and each IOC is Ready, as the watch delivers them."""

    def __init__(self, api: k8s.ApiClient) -> None:
        self.core = k8s.CoreV1Api(api)
        self.custom = k8s.CustomObjectsApi(api)
        self.running: dict[str, float] = {}
        self.ready: dict[str, float] = {}
        self.stop = threading.Event()
        for target in (self._pods, self._iocs):
            threading.Thread(target=target, daemon=True).start()

    def _pods(self) -> None:
        while not self.stop.is_set():
            for event in k8s_watch.Watch().stream(self.core.list_namespaced_pod, NS,
                                                  timeout_seconds=60):
                pod = event["object"]
                ioc = (pod.metadata.labels or {}).get("app.kubernetes.io/instance")
                statuses = pod.status.container_statuses or []
                if ioc and pod.status.phase == "Running" and statuses and all(
                        s.state.running for s in statuses):
                    self.running.setdefault(ioc, time.time())

    def _iocs(self) -> None:
        while not self.stop.is_set():
            for event in k8s_watch.Watch().stream(self.custom.list_namespaced_custom_object,
                                                  *IOC_API[:2], NS, IOC_API[2],
                                                  timeout_seconds=60):
                obj = event["object"]
                conds = (obj.get("status") or {}).get("conditions") or []
                if any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
                    self.ready.setdefault(obj["metadata"]["name"], time.time())


def manifest(name: str, mode: str) -> dict[str, Any]:
    prefix = name.upper().replace("-", "") + ":"
    spec: dict[str, Any] = {
        "image": IMAGE, "prefix": prefix, "network": {"mode": mode},
        "args": ["python", "-m", "pvxslibs.ioc", "-m", f"P={prefix}", "-d",
                 "/epics/example/example.db"]}
    if mode == "host":
        spec["scheduling"] = {"nodeName": "beamline-01"}
    return {"apiVersion": "/".join(IOC_API[:2]), "kind": "IOC",
            "metadata": {"name": name, "namespace": NS}, "spec": spec}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench(n: int, modes: list[str]) -> list[tuple[str, str, str]]:
    figures: list[tuple[str, str, str]] = []
    cluster = Cluster(2, context=ROOT)
    t0 = time.monotonic()
    cluster.start()
    figures.append(("node start", f"{cluster.timings['nodes']:.1f} s",
                    "containerd, image import, kubelet, kube-proxy: two nodes to Ready "
                    f"(whole cluster {cluster.timings['start'] - cluster.timings['images']:.0f}"
                    " s without the image build)"))
    try:
        plane = cluster.plane
        assert plane is not None and plane.bin_dir is not None
        helm = Helm(build_helm(), cluster.workdir / "helm", ROOT / "charts" / "ioc-operator")
        helm.install_operator(cluster.kubeconfig, "ioc-system",
                              f"nameService.clusterIP={NAME_SERVICE_IP}")
        configuration = k8s.Configuration()
        k8s_config.load_kube_config(str(cluster.kubeconfig), client_configuration=configuration)
        configuration.proxy = None
        api = k8s.ApiClient(configuration)
        core = k8s.CoreV1Api(api)
        custom = k8s.CustomObjectsApi(api)
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=NS)))
        # The directory (constant: the name service) exists once the first IOC does.
        custom.create_namespaced_custom_object(*IOC_API[:2], NS, IOC_API[2],
                                               manifest("warmup", "pod"))
        wait_for("the directory", lambda: _exists(core, "epics-client-env"), 60)
        client = ClientPod(Kubectl(plane.bin_dir / "kubectl", cluster.kubeconfig), NS,
                           name="client", node="beamline-02").create()
        watcher = Watcher(api)
        rows: dict[str, dict[str, list[float]]] = {}
        for mode in modes:
            samples: dict[str, list[float]] = {"running": [], "ready": [], "ca": [], "pva": [],
                                               "gone": []}
            for i in range(n):
                name = f"{mode}-{i:02d}"
                body = manifest(name, mode)
                pv = body["spec"]["prefix"] + "value"
                # Clients that are running and asking for the PV before the IOC exists.
                watches = {"ca": Watch(client, "pyepics", [pv]),
                           "pva": Watch(client, "p4p", [pv])}
                start = time.time()
                custom.create_namespaced_custom_object(*IOC_API[:2], NS, IOC_API[2], body)
                for watch in watches.values():
                    with contextlib.suppress(AssertionError):  # not read: inf below
                        wait_for(f"{pv} read", lambda w=watch, pv=pv: w.seen("value", pv),
                                 READ_TIMEOUT)
                    watch.stop()
                wait_for(f"{name} Ready", lambda name=name: name in watcher.ready, 60)
                samples["running"].append(watcher.running[name] - start)
                samples["ready"].append(watcher.ready[name] - start)
                for proto, watch in watches.items():
                    seen = watch.seen("value", pv)
                    samples[proto].append(seen["t"] - start if seen else float("inf"))
                deleted = time.time()
                custom.delete_namespaced_custom_object(*IOC_API[:2], NS, IOC_API[2], name)
                # The next IOC starts on a node without this one (host mode: its ports).
                wait_for(f"{name}'s pod gone", lambda name=name: not _pod_exists(
                    core, f"{name}-0"), 60, 0.05)
                samples["gone"].append(time.time() - deleted)
                print(f"{name}: running {samples['running'][-1]:.2f} s, ready "
                      f"{samples['ready'][-1]:.2f} s, CA {samples['ca'][-1]:.2f} s, "
                      f"PVA {samples['pva'][-1]:.2f} s, pod gone "
                      f"{samples['gone'][-1]:.2f} s after delete", flush=True)
            rows[mode] = samples
        watcher.stop.set()
        for mode, samples in rows.items():
            for key, label in (("running", "Running"), ("ready", "Ready"),
                               ("ca", "first read, CA (libca)"), ("pva", "first read, PVA (p4p)"),
                               ("gone", "delete to pod gone")):
                values = samples[key]
                figures.append((f"{mode}: {label}",
                                f"{statistics.median(values):.2f} / "
                                f"{percentile(values, 0.95):.2f} s",
                                f"p50 / p95 of {len(values)} applies"))
    finally:
        stop_start = time.monotonic()
        problems = cluster.stop()
        left = cluster.residue()
        figures.append(("cluster teardown", f"{time.monotonic() - stop_start:.1f} s",
                        "pods deleted, nodes and control plane stopped, host restored; "
                        + ("nothing left behind" if not (problems or left)
                           else f"LEFT: {problems + left}")))
    figures.append(("whole run", f"{time.monotonic() - t0:.0f} s", ""))
    return figures


def _pod_exists(core: k8s.CoreV1Api, name: str) -> bool:
    try:
        core.read_namespaced_pod(name, NS)
        return True
    except k8s.ApiException:
        return False


def _exists(core: k8s.CoreV1Api, name: str) -> bool:
    try:
        core.read_namespaced_config_map(name, NS)
        return True
    except k8s.ApiException:
        return False


START = "<!-- figures: written by benchmarks/bench_real_node.py, do not edit -->"
END = "<!-- end of figures -->"


def write_doc(figures: list[tuple[str, str, str]], n: int) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    block = [START, f"Measured by `make bench-node` on {machine}, "
             f"{time.strftime('%Y-%m-%d')}, {n} applies per mode.", "",
             "| figure | value | conditions |", "|---|---|---|"]
    block += [f"| {a} | {b} | {c} |" for a, b, c in figures]
    block.append(END)
    out = ROOT / "docs" / "real-node.md"
    text = out.read_text()
    head, rest = text.split(START, 1)
    out.write_text(head + "\n".join(block) + rest.split(END, 1)[1])
    print(f"written to {out}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("-n", type=int, default=20, help="applies per mode (default 20)")
    p.add_argument("--mode", action="append", choices=["host", "pod", "sidecar"],
                   help="modes to measure (default: all three)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    figures = bench(args.n, args.mode or ["host", "pod", "sidecar"])
    for name, value, cond in figures:
        print(f"{name:34} {value:>14}   {cond}")
    if not args.no_write:
        write_doc(figures, args.n)


if __name__ == "__main__":
    main()
