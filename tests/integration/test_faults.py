"""Faults on the real control plane: the operator killed mid-burst, the API server gone
for 30 s, owned objects deleted or edited by hand, 100 IOCs created and deleted in a
burst. After each fault the whole state must converge (faults_support.problems) and
the time it took is printed. Also: the renderer's hypothesis strategies checked
against the real API server with server-side dry runs.

The `operator` and `control_plane` fixtures are shared with other modules: whatever a
test stops it starts again, in `finally`.
"""

from __future__ import annotations

import concurrent.futures
import copy
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from faults_support import (
    DIRECTORY,
    IOC_LABEL,
    MERGE,
    STRATEGIC,
    converge,
    delete_quietly,
    ioc,
    make_node,
    patch_spec,
    render_properties,
    wait_until,
)
from hypothesis import HealthCheck, given, settings

from ioc_operator.controller.kube import Kube, KubeError, path

from support import IOC_API

props = render_properties()
STRICT_DRY_RUN = [("dryRun", "All"), ("fieldValidation", "Strict")]
# more examples for a deeper search: IOC_FAULTS_EXAMPLES=400 (about 11 s per 400 IOCs)
VALID_EXAMPLES = int(os.environ.get("IOC_FAULTS_EXAMPLES", "25"))
INVALID_EXAMPLES = max(3, VALID_EXAMPLES // 8)  # per broken rule


@pytest.fixture
def node(kube: Kube) -> Iterator[str]:
    """A Node object with a lab address for host-mode IOCs (no kubelet: it only names
    an address); deleted afterwards."""
    name = f"fault-{uuid.uuid4().hex[:8]}"
    make_node(kube, name, f"198.18.1.{uuid.uuid4().int % 250 + 1}")
    yield name
    delete_quietly(kube, "v1", "Node", None, name)


def create_all(kube: Kube, bodies: list[dict[str, Any]], workers: int = 8) -> None:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(kube.create, bodies))


def delete_all(kube: Kube, namespace: str, names: list[str], workers: int = 8) -> None:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda n: kube.delete(IOC_API, "IOC", namespace, n), names))


def mixed(names: list[str], namespace: str, node: str) -> list[dict[str, Any]]:
    modes = ("pod", "sidecar", "host")
    return [ioc(n, namespace, modes[i % 3], node) for i, n in enumerate(names)]


def generation(kube: Kube, namespace: str, name: str) -> int:
    return kube.get(IOC_API, "IOC", namespace, name)["metadata"]["generation"]


def handled(kube: Kube, namespace: str, name: str, gen: int) -> bool:
    item = kube.get(IOC_API, "IOC", namespace, name) or {}
    return ((item.get("status") or {}).get("observedGeneration") or 0) >= gen


# ------------------------------------------- the renderer against the real server


