"""A real Kubernetes cluster on this machine: control plane, nodes, the project's images.

>>> with Cluster(nodes=2) as cluster:          # root; Debian containerd, runc, CNI
...     cluster.kubectl("get", "nodes")        # beamline-01, beamline-02: Ready

`Cluster.start` builds (or reuses) the images, creates the node network
(`network.NodeNetwork`), starts etcd, kube-apiserver (on the node network's host
address, so pods reach it through the `kubernetes` Service), kube-controller-manager
and kube-scheduler, then each node (`node.Node`: containerd with the images imported,
kubelet, kube-proxy), and waits until every node is Ready.

`Cluster.stop` runs on every exit (context manager, atexit, SIGTERM and SIGHUP: its own
handlers, or the caller's if it has some) and leaves nothing behind: pods are deleted so
the kubelets run CNI DEL, then kube-proxy and the kubelets stop, containerd's leftover
tasks are killed, containerd stops, every process left in a node's netns or cgroups is
stopped by PID, mounts under the node directories are unmounted, cgroups removed,
sysctls restored, the network removed, and the last cluster of the machine to stop
removes the paths the kubelet and containerd use whatever they are told (hoststate).
`residue()` lists anything still there; a run killed with SIGKILL is
cleaned by the next one (`cleanup_stale`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..controlplane import ControlPlane, ensure_binaries, polls
from ..images import BuiltImage, build_all
from ..lab.netns import netns_pids, stop_pid
from ..ownership import markers, proc_start_time, write_marker
from . import hoststate
from .network import NodeNetwork
from .node import Node, NodeError

__all__ = ["DEFAULT_NODE_NAMES", "Cluster", "ClusterError", "cleanup_stale", "preflight"]

DEFAULT_NODE_NAMES = ("beamline-01", "beamline-02")
STATE_DIR = hoststate.STATE_DIR
WORK_ROOT = Path("/var/lib/ioc-testbed")
REQUIRED_TOOLS = ("containerd", "runc", "ctr", "nsenter", "ip", "iptables", "conntrack",
                  "buildah", "debootstrap", "gcc")


class ClusterError(RuntimeError):
    """The cluster could not start."""


def preflight() -> str | None:
    """None when a real node can run here, else why not (for a clear skip of the demo)."""
    if sys.platform != "linux":
        return "real nodes need Linux"
    if os.geteuid() != 0:
        return "real nodes need root (network namespaces, mounts, cgroups)"
    missing = [t for t in REQUIRED_TOOLS if not shutil.which(t)]
    if missing:
        return f"missing {', '.join(missing)} (make system-deps installs them)"
    if not Path("/usr/lib/cni/ptp").exists():
        return "no CNI plugins in /usr/lib/cni (apt-get install containernetworking-plugins)"
    return None


class Cluster:
    """See the module doc. Timings of the last start and stop are in `timings`."""

    def __init__(self, nodes: int | Sequence[str] = 2, *, context: Path | None = None,
                 images: Iterable[str] | None = None, keep_logs: bool = False) -> None:
        names = list(DEFAULT_NODE_NAMES[:nodes] if isinstance(nodes, int) else nodes)
        if isinstance(nodes, int) and nodes > len(DEFAULT_NODE_NAMES):
            names += [f"node-{i:02d}" for i in range(len(names) + 1, nodes + 1)]
        self.run_id = secrets.token_hex(3)
        self.context = (context or Path.cwd()).resolve()
        self.image_names = list(images) if images is not None else None
        self.keep_logs = keep_logs
        self.workdir = WORK_ROOT / self.run_id
        self.network = NodeNetwork(self.run_id, names)
        self.plane: ControlPlane | None = None
        self.nodes: list[Node] = []
        self.images: list[BuiltImage] = []
        self.timings: dict[str, float] = {}
        self._sysctls: dict[str, str] = {}
        self._cni_before: set[str] = set()
        self._marker = STATE_DIR / f"{self.run_id}.json"
        # One cgroup for the whole cluster, under this process's own; a child per node.
        self.cgroup = hoststate.CgroupTree(
            f"{hoststate.own_cgroup().rstrip('/')}/ioc-testbed-{self.run_id}")
        self._started = self._stopped = False
        self._saved_handlers: dict[int, Any] = {}

    # -- context manager
    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.stop(keep_logs=self.keep_logs or exc_type is not None)

    @property
    def kubeconfig(self) -> Path:
        assert self.plane is not None
        return self.plane.kubeconfig

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert self.plane is not None
        return self.plane.kubectl(*args, **kwargs)

    # -- start
    def start(self) -> Cluster:
        if self._started:
            return self
        if why := preflight():
            raise ClusterError(why)
        self._started = True
        atexit.register(self.stop)
        self._catch_signals()
        t0 = time.monotonic()
        try:
            cleanup_stale()
            self.images = build_all(self.context, self.image_names)
            self.timings["images"] = time.monotonic() - t0
            t1 = time.monotonic()
            bin_dir = ensure_binaries()
            self._sysctls = hoststate.read_sysctls()
            hoststate.note_shared_paths()
            self._cni_before = hoststate.cni_netns()
            self.workdir.mkdir(parents=True)
            self.cgroup.create()
            self._write_marker()
            slot = self.network.create()
            self.plane = ControlPlane(bin_dir=bin_dir, scheduler=True, address=slot.host_ip,
                                      workdir=self.workdir / "control-plane")
            self.plane.start()
            self._write_marker()  # with the control plane's PIDs
            self.timings["control plane"] = time.monotonic() - t1
            t2 = time.monotonic()
            for address in self.network.nodes:
                node = Node(self.plane, address, self.workdir / address.name,
                            f"{self.cgroup.path}/{address.name}")
                self.nodes.append(node)
                node.start_runtime()
            with ThreadPoolExecutor(len(self.nodes)) as pool:
                for done in [pool.submit(n.import_images, self.images) for n in self.nodes]:
                    done.result()
            for node in self.nodes:
                node.start_kubelet()
            self._write_marker()  # with the nodes' PIDs
            self._wait_nodes_ready()
            self.timings["nodes"] = time.monotonic() - t2
            self.timings["start"] = time.monotonic() - t0
        except BaseException:
            self.stop(keep_logs=True)
            raise
        return self

    def _catch_signals(self) -> None:
        """SIGTERM and SIGHUP (a killed test run, a closed terminal) tear the cluster
        down, then end the process as the signal would have; where the process has its
        own handlers (the demo's), those unwind to `stop` instead."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                self._saved_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stop()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def _wait_nodes_ready(self, timeout: float = 90.0) -> None:
        names = {n.name for n in self.nodes}
        last = ""
        for _ in polls(timeout, 0.5):
            for node in self.nodes:
                node.check_running()
            done = self.kubectl("get", "nodes", "-o", "json", check=False)
            if done.returncode == 0:
                ready = {i["metadata"]["name"] for i in json.loads(done.stdout)["items"]
                         if any(c["type"] == "Ready" and c["status"] == "True"
                                for c in i["status"].get("conditions", []))}
                if names <= ready:
                    return
                last = f"ready: {sorted(ready)}"
        raise ClusterError(f"nodes not Ready within {timeout:.0f} s ({last})\n"
                           + "\n".join(n.log_tails() for n in self.nodes))

    def _write_marker(self) -> None:
        write_marker(self._marker, {
            "workdir": str(self.workdir), "bridge": self.network.bridge,
            "netns": self.network.netns, "sysctls": self._sysctls,
            "cgroup": self.cgroup.path, "cgroup_created": [str(p) for p in self.cgroup.created],
            "processes": [[pid, proc_start_time(pid)] for pid in self.pids()],
        })

    def pids(self) -> list[int]:
        """PIDs of the processes this cluster started (control plane and nodes)."""
        procs = list(self.plane.processes()) if self.plane else []
        procs += [p for node in self.nodes for p in node.procs.values()]
        return [p.popen.pid for p in procs if p.popen is not None]

    # -- stop
    def stop(self, keep_logs: bool | None = None) -> list[str]:
        """Tear everything down (see the module doc); returns what could not be undone."""
        atexit.unregister(self.stop)
        for sig, handler in self._saved_handlers.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, handler)
        self._saved_handlers.clear()
        if self._stopped or not self._started:
            return []
        self._stopped = True
        t0 = time.monotonic()
        problems: list[str] = []
        if self.plane is not None and self.plane.apiserver_running and self.nodes:
            problems += self._delete_pods()
        for node in self.nodes:
            problems += node.stop()
        if self.plane is not None:
            self.plane.stop(keep_logs=False)
        problems += self.cgroup.remove()
        problems += self._remove_cni_netns()
        problems += self.network.destroy()
        self._marker.unlink(missing_ok=True)
        problems += hoststate.remove_shared_paths(len(live_clusters()))
        problems += [f"sysctl {k}" for k in hoststate.restore_sysctls(self._sysctls)]
        for link in hoststate.container_log_links([self.workdir]):
            link.unlink(missing_ok=True)
        keep = self.keep_logs if keep_logs is None else keep_logs
        if keep:
            print(f"cluster logs kept in {self.workdir}", file=sys.stderr)
            for node in self.nodes:  # keep the logs, drop the bulk
                for sub in ("containerd", "kubelet"):
                    shutil.rmtree(node.dir / sub, ignore_errors=True)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.timings["stop"] = time.monotonic() - t0
        return problems

    def _delete_pods(self, timeout: float = 40.0) -> list[str]:
        """Delete every pod so the kubelets stop them and run CNI DEL; controllers first,
        or they would create the pods again."""
        assert self.plane is not None
        self.plane.stop_controllers()
        self.kubectl("delete", "pods", "--all", "--all-namespaces", "--grace-period=1",
                     "--wait=false", check=False, timeout=60)
        for _ in polls(timeout, 0.5):
            if not any(node.sandboxes() for node in self.nodes):
                return []
            if not self.kubectl("get", "pods", "-A", "-o", "name", check=False).stdout:
                # Gone from the API: the kubelets are still stopping them.
                continue
        return [f"node {n.name}: sandboxes left after {timeout:.0f} s: {n.sandboxes()}"
                for n in self.nodes if n.sandboxes()]

    def _remove_cni_netns(self) -> list[str]:
        """Network namespaces our containerds made and did not remove (a failed CNI
        DEL): new since start and without processes (a concurrent run's have some)."""
        problems = []
        for name in sorted(hoststate.cni_netns() - self._cni_before):
            if netns_pids(name):
                continue
            done = subprocess.run(["ip", "netns", "del", name], capture_output=True,
                                  text=True, timeout=20, check=False)
            if done.returncode:
                problems.append(f"netns {name}: {done.stderr.strip()}")
        return problems

    def residue(self) -> list[str]:
        """What is still there after `stop` (empty when the teardown was clean)."""
        left = self.network.residue() + self.cgroup.residue()
        for node in self.nodes:
            left += [f"mount {m}" for m in hoststate.mounts_under(node.dir)]
            left += [f"pid {p} in {node.address.netns}"
                     for p in netns_pids(node.address.netns)] if \
                node.address.netns_path.exists() else []
            left += [f"process {p.name} of {node.name}" for p in node.procs.values()
                     if p.running]
        saved = self._sysctls
        now = hoststate.read_sysctls()
        left += [f"sysctl {k}={now.get(k)} (was {v})" for k, v in saved.items()
                 if now.get(k) != v]
        left += [f"netns {n}" for n in hoststate.cni_netns() - self._cni_before
                 if not netns_pids(n)]
        left += [f"log link {p}" for p in hoststate.container_log_links([self.workdir])]
        if self.workdir.exists() and not self.keep_logs:
            left.append(f"directory {self.workdir}")
        if self._marker.exists():
            left.append(f"marker {self._marker}")
        if not live_clusters():
            left += [f"path {p}" for p in hoststate.shared_paths_left()]
        return left


