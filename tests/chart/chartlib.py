"""Helpers for the Helm chart tests: render with helm, run the operator as the chart's
ServiceAccount, read the API server's audit log. Every wait is bounded in time."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ioc_testbed.controlplane import ControlPlane, free_port
from ioc_testbed.operator_process import OperatorProcess

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "ioc-operator"
IOC_API = "epics-operator.io/v1alpha1"
WAIT = 45.0


def run(argv: list[str], *, timeout: float = 120.0, input: str | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                          stdin=None if input is not None else subprocess.DEVNULL, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}):\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


# ------------------------------------------------------------------------------ helm


def by_kind(objects: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def rule_triples(rules: Iterable[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource[/subresource], verb) for every combination a rule grants."""
    return {(group, resource, verb)
            for rule in rules
            for group in rule.get("apiGroups") or []
            for resource in rule.get("resources") or []
            for verb in rule.get("verbs") or []}


# ------------------------------------------------------------------- service account


def service_account_kubeconfig(plane: ControlPlane, namespace: str, account: str,
                               path: Path) -> Path:
    """A kubeconfig holding a TokenRequest token of `account` (nothing else)."""
    token = plane.kubectl("create", "token", account, "-n", namespace,
                          "--duration=2h").stdout.strip()
    assert plane.pki is not None
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "chart-test", "cluster": {
            "server": plane.server,
            "certificate-authority-data": base64.b64encode(
                plane.pki.ca.cert.read_bytes()).decode()}}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "chart-test", "context": {
            "cluster": "chart-test", "user": account, "namespace": namespace}}],
        "current-context": "chart-test",
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
    return path


def kubectl_as(plane: ControlPlane, kubeconfig: Path, *args: str,
               check: bool = False) -> subprocess.CompletedProcess[str]:
    """kubectl with another kubeconfig (the ServiceAccount's token)."""
    assert plane.bin_dir is not None
    return run([str(plane.bin_dir / "kubectl"), f"--kubeconfig={kubeconfig}",
                f"--cache-dir={kubeconfig.parent / 'kubectl-cache'}", *args],
               timeout=60, check=check)


# ------------------------------------------------------------------------- operator


class ChartOperator(OperatorProcess):
    """The operator, started the way the chart's Deployment starts it (its args and env),
    out of cluster with a ServiceAccount kubeconfig. Stopped by PID."""

    def __init__(self, deployment: dict[str, Any], kubeconfig: Path, log_path: Path) -> None:
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["ioc-operator"], container["command"]
        args = list(container["args"])
        i = args.index("--liveness")
        self.liveness_port = free_port()
        chart_url = args[i + 1]
        self.liveness_path = "/" + chart_url.split("/", 3)[3]
        # The chart listens on 0.0.0.0 (the kubelet probes the pod IP); here: loopback.
        args[i + 1] = f"http://127.0.0.1:{self.liveness_port}{self.liveness_path}"
        self.metrics_port: int | None = None
        if "--metrics-port" in args:  # likewise the metrics endpoint, on a free port
            self.metrics_port = free_port()
            args[args.index("--metrics-port") + 1] = str(self.metrics_port)
            args += ["--metrics-address", "127.0.0.1"]
        env = {e["name"]: e["value"] for e in container.get("env") or []}
        env |= {"HOME": os.environ.get("HOME", "/tmp"), "NO_PROXY": "127.0.0.1"}
        super().__init__(kubeconfig, log_path, args=[*args, "--verbose"], env=env,
                         clean_env=True)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """A scrape of the metrics endpoint: (sample name, sorted labels) -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        assert self.metrics_port is not None, "the chart's args have no --metrics-port"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def healthy(self) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"http://127.0.0.1:{self.liveness_port}{self.liveness_path}"
        try:
            with opener.open(url, timeout=2) as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError):
            return False


# ----------------------------------------------------------------------------- audit


AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups: [system:serviceaccounts]
- level: None
"""


@dataclass(frozen=True)
class Request:
    """One audited request of a ServiceAccount."""

    user: str
    verb: str
    group: str
    resource: str  # with "/subresource"
    namespace: str | None
    name: str | None
    code: int | None
    decision: str | None
    uri: str

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.group, self.resource, self.verb)


def audited(path: Path, user: str) -> Iterator[Request]:
    """The resource requests `user` made, from the API server's JSON audit log."""
    if not path.exists():
        return
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line being written
        if event.get("user", {}).get("username") != user:
            continue
        ref = event.get("objectRef")
        if not ref:
            continue  # discovery and other non-resource URLs
        resource = ref.get("resource", "")
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        yield Request(
            user=user, verb=event.get("verb", ""), group=ref.get("apiGroup", ""),
            resource=resource, namespace=ref.get("namespace"), name=ref.get("name"),
            code=(event.get("responseStatus") or {}).get("code"),
            decision=(event.get("annotations") or {}).get("authorization.k8s.io/decision"),
            uri=event.get("requestURI", ""))


def nonresource_paths(path: Path, user: str) -> set[str]:
    """Non-resource URLs (discovery, /version) `user` requested."""
    found = set()
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("user", {}).get("username") == user and not event.get("objectRef"):
            found.add(event.get("requestURI", "").split("?")[0])
    return found


def shellcheck() -> str:
    """Path of shellcheck, installed with apt-get (as root) when missing."""
    found = shutil.which("shellcheck")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update", "-qq"],
                     ["apt-get", "install", "-y", "-qq", "shellcheck"]):
            subprocess.run(argv, check=True, timeout=600, env=env, stdin=subprocess.DEVNULL,
                           capture_output=True)
    found = shutil.which("shellcheck")
    if not found:
        raise AssertionError("shellcheck is missing: apt-get install shellcheck (as root)")
    return found
