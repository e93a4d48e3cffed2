"""ioc-name-server in the lab: replicas in pod namespaces behind one ClusterIP, and its
table written from IOCs run by `LabRunner` (the entries the operator's status gives).

    ns = LabNameService(lab, node=0, cluster_ip="198.19.0.53", replicas=2)
    ns.set_iocs([entry_for(running) for running in iocs])    # table file, re-read
    env = name_service_env(NameService(ns.cluster_ip))       # the constant directory
    ns.kill(0); ns.route_to(1)                               # a replica dies

The Service is DNAT to one replica at a time, as kube-proxy's rules are after the
endpoints of a dead pod are removed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ioc_operator.allocation.plan import Rendered
from ioc_operator.discovery import clientenv

from .netns import Lab, LabError, Pod, listening_ports
from .runner import RunningIOC

__all__ = ["LabNameService", "entry_for"]

PORTS = [("tcp", 5064, 5064), ("udp", 5064, 5064), ("tcp", 5075, 5075), ("udp", 5076, 5076)]


def entry_for(running: RunningIOC, rendered: Rendered, *, name: str | None = None,
              created: str = "") -> dict[str, Any]:
    """The table entry of an IOC run in the lab: what the operator writes into its
    status (`clientenv.endpoints`, `status.ports`) and kubewatch reads back."""
    ioc = running.ioc
    endpoints = clientenv.endpoints(ioc.spec, running.address, rendered.ports)
    entry: dict[str, Any] = {"name": name or f"{ioc.metadata.namespace}/{ioc.metadata.name}",
                             "prefix": ioc.spec.prefix, "created": created,
                             "external": running.mode == "host", **endpoints}
    if "pva" in endpoints:
        entry["pvaSearch"] = f"{running.address}:{rendered.ports.pva_broadcast}"
    return entry


@dataclass
class _Replica:
    pod: Pod
    popen: subprocess.Popen[Any]


class LabNameService:
    """Replicas of ioc-name-server sharing one table file, behind one ClusterIP."""

    def __init__(self, lab: Lab, node: int = 0, cluster_ip: str = "198.19.0.53",
                 replicas: int = 2, args: list[str] | None = None) -> None:
        self.lab = lab
        self.cluster_ip = cluster_ip
        self.table = lab.tmpdir / "name-server-table.yaml"
        self.table.write_text("iocs: []\n")
        self.args = args or []
        self.replicas: list[_Replica] = []
        self.routed: int | None = None
        for i in range(replicas):
            pod = lab.add_pod(node, name=f"name-server-{i}")
            self.replicas.append(_Replica(pod, self._spawn(pod, i)))
        for replica in self.replicas:
            self._wait_listening(replica)
        self.route_to(0)

    def _spawn(self, pod: Pod, index: int) -> subprocess.Popen[Any]:
        argv = [sys.executable, "-m", "ioc_operator.nameserver.main", "--table",
                str(self.table), "-v", "--stats-interval", "3600", *self.args]
        return self.lab.spawn(pod, argv, {},
                              log=self.lab.tmpdir / f"name-server-{index}.log")

    @staticmethod
    def _wait_listening(replica: _Replica, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if replica.popen.poll() is not None:
                raise LabError(f"name server exited: {log_of(replica.popen)[-2000:]}")
            ports = listening_ports(replica.popen.pid)
            if {5064, 5075} <= ports.get("tcp", set()) and {5064, 5076} <= ports.get("udp",
                                                                                    set()):
                return
            time.sleep(0.05)
        raise LabError(f"name server not listening after {timeout} s")

    # ------------------------------------------------------------------ the Service
    def route_to(self, index: int) -> None:
        if self.routed is not None:
            self.lab.remove_service(self.cluster_ip)
        self.lab.add_service(self.cluster_ip, PORTS, self.replicas[index].pod.ip)
        self.routed = index

    # ------------------------------------------------------------------ the table
    def set_iocs(self, entries: list[dict[str, Any]], wait: float = 5.0) -> float:
        """Write the table (atomically) and wait until every replica alive has loaded it;
        returns the time.monotonic() of the write."""
        tmp = self.table.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"iocs": entries}, sort_keys=False))
        counts = {i: log_of(r.popen).count("ioc_name_server.table INFO")
                  for i, r in enumerate(self.replicas) if self.alive(i)}
        written = time.monotonic()
        os.replace(tmp, self.table)
        for i, r in enumerate(self.replicas):
            if not self.alive(i):
                continue
            r.popen.send_signal(signal.SIGHUP)  # at once, not at the next 1 s poll
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if all(log_of(self.replicas[i].popen).count("ioc_name_server.table INFO") > n
                   for i, n in counts.items()):
                return written
            time.sleep(0.02)
        raise LabError("a name server did not load its table")

    # ------------------------------------------------------------------ replicas
    def alive(self, index: int) -> bool:
        return self.replicas[index].popen.poll() is None

    def kill(self, index: int) -> None:
        """SIGKILL: nothing is closed cleanly (a crashed or evicted pod)."""
        popen = self.replicas[index].popen
        popen.kill()
        popen.wait(timeout=10)

    def restart(self, index: int) -> None:
        """A new process for a replica that died (as its Deployment would start one);
        it loads the current table."""
        replica = self.replicas[index]
        if replica.popen.poll() is None:
            raise LabError(f"replica {index} is still running")
        replica.popen = self._spawn(replica.pod, index)
        self._wait_listening(replica)

    def stats(self, index: int = 0, timeout: float = 5.0) -> dict[str, int]:
        """Its counters (SIGUSR1 makes it log them)."""
        popen = self.replicas[index].popen
        before = log_of(popen).count(" stats ")
        popen.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log_of(popen)
            if text.count(" stats ") > before:
                line = text[text.rindex(" stats "):].splitlines()[0]
                return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
            time.sleep(0.02)
        raise LabError("no stats from the name server")

    def log(self, index: int = 0) -> str:
        return log_of(self.replicas[index].popen)


def log_of(popen: Any) -> str:
    path: Path = popen.log_path
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
