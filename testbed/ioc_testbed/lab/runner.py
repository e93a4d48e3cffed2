"""Run rendered IOCs in the lab, as a kubelet and kube-proxy would.

Each rendered pod is placed like Kubernetes would place it: hostNetwork pods in a node
namespace, others in a pod namespace of their own. The IOC container becomes a real
test IOC of the IOC's server kind with exactly the env the container spec sets; every
sidecar runs its rendered command with its ConfigMap and emptyDir volumes materialised
as directories; each Service becomes DNAT rules for its ClusterIP in every node.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ioc_operator.allocation.plan import Rendered
from ioc_operator.discovery.clientenv import for_ioc
from ioc_operator.model.ioc import IOC, CAImplementation, PVAImplementation

from .netns import Lab, LabError, Node, Pod, listening_ports
from .servers import EpicsServer, start_server

SERVICE_RANGE = ipaddress.ip_network("198.19.1.0/24")


def server_kind(ioc: IOC) -> str:
    """The lab's test server for an IOC's declared servers."""
    ca, pva = ioc.spec.servers.ca, ioc.spec.servers.pva
    if ca.enabled and pva.enabled and ca.implementation == CAImplementation.RSRV:
        return "softioc-classic" if pva.implementation == PVAImplementation.CLASSIC \
            else "softioc-pvxs"
    if ca.enabled and not pva.enabled:
        kinds = {CAImplementation.CAPROTO: "caproto", CAImplementation.PCAS: "pcaspy"}
        if ca.implementation in kinds:
            return kinds[ca.implementation]
    if pva.enabled and not ca.enabled and pva.implementation == PVAImplementation.PVXS:
        return "p4p"
    raise LabError(f"the lab has no test server for {ioc.spec.servers.model_dump()}")


def container_env(container: dict[str, Any], pod_ip: str, host_ip: str) -> dict[str, str]:
    """The env a kubelet would give the container (downward API fields included)."""
    fields = {"status.podIP": pod_ip, "status.hostIP": host_ip}
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif path := ((var.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath"):
            env[var["name"]] = fields[path]
    return env


def expand(arg: str, env: dict[str, str]) -> str:
    """$(VAR) in command and args, as the kubelet expands it (unknown names stay)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: env.get(m.group(1), m.group(0)), arg)


def mount_paths(arg: str, mounts: list[dict[str, Any]], volumes: dict[str, Path]) -> str:
    """A mount is a path rewrite here: each mountPath in `arg` (as a whole path, not
    inside another) becomes its volume's directory, in one pass, so a directory put in
    (under /tmp, say) is not rewritten again by a /tmp mount."""
    paths = {m["mountPath"].rstrip("/") or "/": str(volumes[m["name"]]) for m in mounts}
    if not paths:
        return arg
    pattern = "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))
    return re.sub(rf"(?<![\w./-])({pattern})(?=/|$|[^\w.-])",
                  lambda m: paths[m.group(1)], arg)


@dataclass
class RunningIOC:
    ioc: IOC
    where: Pod | Node
    address: str  # what clients are told: the ClusterIP, or the node IP in host mode
    server: EpicsServer
    client_env: dict[str, str]
    sidecars: list[subprocess.Popen[Any]] = field(default_factory=list)

    @property
    def mode(self) -> str:
        return self.ioc.spec.network.mode.value


class LabRunner:
    """Places rendered IOCs in a Lab. Everything it starts is stopped with the lab."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self._next_ip = iter(SERVICE_RANGE.hosts())

    def run(self, rendered: Rendered, node: int = 0) -> RunningIOC:
        ioc = rendered.ioc
        objects = {o["kind"]: o for o in rendered.objects}
        pod_spec = objects["StatefulSet"]["spec"]["template"]["spec"]
        host_node = self.lab.nodes[node]
        if pod_spec.get("hostNetwork"):
            where: Pod | Node = host_node
        else:
            where = self.lab.add_pod(node, name=ioc.metadata.name)
        containers = pod_spec["containers"]
        env = container_env(containers[0], where.ip, host_node.ip)
        server = start_server(self.lab, where, server_kind(ioc), ioc.spec.prefix, env)
        running = RunningIOC(ioc, where, host_node.ip, server, {})
        volumes = self._volumes(ioc, pod_spec, rendered.objects)
        for sidecar in containers[1:]:
            running.sidecars.append(self._sidecar(where, sidecar, volumes, host_node.ip))
        if "Service" in objects:
            running.address = self._service(objects["Service"], where.ip)
        running.client_env = for_ioc(ioc.spec, running.address, rendered.ports).env()
        return running

    def _volumes(self, ioc: IOC, pod_spec: dict[str, Any],
                 objects: list[dict[str, Any]]) -> dict[str, Path]:
        """ConfigMap and emptyDir volumes as directories of the lab."""
        config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
        paths: dict[str, Path] = {}
        for vol in pod_spec.get("volumes", []):
            path = self.lab.tmpdir / "volumes" / ioc.metadata.name / vol["name"]
            path.mkdir(parents=True, exist_ok=True)
            if "configMap" in vol:
                cm = config_maps.get(vol["configMap"]["name"])
                if not cm:
                    raise LabError(f"volume {vol['name']}: ConfigMap not rendered")
                for key, text in cm["data"].items():
                    (path / key).write_text(text)
            paths[vol["name"]] = path
        return paths

    def _sidecar(self, where: Pod | Node, container: dict[str, Any],
                 volumes: dict[str, Path], host_ip: str) -> subprocess.Popen[Any]:
        env = container_env(container, where.ip, host_ip)
        argv = [expand(a, env) for a in
                list(container.get("command", [])) + list(container.get("args", []))]
        argv = [mount_paths(a, container.get("volumeMounts", []), volumes) for a in argv]
        env["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        proc = self.lab.spawn(where, argv, env,
                              log=self.lab.tmpdir / f"{container['name']}-{where.ns}.log")
        port = ((container.get("readinessProbe") or {}).get("tcpSocket") or {}).get("port")
        if port:
            self._wait_listening(proc, int(port), container["name"])
        return proc

    @staticmethod
    def _wait_listening(proc: subprocess.Popen[Any], port: int, name: str,
                        timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"sidecar {name} exited with {proc.returncode}")
            if port in listening_ports(proc.pid).get("tcp", set()):
                return
            time.sleep(0.1)
        raise LabError(f"sidecar {name} did not listen on TCP {port} within {timeout:.0f} s")

    def _service(self, service: dict[str, Any], backend_ip: str) -> str:
        cluster_ip = service["spec"].get("clusterIP") or str(next(self._next_ip))
        ports = [(p["protocol"].lower(), int(p["port"]), int(p["targetPort"]))
                 for p in service["spec"]["ports"]]
        self.lab.add_service(cluster_ip, ports, backend_ip)
        return cluster_ip
