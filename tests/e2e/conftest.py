"""End-to-end tests on real nodes: the project's images, the chart's operator in a pod.

One cluster for the session (`ioc_testbed.cluster.Cluster`: a control plane and two
nodes, beamline-01 and beamline-02, each with containerd, kubelet and kube-proxy; needs
root and the Debian packages that `make system-deps` installs). The chart installs the
operator into `ioc-system`; the examples run in `e2e-examples`. The teardown is checked:
it must leave nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ioc_testbed.cluster import Cluster, ClusterError
from ioc_testbed.helm import Helm, build_helm
from ioc_testbed.incluster import NAME_SERVICE_IP, ClientPod, Kubectl, local_volume

from e2elib import (
    AUTOSAVE_PV,
    CHART,
    EXAMPLES_NS,
    HOST_NODE,
    OPERATOR_NS,
    REPO,
    apply_ready,
    directory_client,
    examples,
)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    # E2E_KUBECONFIG: reuse a cluster kept up by `ioc-testbed cluster` (development).
    if os.environ.get("E2E_KUBECONFIG"):
        pytest.fail("E2E_KUBECONFIG is for the kubectl fixture only", pytrace=False)
    the_cluster = Cluster(nodes=2, context=REPO)
    try:
        the_cluster.start()
    except (ClusterError, RuntimeError) as exc:
        pytest.fail(f"the real-node cluster did not start: {exc}", pytrace=False)
    print(f"\ncluster up: {the_cluster.timings}")
    yield the_cluster
    problems = the_cluster.stop()
    left = the_cluster.residue()
    print(f"\ncluster stopped in {the_cluster.timings['stop']:.1f} s")
    assert problems == [] and left == [], f"teardown: {problems}; left behind: {left}"


@pytest.fixture(scope="session")
def kubectl(request: pytest.FixtureRequest) -> Kubectl:
    if path := os.environ.get("E2E_KUBECONFIG"):
        from ioc_testbed.controlplane import ensure_binaries

        return Kubectl(ensure_binaries(build=False) / "kubectl", Path(path))
    the_cluster: Cluster = request.getfixturevalue("cluster")
    assert the_cluster.plane is not None and the_cluster.plane.bin_dir is not None
    return Kubectl(the_cluster.plane.bin_dir / "kubectl", the_cluster.kubeconfig)


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(build_helm(), tmp_path_factory.mktemp("helm"), CHART)


@pytest.fixture(scope="session")
def operator(kubectl: Kubectl, helm: Helm) -> str:
    """The chart installed as a new user would: the operator runs as a pod."""
    helm.install_operator(kubectl.kubeconfig, OPERATOR_NS,
                          f"nameService.clusterIP={NAME_SERVICE_IP}")
    kubectl("-n", OPERATOR_NS, "rollout", "status", "deployment/ioc-operator",
            "--timeout=120s", timeout=150)
    return OPERATOR_NS


@pytest.fixture(scope="session")
def example_iocs(kubectl: Kubectl, operator: str) -> dict[str, dict[str, Any]]:
    """Every example applied with kubectl, each IOC Ready (its containers really run)."""
    kubectl("create", "namespace", EXAMPLES_NS, check=False)
    local_volume(kubectl, HOST_NODE, AUTOSAVE_PV)
    return apply_ready(kubectl, EXAMPLES_NS, examples(HOST_NODE))


@pytest.fixture(scope="session", params=["name-service", "per-ioc"])
def client(request: pytest.FixtureRequest, kubectl: Kubectl,
           example_iocs: dict[str, dict[str, Any]]) -> ClientPod:
    """A client pod on the other node than the host-mode IOCs whose only EPICS settings
    are one directory: the operator's (the name service: the chart's default) or the
    per-IOC lists."""
    return directory_client(kubectl, EXAMPLES_NS, example_iocs, request.param)

