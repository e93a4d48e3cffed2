"""`ioc-operator demo`: the whole claim on one machine, in about a minute.

A throwaway real control plane, the operator, the example IOCs; then (as root) a
broadcast-less network lab where a small "lab kubelet" runs each IOC pod the API server
holds, and a client that knows only the operator's directory reads and writes a PV of
every IOC over CA and PVA. Everything started is stopped again, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ioc_operator import GROUP, VERSION
from ioc_operator.controller.kube import Kube, KubeError

IOC_API = f"{GROUP}/{VERSION}"
NAMESPACE = "epics-demo"
DIRECTORY = "epics-client-env"
HOST_NODE = 2  # the lab node that takes the host-network IOCs
WAIT = 90.0


class DemoError(RuntimeError):
    pass


def say(step: str, detail: str = "") -> None:
    print(f"==> {step}" + (f": {detail}" if detail else ""), flush=True)


@contextlib.contextmanager
def timed(step: str) -> Iterator[None]:
    start = time.monotonic()
    say(step)
    yield
    print(f"    done in {time.monotonic() - start:.1f} s", flush=True)


def wait_for(what: str, probe: Any, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := probe():
            return result
        time.sleep(0.2)
    raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")


def demo_manifests(examples: Path, lab_node: str | None) -> list[dict[str, Any]]:
    """The examples, in the demo namespace; host-mode ones pinned to one lab node (so
    two share it). Probes are dropped: the operator runs outside the lab, and must not
    send probe packets out of this machine."""
    docs = []
    if not examples.is_dir():
        raise DemoError(f"no directory {examples}: run the demo from the repository, "
                        "or name the examples with --examples")
    for path in sorted(examples.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "IOC":
                continue
            doc["metadata"]["namespace"] = NAMESPACE
            spec = doc["spec"]
            spec.pop("probe", None)
            if (spec.get("network") or {}).get("mode") == "host":
                if lab_node:
                    spec.setdefault("scheduling", {})["nodeName"] = lab_node
                else:
                    spec.pop("scheduling", None)
            docs.append(doc)
    return docs


@dataclass
class Row:
    name: str
    mode: str
    kind: str
    endpoints: str
    ca: str = "-"
    pva: str = "-"
    seconds: float = 0.0


class Demo:
    def __init__(self, kubeconfig: str | None, use_lab: bool, examples: Path) -> None:
        self.kubeconfig = kubeconfig
        self.examples = examples
        self.use_lab = use_lab
        self.stack = contextlib.ExitStack()
        self.kube: Kube | None = None

    # --- set-up -------------------------------------------------------------
    def start_cluster(self) -> str:
        if self.kubeconfig:
            say("using the cluster of", self.kubeconfig)
            return self.kubeconfig
        from .controlplane import ControlPlane, ensure_binaries

        with timed("Kubernetes binaries (built from the Go module proxy on first use, "
                   "about 6 minutes; cached after)"):
            bin_dir = ensure_binaries()
        with timed("starting a throwaway control plane: etcd, kube-apiserver, "
                   "kube-controller-manager on 127.0.0.1"):
            plane = ControlPlane(bin_dir=bin_dir)
            self.stack.callback(plane.stop)
            plane.start()
        return str(plane.kubeconfig)

    def connect(self, kubeconfig: str) -> Kube:
        from kubernetes import client as k8s
        from kubernetes import config as k8s_config

        configuration = k8s.Configuration()
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        configuration.proxy = None
        self.kube = Kube(k8s.ApiClient(configuration))
        return self.kube

    def install_crd(self, kube: Kube) -> None:
        from ioc_operator.model.crd import crd

        say("installing the IOC CustomResourceDefinition")
        body = crd()
        try:
            kube.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                         body=body)
        except KubeError as exc:
            if exc.status != 409:
                raise
        wait_for("the CRD to be served", lambda: self._served(kube), 30)

    @staticmethod
    def _served(kube: Kube) -> bool:
        try:
            kube.request("GET", f"/apis/{IOC_API}/iocs")
            return True
        except KubeError:
            return False

    def start_operator(self, kubeconfig: str, log: Path) -> None:
        from .operator_process import OperatorProcess

        say("starting the operator", f"ioc-operator run (log: {log})")
        operator = OperatorProcess(kubeconfig, log).start()
        self.stack.callback(operator.stop)

    def apply_examples(self, kube: Kube, lab_node: str | None) -> list[dict[str, Any]]:
        docs = demo_manifests(self.examples, lab_node)
        say("applying the examples", ", ".join(d["metadata"]["name"] for d in docs))
        with contextlib.suppress(KubeError):
            kube.create({"apiVersion": "v1", "kind": "Namespace",
                         "metadata": {"name": NAMESPACE}})
        for doc in docs:
            try:
                kube.create(doc)
            except KubeError as exc:
                if exc.status != 409:
                    raise DemoError(f"IOC {doc['metadata']['name']}: {exc.message}") from None
        return docs

    def wait_reconciled(self, kube: Kube, names: list[str],
                        need_address: bool = True) -> list[dict[str, Any]]:
        """Until each IOC's spec is applied (and, in the lab, it has an address; without
        the lab host-mode IOCs have no node, so no address)."""
        def all_done() -> list[dict[str, Any]] | None:
            iocs = [kube.get(IOC_API, "IOC", NAMESPACE, n) for n in names]
            if all(i and _reconciled(i) and (need_address is False or (
                    i.get("status") or {}).get("endpoints")) for i in iocs):
                return iocs  # type: ignore[return-value]
            return None

        with timed("waiting for the operator to reconcile every IOC"):
            return wait_for("reconciled IOCs", all_done)

    # --- the lab --------------------------------------------------------------
    def run_lab(self, kube: Kube, iocs: list[dict[str, Any]], lab: Any) -> list[Row]:
        from ioc_operator.allocation.plan import Rendered
        from ioc_operator.model.validation import parse_ioc
        from ioc_operator.render.ports import ResolvedPorts

        from .lab.clients import ClientCall, run_clients
        from .lab.runner import LabRunner, server_kind

        runner = LabRunner(lab)
        rows: list[Row] = []
        running = {}
        with timed("lab kubelet: running every IOC pod in the broadcast-less lab"):
            for n, body in enumerate(iocs):
                ioc = parse_ioc(body)
                name = ioc.metadata.name
                objects = [o for o in (
                    kube.get("apps/v1", "StatefulSet", NAMESPACE, name),
                    kube.get("v1", "Service", NAMESPACE, name),
                    kube.get("v1", "ConfigMap", NAMESPACE, f"{name}-pvagw"),
                    kube.get("v1", "ConfigMap", NAMESPACE, f"{name}-cagw")) if o]
                ports = ResolvedPorts(**{k: v for k, v in zip(
                    ("ca", "pva_server", "pva_broadcast"),
                    (body["status"]["ports"][p] for p in ("ca", "pvaServer", "pvaBroadcast")),
                    strict=True)})
                host = ioc.spec.network.mode.value == "host"
                node = HOST_NODE if host else n % 2
                started = runner.run(Rendered(ioc, ports, objects), node)
                self._mark_pod_ready(kube, name, lab.nodes[node], started.where.ip)
                running[name] = started
                rows.append(Row(name, ioc.spec.network.mode.value, server_kind(ioc),
                                _endpoints(body)))
        directory = wait_for("the client directory", lambda: (
            kube.get("v1", "ConfigMap", NAMESPACE, DIRECTORY) or {}).get("data"))
        env = {k: v for k, v in directory.items() if k.startswith("EPICS_")}
        say("client pod", "env = the epics-client-env ConfigMap, nothing else:")
        for key in sorted(env):
            print(f"      {key}={env[key]}")
        client = lab.add_pod(1, name="client")
        with timed("reading and writing a PV of every IOC over CA (libca) and PVA (p4p)"):
            calls, where = [], []
            for row in rows:
                r = running[row.name]
                pv = r.server.pv("value")
                if "EPICS_CA_ADDR_LIST" in r.client_env:
                    calls.append(ClientCall(client, "pyepics", "put", [pv], env, value=4.25))
                    where.append((row, "ca"))
                if "EPICS_PVA_ADDR_LIST" in r.client_env:
                    calls.append(ClientCall(client, "p4p", "put", [pv], env, value=4.5))
                    where.append((row, "pva"))
            for (row, proto), res in zip(where, run_clients(lab, calls, parallel=4),
                                         strict=True):
                text = (f"ok {res.value():g}" if res.ok else
                        f"FAIL {(res.error or '')[:40]}")
                setattr(row, proto, text)
                row.seconds = max(row.seconds, res.elapsed)
        return rows

    def _mark_pod_ready(self, kube: Kube, ioc: str, node: Any, pod_ip: str) -> None:
        """What a kubelet would report: bound to the lab node, running, ready."""
        pod_name = f"{ioc}-0"
        pod = wait_for(f"pod {pod_name}", lambda: kube.get("v1", "Pod", NAMESPACE, pod_name))
        if not pod["spec"].get("nodeName"):
            kube.request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods/{pod_name}/binding",
                         body={"apiVersion": "v1", "kind": "Binding",
                               "metadata": {"name": pod_name},
                               "target": {"apiVersion": "v1", "kind": "Node",
                                          "name": f"lab-{node.name}"}})
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        ready = [{"type": t, "status": "True", "lastTransitionTime": now}
                 for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")]
        kube.request("PATCH", f"/api/v1/namespaces/{NAMESPACE}/pods/{pod_name}/status",
                     body={"status": {"phase": "Running", "podIP": pod_ip,
                                      "podIPs": [{"ip": pod_ip}], "hostIP": node.ip,
                                      "startTime": now, "conditions": ready}},
                     content_type="application/merge-patch+json")

    # --- output ---------------------------------------------------------------
    def show_iocs(self, kubeconfig: str) -> None:
        from .controlplane import ensure_binaries

        kubectl = shutil.which("kubectl") or str(ensure_binaries(build=False) / "kubectl")
        say("kubectl get iocs -n " + NAMESPACE)
        subprocess.run([kubectl, "--kubeconfig", kubeconfig, "get", "iocs", "-n", NAMESPACE],
                       check=False, timeout=30)


def _reconciled(ioc: dict[str, Any]) -> bool:
    return any(c.get("type") == "Reconciled" and c.get("status") == "True"
               for c in (ioc.get("status") or {}).get("conditions") or [])


def _endpoints(ioc: dict[str, Any]) -> str:
    status = ioc.get("status") or {}
    if status.get("endpoints"):
        return " ".join(f"{k}={v}" for k, v in sorted(status["endpoints"].items()))
    ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
    return f"({ready.get('message', 'no address yet')})"


def print_table(rows: list[Row]) -> None:
    header = ("IOC", "MODE", "SERVER", "ENDPOINTS", "CA", "PVA", "TIME")
    table = [header] + [(r.name, r.mode, r.kind, r.endpoints, r.ca, r.pva,
                         f"{r.seconds:.2f}s") for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)))


def _on_real_nodes(examples: Path, start: float) -> int:
    from . import demo_nodes

    try:
        ok = demo_nodes.run(examples.resolve(), Path.cwd())
    except KeyboardInterrupt:
        print("\ninterrupted: everything started has been stopped", file=sys.stderr)
        return 130
    except Exception as exc:  # the cluster is torn down already; say what failed
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"demo on real nodes {'passed' if ok else 'FAILED'} in "
          f"{time.monotonic() - start:.0f} s")
    return 0 if ok else 1


def can_use_lab() -> str | None:
    """None when the lab can run, else why not."""
    if sys.platform != "linux":
        return "the network lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, veth, iptables)"
    for tool in ("ip", "iptables"):
        if not shutil.which(tool):
            return f"the network lab needs `{tool}` (make system-deps installs it)"
    return None


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(kubeconfig: str | None = None, examples: Path = Path("examples")) -> int:
    start = time.monotonic()
    # A closed terminal or `kill` unwinds like Ctrl-C: lab, operator, control plane.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # started in the background
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if kubeconfig is None:
        from .cluster import preflight

        no_nodes = preflight()
        if no_nodes is None:
            say("running on real nodes", "kubelet + containerd, the project's images, the "
                "chart's operator")
            return _on_real_nodes(examples, start)
        say("real nodes unavailable", f"{no_nodes}; running the examples in the network "
            "lab instead (a lab kubelet runs each IOC pod from this Python environment)")
    why_not = None if kubeconfig is None else "the lab only runs with the demo's own cluster"
    why_not = why_not or can_use_lab()
    demo = Demo(kubeconfig, use_lab=why_not is None, examples=examples)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"ioc-operator-demo-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    ok = True
    try:
        with demo.stack:
            config = demo.start_cluster()
            kube = demo.connect(config)
            if not kubeconfig:
                demo.install_crd(kube)
            lab = None
            if why_not is None:
                from .lab import Lab

                with timed("building the lab: 3 nodes, Calico-style /32 pods, no broadcast "
                           "between pods, ClusterIPs as iptables DNAT"):
                    lab = Lab(nodes=3)
                    demo.stack.enter_context(lab)
                    for node in lab.nodes:  # the API server's view of the lab's nodes
                        with contextlib.suppress(KubeError):
                            kube.create({"apiVersion": "v1", "kind": "Node",
                                         "metadata": {"name": f"lab-{node.name}"},
                                         "status": {"addresses": [
                                             {"type": "InternalIP", "address": node.ip}]}})
            demo.start_operator(config, log_dir / "operator.log")
            host_node = f"lab-{lab.nodes[HOST_NODE].name}" if lab else None
            docs = demo.apply_examples(kube, host_node)
            iocs = demo.wait_reconciled(kube, [d["metadata"]["name"] for d in docs],
                                        need_address=lab is not None)
            if lab is None:
                say("skipped the network lab", why_not or "")
                addresses = [a for i in iocs for a in (i["status"].get("endpoints") or {})]
                directory = wait_for("the client directory", lambda: (
                    d := (kube.get("v1", "ConfigMap", NAMESPACE, DIRECTORY) or {}).get("data")
                ) and (d.get("EPICS_CA_ADDR_LIST") or not addresses) and d, 30)
                say("the client directory (epics-client-env)")
                for key in sorted(k for k in directory if k.startswith("EPICS_")):
                    print(f"      {key}={directory[key]}")
                rows = [Row(i["metadata"]["name"], i["spec"]["network"]["mode"], "-",
                            _endpoints(i)) for i in iocs]
            else:
                rows = demo.run_lab(kube, iocs, lab)
                wait_for("Ready IOCs", lambda: all(
                    any(c["type"] == "Ready" and c["status"] == "True" for c in
                        (kube.get(IOC_API, "IOC", NAMESPACE, r.name) or {}).get(
                            "status", {}).get("conditions", [])) for r in rows), 60)
            if not kubeconfig:
                demo.show_iocs(config)
            print()
            print_table(rows)
            ok = all("FAIL" not in r.ca + r.pva for r in rows)
            say("shutting down", "operator, lab and control plane")
    except KeyboardInterrupt:
        print("\ninterrupted: everything started has been stopped", file=sys.stderr)
        return 130
    except DemoError as exc:
        print(f"error: {exc} (operator log: {log_dir / 'operator.log'})", file=sys.stderr)
        return 1
    outcome = "passed" if ok else "FAILED"
    if why_not:
        outcome = f"finished without the network lab ({why_not})"
    print(f"demo {outcome} in {time.monotonic() - start:.0f} s")
    return 0 if ok else 1
