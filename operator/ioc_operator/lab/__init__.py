"""Network-namespace lab: a broadcast-less, Calico-style cluster network with EPICS
servers and clients (see docs/lab.md)."""

from .netns import Lab, LabError, Node, Pod

__all__ = ["Lab", "LabError", "Node", "Pod"]
