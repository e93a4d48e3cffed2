"""The demo on real nodes: the project's images, the chart's operator, the examples.

A throwaway cluster of the test bed (control plane, two nodes with containerd, kubelet
and kube-proxy), `helm install` of the chart (operator and name service in pods),
`kubectl apply` of every example, then a client pod whose only EPICS settings are
`envFrom: epics-client-env` writes and reads a PV of every IOC over CA (libca) and PVA
(p4p). Everything is torn down at the end, or on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import yaml

from .cluster import Cluster
from .helm import Helm, build_helm
from .incluster import NAME_SERVICE_IP, ClientPod, Kubectl, condition, local_volume, protocols

NAMESPACE = "epics-demo"
HOST_NODE = "beamline-01"  # host-mode examples share it; the client runs on the other
CLIENT_NODE = "beamline-02"
AUTOSAVE_PV = "demo-autosave"


def say(step: str, detail: str = "") -> None:
    print(f"==> {step}" + (f": {detail}" if detail else ""), flush=True)


@contextlib.contextmanager
def timed(step: str) -> Any:
    start = time.monotonic()
    say(step)
    yield
    print(f"    done in {time.monotonic() - start:.1f} s", flush=True)


def manifests(examples: Path) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(examples.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "IOC":
                doc.setdefault("metadata", {})["namespace"] = NAMESPACE
                if doc["spec"].get("network", {}).get("mode") == "host":
                    doc["spec"].setdefault("scheduling", {})["nodeName"] = HOST_NODE
                docs.append(doc)
    return docs


def run(examples: Path, repo: Path) -> bool:
    """The demo; True when every IOC was written and read over every protocol it serves."""
    docs = manifests(examples)
    if not docs:
        raise RuntimeError(f"no IOC manifests in {examples}")
    with contextlib.ExitStack() as stack:
        with timed("a throwaway cluster: images built from docker/ (cached), control plane, "
                   "nodes beamline-01 and beamline-02 (containerd, kubelet, kube-proxy)"):
            cluster = Cluster(2, context=repo)
            stack.callback(_teardown, cluster)
            cluster.start()
        assert cluster.plane is not None and cluster.plane.bin_dir is not None
        kubectl = Kubectl(cluster.plane.bin_dir / "kubectl", cluster.kubeconfig)
        print(f"    export KUBECONFIG={cluster.kubeconfig}   # while the demo runs")
        with timed("helm install ioc-operator charts/ioc-operator (operator and name "
                   "service as pods)"):
            helm = Helm(build_helm(), cluster.workdir / "helm", repo / "charts/ioc-operator")
            helm.install_operator(cluster.kubeconfig, "ioc-system",
                                  f"nameService.clusterIP={NAME_SERVICE_IP}")
        with timed(f"kubectl apply -f examples/ ({len(docs)} IOCs) and wait for Ready"):
            kubectl("create", "namespace", NAMESPACE, check=False)
            local_volume(kubectl, HOST_NODE, AUTOSAVE_PV)
            kubectl.apply(docs)
            kubectl("-n", NAMESPACE, "wait", "--for=condition=Ready", "iocs", "--all",
                    "--timeout=180s", timeout=200)
            # The operator reads each IOC's probe PV (spec.probe) once it is Ready.
            kubectl("-n", NAMESPACE, "wait", "--for=condition=Reachable", "iocs", "--all",
                    "--timeout=60s", check=False, timeout=80)
        say(f"kubectl get iocs -n {NAMESPACE}")
        print(kubectl("-n", NAMESPACE, "get", "iocs").stdout, flush=True)
        client = ClientPod(kubectl, NAMESPACE, name="client", node=CLIENT_NODE).create()
        say("client pod", "env = the epics-client-env ConfigMap, nothing else:")
        for key, value in sorted(client.env().items()):
            print(f"      {key}={value}")
        iocs = {i["metadata"]["name"]: i for i in
                kubectl.json("-n", NAMESPACE, "get", "iocs")["items"]}
        with timed("writing and reading a PV of every IOC over CA (libca) and PVA (p4p)"):
            rows = _read_all(client, iocs)
        print()
        _table(rows)
        return all("FAIL" not in " ".join(r) for r in rows)
    return False


def _read_all(client: ClientPod, iocs: dict[str, dict[str, Any]]) -> list[list[str]]:
    results: dict[tuple[str, str], str] = {}
    for proto, lib, value in (("ca", "pyepics", 4.25), ("pva", "p4p", 4.5)):
        serving = {f"{i['spec']['prefix']}value": n for n, i in iocs.items()
                   if proto in protocols(i)}
        out = client.run(lib, "put", list(serving), value=value, timeout=10.0)
        by_pv = {r["pv"]: r for r in out.get("results", [])}
        for pv, name in serving.items():
            r = by_pv.get(pv) or {"ok": False, "error": out.get("error")}
            results[(name, proto)] = (f"ok {r['value']:g} ({r['elapsed']:.2f} s)" if r["ok"]
                                      else f"FAIL {str(r.get('error'))[:40]}")
    rows = [["IOC", "MODE", "NODE", "READY", "REACHABLE", "CA", "PVA"]]
    for name, ioc in sorted(iocs.items()):
        rows.append([name, ioc["spec"]["network"]["mode"],
                     (ioc.get("status") or {}).get("node", "-") or "-",
                     condition(ioc, "Ready").get("status", "?"),
                     condition(ioc, "Reachable").get("status", "-"),
                     results.get((name, "ca"), "-"), results.get((name, "pva"), "-")])
    return rows


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _teardown(cluster: Cluster) -> None:
    say("tearing down", "pods, nodes, control plane, network")
    problems = cluster.stop()
    left = cluster.residue()
    if problems or left:
        print(f"    left behind: {problems + left}", flush=True)
    else:
        print(f"    done in {cluster.timings.get('stop', 0):.1f} s, nothing left behind")
