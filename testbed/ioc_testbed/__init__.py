"""The test bed of ioc-operator: what the tests, the demo and the benchmarks run on.

A real Kubernetes control plane and real nodes (kubelet, containerd, CNI) built from the
Go module proxy and Debian, the project's images built offline, a broadcast-less network
lab of Linux network namespaces, and the demo. Kept out of the operator's wheel and image.
"""

from importlib.resources import files
from pathlib import Path


def resource(name: str) -> Path:
    """A file shipped with the package (build scripts, the Go wrapper module)."""
    return Path(str(files(__name__) / name))
