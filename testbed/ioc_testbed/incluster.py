"""Clients and kubectl on a cluster of the test bed: the e2e tests, the demo and the
real-node benchmark use them. Every wait is bounded."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .waiting import wait_for

CLIENT_IMAGE = "ghcr.io/epics-operator/example-ioc:0.1.0"  # has pyepics, caproto, p4p
CLIENT_SCRIPT = "/epics/example/client.py"
# The name service's ClusterIP the test bed pins (nameService.clusterIP): there is no
# cluster DNS here, and a pinned address is what a site publishes to clients anyway.
NAME_SERVICE_IP = "198.19.0.53"


class KubectlError(RuntimeError):
    """kubectl failed."""


@dataclass
class Kubectl:
    binary: Path
    kubeconfig: Path

    def __call__(self, *args: str, check: bool = True, timeout: float = 60.0,
                 input: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(self.binary), f"--kubeconfig={self.kubeconfig}", *args],
                              input=input, capture_output=True, text=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL,
                              check=False)
        if check and done.returncode:
            raise KubectlError(f"kubectl {' '.join(args)} failed ({done.returncode}):\n"
                                 f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json").stdout)

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        done = self("get", kind, name, "-n", namespace, "-o", "json", check=False)
        return json.loads(done.stdout) if done.returncode == 0 else None

    def apply(self, docs: Iterable[dict[str, Any]], namespace: str | None = None) -> None:
        ns = ["-n", namespace] if namespace else []
        self("apply", *ns, "-f", "-", input=yaml.safe_dump_all(list(docs)))


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return {}


def protocols(ioc: dict[str, Any]) -> list[str]:
    """What a client can reach of this IOC: CA, PVA (the bridge serves CA-only IOCs)."""
    spec = ioc["spec"]
    servers = spec.get("servers", {})
    out = []
    if servers.get("ca", {}).get("enabled", True):
        out.append("ca")
    bridge = ((spec.get("gateways") or {}).get("bridge") or {}).get("enabled", False)
    if servers.get("pva", {}).get("enabled", True) or bridge:
        out.append("pva")
    return out


class ClientPod:
    """A pod whose only EPICS settings are `envFrom: epics-client-env`; each call runs
    one bounded client operation in it (kubectl exec) and returns its JSON result."""

    def __init__(self, kubectl: Kubectl, namespace: str, name: str = "epics-client",
                 node: str | None = None) -> None:
        self.kubectl = kubectl
        self.namespace = namespace
        self.name = name
        self.node = node

    def create(self, directory: str = "epics-client-env") -> ClientPod:
        spec: dict[str, Any] = {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
            "containers": [{
                "name": "client", "image": CLIENT_IMAGE, "imagePullPolicy": "IfNotPresent",
                "command": ["python", "-c", "import time; time.sleep(86400)"],
                "envFrom": [{"configMapRef": {"name": directory}}],
            }],
        }
        if self.node:
            spec["nodeName"] = self.node
        self.kubectl.apply([{"apiVersion": "v1", "kind": "Pod",
                             "metadata": {"name": self.name, "namespace": self.namespace},
                             "spec": spec}])
        wait_for(f"client pod {self.name} Running", lambda: (self.kubectl.get(
            "pod", self.name, self.namespace) or {}).get("status", {}).get(
            "phase") == "Running", timeout=60)
        return self

    def env(self) -> dict[str, str]:
        out = self.kubectl("exec", "-n", self.namespace, self.name, "--", "env").stdout
        return dict(line.split("=", 1) for line in out.splitlines()
                    if line.startswith("EPICS_"))

    def run(self, lib: str, op: str, pvs: list[str], value: float | None = None,
            timeout: float = 5.0) -> dict[str, Any]:
        args = ["exec", "-n", self.namespace, self.name, "--", "python", CLIENT_SCRIPT,
                "--lib", lib, "--op", op, "--timeout", str(timeout)]
        for pv in pvs:
            args += ["--pv", pv]
        if value is not None:
            args += ["--value", str(value)]
        t0 = time.monotonic()
        done = self.kubectl(*args, check=False, timeout=3 * timeout + 30)
        try:
            result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            result = {"ok": False, "results": [],
                      "error": f"no result (exit {done.returncode}): {done.stderr[-500:]}"}
        result["wall"] = time.monotonic() - t0
        return result


# ------------------------------------------------------------------ the client matrix
LIBS = {"ca": ("pyepics", "caproto"), "pva": ("p4p",)}
OPS = ("get", "put", "monitor")
PV_OF_OP = {"get": "value", "put": "value", "monitor": "counter"}
Cells = dict[tuple[str, str, str], dict[str, Any]]


def run_matrix(client: ClientPod, iocs: dict[str, dict[str, Any]],
               libs: dict[str, tuple[str, ...]] | None = None) -> Cells:
    """Every cell once: (ioc, lib, op) -> that PV's result. One client process per
    (lib, op) asks for every IOC's PV, as a real client would. 10 s (15 s for monitors):
    a first search through a gateway or the bridge is answered once the gateway found
    the name upstream, and clients back off between searches (pvxs: 1, 2, 4 s)."""
    cells: Cells = {}
    for proto, proto_libs in (libs or LIBS).items():
        serving = {n: i for n, i in iocs.items() if proto in protocols(i)}
        for lib in proto_libs:
            for op in OPS:
                pvs = {f"{i['spec']['prefix']}{PV_OF_OP[op]}": n for n, i in serving.items()}
                result = client.run(lib, op, list(pvs), value=4.25 if op == "put" else None,
                                    timeout=15.0 if op == "monitor" else 10.0)
                by_pv = {r["pv"]: r for r in result.get("results", [])}
                for pv, name in pvs.items():
                    cells[(name, lib, op)] = by_pv.get(pv) or {
                        "ok": False, "error": result.get("error")}
    return cells


def failed_cells(cells: Cells) -> dict[str, str]:
    return {f"{ioc} {lib} {op}": str(c.get("error")) for (ioc, lib, op), c in cells.items()
            if not c["ok"]}


def format_matrix(cells: Cells, label: str = "IOC") -> str:
    iocs = sorted({k[0] for k in cells})
    columns = [(lib, op) for libs in LIBS.values() for lib in libs for op in OPS]
    rows = [[label] + [f"{lib} {op}" for lib, op in columns]]
    for ioc in iocs:
        row = [ioc]
        for lib, op in columns:
            cell = cells.get((ioc, lib, op))
            row.append("-" if cell is None else
                       f"ok {cell.get('elapsed', 0):.2f}" if cell["ok"] else "FAIL")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)




def local_volume(kubectl: Kubectl, node: str, name: str, owner: int = 65532) -> None:
    """A local PersistentVolume on `node` (e.g. for an IOC's autosave claim), its
    directory in the node's own directory of a test-bed cluster (whose admin kubeconfig
    is <cluster dir>/control-plane/admin.kubeconfig), owned by the IOC images' uid."""
    path = Path(kubectl.kubeconfig).resolve().parents[1] / node / "volumes" / name
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, owner, owner)
    kubectl.apply([{
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
            "local": {"path": str(path)},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}},
        },
    }])