def test_valid_specs_pass_the_real_api_server(kube, operator, namespace):
    """What the property tests check structurally, the API server checks for real:
    each valid manifest is accepted by the CRD (schema + CEL, strict field validation),
    and every object rendered from it passes a server-side dry run, both as a create
    (strict: a typo in the renderer would be an unknown field) and as the operator's
    own server-side apply."""
    started = time.monotonic()
    checked = {"iocs": 0, "objects": 0}

    @settings(max_examples=VALID_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(props.valid_manifests(namespace=namespace, with_uid=True))
    def check(body):
        manifest = copy.deepcopy(body)
        manifest["metadata"].pop("uid")
        kube.request("POST", path(IOC_API, "IOC", namespace), STRICT_DRY_RUN, manifest)
        _, objects = props.render_one(body)
        for obj in objects:
            try:
                kube.request("POST", path(obj["apiVersion"], obj["kind"], namespace),
                             STRICT_DRY_RUN, obj)
                kube.apply(obj, dry_run=True)
            except KubeError as exc:
                raise AssertionError(f"{obj['kind']} refused: {exc}\n{obj}") from None
            checked["objects"] += 1
        checked["iocs"] += 1

    check()
    print(f"\nreal-server dry runs: {checked['iocs']} IOCs, {checked['objects']} objects "
          f"in {time.monotonic() - started:.1f} s")


@pytest.mark.parametrize("mutation", props.MUTATIONS, ids=props.MUTATION_IDS)
def test_invalid_specs_are_refused_where_the_model_says(kube, operator, namespace, mutation):
    """A rule the CRD carries (schema, CEL) is refused by the API server with 422; a rule
    only the operator knows passes the API server and is refused by parse_ioc. So
    offline `ioc-operator render` and `kubectl apply` agree."""

    @settings(max_examples=INVALID_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(props.invalid_manifests(namespace=namespace, mutations=[mutation]))
    def check(case):
        body, rule, level = case
        manifest = copy.deepcopy(body)
        manifest["metadata"].pop("uid", None)
        with pytest.raises(props.IOCValidationError):
            props.render_one(body)
        try:
            kube.request("POST", path(IOC_API, "IOC", namespace), STRICT_DRY_RUN, manifest)
        except KubeError as exc:
            assert level == props.SCHEMA, f"{rule}: the API server refused it: {exc}"
            assert exc.status in (400, 422), exc  # 400: strict decoding (unknown field)
        else:
            assert level == props.SEMANTIC, f"{rule}: the API server accepted it"

    check()


# ------------------------------------------------------------------------ faults


def test_operator_killed_mid_burst_converges_after_restart(kube, operator, namespace, node):
    names = [f"k{i:02}" for i in range(18)]
    create_all(kube, mixed(names, namespace, node))
    converge(kube, namespace, names, "initial 18 IOCs", timeout=90)

    # first half of the burst: a spec change on every IOC, then SIGKILL while the
    # operator is working through it (some handled, some not)
    for name in names:
        patch_spec(kube, namespace, name, {"env": [{"name": "BURST", "value": "1"}]})
    gens = {n: generation(kube, namespace, n) for n in names}
    done = 0
    for _ in range(200):  # bounded: at most ~10 s
        done = sum(handled(kube, namespace, n, gens[n]) for n in names)
        if done:
            break
        time.sleep(0.05)
    operator.stop(kill=True)
    print(f"\nkilled the operator with {done}/{len(names)} changes handled")
    try:
        # second half, while it is dead: mode switches, deletes, a delete + re-create
        # under the same name (new uid, other mode), and new IOCs
        patch_spec(kube, namespace, "k00", {"network": {"mode": "host"},
                                            "scheduling": {"nodeName": node}})
        patch_spec(kube, namespace, "k02", {"network": {"mode": "pod"}, "scheduling": None})
        patch_spec(kube, namespace, "k01", {"gateways": None, "network": {"mode": "pod"}})
        for name in ("k03", "k04", "k05"):
            kube.delete(IOC_API, "IOC", namespace, name)
        wait_until("k05 gone", lambda: kube.get(IOC_API, "IOC", namespace, "k05") is None,
                   timeout=20)
        create_all(kube, [ioc("k05", namespace, "sidecar"), ioc("n0", namespace, "pod"),
                          ioc("n1", namespace, "host", node)])
    finally:
        operator.start()
    restarted = time.monotonic()
    expected = (set(names) - {"k03", "k04"}) | {"n0", "n1"}
    converge(kube, namespace, expected, "operator SIGKILL mid-burst + restart", timeout=90,
             since=restarted)
    # the workload of the re-created k05 is the new incarnation's, in its new mode
    sts = kube.get("apps/v1", "StatefulSet", namespace, "k05")
    assert kube.get("v1", "ConfigMap", namespace, "k05-pvagw") is not None
    # the IOC, pvagw and the CA gateway
    assert [c["name"] for c in sts["spec"]["template"]["spec"]["containers"]] == [
        "ioc", "pvagw", "cagw"]
    env = sts["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "BURST", "value": "1"} in kube.get(
        "apps/v1", "StatefulSet", namespace, "k10")["spec"]["template"]["spec"][
        "containers"][0]["env"]
    assert not any(e["name"] == "BURST" for e in env)


def test_api_server_outage_is_survived_without_restart(kube, operator, control_plane,
                                                       namespace, node):
    names = [f"a{i}" for i in range(9)]
    create_all(kube, mixed(names, namespace, node))
    converge(kube, namespace, names, "initial 9 IOCs", timeout=60)
    pid = operator.proc.pid
    # changes the operator is handling when the API server goes away
    create_all(kube, mixed(["b0", "b1", "b2"], namespace, node))
    patch_spec(kube, namespace, "a0", {"args": ["st.cmd"]})
    patch_spec(kube, namespace, "a1", {"network": {"mode": "pod"}, "gateways": None})
    gone = {"a2", "a3", "a5"}
    kube.delete(IOC_API, "IOC", namespace, "a2")
    kube.delete(IOC_API, "IOC", namespace, "a3")
    control_plane.stop_apiserver()
    try:
        time.sleep(30)
        assert operator.proc.poll() is None, "the operator died while the API server was down"
    finally:
        control_plane.start_apiserver()
    back = time.monotonic()
    # The controllers' informers back off after an outage (client-go: up to ~30 s), which
    # would time the garbage collector, not the operator: restart them (the operator not).
    control_plane.restart_controllers()
    # and more changes right after it is back, while the operator's watches reconnect
    create_all(kube, [ioc("c0", namespace, "pod"), ioc("c1", namespace, "host", node)])
    patch_spec(kube, namespace, "a4", {"env": [{"name": "AFTER", "value": "outage"}]})
    kube.delete(IOC_API, "IOC", namespace, "a5")
    expected = (set(names) - gone) | {"b0", "b1", "b2", "c0", "c1"}
    converge(kube, namespace, expected, "API server down 30 s", timeout=120, since=back)
    assert operator.proc is not None and operator.proc.pid == pid  # never restarted
    assert operator.proc.poll() is None


def test_api_blip_mid_reconcile_is_retried_promptly(kube, operator, control_plane, namespace):
    names = [f"z{i:02}" for i in range(12)]
    create_all(kube, [ioc(n, namespace, "pod") for n in names])
    control_plane.stop_apiserver()
    try:
        time.sleep(3)
    finally:
        control_plane.start_apiserver()
    back = time.monotonic()
    try:
        converge(kube, namespace, names, "API server blip of 3 s mid-burst", timeout=20,
                 since=back)
    finally:
        control_plane.restart_controllers()  # prompt again for the modules after this one


def test_deleted_owned_objects_are_recreated(kube, operator, namespace, node):
    create_all(kube, [ioc("gw", namespace, "sidecar"), ioc("h", namespace, "host", node)])
    names = ["gw", "h"]
    converge(kube, namespace, names, "initial 2 IOCs")
    for api, kind, name in (("apps/v1", "StatefulSet", "gw"), ("v1", "Service", "gw"),
                            ("v1", "ConfigMap", "gw-pvagw"), ("v1", "ConfigMap", DIRECTORY),
                            ("apps/v1", "StatefulSet", "h")):
        old = kube.get(api, kind, namespace, name)
        start = time.monotonic()
        kube.delete(api, kind, namespace, name)
        new, took = wait_until(f"{kind} {name} recreated", lambda a=api, k=kind, n=name, o=old: (
            (x := kube.get(a, k, namespace, n)) and x["metadata"]["uid"] != o["metadata"][
                "uid"] and x))
        print(f"fault delete {kind} {name}: recreated in {took:.2f} s")
        if kind != "ConfigMap" or name == DIRECTORY:
            assert new["metadata"]["labels"] == old["metadata"]["labels"]
        if kind == "Service":  # a new ClusterIP: the IOC's endpoints and directory follow
            assert new["spec"]["ports"] == old["spec"]["ports"]
        converge(kube, namespace, names, f"delete {kind} {name}", since=start)
    ip = kube.get("v1", "Service", namespace, "gw")["spec"]["clusterIP"]
    assert kube.get(IOC_API, "IOC", namespace, "gw")["status"]["endpoints"]["ca"] == f"{ip}:5064"


def test_drift_in_owned_fields_is_reverted_and_foreign_fields_are_kept(kube, operator,
                                                                      namespace):
    create_all(kube, [ioc("d", namespace, "sidecar")])
    converge(kube, namespace, ["d"], "initial IOC")
    sts_url = f"/apis/apps/v1/namespaces/{namespace}/statefulsets/d"
    svc_url = f"/api/v1/namespaces/{namespace}/services/d"

    def sts():
        return kube.get("apps/v1", "StatefulSet", namespace, "d")

    def svc():
        return kube.get("v1", "Service", namespace, "d")

    def env(s):
        return {e["name"]: e.get("value") for e in
                s["spec"]["template"]["spec"]["containers"][0]["env"]}

    # fields nobody renders: a label and an annotation, added by hand
    kube.request("PATCH", sts_url, body={"metadata": {
        "labels": {"team": "vacuum"}, "annotations": {"note": "by hand"}}}, content_type=MERGE)
    kube.request("PATCH", svc_url, body={"metadata": {"annotations": {"note": "by hand"}}},
                 content_type=MERGE)
    drifts = [
        ("StatefulSet replicas", sts_url, MERGE, {"spec": {"replicas": 3}},
         lambda: sts()["spec"]["replicas"] == 1),
        ("StatefulSet env value", sts_url, STRATEGIC,
         {"spec": {"template": {"spec": {"containers": [
             {"name": "ioc", "env": [{"name": "EPICS_CAS_SERVER_PORT", "value": "9999"}]}]}}}},
         lambda: env(sts())["EPICS_CAS_SERVER_PORT"] == "15064"),  # behind the CA gateway
        ("Service targetPort", svc_url, STRATEGIC,
         {"spec": {"ports": [{"port": 5064, "protocol": "TCP", "targetPort": 7064}]}},
         lambda: all(p["port"] == p["targetPort"] for p in svc()["spec"]["ports"])),
        ("pvagw ConfigMap data", f"/api/v1/namespaces/{namespace}/configmaps/d-pvagw", MERGE,
         {"data": {"pvagw.json": "{}"}},
         lambda: kube.get("v1", "ConfigMap", namespace, "d-pvagw")["data"][
             "pvagw.json"] != "{}"),
        ("directory ConfigMap data", f"/api/v1/namespaces/{namespace}/configmaps/{DIRECTORY}",
         MERGE, {"data": {"EPICS_CA_ADDR_LIST": "198.18.9.9"}},
         lambda: "198.18.9.9" not in kube.get("v1", "ConfigMap", namespace, DIRECTORY)[
             "data"]["EPICS_CA_ADDR_LIST"]),
    ]
    for what, url, content_type, patch, reverted in drifts:
        start = time.monotonic()
        kube.request("PATCH", url, body=patch, content_type=content_type)
        _, took = wait_until(f"{what} reverted", reverted, since=start)
        print(f"fault drift {what}: reverted in {took:.2f} s")
        converge(kube, namespace, ["d"], f"drift {what}", since=start)
    # a spec change re-applies everything: the hand-made fields survive that too
    patch_spec(kube, namespace, "d", {"description": "touched"})
    converge(kube, namespace, ["d"], "spec change after drift")
    s = sts()
    assert s["metadata"]["labels"]["team"] == "vacuum"
    assert s["metadata"]["annotations"]["note"] == "by hand"
    assert svc()["metadata"]["annotations"]["note"] == "by hand"
    assert s["metadata"]["labels"][IOC_LABEL] == "d"


def test_drift_of_a_service_port_number_is_reverted(kube, operator, namespace):
    create_all(kube, [ioc("sp", namespace, "pod")])
    converge(kube, namespace, ["sp"], "initial IOC")
    svc = kube.get("v1", "Service", namespace, "sp")
    ports = [dict(p) for p in svc["spec"]["ports"]]
    for p in ports:
        if p["name"] == "ca-tcp":
            p["port"] = p["targetPort"] = 6064
    kube.request("PATCH", f"/api/v1/namespaces/{namespace}/services/sp",
                 body={"spec": {"ports": ports}}, content_type=MERGE)
    wait_until("Service ports reverted", lambda: sorted(
        (p["port"], p["protocol"]) for p in kube.get("v1", "Service", namespace, "sp")[
            "spec"]["ports"]) == [(5064, "TCP"), (5064, "UDP"), (5075, "TCP"), (5076, "UDP")],
        timeout=8)


@pytest.mark.parametrize("spec", [
    {"network": {"mode": "pod", "ports": {"ca": 5075}}},  # CA TCP == PVA server TCP
    {"env": [{"name": "EPICS_CAS_SERVER_PORT", "value": "5070"}]},  # == the operator's
], ids=["ca-port-is-pva-port", "env-overrides-server-port"])
def test_duplicate_keys_are_reported_not_retried_forever(kube, operator, namespace, spec):
    kube.create(ioc("dup", namespace, "pod", **spec))
    wait_until("a Reconciled=False condition", lambda: any(
        c["type"] == "Reconciled" and c["status"] == "False" for c in (
            (kube.get(IOC_API, "IOC", namespace, "dup") or {}).get("status") or {}).get(
            "conditions") or []), timeout=8)


def test_explicit_host_port_moves_an_allocated_holder(kube, operator, namespace, node):
    kube.create(ioc("holder", namespace, "host", node))
    converge(kube, namespace, ["holder"], "holder")
    port = kube.get(IOC_API, "IOC", namespace, "holder")["status"]["ports"]["ca"]
    kube.create(ioc("asker", namespace, "host", node, network={"mode": "host",
                                                              "ports": {"ca": port}}))
    converge(kube, namespace, ["holder", "asker"], "explicit port over an allocation",
             timeout=8)


def test_burst_of_100_iocs_then_delete_all(kube, operator, namespace, node):
    names = [f"b{i:03}" for i in range(100)]
    bodies = []
    for i, name in enumerate(names):
        mode = ("pod", "sidecar", "host")[i % 3]
        body = ioc(name, namespace, mode, node)
        if mode == "host" and i % 9 == 2:  # some explicit ports, out of the allocator's way
            body["spec"]["network"]["ports"] = {"ca": 5990 + i // 9}
        if i % 10 == 5:
            body["spec"]["servers"] = {"pva": {"enabled": False}} if mode != "sidecar" else {
                "ca": {"enabled": False}}
        bodies.append(body)
    start = time.monotonic()
    create_all(kube, bodies)
    took = converge(kube, namespace, names, "burst create 100 IOCs", timeout=150, since=start)
    host = [b for b in kube.list(IOC_API, "IOC", namespace)
            if b["spec"]["network"]["mode"] == "host"]
    ports = [p for b in host for p in b["status"]["ports"].values()]
    assert len(host) == 33 and len(ports) == len(set(ports)), "a host port twice on one node"
    print(f"burst create: {len(names) / took:.1f} IOCs/s")

    start = time.monotonic()
    delete_all(kube, namespace, names)
    took = converge(kube, namespace, [], "burst delete 100 IOCs", timeout=150, since=start)
    assert kube.get("v1", "ConfigMap", namespace, DIRECTORY) is None
    print(f"burst delete: {len(names) / took:.1f} IOCs/s")


