"""One real Kubernetes node: containerd, kubelet and kube-proxy in a network namespace.

The kubelet and kube-proxy are built from the same ``k8s.io/kubernetes`` module as the
API server; containerd, runc and the CNI plugins are Debian's. Every path the three
write is under the node's own directory (containerd's root and state, the kubelet's root
and pod logs, the CNI configuration and IP allocations), except what their code fixes
(see hoststate). The processes run with the node's network namespace but the host's
mount namespace (``nsenter --net``): the kubelet mounts volumes that containerd's
containers must see. Settings and why: docs/real-node.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from ..controlplane import ChildProcess, ControlPlane, log_tail, polls, write_kubeconfig
from ..images import PAUSE_IMAGE, BuiltImage
from ..lab.netns import netns_pids, stop_pid
from .hoststate import DEVICE_PLUGIN_SOCKET, CgroupTree, host_lock, made_ns, unmount_all
from .network import NodeAddress

CNI_BIN = Path("/usr/lib/cni")
CTR_TIMEOUT = 300.0


class NodeError(RuntimeError):
    """A node could not start, or did not stop cleanly."""


class Node:
    """A node of `plane`, started with `start` and removed with `stop` (see module doc)."""

    def __init__(self, plane: ControlPlane, address: NodeAddress, workdir: Path,
                 cgroup: str) -> None:
        self.plane = plane
        self.address = address
        self.name = address.name
        self.dir = workdir
        self.cgroup = CgroupTree(cgroup)
        self.procs: dict[str, ChildProcess] = {}
        self.timings: dict[str, float] = {}

    # -- paths
    @property
    def socket(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def ip(self) -> str:
        return self.address.ip

    def _nsenter(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net={self.address.netns_path}", "--", *argv]

    # -- configuration
    def _write_configs(self) -> None:
        d = self.dir
        for sub in ("containerd", "kubelet", "pod-logs", "cni/net.d", "cni/ipam", "runc",
                    "volume-plugins", "logs"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "containerd.toml").write_text(self._containerd_toml())
        (d / "cni/net.d/10-ioc-testbed.conflist").write_text(json.dumps(self._cni(), indent=2))
        # Pods (and host-network pods) get no resolver: nothing may reach the host's DNS.
        (d / "resolv.conf").write_text("nameserver 127.0.0.1\noptions ndots:1\n")
        pki = self.plane.pki
        assert pki is not None
        kubelet = pki.issue_client(f"kubelet-{self.name}", f"system:node:{self.name}",
                                   ["system:nodes"])
        proxy = pki.issue_client(f"kube-proxy-{self.name}", "system:kube-proxy")
        write_kubeconfig(d / "kubelet.kubeconfig", self.plane.server, pki.ca.cert, kubelet,
                         f"system:node:{self.name}")
        write_kubeconfig(d / "kube-proxy.kubeconfig", self.plane.server, pki.ca.cert, proxy,
                         "system:kube-proxy")
        (d / "kubelet.yaml").write_text(yaml.safe_dump(self._kubelet_config(pki.ca.cert)))
        (d / "kube-proxy.yaml").write_text(yaml.safe_dump(self._proxy_config()))

    def _containerd_toml(self) -> str:
        d = self.dir
        return f"""\
version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # Without it every sandbox fails: runc cannot write a negative oom_score_adj here
  # (no CAP_SYS_RESOURCE), "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{d}/cni/net.d"
    max_conf_num = 1
