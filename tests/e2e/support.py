"""What the end-to-end tests do on the real cluster: kubectl, helm, client pods."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ioc_testbed.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
CHART = REPO / "charts" / "ioc-operator"
CLIENT_IMAGE = "ghcr.io/epics-operator/example-ioc:0.1.0"  # has pyepics, caproto, p4p
CLIENT_SCRIPT = "/epics/example/client.py"
OPERATOR_NS = "ioc-system"
EXAMPLES_NS = "e2e-examples"
HOST_NODE = "beamline-01"
AUTOSAVE_PV = "e2e-autosave-bl01"
# The name service's pinned ClusterIP (nameService.clusterIP): the test bed has no
# cluster DNS, and a pinned address is what a site publishes to clients anyway.
NAME_SERVICE_IP = "198.19.0.53"
PER_IOC_DIRECTORY = "epics-client-env-per-ioc"


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
            raise AssertionError(f"kubectl {' '.join(args)} failed ({done.returncode}):\n"
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


def examples(host_node: str) -> list[dict[str, Any]]:
    """examples/*.yaml, host-mode IOCs pinned to one node (two share it)."""
    docs = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "IOC":
                if doc["spec"].get("network", {}).get("mode") == "host":
                    doc["spec"].setdefault("scheduling", {})["nodeName"] = host_node
                docs.append(doc)
    return docs


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
