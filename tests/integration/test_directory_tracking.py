"""The client directory follows IOCs: creates, deletes, node moves, mode changes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from ioc_operator.controller.kube import Kube

from support import IOC_API, wait_for

DIRECTORY = "epics-client-env"
DELAYS: list[tuple[str, float]] = []


def ioc(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": IOC_API, "kind": "IOC",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"image": "registry.example/ioc:1", "prefix": f"{name.upper()}:", **spec}}


def directory(kube: Kube, ns: str) -> dict[str, str] | None:
    cm = kube.get("v1", "ConfigMap", ns, DIRECTORY)
    return cm["data"] if cm else None


def timed(what: str, probe, timeout: float = 30.0) -> Any:
    start = time.monotonic()
    result = wait_for(what, probe, timeout)
    DELAYS.append((what, time.monotonic() - start))
    return result


def cluster_ip(kube: Kube, ns: str, name: str) -> str:
    return wait_for("service", lambda: kube.get("v1", "Service", ns, name))["spec"]["clusterIP"]


def make_node(kube: Kube, name: str, address: str) -> None:
    kube.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                 "status": {"addresses": [{"type": "InternalIP", "address": address}]}})


def patch_spec(kube: Kube, ns: str, name: str, spec: dict[str, Any]) -> None:
    kube.request("PATCH", f"/apis/{IOC_API}/namespaces/{ns}/iocs/{name}",
                 body={"spec": spec}, content_type="application/merge-patch+json")


def test_directory_tracks_iocs(kube, operator, namespace):
    kube.create(ioc("vac", namespace))
    ip_vac = cluster_ip(kube, namespace, "vac")
    data = timed("create", lambda: (d := directory(kube, namespace))
                 and ip_vac in d["EPICS_CA_ADDR_LIST"] and d)
    assert data["EPICS_CA_AUTO_ADDR_LIST"] == "NO"
    assert data["EPICS_CA_NAME_SERVERS"] == f"{ip_vac}:5064"
    assert data["EPICS_PVA_NAME_SERVERS"] == f"{ip_vac}:5075"
    assert f"org.phoebus.pv.ca/addr_list={ip_vac}" in data["PHOEBUS_SETTINGS_INI"]

    # a caproto IOC: address list only, never a name server
    kube.create(ioc("sim", namespace, servers={"ca": {"implementation": "caproto"},
                                               "pva": {"enabled": False}}))
    ip_sim = cluster_ip(kube, namespace, "sim")
    data = timed("second create", lambda: (d := directory(kube, namespace))
                 and ip_sim in d["EPICS_CA_ADDR_LIST"] and d)
    assert sorted(data["EPICS_CA_ADDR_LIST"].split()) == sorted([ip_vac, ip_sim])
    assert data["EPICS_CA_NAME_SERVERS"] == f"{ip_vac}:5064"

    # mode change: pod -> host (pinned), the entry moves from ClusterIP to node IP
    node = f"n-{namespace}"
    make_node(kube, node, "198.18.0.21")
    patch_spec(kube, namespace, "vac", {"network": {"mode": "host"},
                                        "scheduling": {"nodeName": node}})
    data = timed("mode change", lambda: (d := directory(kube, namespace))
                 and "198.18.0.21" in d["EPICS_CA_ADDR_LIST"] and d)
    assert ip_vac not in data["EPICS_CA_ADDR_LIST"]
    entries = data["EPICS_CA_ADDR_LIST"].split()
    assert len(entries) == len(set(entries)) == 2  # never listed twice

    # node move: the host-mode IOC is pinned to another node
    node2 = f"m-{namespace}"
    make_node(kube, node2, "198.18.0.22")
    patch_spec(kube, namespace, "vac", {"scheduling": {"nodeName": node2}})
    data = timed("node move", lambda: (d := directory(kube, namespace))
                 and "198.18.0.22" in d["EPICS_CA_ADDR_LIST"] and d)
    assert "198.18.0.21" not in data["EPICS_CA_ADDR_LIST"]

    # an unchanged set of IOCs never rewrites it
    version = kube.get("v1", "ConfigMap", namespace, DIRECTORY)["metadata"]["resourceVersion"]
    patch_spec(kube, namespace, "sim", {"description": "simulated motor"})
    wait_for("reconcile", lambda: (i := kube.get(IOC_API, "IOC", namespace, "sim"))
             and i["status"].get("observedGeneration") == 2)
    time.sleep(1.0)
    assert kube.get("v1", "ConfigMap", namespace, DIRECTORY)["metadata"][
        "resourceVersion"] == version

    # the CLI prints it for shells and phoebus
    env = {**os.environ, "KUBECONFIG": str(operator.kubeconfig)}
    out = subprocess.run([sys.executable, "-m", "ioc_operator.cli", "client-env", "-n",
                          namespace], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "export EPICS_CA_AUTO_ADDR_LIST='NO'" in out.stdout
    assert f"export EPICS_CA_ADDR_LIST='{data['EPICS_CA_ADDR_LIST']}'" in out.stdout
    phoebus = subprocess.run([sys.executable, "-m", "ioc_operator.cli", "client-env", "-n",
                              namespace, "--format", "phoebus"], capture_output=True,
                             text=True, env=env, timeout=60)
    assert "org.phoebus.pv.ca/auto_addr_list=false" in phoebus.stdout

    # deleted by hand: written again
    kube.delete("v1", "ConfigMap", namespace, DIRECTORY)
    timed("recreate after manual delete", lambda: directory(kube, namespace))

    # deletes: the entry goes; the last IOC gone takes the directory with it
    kube.delete(IOC_API, "IOC", namespace, "sim")
    data = timed("delete", lambda: (d := directory(kube, namespace))
                 and ip_sim not in d["EPICS_CA_ADDR_LIST"] and d)
    kube.delete(IOC_API, "IOC", namespace, "vac")
    timed("last delete", lambda: directory(kube, namespace) is None)
    print("\ndirectory update delays: " + ", ".join(f"{w} {d * 1000:.0f} ms"
                                                    for w, d in DELAYS))


def test_publisher_writes_changes_only_and_knows_its_own_echo(kube, namespace):
    """The operator's DirectoryPublisher on the real API server: an unchanged set of
    IOCs is not written again, the ConfigMap the API server returns is recognised as
    our own write (no rewrite per echo), also once a later write has overtaken it, and
    a hand edit or a forget() is written over."""
    from ioc_operator.controller.publish import DirectoryPublisher
    from ioc_operator.discovery.directory import directory_config_map

    # not the operator's directory name: a running operator leaves it alone
    name = "publisher-test"

    pub = DirectoryPublisher(kube, name)
    env = {"EPICS_CA_ADDR_LIST": "198.19.0.1", "EPICS_PVA_ADDR_LIST": "198.19.0.1"}
    assert pub.publish(namespace, [env]) and not pub.publish(namespace, [env])
    echo = kube.get("v1", "ConfigMap", namespace, name)
    assert echo["data"] == directory_config_map(namespace, name, [env])["data"]
    assert pub.matches(echo)
    # a later write overtakes the first one's echo: that echo is still ours
    env2 = {**env, "EPICS_CA_ADDR_LIST": "198.19.0.2"}
    assert pub.publish(namespace, [env2])
    assert pub.matches(echo)
    assert not pub.matches({**echo, "metadata": {**echo["metadata"], "resourceVersion": "1"}})
    assert pub.publish(namespace, [env])
    echo = kube.get("v1", "ConfigMap", namespace, name)
    kube.request("PATCH", f"/api/v1/namespaces/{namespace}/configmaps/{name}",
                 body={"data": {"EPICS_CA_ADDR_LIST": "198.19.9.9"}},
                 content_type="application/merge-patch+json")
    edited = kube.get("v1", "ConfigMap", namespace, name)
    assert not pub.matches(edited)
    # (an edit that drops the labels: a new resourceVersion, and not what we wrote)
    assert not pub.matches({**echo, "metadata": {**echo["metadata"], "labels": {},
                                                 "resourceVersion": "1"}})
    pub.forget(namespace)
    assert pub.publish(namespace, [env])
    assert kube.get("v1", "ConfigMap", namespace, name)["data"]["EPICS_CA_ADDR_LIST"] == (
        "198.19.0.1")
    assert pub.publish(namespace, None)  # no IOC left: the ConfigMap goes
    assert kube.get("v1", "ConfigMap", namespace, name) is None
