"""Fixtures for integration tests against a real Kubernetes control plane.

The binaries are built once from the Go module proxy by tests/controlplane/build.sh and
cached outside the repository (KUBEBUILDER_ASSETS is honoured). Logs are kept, and
their path printed, when any test of the session failed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from ioc_operator.controller.kube import Kube
from ioc_testbed.controlplane import (
    COLD_BUILD_HINT,
    ControlPlane,
    ControlPlaneError,
    ensure_binaries,
)

from support import Operator

REPO = Path(__file__).resolve().parents[2]
_FAILED = pytest.StashKey[bool]()
_STARTUP = pytest.StashKey[str]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report: pytest.TestReport = yield
    if report.failed:
        item.config.stash[_FAILED] = True
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if line := terminalreporter.config.stash.get(_STARTUP, None):
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    """A running etcd + kube-apiserver + kube-controller-manager with the repo's CRDs."""
    t0 = time.monotonic()
    try:
        bin_dir = ensure_binaries()
    except ControlPlaneError as exc:
        pytest.fail(f"no control-plane binaries ({COLD_BUILD_HINT}): {exc}", pytrace=False)
    t_bin = time.monotonic() - t0
    plane = ControlPlane(bin_dir=bin_dir)
    crds = sorted((REPO / "crds").glob("*.yaml"))
    try:
        plane.start()
        if crds:
            plane.apply_crds(crds)
    except ControlPlaneError as exc:
        plane.stop(keep_logs=True)
        pytest.fail(f"control plane did not start: {exc}", pytrace=False)
    request.config.stash[_STARTUP] = (
        f"control plane {plane.version().get('gitVersion')}: binaries {t_bin:.1f}s, "
        f"start-up {time.monotonic() - t0 - t_bin:.1f}s, CRDs: {len(crds)}"
    )
    yield plane
    keep = request.config.stash.get(_FAILED, False)
    plane.stop(keep_logs=keep)
    if keep:
        request.config.stash[_STARTUP] += f"\ncontrol plane logs kept in {plane.workdir}"


@pytest.fixture(scope="session")
def api_client(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    """A `kubernetes` ApiClient authenticated as admin (system:masters)."""
    configuration = client.Configuration()
    config.load_kube_config(
        config_file=str(control_plane.kubeconfig), client_configuration=configuration
    )
    configuration.proxy = None  # loopback only, whatever *_proxy says
    with client.ApiClient(configuration) as api:
        yield api


@pytest.fixture
def namespace(api_client: client.ApiClient) -> Iterator[str]:
    """A fresh namespace with its `default` ServiceAccount; deleted (no wait) afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(api_client)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    for _ in range(100):  # the serviceaccount controller takes milliseconds; bound: ~10 s
        if core.list_namespaced_service_account(name, field_selector="metadata.name=default").items:
            break
        time.sleep(0.1)
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def kube(api_client: client.ApiClient) -> Kube:
    """The operator's own API layer, as admin."""
    return Kube(api_client)


@pytest.fixture(scope="session")
def operator(control_plane: ControlPlane,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """The real operator (`ioc-operator run`) watching all namespaces."""
    op = Operator(Path(control_plane.kubeconfig), tmp_path_factory.mktemp("operator"))
    op.start()
    yield op
    op.stop()
    print(f"operator log: {op.log_path}")
