"""The node network of a real-node cluster: a bridge on the host, one namespace per node.

::

    host netns: bridge itb-<id> 198.18.100.1/24 (the API server listens here)
       |-- veth -- node netns itb-<id>-n0: eth0 198.18.100.10/24
       |              containerd, kubelet, kube-proxy and host-network pods live here;
       |              CNI ptp pods 198.18.128.0/24, each a /32 on its own veth
       |-- veth -- node netns itb-<id>-n1: eth0 198.18.100.11/24, pods 198.18.129.0/24

(for the first cluster on the machine: a second one running at the same time, e.g. the
demo's beside the e2e tests', takes the next slot, 198.18.101.0/24 and 198.18.144.0/20.)

Each node is a network namespace, so two nodes on one machine each have their own
host network (host-mode IOCs on different nodes do not share ports), their own
iptables (kube-proxy's and the kubelet's chains vanish with the namespace) and their own
routes. The host routes each node's pod block to that node, so the API server answers
pods. Pods route only 198.18.0.0/15 (no default route): no test traffic can leave the
range, and nothing reaches the host's DNS resolver.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ..lab.netns import run
from ..ownership import file_lock

SERVICE_CIDR = "198.19.0.0/16"  # the control plane's --service-cluster-ip-range
MAX_NODES = 16
SLOTS = 8  # clusters on one machine at once
NETNS_DIR = Path("/run/netns")
LOCK = Path("/run/ioc-testbed/network.lock")


@dataclass(frozen=True)
class Slot:
    """The addresses of one cluster: slot s has node network 198.18.(100 + s).0/24 (the
    host .1, node i .(10 + i)) and pods 198.18.(128 + 16 s).0/20 (node i a /24)."""

    index: int

    @property
    def node_subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"198.18.{100 + self.index}.0/24")

    @property
    def host_ip(self) -> str:
        """The host's end of the node network: the API server's address."""
        return str(self.node_subnet[1])

    @property
    def pod_cidr(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"198.18.{128 + 16 * self.index}.0/20")


@dataclass(frozen=True)
class NodeAddress:
    index: int
    name: str  # the Kubernetes node name
    netns: str
    slot: Slot

    @property
    def ip(self) -> str:
        return str(self.slot.node_subnet[10 + self.index])

    @property
    def pod_cidr(self) -> ipaddress.IPv4Network:
        return list(self.slot.pod_cidr.subnets(new_prefix=24))[self.index]

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns


def _addresses_in_use() -> list[ipaddress.IPv4Interface]:
    out = run(["ip", "-4", "-o", "addr", "show"], check=False).stdout
    return [ipaddress.IPv4Interface(line.split()[3]) for line in out.splitlines()
            if len(line.split()) > 3]


class NodeNetwork:
    """Creates and removes the bridge, the node namespaces, their links and routes.
    `create` picks the first slot no other cluster uses; `nodes` exist after it."""

    def __init__(self, run_id: str, names: list[str]) -> None:
        if not 0 < len(names) <= MAX_NODES:
            raise ValueError(f"1 to {MAX_NODES} nodes, not {len(names)}")
        self.run_id = run_id
        self.names = names
        self.bridge = f"itb-{run_id}"
        self.netns = [f"itb-{run_id}-n{i}" for i in range(len(names))]
        self.nodes: list[NodeAddress] = []
        self.slot: Slot | None = None

    def veth(self, node: NodeAddress) -> str:
        return f"itb{self.run_id}n{node.index}"  # <= 15 characters (IFNAMSIZ)

    def create(self) -> Slot:
        with file_lock(LOCK, timeout=60):  # held for milliseconds by each cluster
            used = _addresses_in_use()
            free = [s for s in map(Slot, range(SLOTS))
                    if not any(a.ip in s.node_subnet for a in used)]
            if not free:
                raise RuntimeError(f"all {SLOTS} test-bed network slots are in use")
            slot = self.slot = free[0]
            run(["ip", "link", "add", self.bridge, "type", "bridge"])
            run(["ip", "addr", "add", f"{slot.host_ip}/{slot.node_subnet.prefixlen}", "dev",
                 self.bridge])
        self.nodes = [NodeAddress(i, name, self.netns[i], slot)
                      for i, name in enumerate(self.names)]
        run(["ip", "link", "set", self.bridge, "up"])
        for node in self.nodes:
            self._create_node(node)
        for node in self.nodes:
            run(["ip", "route", "add", str(node.pod_cidr), "via", node.ip])
        return slot

    def _create_node(self, node: NodeAddress) -> None:
        ns = node.netns
        run(["ip", "netns", "add", ns])
        run(["ip", "link", "add", self.veth(node), "type", "veth", "peer", "name", "eth0",
             "netns", ns])
        run(["ip", "link", "set", self.veth(node), "master", self.bridge, "up"])

        def in_ns(*argv: str) -> None:
            run(["ip", "netns", "exec", ns, *argv])

        in_ns("ip", "link", "set", "lo", "up")
        # With a broadcast address, like a real NIC (pcas refuses an interface without).
        in_ns("ip", "addr", "add", f"{node.ip}/{node.slot.node_subnet.prefixlen}", "brd", "+",
              "dev", "eth0")
        in_ns("ip", "link", "set", "eth0", "up")
        # Only what the cluster needs: the other nodes' pods, and Services through the
        # host (kube-proxy DNATs them before routing; a route must still exist).
        for other in self.nodes:
            if other is not node:
                in_ns("ip", "route", "add", str(other.pod_cidr), "via", other.ip)
        in_ns("ip", "route", "add", SERVICE_CIDR, "via", node.slot.host_ip)
        in_ns("sysctl", "-qw", "net.ipv4.ip_forward=1")  # per namespace: pods route here

    def destroy(self) -> list[str]:
        """Remove everything (routes go with their links); returns what failed."""
        problems = []
        for netns in self.netns:
            if (NETNS_DIR / netns).exists():
                done = run(["ip", "netns", "del", netns], check=False)
                if done.returncode:
                    problems.append(f"netns {netns}: {done.stderr.strip()}")
        if Path(f"/sys/class/net/{self.bridge}").exists():
            done = run(["ip", "link", "del", self.bridge], check=False)
            if done.returncode:
                problems.append(f"bridge {self.bridge}: {done.stderr.strip()}")
        return problems

    def residue(self) -> list[str]:
        left = [f"netns {n}" for n in self.netns if (NETNS_DIR / n).exists()]
        left += [f"link {name}" for name in [self.bridge, *map(self.veth, self.nodes)]
                 if Path(f"/sys/class/net/{name}").exists()]
        routes = run(["ip", "route", "show"], check=False).stdout
        left += [f"route {line}" for line in routes.splitlines()
                 if any(line.startswith(str(n.pod_cidr)) for n in self.nodes)]
        return left