def live_clusters(state_dir: Path = STATE_DIR) -> list[str]:
    """Run ids of the clusters whose process is alive (their markers)."""
    return [marker.stem for marker, _, alive in markers(state_dir) if alive]


def cleanup_stale(state_dir: Path = STATE_DIR) -> list[str]:
    """Undo what clusters whose process died (SIGKILL) left; returns what was removed."""
    removed: list[str] = []
    for marker, info, alive in markers(state_dir):
        if alive:
            continue
        for pid, start in info.get("processes", []):  # control plane, kubelets, ...
            if proc_start_time(pid) == start:  # the same process, not a reused PID
                stop_pid(pid, grace=5.0)
        for ns in info.get("netns", []):
            if Path(f"/run/netns/{ns}").exists():
                for pid in netns_pids(ns):
                    stop_pid(pid, grace=1.0)
        tree = hoststate.CgroupTree(info.get("cgroup", "/nonexistent"),
                                    [Path(p) for p in info.get("cgroup_created", [])])
        for pid in tree.pids():
            stop_pid(pid, grace=1.0)
        workdir = Path(info.get("workdir", ""))
        if workdir.is_absolute() and workdir.is_relative_to(WORK_ROOT):
            hoststate.unmount_all(workdir)
            for link in hoststate.container_log_links([workdir]):
                link.unlink(missing_ok=True)
            shutil.rmtree(workdir, ignore_errors=True)
        tree.remove()
        for ns in info.get("netns", []):
            with contextlib.suppress(OSError):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20,
                               check=False)
        subprocess.run(["ip", "link", "del", info.get("bridge", "")], capture_output=True,
                       timeout=20, check=False)
        hoststate.restore_sysctls(info.get("sysctls", {}))
        marker.unlink(missing_ok=True)
        removed.append(marker.stem)
    if removed:
        hoststate.remove_shared_paths(len(live_clusters(state_dir)))
    return removed


__all__ += ["NodeError"]
