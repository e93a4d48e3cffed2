"""A throw-away, broadcast-less network lab made of Linux network namespaces.

Topology (Calico-like, see docs/lab.md)::

    fabric netns: bridge br0 (the node network, 198.18.0.0/24, no uplink)
      |-- veth -- node netns n0: eth0 198.18.0.10/24, caliXXXXXXXXXXX per pod
      |              |-- veth -- pod netns: eth0 198.18.16.2/32, default via 169.254.1.1
      |-- veth -- node netns n1: eth0 198.18.0.11/24 ... pods 198.18.17.x/32

Every pod has its own /32 address and a point-to-point veth to its node; the node answers
ARP for the link-local gateway (proxy_arp), routes each pod with a /32 route and other
nodes' pod blocks via their node IP. No L2 segment is shared between pods, so broadcasts
do not cross pods. ClusterIPs are kube-proxy-like iptables DNAT rules in every node.

Needs root, ``ip`` (iproute2) and ``iptables``. Everything is torn down on exit, on
SIGTERM/SIGHUP and at interpreter exit; processes are stopped by PID.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..ownership import markers, write_marker

__all__ = [
    "CLUSTER_IP_RANGE",
    "LINK_LOCAL_GW",
    "NODE_NET",
    "POD_NET",
    "Lab",
    "LabError",
    "Node",
    "Pod",
    "ServicePort",
    "cleanup_stale",
    "listening_ports",
    "netns_pids",
    "stop_pid",
]

NODE_NET = ipaddress.IPv4Network("198.18.0.0/24")
POD_NET = ipaddress.IPv4Network("198.18.16.0/20")  # one /24 block per node
CLUSTER_IP_RANGE = ipaddress.IPv4Network("198.19.0.0/16")
LAB_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
LINK_LOCAL_GW = "169.254.1.1"
NODE_HOST_OFFSET = 10  # node i gets 198.18.0.(10 + i)
MAX_NODES = 16  # 198.18.16.0/20 has sixteen /24 blocks
STATE_DIR = Path("/run/ioc-lab")
NAME_PREFIX = "iol"
SERVICE_CHAIN = "LAB-SERVICES"
IFNAMSIZ = 15
CMD_TIMEOUT = 20.0  # seconds for one ip/iptables command
CALICO_MAC = "ee:ee:ee:ee:ee:ee"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

ServicePort = tuple[str, int, int]  # (protocol "tcp"/"udp", port, targetPort)


class LabError(RuntimeError):
    """A lab command failed."""


def _check_ifname(name: str) -> str:
    if not 0 < len(name) <= IFNAMSIZ:
        raise LabError(f"interface name {name!r} is longer than {IFNAMSIZ} characters")
    return name


def _check_lab_address(addr: str) -> str:
    """Refuse any address outside 198.18.0.0/15 (the only range the lab may use)."""
    ip = ipaddress.IPv4Address(addr)
    if ip not in LAB_RANGE:
        raise LabError(f"{addr} is outside the lab range {LAB_RANGE}")
    return addr


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = CMD_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command with a bounded time; raise LabError on failure when ``check``."""
    try:
        proc = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout}s: {' '.join(argv)}") from exc
    if check and proc.returncode != 0:
        raise LabError(
            f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}"
        )
    return proc


