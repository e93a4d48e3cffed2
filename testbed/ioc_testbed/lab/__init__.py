"""Network-namespace lab: a broadcast-less, Calico-style cluster network with real EPICS
servers and clients (see docs/lab.md). Needs root, iproute2 and iptables."""

from .clients import ClientCall, ClientResult, run_client, run_clients
from .netns import Lab, LabError, Node, Pod
from .servers import KINDS, EpicsServer, start_server

__all__ = [
    "KINDS",
    "ClientCall",
    "ClientResult",
    "EpicsServer",
    "Lab",
    "LabError",
    "Node",
    "Pod",
    "run_client",
    "run_clients",
    "start_server",
]