class Watch:
    """A running client in a pod (`iocs/watch.py` of the example image through `kubectl
    exec -i`): it monitors PVs from the start and records every event with the wall
    time it happened; `stop` closes its stdin (it exits) and waits, bounded."""

    def __init__(self, client: ClientPod, lib: str, pvs: list[str],
                 duration: float = 600.0) -> None:
        k = client.kubectl
        argv = [str(k.binary), f"--kubeconfig={k.kubeconfig}", "-n", client.namespace,
                "exec", "-i", client.name, "--", "python", "/epics/example/watch.py",
                "--lib", lib, "--duration", str(duration)]
        for pv in pvs:
            argv += ["--pv", pv]
        self.lib = lib
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(f"the {lib} watch to start", lambda: self.seen("started"), 60)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                with self._lock:
                    self.events.append(event)

    def seen(self, event: str, pv: str | None = None,
             after: float = 0.0) -> dict[str, Any] | None:
        """The first `event` (for `pv`) that happened after wall time `after`."""
        with self._lock:
            return next((e for e in self.events if e["event"] == event and e["t"] >= after
                         and (pv is None or e["pv"] == pv)), None)

    def count(self, event: str, pv: str, after: float = 0.0) -> int:
        with self._lock:
            return sum(1 for e in self.events if e["event"] == event and e["pv"] == pv
                       and e["t"] >= after)

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
