"""The constant directory and the name server's table source, on a real API server.

An operator told the name service's address (IOC_OPERATOR_NAME_SERVICE_ADDRESS) writes
directories that hold only that address and are never rewritten as IOCs come, go and
move; `ioc-operator client-env` prints them, or the per-IOC lists with --per-ioc. The
name server's read-only watch (KubeWatch, the kubernetes package) follows the IOC
objects' status into its table: new IOCs, moves, deletions, one namespace or all.

This module runs its own control plane and operator: the session's operator watches
every namespace with the per-IOC directory and would write the same ConfigMaps.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from ioc_operator.controller.kube import Kube
from ioc_operator.discovery.clientenv import NameService, name_service_env
from ioc_operator.nameserver.kubewatch import KubeWatch
from ioc_operator.nameserver.table import IOC, Endpoint, Table
from ioc_testbed.controlplane import (
    COLD_BUILD_HINT,
    ControlPlane,
    ControlPlaneError,
    ensure_binaries,
)

from support import IOC_API, Operator, wait_for

REPO = Path(__file__).resolve().parents[2]
DIRECTORY = "epics-client-env"
NAME_SERVICE = "198.19.0.53"
CONSTANT = name_service_env(NameService(NAME_SERVICE))


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    try:
        bin_dir = ensure_binaries()
    except ControlPlaneError as exc:
        pytest.fail(f"no control-plane binaries ({COLD_BUILD_HINT}): {exc}", pytrace=False)
    the_plane = ControlPlane(bin_dir=bin_dir, workdir=tmp_path_factory.mktemp("ns-plane"))
    try:
        the_plane.start()
        the_plane.apply_crds(sorted((REPO / "crds").glob("*.yaml")))
    except ControlPlaneError as exc:
        the_plane.stop(keep_logs=True)
        pytest.fail(f"control plane did not start: {exc}", pytrace=False)
    yield the_plane
    the_plane.stop()


@pytest.fixture(scope="module")
def api(plane: ControlPlane) -> Iterator[client.ApiClient]:
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(plane.kubeconfig),
                            client_configuration=configuration)
    configuration.proxy = None
    with client.ApiClient(configuration) as api_client:
        yield api_client


@pytest.fixture(scope="module")
def kube(api: client.ApiClient) -> Kube:
    return Kube(api)


@pytest.fixture(scope="module")
def ns_operator(plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Operator]:
    op = Operator(Path(plane.kubeconfig), tmp_path_factory.mktemp("ns-operator"))
    op.env["IOC_OPERATOR_NAME_SERVICE_ADDRESS"] = NAME_SERVICE
    op.start()
    yield op
    op.stop()
    print(f"operator log: {op.log_path}")


def make_namespace(kube: Kube, name: str) -> str:
    kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


def ioc(name: str, namespace: str, prefix: str | None = None, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": IOC_API, "kind": "IOC",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"image": "registry.example/ioc:1",
                     "prefix": prefix or f"{name.upper()}:", **spec}}


def status_of(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    obj = kube.get(IOC_API, "IOC", ns, name)
    return (obj or {}).get("status") or {}


def endpoints_written(kube: Kube, ns: str, name: str) -> dict[str, str] | None:
    return status_of(kube, ns, name).get("endpoints") or None


def patch_spec(kube: Kube, ns: str, name: str, spec: dict[str, Any]) -> None:
    kube.request("PATCH", f"/apis/{IOC_API}/namespaces/{ns}/iocs/{name}",
                 body={"spec": spec}, content_type="application/merge-patch+json")


# ------------------------------------------------------------------ constant directory
def test_the_directory_holds_only_the_name_service_and_never_changes(kube, ns_operator):
    ns = make_namespace(kube, "beamline")
    kube.create(ioc("vac", ns))
    cm = wait_for("directory", lambda: kube.get("v1", "ConfigMap", ns, DIRECTORY))
    data = cm["data"]
    assert {k: v for k, v in data.items() if k.startswith("EPICS_")} == CONSTANT
    assert f"org.phoebus.pv.ca/name_servers={NAME_SERVICE}:5064" in data["PHOEBUS_SETTINGS_INI"]
    version = cm["metadata"]["resourceVersion"]

    # IOCs come, move and go: each is reconciled (its status shows it) ...
    kube.create(ioc("sim", ns, servers={"ca": {"implementation": "caproto"},
                                        "pva": {"enabled": False}}))
    kube.create(ioc("table", ns, servers={"ca": {"enabled": False}}))
    for name in ("vac", "sim", "table"):
        wait_for(f"{name} endpoints", lambda n=name: endpoints_written(kube, ns, n))
    kube.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n-ns"},
                 "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.21"}]}})
    patch_spec(kube, ns, "vac", {"network": {"mode": "host"},
                                 "scheduling": {"nodeName": "n-ns"}})
    wait_for("vac on its node", lambda: "198.18.0.21" in str(endpoints_written(kube, ns, "vac")))
    for name in ("sim", "table", "vac"):
        kube.delete(IOC_API, "IOC", ns, name)
    wait_for("IOCs gone", lambda: not kube.list(IOC_API, "IOC", ns))
    time.sleep(2)  # a publish would follow the last event within a fraction of a second
    # ... and the directory was never written again, nor deleted with the last IOC.
    cm = kube.get("v1", "ConfigMap", ns, DIRECTORY)
    assert cm is not None and cm["metadata"]["resourceVersion"] == version


def test_each_namespace_gets_the_same_constant_directory(kube, ns_operator):
    nss = [make_namespace(kube, f"linac-{i}") for i in range(3)]
    for i, ns in enumerate(nss):
        kube.create(ioc(f"rf{i}", ns))
    datas = [wait_for(f"directory of {ns}", lambda n=ns: kube.get("v1", "ConfigMap", n,
                                                                  DIRECTORY))["data"]
             for ns in nss]
    assert all(d == datas[0] for d in datas)


def test_client_env_prints_the_constant_directory_or_the_per_ioc_lists(kube, ns_operator,
                                                                     plane):
    ns = make_namespace(kube, "optics")
    kube.create(ioc("m1", ns))
    status = wait_for("m1 env", lambda: status_of(kube, ns, "m1").get("clientEnv"))
    wait_for("directory", lambda: kube.get("v1", "ConfigMap", ns, DIRECTORY))
    env = {"KUBECONFIG": str(plane.kubeconfig), "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "ioc_operator.cli", "client-env",
                               "-n", ns, "--format", "env", *args], capture_output=True,
                              text=True, timeout=60, env=env, check=True)
        return done.stdout

    printed = dict(line.split("=", 1) for line in cli().splitlines())
    assert printed == CONSTANT
    per_ioc = dict(line.split("=", 1) for line in cli("--per-ioc").splitlines())
    assert per_ioc["EPICS_CA_ADDR_LIST"] == status["EPICS_CA_ADDR_LIST"] != NAME_SERVICE
    assert per_ioc["EPICS_PVA_NAME_SERVERS"] == status["EPICS_PVA_NAME_SERVERS"]


# ------------------------------------------------------------------ the name server's watch
def run_until(loop: asyncio.AbstractEventLoop, what: str, probe: Callable[[], Any],
              timeout: float = 30.0) -> Any:
    """Run the event loop (where the watch applies its events) until probe() holds."""
    async def wait() -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if result := probe():
                return result
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    return loop.run_until_complete(wait())


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    the_loop = asyncio.new_event_loop()
    yield the_loop
    the_loop.close()


def entry(table: Table, key: str) -> IOC | None:
    return table.get(key)


def test_the_watch_follows_iocs_into_the_table(kube, api, ns_operator, loop):
    ns, other = make_namespace(kube, "w-one"), make_namespace(kube, "w-two")
    table = Table()
    watch = KubeWatch(loop, table, None, api)  # all namespaces
    scoped_table = Table()
    scoped = KubeWatch(loop, scoped_table, [ns], api)
    kube.create(ioc("early", ns))
    wait_for("early endpoints", lambda: endpoints_written(kube, ns, "early"))
    watch.start()
    scoped.start()
    try:
        run_until(loop, "initial lists", lambda: watch.synced.is_set() and scoped.synced.is_set())
        early = run_until(loop, "early listed", lambda: entry(table, f"{ns}/early"))
        ca = endpoints_written(kube, ns, "early")["ca"]  # type: ignore[index]
        assert early.ca == Endpoint.parse(ca, 5064) and early.prefix == "EARLY:"
        assert early.pva_search is not None and early.pva_search.port == 5076
        assert not early.external and early.created

        # created after the watch started; in the other namespace only the wide one sees it
        kube.create(ioc("late", ns, servers={"ca": {"implementation": "caproto"},
                                             "pva": {"enabled": False}}))
        kube.create(ioc("elsewhere", other, prefix="EARLY:"))
        late = run_until(loop, "late", lambda: entry(table, f"{ns}/late"))
        assert late.pva is None and late.ca_server == "caproto"
        run_until(loop, "elsewhere", lambda: entry(table, f"{other}/elsewhere"))
        run_until(loop, "scoped late", lambda: entry(scoped_table, f"{ns}/late"))
        assert entry(scoped_table, f"{other}/elsewhere") is None
        # the same prefix in two namespaces: the older IOC first
        assert [i.key for i in table.candidates("ca", "EARLY:x")] == [f"{ns}/early",
                                                                     f"{other}/elsewhere"]

        # a move (host mode on a node): a new entry at once, the old one dead
        kube.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n-watch"},
                     "status": {"addresses": [{"type": "InternalIP",
                                               "address": "198.18.0.31"}]}})
        patch_spec(kube, ns, "early", {"network": {"mode": "host"},
                                       "scheduling": {"nodeName": "n-watch"}})
        moved = run_until(loop, "early moved", lambda: (e := entry(table, f"{ns}/early"))
                          and e.ca is not None and e.ca.host == "198.18.0.31" and e)
        assert moved.external and not early.live

        # deleted: gone from the table, answers cached from it are dead
        kube.delete(IOC_API, "IOC", ns, "early")
        run_until(loop, "early gone", lambda: entry(table, f"{ns}/early") is None)
        assert not moved.live
    finally:
        watch.stop()
        scoped.stop()


def test_the_watch_lists_again_after_the_api_server_was_down(kube, api, ns_operator, plane,
                                                            loop):
    ns = make_namespace(kube, "w-again")
    kube.create(ioc("before", ns))
    wait_for("before endpoints", lambda: endpoints_written(kube, ns, "before"))
    table = Table()
    watch = KubeWatch(loop, table, [ns], api)
    watch.start()
    try:
        run_until(loop, "before", lambda: entry(table, f"{ns}/before"))
        plane.stop_apiserver()
        loop.run_until_complete(asyncio.sleep(3))  # the watch fails meanwhile
        plane.start_apiserver()
        plane.wait_ready()
        kube.delete(IOC_API, "IOC", ns, "before")
        kube.create(ioc("after", ns))
        wait_for("after endpoints", lambda: endpoints_written(kube, ns, "after"), timeout=60)
        run_until(loop, "after in the table, before gone",
                  lambda: entry(table, f"{ns}/after") and not entry(table, f"{ns}/before"),
                  timeout=90)
    finally:
        watch.stop()
