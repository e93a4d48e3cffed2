"""Fixtures for the Helm chart tests: Helm built from the Go module proxy, and a real
control plane of our own (the machinery of ioc_testbed.controlplane) whose API server
writes an audit log, so the tests see every request the chart's ServiceAccount makes,
and enforces OwnerReferencesPermissionEnforcement, as many production clusters do."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chartlib import AUDIT_POLICY, CHART
from kubernetes import client, config

from ioc_operator.controller.kube import Kube
from ioc_testbed.controlplane import (
    COLD_BUILD_HINT,
    ControlPlane,
    ControlPlaneError,
    ensure_binaries,
)
from ioc_testbed.helm import Helm, build_helm

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """Helm, built once by build-helm.sh (cached outside the repository)."""
    try:
        binary = build_helm()
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        pytest.fail(str(exc), pytrace=False)
    return Helm(binary=binary, home=tmp_path_factory.mktemp("helm"), chart=CHART)


@pytest.fixture(scope="session")
def chart_plane(request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + kube-controller-manager with the chart's CRDs installed
    (as `helm install` would), an audit log of ServiceAccount requests at
    `plane.workdir / "audit.log"`, and OwnerReferencesPermissionEnforcement on."""
    t0 = time.monotonic()
    try:
        bin_dir = ensure_binaries()
    except ControlPlaneError as exc:
        pytest.fail(f"no control-plane binaries ({COLD_BUILD_HINT}): {exc}", pytrace=False)
    # A workdir of pytest's: kept for a look after a failure, pruned by pytest later.
    workdir = tmp_path_factory.mktemp("chart-plane")
    policy = workdir / "audit-policy.yaml"
    policy.write_text(AUDIT_POLICY)
    plane = ControlPlane(bin_dir=bin_dir, workdir=workdir, extra_args={"kube-apiserver": [
        f"--audit-policy-file={policy}",
        f"--audit-log-path={workdir / 'audit.log'}",
        "--audit-log-format=json",
        "--audit-log-mode=blocking",
        # Appended to the control plane's own list (NodeRestriction).
        "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
    ]})
    try:
        plane.start()
        plane.apply_crds(sorted((CHART / "crds").glob("*.yaml")))
    except ControlPlaneError as exc:
        plane.stop(keep_logs=True)
        pytest.fail(f"control plane did not start: {exc}", pytrace=False)
    print(f"chart control plane up in {time.monotonic() - t0:.1f}s")
    yield plane
    plane.stop()
    if request.session.testsfailed:
        print(f"chart control plane logs and audit.log: {workdir}")


@pytest.fixture(scope="session")
def admin(chart_plane: ControlPlane) -> Iterator[Kube]:
    """The operator's own API layer, authenticated as admin (system:masters)."""
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(chart_plane.kubeconfig),
                            client_configuration=configuration)
    configuration.proxy = None  # loopback only, whatever *_proxy says
    with client.ApiClient(configuration) as api:
        yield Kube(api)