"""

    def _cni(self) -> dict[str, Any]:
        """Calico-like: each pod a /32 on its own veth (ptp), no broadcast between pods,
        no masquerade, and a route to 198.18.0.0/15 only."""
        return {
            "cniVersion": "1.0.0",
            "name": f"ioc-testbed-{self.name}",
            "plugins": [
                {
                    "type": "ptp",
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(self.address.pod_cidr)}]],
                        "routes": [{"dst": "198.18.0.0/15"}],
                        "dataDir": str(self.dir / "cni/ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    def _kubelet_config(self, ca: Path) -> dict[str, Any]:
        d = self.dir
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.ip,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(ca)}},
            "authorization": {"mode": "AlwaysAllow"},
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            # These machines run cgroup v1 without systemd or swap accounting.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "failSwapOn": False,
            # Pods inside the cgroup of the process that started the node.
            "cgroupRoot": self.cgroup.path,
            "cgroupsPerQOS": True,
            "enforceNodeAllocatable": ["pods"],
            "resolvConf": str(d / "resolv.conf"),
            "clusterDomain": "cluster.local",
            # Images are imported, never pulled: never collect them; never evict for disk.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "podLogsDir": str(d / "pod-logs"),
            "volumePluginDir": str(d / "volume-plugins"),
            "serializeImagePulls": False,
            "localStorageCapacityIsolation": False,
            "syncFrequency": "10s",  # ConfigMap volumes follow edits within seconds
            "nodeStatusUpdateFrequency": "5s",
            "shutdownGracePeriod": "0s",
            "maxPods": 110,
            "rotateCertificates": False,
        }

    def _proxy_config(self) -> dict[str, Any]:
        return {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.dir / "kube-proxy.kubeconfig")},
            "hostnameOverride": self.name,
            "bindAddress": self.ip,
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            "mode": "iptables",
            "clusterCIDR": str(self.address.slot.pod_cidr),
            "nodePortAddresses": [f"{self.ip}/32"],
            "iptables": {"localhostNodePorts": False, "syncPeriod": "30s",
                         "minSyncPeriod": "0s"},
            # Zero: leave the host's conntrack sysctls as they are.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s"},
        }

    # -- lifecycle
    def start_runtime(self) -> None:
        """Configuration, cgroup, containerd. Then `import_images` (any thread) and
        `start_kubelet` (processes start from the main thread: their parent-death signal
        belongs to the thread that forks them)."""
        t0 = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_configs()
        self.cgroup.create()
        bins = self.plane.bin_dir
        assert bins is not None
        logs = self.dir / "logs"
        self.procs["containerd"] = ChildProcess(
            "containerd", self._nsenter("containerd", "--config",
                                        str(self.dir / "containerd.toml")),
            logs / "containerd.log")
        self.procs["kubelet"] = ChildProcess("kubelet", self._nsenter(
            str(bins / "kubelet"), f"--config={self.dir / 'kubelet.yaml'}",
            f"--kubeconfig={self.dir / 'kubelet.kubeconfig'}",
            f"--root-dir={self.dir / 'kubelet'}", f"--cert-dir={self.dir / 'kubelet/pki'}",
            f"--node-ip={self.ip}", f"--hostname-override={self.name}",
            f"--node-labels=ioc-testbed/node-index={self.address.index}", "--v=1"),
            logs / "kubelet.log")
        self.procs["kube-proxy"] = ChildProcess("kube-proxy", self._nsenter(
            str(bins / "kube-proxy"), f"--config={self.dir / 'kube-proxy.yaml'}", "--v=1"),
            logs / "kube-proxy.log")
        self.procs["containerd"].start()
        self._wait_containerd()
        self.timings["containerd"] = time.monotonic() - t0

    def start_kubelet(self, timeout: float = 60.0) -> None:
        """kubelet, then kube-proxy. Every kubelet of the machine serves its device
        plugin registry at one fixed path, wiping the directory first: two starting at
        once fail "address already in use". So one at a time, each until its socket is
        there (the next one replaces it; nothing here uses device plugins)."""
        with host_lock("kubelet-start", timeout=2 * timeout):
            # A socket made after this (not its inode: ext4 reuses it at once).
            started_ns = time.time_ns()
            self.procs["kubelet"].start()
            for _ in polls(timeout, 0.05):
                self.check_running()
                if (made_ns(DEVICE_PLUGIN_SOCKET) or 0) >= started_ns:
                    break
            else:
                raise NodeError(f"kubelet of {self.name} served no device plugin socket "
                                f"within {timeout:.0f} s:\n{self.procs['kubelet'].describe()}")
        self.procs["kube-proxy"].start()

    def ctr(self, *args: str, timeout: float = CTR_TIMEOUT,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["ctr", "--address", str(self.socket), "--namespace", "k8s.io",
                               *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
        if check and done.returncode:
            raise NodeError(f"ctr {' '.join(args)}: {done.stderr.strip()}")
        return done

    def import_images(self, images: list[BuiltImage]) -> None:
        t0 = time.monotonic()
        have = set(self.ctr("images", "ls", "-q").stdout.split())
        for image in images:
            if image.name not in have:
                self.ctr("images", "import", "--no-unpack=false", str(image.archive))
        have = set(self.ctr("images", "ls", "-q").stdout.split())
        missing = [i.name for i in images if i.name not in have]
        if missing:
            raise NodeError(f"node {self.name}: images not imported: {missing}")
        self.timings["images"] = time.monotonic() - t0

    def _wait_containerd(self, timeout: float = 30.0) -> None:
        for _ in polls(timeout, 0.1):
            if not self.procs["containerd"].running:
                break
            if self.socket.exists() and self.ctr("version", timeout=10,
                                                  check=False).returncode == 0:
                return
        raise NodeError(f"containerd of {self.name} did not start:\n"
                        f"{self.procs['containerd'].describe()}")

    def check_running(self) -> None:
        for proc in self.procs.values():
            if proc.popen is not None and not proc.running:
                raise NodeError(f"{proc.name} of node {self.name} exited:\n{proc.describe()}")

    def describe(self) -> str:
        return "\n".join(p.describe() for p in self.procs.values())

    # -- teardown
    def sandboxes(self) -> list[str]:
        """Pod sandboxes containerd still has (each holds a pause process and a netns)."""
        done = self.ctr("containers", "ls", "-q", "labels.io.cri-containerd.kind==sandbox",
                        timeout=20, check=False)
        return done.stdout.split() if done.returncode == 0 else []

    def stop(self) -> list[str]:
        """Stop everything of this node (see docs/real-node.md for the order)."""
        problems: list[str] = []
        for name in ("kube-proxy", "kubelet"):
            if name in self.procs:
                self.procs[name].stop()
        if "containerd" in self.procs and self.procs["containerd"].running:
            # Whatever the kubelet left: kill the tasks, then remove them.
            done = self.ctr("tasks", "ls", "-q", timeout=20, check=False)
            for task in done.stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, timeout=20, check=False)
            for _ in polls(10, 0.2):
                if not self.ctr("tasks", "ls", "-q", timeout=20, check=False).stdout.split():
                    break
            for task in self.ctr("tasks", "ls", "-q", timeout=20, check=False).stdout.split():
                self.ctr("tasks", "delete", "--force", task, timeout=20, check=False)
        if "containerd" in self.procs:
            self.procs["containerd"].stop()
        # containerd-shims outlive containerd by design; they are in the node's netns
        # and in our cgroups. Stop them (and anything else there) by PID.
        for pid in set(netns_pids(self.address.netns)) | self.cgroup.pids():
            stop_pid(pid, grace=2.0)
        problems += unmount_all(self.dir)
        problems += self.cgroup.remove()
        return problems

    def remove_files(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tails(self) -> str:
        return "\n".join(f"--- {p.name} of {self.name}:\n{log_tail(p.log_path)}"
                         for p in self.procs.values())
