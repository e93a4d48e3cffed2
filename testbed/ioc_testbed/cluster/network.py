"""The node network of a real-node cluster: a bridge on the host, one namespace per node.

::

    host netns: bridge itb-<id> 198.18.100.1/24 (the API server listens here)
       |-- veth -- node netns itb-<id>-n0: eth0 198.18.100.10/24
       |              containerd, kubelet, kube-proxy and host-network pods live here;
       |              CNI ptp pods 198.18.128.0/24, each a /32 on its own veth
       |-- veth -- node netns itb-<id>-n1: eth0 198.18.100.11/24, pods 198.18.129.0/24

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

NODE_SUBNET = ipaddress.IPv4Network("198.18.100.0/24")
HOST_IP = "198.18.100.1"  # the host's end of the node network; the API server's address
POD_CIDR = ipaddress.IPv4Network("198.18.128.0/17")  # node i: 198.18.(128 + i).0/24
SERVICE_CIDR = "198.19.0.0/16"  # the control plane's --service-cluster-ip-range
MAX_NODES = 16
NETNS_DIR = Path("/run/netns")


@dataclass(frozen=True)
class NodeAddress:
    index: int
    name: str  # the Kubernetes node name
    netns: str
    ip: str
    pod_cidr: ipaddress.IPv4Network

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns


def node_addresses(run_id: str, names: list[str]) -> list[NodeAddress]:
    if not 0 < len(names) <= MAX_NODES:
        raise ValueError(f"1 to {MAX_NODES} nodes, not {len(names)}")
    blocks = list(POD_CIDR.subnets(new_prefix=24))
    return [NodeAddress(i, name, f"itb-{run_id}-n{i}", str(NODE_SUBNET[10 + i]), blocks[i])
            for i, name in enumerate(names)]


class NodeNetwork:
    """Creates and removes the bridge, the node namespaces, their links and routes."""

    def __init__(self, run_id: str, nodes: list[NodeAddress]) -> None:
        self.run_id = run_id
        self.nodes = nodes
        self.bridge = f"itb-{run_id}"

    def veth(self, node: NodeAddress) -> str:
        return f"itb{self.run_id}n{node.index}"  # <= 15 characters (IFNAMSIZ)

    def create(self) -> None:
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        run(["ip", "addr", "add", f"{HOST_IP}/{NODE_SUBNET.prefixlen}", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])
        for node in self.nodes:
            self._create_node(node)
        for node in self.nodes:
            run(["ip", "route", "add", str(node.pod_cidr), "via", node.ip])

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
        in_ns("ip", "addr", "add", f"{node.ip}/{NODE_SUBNET.prefixlen}", "brd", "+", "dev",
              "eth0")
        in_ns("ip", "link", "set", "eth0", "up")
        # Only what the cluster needs: the other nodes' pods, and Services through the
        # host (kube-proxy DNATs them before routing; a route must still exist).
        for other in self.nodes:
            if other is not node:
                in_ns("ip", "route", "add", str(other.pod_cidr), "via", other.ip)
        in_ns("ip", "route", "add", SERVICE_CIDR, "via", HOST_IP)
        in_ns("sysctl", "-qw", "net.ipv4.ip_forward=1")  # per namespace: pods route here

    def destroy(self) -> list[str]:
        """Remove everything (routes go with their links); returns what failed."""
        problems = []
        for node in self.nodes:
            if node.netns_path.exists():
                done = run(["ip", "netns", "del", node.netns], check=False)
                if done.returncode:
                    problems.append(f"netns {node.netns}: {done.stderr.strip()}")
        if Path(f"/sys/class/net/{self.bridge}").exists():
            done = run(["ip", "link", "del", self.bridge], check=False)
            if done.returncode:
                problems.append(f"bridge {self.bridge}: {done.stderr.strip()}")
        return problems

    def residue(self) -> list[str]:
        left = [f"netns {n.netns}" for n in self.nodes if n.netns_path.exists()]
        left += [f"link {name}" for name in [self.bridge, *map(self.veth, self.nodes)]
                 if Path(f"/sys/class/net/{name}").exists()]
        routes = run(["ip", "route", "show"], check=False).stdout
        left += [f"route {line}" for line in routes.splitlines()
                 if any(line.startswith(str(n.pod_cidr)) for n in self.nodes)]
        return left
