"""The e2e tier's own pieces: where things are, the examples, the directories."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ioc_testbed.incluster import NAME_SERVICE_IP, ClientPod, Kubectl, condition
from ioc_testbed.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
CHART = REPO / "charts" / "ioc-operator"
OPERATOR_NS = "ioc-system"
EXAMPLES_NS = "e2e-examples"
HOST_NODE = "beamline-01"
AUTOSAVE_PV = "e2e-autosave-bl01"
PER_IOC_DIRECTORY = "epics-client-env-per-ioc"


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


# ------------------------------------------------------------------ directories
def per_ioc_directory(kubectl: Kubectl, namespace: str, iocs: dict[str, dict[str, Any]],
                      name_servers_only: bool = False) -> str:
    """The per-IOC lists (`ioc-operator client-env --per-ioc`) as a ConfigMap, for sites
    that publish those instead of the name service; with `name_servers_only`, only the
    NAME_SERVERS lists (TCP searches; what libca and pvxs clients use first)."""
    env = subprocess.run(
        [sys.executable, "-m", "ioc_operator.cli", "client-env", "--per-ioc", "--format",
         "env", "-n", namespace, "--kubeconfig", str(kubectl.kubeconfig)],
        capture_output=True, text=True, timeout=60, check=True,
        stdin=subprocess.DEVNULL).stdout
    data = dict(line.split("=", 1) for line in env.splitlines() if "=" in line)
    listed = data.get("EPICS_CA_ADDR_LIST", "") + " " + data.get("EPICS_PVA_ADDR_LIST", "")
    for name, ioc in iocs.items():
        for address in (ioc.get("status", {}).get("endpoints") or {}).values():
            assert address.rsplit(":", 1)[0] in listed, (name, address, data)
    name = PER_IOC_DIRECTORY
    if name_servers_only:
        data = {k: ("" if k.endswith("_ADDR_LIST") and "_AUTO_" not in k else v)
                for k, v in data.items()}
        name += "-name-servers"
    kubectl.apply([{"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": name, "namespace": namespace}, "data": data}])
    return name


def directory_client(kubectl: Kubectl, namespace: str, iocs: dict[str, dict[str, Any]],
                     kind: str, node: str = "beamline-02") -> ClientPod:
    """A client pod whose only EPICS settings are one directory: `name-service` (the
    operator's epics-client-env, the chart's default), `per-ioc` (the IOCs' own lists)
    or `name-servers-only` (their NAME_SERVERS lists alone)."""
    if kind == "name-service":
        directory = "epics-client-env"
        wait_for("the directory naming the name service", lambda: NAME_SERVICE_IP in str(
            (kubectl.get("configmap", directory, namespace) or {}).get("data")), 30)
    else:
        directory = per_ioc_directory(kubectl, namespace, iocs,
                                      name_servers_only=kind == "name-servers-only")
    return ClientPod(kubectl, namespace, name=f"client-{kind}", node=node).create(directory)


def apply_ready(kubectl: Kubectl, namespace: str, docs: list[dict[str, Any]],
                timeout: float = 180.0) -> dict[str, dict[str, Any]]:
    """Apply IOCs and wait until each is Ready (its containers really run); the IOCs by
    name. Fails the test with every IOC's Ready condition and the pods if not."""
    kubectl("create", "namespace", namespace, check=False)
    kubectl.apply(docs, namespace)
    names = [d["metadata"]["name"] for d in docs]
    done = kubectl("-n", namespace, "wait", "--for=condition=Ready", "iocs", *names,
                   f"--timeout={timeout:.0f}s", check=False, timeout=timeout + 20)
    iocs = {i["metadata"]["name"]: i for i in
            kubectl.json("-n", namespace, "get", "iocs")["items"]}
    if done.returncode:
        pods = kubectl("-n", namespace, "get", "pods", "-o", "wide", check=False).stdout
        states = {n: condition(i, "Ready") for n, i in iocs.items()}
        pytest.fail(f"IOCs not Ready in {namespace}: {states}\n{pods}", pytrace=False)
    return iocs