def netns_pids(ns: str) -> list[int]:
    """PIDs of processes whose network namespace is ``ns``."""
    proc = run(["ip", "netns", "pids", ns], check=False, timeout=10)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def stop_pid(pid: int, grace: float = 3.0, popen: subprocess.Popen[Any] | None = None) -> None:
    """Stop one process by PID: SIGTERM, wait up to ``grace`` s, then SIGKILL (bounded)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 3.0)):
        if popen is not None and popen.poll() is not None:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if popen is not None:
                if popen.poll() is not None:
                    return
            elif not _pid_alive(pid):
                return
            time.sleep(0.02)
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=1)


def _read_proc_net(pid: int, name: str) -> list[list[str]]:
    try:
        with open(f"/proc/{pid}/net/{name}") as f:
            return [line.split() for line in f.readlines()[1:]]
    except OSError:
        return []


def listening_ports(pid: int) -> dict[str, set[int]]:
    """Ports of the sockets owned by ``pid``: TCP sockets in LISTEN and bound UDP sockets.

    Reads ``/proc/<pid>/fd`` and ``/proc/<pid>/net/*``, so it sees the process's own network
    namespace. Returns ``{"tcp": {...}, "udp": {...}}`` (IPv4 and IPv6 together).
    """
    inodes: set[str] = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    except OSError:
        return {"tcp": set(), "udp": set()}
    out: dict[str, set[int]] = {"tcp": set(), "udp": set()}
    for proto in ("tcp", "udp"):
        for table in (proto, proto + "6"):
            for cols in _read_proc_net(pid, table):
                if len(cols) < 10 or cols[9] not in inodes:
                    continue
                if proto == "tcp" and cols[3] != "0A":  # 0A = LISTEN
                    continue
                out[proto].add(int(cols[1].rsplit(":", 1)[1], 16))
    return out


@dataclass
class Node:
    """A Kubernetes node: a network namespace with a NIC on the node network."""

    index: int
    ns: str
    ip: str
    pod_block: ipaddress.IPv4Network
    next_host: int = 2

    @property
    def name(self) -> str:
        return f"n{self.index}"


@dataclass
class Pod:
    """A pod: its own network namespace, a /32 on eth0 and a veth to its node."""

    name: str
    ns: str
    ip: str
    node: Node
    host_if: str


@dataclass
class _Service:
    cluster_ip: str
    ports: list[ServicePort]
    backend_ip: str
    rules: list[list[str]] = field(default_factory=list)


_LIVE: set[Lab] = set()
_LIVE_LOCK = threading.Lock()
_HANDLERS_INSTALLED = False


def _close_live_labs() -> None:
    with _LIVE_LOCK:
        labs = list(_LIVE)
    for lab in labs:
        with contextlib.suppress(Exception):
            lab.close()


def _on_signal(signum: int, _frame: Any) -> None:
    """Tear every live lab down, then die of the same signal."""
    _close_live_labs()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_close_live_labs)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _on_signal)


def cleanup_stale(state_dir: Path = STATE_DIR) -> list[str]:
    """Remove namespaces left by labs whose owning process died (e.g. SIGKILL).

    Each lab writes ``<state_dir>/<run id>.json`` with its owner PID; returns the
    namespaces that were removed.
    """
    removed: list[str] = []
    for marker, info, alive in markers(state_dir):
        if alive:
            continue
        existing = set(_list_netns())
        for ns in info.get("netns", []):
            if ns in existing:
                for pid in netns_pids(ns):
                    stop_pid(pid, grace=1.0)
                run(["ip", "netns", "del", ns], check=False)
                removed.append(ns)
        shutil.rmtree(info.get("tmpdir", ""), ignore_errors=True)
        marker.unlink(missing_ok=True)
    return removed


def _list_netns() -> list[str]:
    proc = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


class Lab:
    """A broadcast-less, Calico-style network of namespaces. Use as a context manager.

    >>> with Lab(nodes=2) as lab:
    ...     pod = lab.add_pod(lab.nodes[0])
    ...     lab.add_service("198.19.0.10", [("udp", 5064, 5064)], pod.ip)
    ...     lab.exec(pod, ["ip", "addr"])
    """

    def __init__(self, nodes: int = 1, *, keep_dir: bool = False) -> None:
        self.run_id = secrets.token_hex(3)
        self.prefix = f"{NAME_PREFIX}-{self.run_id}"
        self.fabric_ns = f"{self.prefix}-fab"
        self.nodes: list[Node] = []
        self.pods: dict[str, Pod] = {}
        self.services: dict[str, _Service] = {}
        self.processes: list[subprocess.Popen[Any]] = []
        self._initial_nodes = nodes
        self._netns: list[str] = []
        self._netns_inodes: dict[str, int] = {}
        self._keep_dir = keep_dir
        self._closed = False
        self._started = False
        self._lock = threading.RLock()
        self.tmpdir = Path(tempfile.gettempdir()) / self.prefix  # created by start()
        self._marker = STATE_DIR / f"{self.run_id}.json"

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Lab:
        """Create the fabric namespace and the initial nodes."""
        if os.geteuid() != 0:
            raise LabError("the network lab needs root (network namespaces, veth, iptables)")
        for tool in ("ip", "iptables"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} not found: apt-get install -y iproute2 iptables")
        with _LIVE_LOCK:
            _LIVE.add(self)
        _install_handlers()
        self._started = True
        self.tmpdir.mkdir(mode=0o700)
        try:
            self._add_netns(self.fabric_ns)
            self._ip(self.fabric_ns, "link add br0 type bridge")
            self._ip(self.fabric_ns, "link set br0 up")
            for _ in range(self._initial_nodes):
                self.add_node()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every process (by PID) and delete every namespace. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not self._started:
            return
        try:
            for popen in reversed(self.processes):
                with contextlib.suppress(Exception):
                    if popen.stdin:
                        popen.stdin.close()
                with contextlib.suppress(Exception):
                    stop_pid(popen.pid, grace=2.0, popen=popen)
            # Anything else still living in our namespaces (e.g. detached repeaters).
            for ns in reversed(self._netns):
                for _ in range(3):
                    pids = netns_pids(ns)
                    if not pids:
                        break
                    for pid in pids:
                        stop_pid(pid, grace=1.0)
            for ns in reversed(self._netns):
                run(["ip", "netns", "del", ns], check=False)
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(self)
            self._marker.unlink(missing_ok=True)
            if not self._keep_dir:
                shutil.rmtree(self.tmpdir, ignore_errors=True)

    def residue(self) -> list[str]:
        """What survived teardown: namespaces still listed, processes still inside them."""
        left = [f"netns {ns}" for ns in set(_list_netns()) & set(self._netns)]
        inodes = set(self._netns_inodes.values())
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes and _pid_alive(int(entry)):
                    left.append(f"pid {entry}")
        left += [f"pid {p.pid}" for p in self.processes if p.poll() is None]
        return sorted(set(left))

    @property
    def netns(self) -> list[str]:
        """Names of every namespace this lab created."""
        return list(self._netns)

    # ------------------------------------------------------------------ building
    def _add_netns(self, ns: str) -> None:
        run(["ip", "netns", "add", ns])
        self._netns.append(ns)
        with contextlib.suppress(OSError):
            self._netns_inodes[ns] = os.stat(f"/run/netns/{ns}").st_ino
        self._write_marker()
        self._ip(ns, "link set lo up")
        # Nothing leaves the lab's addresses, not even a library's DNS query to the
        # host's resolver: refused at once inside the namespace.
        # (Broadcasts stay on the link; the lab tests that they do not cross pods.)
        for rule in (["-o", "lo", "-j", "ACCEPT"], ["-d", str(LAB_RANGE), "-j", "ACCEPT"],
                     ["-d", "255.255.255.255", "-j", "ACCEPT"], ["-j", "REJECT"]):
            self._iptables(ns, ["-A", "OUTPUT", *rule])

    def _write_marker(self) -> None:
        write_marker(self._marker, {"netns": self._netns, "tmpdir": str(self.tmpdir)})

    def _ip(self, ns: str | None, args: str) -> None:
        argv = ["ip"] + (["-n", ns] if ns else []) + args.split()
        run(argv)

    def _sh(self, ns: str, script: str) -> None:
        run(["ip", "netns", "exec", ns, "sh", "-ec", script])

    def add_node(self) -> Node:
        """Add a node namespace on the node network; routes to and from other nodes."""
        with self._lock:
            index = len(self.nodes)
            if index >= MAX_NODES:
                raise LabError(f"at most {MAX_NODES} nodes")
            ns = f"{self.prefix}-n{index}"
            ip = str(NODE_NET.network_address + NODE_HOST_OFFSET + index)
            block = list(POD_NET.subnets(new_prefix=24))[index]
            node = Node(index=index, ns=ns, ip=_check_lab_address(ip), pod_block=block)
            self._add_netns(ns)
            fab_if = _check_ifname(f"veth-n{index}")
            self._ip(
                None,
                f"link add eth0 netns {ns} type veth peer name {fab_if} netns {self.fabric_ns}",
            )
            self._ip(self.fabric_ns, f"link set {fab_if} master br0 up")
            self._ip(ns, f"addr add {ip}/{NODE_NET.prefixlen} brd + dev eth0")
            self._ip(ns, "link set eth0 up")
            # ClusterIPs need a route before the OUTPUT NAT hook, and proxy ARP answers only
            # for addresses routed out of another device: route both out of eth0 (a real
            # node would use its default route; this lab has no uplink).
            self._ip(ns, f"route add {CLUSTER_IP_RANGE} dev eth0")
            self._ip(ns, f"route add {LINK_LOCAL_GW}/32 dev eth0")
            self._ip(ns, f"route add blackhole {block}")  # like Calico's block route
            self._sh(ns, "sysctl -qw net.ipv4.ip_forward=1")
            self._iptables(ns, ["-t", "nat", "-N", SERVICE_CHAIN])
            for chain in ("PREROUTING", "OUTPUT"):
                self._iptables(ns, ["-t", "nat", "-A", chain, "-j", SERVICE_CHAIN])
            for other in self.nodes:
                self._ip(ns, f"route add {other.pod_block} via {other.ip} dev eth0")
                self._ip(other.ns, f"route add {block} via {ip} dev eth0")
            self.nodes.append(node)
            for svc in self.services.values():
                for rule in svc.rules:
                    self._iptables(ns, ["-t", "nat", "-A", SERVICE_CHAIN, *rule])
            return node

    def add_pod(self, node: Node | int = 0, name: str | None = None) -> Pod:
        """Add a pod namespace on ``node`` with a /32 address, Calico style."""
        with self._lock:
            if isinstance(node, int):
                node = self.nodes[node]
            index = len(self.pods)
            name = name or f"p{index}"
            if name in self.pods:
                raise LabError(f"pod {name!r} exists")
            if node.next_host > 254:
                raise LabError(f"node {node.name} has no free pod address")
            ip = _check_lab_address(str(node.pod_block.network_address + node.next_host))
            node.next_host += 1
            ns = f"{self.prefix}-p{index}"
            digest = hashlib.sha1(f"{self.run_id}/{name}".encode()).hexdigest()
            host_if = _check_ifname(f"cali{digest[:11]}")
            self._add_netns(ns)
            self._ip(
                None, f"link add eth0 netns {ns} type veth peer name {host_if} netns {node.ns}"
            )
            self._ip(node.ns, f"link set {host_if} address {CALICO_MAC}")
            self._sh(
                node.ns,
                f"sysctl -qw net.ipv4.conf.{host_if}.proxy_arp=1 "
                f"net.ipv4.neigh.{host_if}.proxy_delay=0 "
                f"net.ipv4.conf.{host_if}.forwarding=1",
            )
            self._ip(node.ns, f"link set {host_if} up")
            self._ip(node.ns, f"route add {ip}/32 dev {host_if} scope link")
            self._ip(ns, f"addr add {ip}/32 dev eth0")
            self._ip(ns, "link set eth0 up")
            self._ip(ns, f"route add {LINK_LOCAL_GW} dev eth0 scope link")
            self._ip(ns, f"route add default via {LINK_LOCAL_GW} dev eth0 onlink")
            pod = Pod(name=name, ns=ns, ip=ip, node=node, host_if=host_if)
            self.pods[name] = pod
            return pod

    # ------------------------------------------------------------------ services
    def _iptables(self, ns: str, args: list[str]) -> None:
        run(["ip", "netns", "exec", ns, "iptables", "-w", "5", *args])

    def add_service(self, cluster_ip: str, ports: Iterable[ServicePort], backend_ip: str) -> None:
        """kube-proxy-like ClusterIP: DNAT ``cluster_ip:port`` to ``backend_ip:target``.

        One rule per (protocol, port) in every node's nat ``LAB-SERVICES`` chain, which is
        jumped to from PREROUTING (pod traffic) and OUTPUT (host-network traffic). No SNAT.
        """
        if ipaddress.IPv4Address(cluster_ip) not in CLUSTER_IP_RANGE:
            raise LabError(f"ClusterIP {cluster_ip} is outside {CLUSTER_IP_RANGE}")
        _check_lab_address(backend_ip)
        with self._lock:
            if cluster_ip in self.services:
                self.remove_service(cluster_ip)
            svc = _Service(cluster_ip, [], backend_ip)
            for proto, port, target in ports:
                proto = proto.lower()
                if proto not in ("tcp", "udp"):
                    raise LabError(f"protocol {proto!r} is not tcp or udp")
                svc.ports.append((proto, int(port), int(target)))
                svc.rules.append(
                    f"-d {cluster_ip}/32 -p {proto} -m {proto} --dport {port} "
                    f"-m comment --comment svc:{cluster_ip} "
                    f"-j DNAT --to-destination {backend_ip}:{target}".split()
                )
            for node in self.nodes:
                for rule in svc.rules:
                    self._iptables(node.ns, ["-t", "nat", "-A", SERVICE_CHAIN, *rule])
            self.services[cluster_ip] = svc

    def remove_service(self, cluster_ip: str) -> None:
        """Delete a ClusterIP's DNAT rules from every node."""
        with self._lock:
            svc = self.services.pop(cluster_ip, None)
            if svc is None:
                return
            for node in self.nodes:
                for rule in svc.rules:
                    self._iptables(node.ns, ["-t", "nat", "-D", SERVICE_CHAIN, *rule])
            if svc.rules and shutil.which("conntrack"):
                for node in self.nodes:
                    # Drop conntrack entries so a later service on this IP starts clean.
                    run(
                        ["ip", "netns", "exec", node.ns, "conntrack", "-D", "-d", cluster_ip],
                        check=False,
                    )

    def nat_rules(self, node: Node | int = 0) -> list[str]:
        """``iptables -t nat -S`` of a node (for inspection and tests)."""
        if isinstance(node, int):
            node = self.nodes[node]
        proc = run(["ip", "netns", "exec", node.ns, "iptables", "-w", "5", "-t", "nat", "-S"])
        return proc.stdout.splitlines()

    # ------------------------------------------------------------------ processes
    @staticmethod
    def _ns_name(where: str | Node | Pod) -> str:
        return where if isinstance(where, str) else where.ns

    def make_env(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """A clean environment: PATH, HOME, LANG and PYTHONUNBUFFERED plus ``env``."""
        base = {
            "PATH": f"{Path(sys.executable).parent}:{BASE_PATH}",
            "HOME": str(self.tmpdir),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        base.update(env or {})
        return base

    def exec(
        self,
        where: str | Node | Pod,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion in a namespace with a clean ``env`` (bounded)."""
        ns = self._ns_name(where)
        try:
            return subprocess.run(
                ["ip", "netns", "exec", ns, *argv],
                env=self.make_env(env),
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=self.tmpdir,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"timed out after {timeout}s in {ns}: {' '.join(argv)}") from exc

    def spawn(
        self,
        where: str | Node | Pod,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        stdin: int | IO[Any] | None = subprocess.PIPE,
        log: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process in a namespace; it is stopped by PID at teardown.

        stdout and stderr go to ``log`` (default: a file in the lab's temp dir). stdin is a
        pipe by default (some servers exit when it closes).
        """
        if self._closed:
            raise LabError("lab is closed")
        ns = self._ns_name(where)
        log = log or self.tmpdir / f"{ns}-{len(self.processes)}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                env=self.make_env(env),
                stdin=stdin,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.tmpdir,
                start_new_session=True,
            )
        popen.log_path = log  # type: ignore[attr-defined]
        self.processes.append(popen)
        return popen

    def stop(self, popen: subprocess.Popen[Any], grace: float = 2.0) -> int | None:
        """Stop one spawned process by PID (closing its stdin first); return its exit code."""
        with contextlib.suppress(Exception):
            if popen.stdin:
                popen.stdin.close()
        stop_pid(popen.pid, grace=grace, popen=popen)
        return popen.poll()
