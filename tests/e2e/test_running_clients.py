"""The name service on real nodes, with clients that keep running: the published
directory never changes, so what matters is whether running clients reach IOCs created,
re-created and moved after they started, and whether losing a name server replica
costs them anything. Clients: libca (pyepics), caproto and p4p in one pod on
beamline-02, whose only settings are `envFrom: epics-client-env`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from ioc_testbed.incluster import ClientPod, Kubectl, Watch
from ioc_testbed.waiting import wait_for

from e2elib import OPERATOR_NS, directory_client

NAMESPACE = "e2e-names"
LIBS = ("pyepics", "caproto", "p4p")
IMAGE = "ghcr.io/epics-operator/example-ioc:0.1.0"
REACH_S = 10.0  # bound for the tests; the figures are printed (target: ~2 s)


def ioc(name: str, mode: str = "pod") -> dict[str, Any]:
    prefix = name.upper().replace("-", "") + ":"
    return {"apiVersion": "epics-operator.io/v1alpha1", "kind": "IOC",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"image": IMAGE, "prefix": prefix, "network": {"mode": mode},
                     "args": ["python", "-m", "pvxslibs.ioc", "-m", f"P={prefix}", "-d",
                              "/epics/example/example.db"]}}


@pytest.fixture(scope="module")
def client(kubectl: Kubectl, operator: str) -> ClientPod:
    kubectl("create", "namespace", NAMESPACE, check=False)
    kubectl.apply([ioc("nsa-anchor")])  # the namespace's directory exists with an IOC
    kubectl("-n", NAMESPACE, "wait", "--for=condition=Ready", "ioc/nsa-anchor",
            "--timeout=120s", timeout=130)
    return directory_client(kubectl, NAMESPACE, {}, "name-service")


@pytest.fixture
def watches(client: ClientPod) -> Iterator[list[Watch]]:
    started: list[Watch] = []
    yield started
    for watch in started:
        watch.stop()


def test_running_clients_reach_an_ioc_created_after_they_started(
        kubectl: Kubectl, client: ClientPod, watches: list[Watch]) -> None:
    pv = "NSBNEW:counter"
    watches += [Watch(client, lib, [pv]) for lib in LIBS]
    created = time.time()
    kubectl.apply([ioc("nsb-new")])
    for watch in watches:
        wait_for(f"{watch.lib} to read {pv}", lambda w=watch: w.seen("value", pv), REACH_S)
    print("\nnew IOC read by running clients after " + ", ".join(
        f"{w.lib} {w.seen('value', pv)['t'] - created:.2f} s" for w in watches))


def test_running_clients_reach_an_ioc_again_after_it_is_re_created(
        kubectl: Kubectl, client: ClientPod, watches: list[Watch]) -> None:
    """Deleted and created again under the same name: a new pod, the same ClusterIP
    (derived from namespace/name). libca searches a lost channel again after its
    disconnect governor (10 s)."""
    kubectl.apply([ioc("nsc-again")])
    kubectl("-n", NAMESPACE, "wait", "--for=condition=Ready", "ioc/nsc-again",
            "--timeout=120s", timeout=130)
    old_ip = kubectl.get("service", "nsc-again", NAMESPACE)["spec"]["clusterIP"]
    pv = "NSCAGAIN:counter"
    watches += [Watch(client, lib, [pv]) for lib in LIBS]
    for watch in watches:
        wait_for(f"{watch.lib} to read {pv}", lambda w=watch: w.seen("value", pv), REACH_S)
    kubectl("-n", NAMESPACE, "delete", "ioc", "nsc-again", "--wait=true", timeout=90)
    wait_for("the old pod gone", lambda: kubectl.get("pod", "nsc-again-0", NAMESPACE) is None,
             60)
    recreated = time.time()
    kubectl.apply([ioc("nsc-again")])
    wait_for("the new Service", lambda: kubectl.get("service", "nsc-again", NAMESPACE), 30)
    new_ip = kubectl.get("service", "nsc-again", NAMESPACE)["spec"]["clusterIP"]
    assert new_ip == old_ip
    for watch in watches:
        wait_for(f"{watch.lib} to read {pv} again", lambda w=watch: w.seen(
            "value", pv, after=recreated), REACH_S + 15)
    print(f"\nre-created IOC ({old_ip} -> {new_ip}) read again after " + ", ".join(
        f"{w.lib} {w.seen('value', pv, after=recreated)['t'] - recreated:.2f} s"
        for w in watches))


def test_a_name_server_replica_lost_costs_running_clients_nothing(
        kubectl: Kubectl, client: ClientPod, watches: list[Watch]) -> None:
    """Channels never go through the name server; the other replica answers new names."""
    pv = "NSAANCHOR:counter"
    watches += [Watch(client, lib, [pv]) for lib in LIBS]
    for watch in watches:
        wait_for(f"{watch.lib} to read {pv}", lambda w=watch: w.seen("value", pv), REACH_S)
    pods = kubectl.json("-n", OPERATOR_NS, "get", "pods", "-l",
                        "app.kubernetes.io/component=name-server")["items"]
    assert len(pods) == 2
    killed = time.time()
    kubectl("-n", OPERATOR_NS, "delete", "pod", pods[0]["metadata"]["name"],
            "--grace-period=0", "--force", "--wait=false")
    # A new IOC is found meanwhile (by the remaining replica, or the replacement).
    fresh = Watch(client, "p4p", ["NSDFRESH:counter"])
    watches.append(fresh)
    kubectl.apply([ioc("nsd-fresh")])
    wait_for("a new IOC found with one replica gone", lambda: fresh.seen(
        "value", "NSDFRESH:counter"), REACH_S)
    time.sleep(3)  # updates keep coming (the counter ticks every 0.2 s)
    for watch in watches[:-1]:
        assert watch.seen("disconnected", pv, after=killed) is None, watch.lib
        assert watch.count("value", pv, after=killed) >= 10, watch.lib
