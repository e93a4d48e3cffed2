"""The chart on a real API server: its objects pass server-side validation, and the
operator, run out of cluster as the chart's ServiceAccount, reconciles IOCs of every
mode with the chart's RBAC and nothing more.

"Nothing more" is measured, not assumed: the API server's audit log records every
request the ServiceAccount makes, and the chart must grant exactly those verbs, plus the
few the API server checks inside a request (IMPLIED), each shown to be needed by
taking it away.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from chartlib import (
    CHART,
    IOC_API,
    ChartOperator,
    Request,
    audited,
    by_kind,
    kubectl_as,
    nonresource_paths,
    rule_triples,
    service_account_kubeconfig,
)
from kubernetes import client

from ioc_operator.controller.kube import Kube, KubeError
from ioc_operator.discovery.clientenv import NameService, name_service_env
from ioc_operator.model.validation import parse_ioc
from ioc_operator.render import render
from ioc_testbed.controlplane import ControlPlane, free_port
from ioc_testbed.helm import Helm
from ioc_testbed.waiting import wait_for

Triple = tuple[str, str, str]

# Checked by the API server inside a request rather than being the request's verb, so
# the audit log cannot show them; test_implied_permission_is_needed takes each away.
IMPLIED: dict[Triple, str] = {
    # Server-side apply of an object that does not exist yet is authorized as create.
    ("apps", "statefulsets", "create"): 'cannot create resource "statefulsets"',
    ("", "services", "create"): 'cannot create resource "services"',
    ("", "configmaps", "create"): 'cannot create resource "configmaps"',
    ("", "persistentvolumeclaims", "create"): 'cannot create resource "persistentvolumeclaims"',
    ("networking.k8s.io", "networkpolicies", "create"):
        'cannot create resource "networkpolicies"',
    # OwnerReferencesPermissionEnforcement: blockOwnerDeletion on an IOC's objects.
    ("epics-operator.io", "iocs/finalizers", "update"): "cannot set blockOwnerDeletion",
}
# What kopf may touch without a namespace, besides what the chart grants cluster-wide.
CLUSTER_SCOPED = {"nodes", "namespaces", "customresourcedefinitions", "servicecidrs"}
# A refusal in the operator's log: the API server's RBAC wording, kopf's, or an HTTP 403
# (urllib3's debug line). Nothing here deletes a namespace, the other source of 403s.
DENIED = re.compile(r'is forbidden: User "system:serviceaccount:|Not enough permissions'
                    r'|APIForbiddenError|HTTP/1\.1" 403 ')


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str
    values: dict[str, Any]
    # Where the scenario puts IOCs: the first gets every mode, the second one IOC.
    iocs_in: tuple[str, str]
    node_ip: str
    directory_namespace: str | None = None
    # The name service's address the operator is told (None: per-IOC directories).
    name_service: str | None = None

    @property
    def account(self) -> str:
        return self.name if "ioc-operator" in self.name else f"{self.name}-ioc-operator"

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.account}"

    def namespaces(self) -> list[str]:
        extra = [self.directory_namespace] if self.directory_namespace else []
        return [self.namespace, *self.iocs_in, *extra]


RELEASES = {
    # The chart's defaults: a ClusterRole, all namespaces watched.
    # The chart's defaults: a ClusterRole, all namespaces watched, the name service on.
    "cluster": Release("ioc-operator", "ioc-system", {}, ("beamline", "linac"),
                       node_ip="198.18.0.21",
                       name_service="ioc-operator-name-server.ioc-system.svc"),
    # Roles per namespace, and the per-IOC directories of a site without name service.
    "namespaced": Release(
        "epics", "epics-ops",
        {"rbac": {"scope": "namespaced"}, "watchNamespaces": ["bl-12", "bl-13"],
         "directory": {"clusterNamespace": "epics-dir"},
         "nameService": {"enabled": False}},
        ("bl-12", "bl-13"), node_ip="198.18.0.31", directory_namespace="epics-dir"),
}


def component(obj: dict[str, Any]) -> str:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component", "")


@dataclass
class Installed:
    release: Release
    objects: list[dict[str, Any]]
    kubeconfig: Path
    # Granted triples by namespace; None: cluster-wide (ClusterRoles).
    grants: dict[str | None, set[Triple]] = field(default_factory=dict)

    def allows(self, req: Request) -> bool:
        if req.triple in self.grants.get(None, set()):
            return True
        return req.namespace is not None and req.triple in self.grants.get(req.namespace, set())

    def granted(self) -> set[Triple]:
        return set().union(*self.grants.values())


def ensure_namespaces(plane: ControlPlane, names: list[str]) -> None:
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in names]
    plane.kubectl("apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "List", "items": docs}))


@pytest.fixture(scope="module")
def install(helm: Helm, chart_plane: ControlPlane,
            tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Installed]:
    """Install a release's rendered chart with kubectl (once per release)."""
    done: dict[str, Installed] = {}

    def get(scope: str) -> Installed:
        if scope in done:
            return done[scope]
        rel = RELEASES[scope]
        ensure_namespaces(chart_plane, rel.namespaces())
        objects = helm.template(rel.name, rel.namespace, rel.values)
        chart_plane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": objects}))
        path = tmp_path_factory.mktemp(f"sa-{scope}") / "kubeconfig"
        installed = Installed(rel, objects, service_account_kubeconfig(
            chart_plane, rel.namespace, rel.account, path))
        for obj in by_kind(objects, "ClusterRole") + by_kind(objects, "Role"):
            if component(obj) != "operator":
                continue  # the name server's: test_name_server_reads_iocs_and_nothing_else
            ns = obj["metadata"].get("namespace")
            installed.grants.setdefault(ns, set()).update(rule_triples(obj["rules"]))
        done[scope] = installed
        return installed

    return get


# ------------------------------------------------------------------ server dry-run


@pytest.mark.parametrize("scope", sorted(RELEASES))
def test_rendered_objects_pass_server_side_dry_run(helm, chart_plane, tmp_path, scope):
    rel = RELEASES[scope]
    ensure_namespaces(chart_plane, rel.namespaces())
    objects = helm.template(rel.name, rel.namespace, rel.values, crds=True)
    kinds = {o["kind"] for o in objects}
    assert {"CustomResourceDefinition", "ServiceAccount", "ClusterRole",
            "ClusterRoleBinding", "Deployment"} <= kinds
    if scope == "namespaced":
        assert {"Role", "RoleBinding"} <= kinds
    manifest = tmp_path / "rendered.json"
    manifest.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    done = chart_plane.kubectl("apply", "--dry-run=server", "-o", "name", "-f", str(manifest),
                               check=False)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == len(objects), done.stdout


@pytest.mark.parametrize("scope", sorted(RELEASES))
def test_helm_install_dry_run_prints_next_steps(helm, chart_plane, scope):
    """Helm itself against the API server (server-side dry run), and NOTES.txt."""
    rel = RELEASES[scope]
    ensure_namespaces(chart_plane, rel.namespaces())
    path = helm.home / f"install-{scope}.yaml"
    path.write_text(json.dumps(rel.values))
    done = helm("install", rel.name, str(CHART), "--namespace", rel.namespace,
                "--values", str(path), "--dry-run=server",
                "--kubeconfig", str(chart_plane.kubeconfig))
    notes = done.stdout.split("NOTES:", 1)[1]
    for words in ("rollout status deployment/", "kubectl apply", "examples/",
                  "kubectl get iocs", "ioc-operator client-env", "configMapRef"):
        assert words in notes, notes
    if scope == "namespaced":
        assert "-n bl-12" in notes and "epics-client-env-cluster" in notes, notes


# ----------------------------------------------------------------------- scenario


def ioc(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": IOC_API, "kind": "IOC",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"image": "registry.example/ioc:1", "prefix": f"{name.upper()}:", **spec}}


def condition(obj: dict[str, Any] | None, ctype: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == ctype:
            return cond
    return None


def settled(kube: Kube, ns: str, name: str, status: str) -> dict[str, Any] | None:
    """The IOC once its current generation is reconciled with this outcome."""
    obj = kube.get(IOC_API, "IOC", ns, name)
    cond = condition(obj, "Reconciled")
    if (obj and cond and cond["status"] == status
            and cond.get("observedGeneration") == obj["metadata"]["generation"]):
        return obj
    return None


def owned_by(obj: dict[str, Any] | None, owner: dict[str, Any]) -> bool:
    return any(ref["uid"] == owner["metadata"]["uid"] and ref.get("controller")
               for ref in (obj or {}).get("metadata", {}).get("ownerReferences") or [])


def run_scenario(kube: Kube, rel: Release) -> None:
    """IOCs of every mode, a host-port clash, a probe daemon, a mode change that prunes,
    and the deletion of a namespace's last IOC: every path that calls the API."""
    main, other = rel.iocs_in
    rack1, rack2 = f"{rel.name}-rack-1", f"{rel.name}-rack-2"
    kube.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": rack1},
                 "status": {"addresses": [{"type": "InternalIP", "address": rel.node_ip}]}})
    kube.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": rack2}})
    ports = {"ca": 5070, "pvaServer": 5081, "pvaBroadcast": 5082}
    kube.create(ioc("pod-a", main, network={"mode": "pod"}, autosave={"enabled": True}))
    kube.create(ioc("side-a", main, network={"mode": "sidecar", "allowedNamespaces": [other]},
                    servers={"pva": {"implementation": "classic"}}))
    kube.create(ioc("host-a", main, network={"mode": "host", "ports": ports},
                    scheduling={"nodeName": rack1}))
    # A probe, on a node without an address: it never sends a packet.
    kube.create(ioc("probe-a", main, network={"mode": "host"}, scheduling={"nodeName": rack2},
                    probe={"pv": "PROBE-A:HEARTBEAT"}))
    kube.create(ioc("pod-b", other))
    # An IOC mounting a ConfigMap of its namespace: the operator reads it for its hash.
    kube.create({"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": "cfg-a-files", "namespace": main,
                              "labels": {"epics-operator.io/config": "true"}},
                 "data": {"st.cmd": "iocInit()\n"}})
    kube.create(ioc("cfg-a", main, config={"configMap": "cfg-a-files"}))

    done = {n: wait_for(f"{n} reconciled", lambda n=n: settled(kube, main, n, "True"))
            for n in ("pod-a", "side-a", "host-a", "cfg-a")}
    for name, obj in done.items():
        sts = kube.get("apps/v1", "StatefulSet", main, name)
        assert owned_by(sts, obj), f"StatefulSet {name}"
        assert obj["status"]["endpoints"], obj["status"]
    assert done["host-a"]["status"]["endpoints"]["ca"] == f"{rel.node_ip}:5070"
    assert kube.get("v1", "PersistentVolumeClaim", main, "pod-a-autosave")
    assert owned_by(kube.get("v1", "ConfigMap", main, "side-a-pvagw"), done["side-a"])
    assert owned_by(kube.get("networking.k8s.io/v1", "NetworkPolicy", main, "side-a"),
                    done["side-a"])
    wait_for("pod-b reconciled", lambda: settled(kube, other, "pod-b", "True"))

    # The same explicit host ports on the same node: the newer IOC is refused, and the
    # operator patches the older one so that it reports the clash too.
    kube.create(ioc("host-b", main, network={"mode": "host", "ports": ports},
                    scheduling={"nodeName": rack1}))
    refused = wait_for("host-b refused", lambda: settled(kube, main, "host-b", "False"))
    assert condition(refused, "Reconciled")["reason"] == "PortConflict"
    wait_for("host-a told of the clash", lambda: (
        (cond := condition(kube.get(IOC_API, "IOC", main, "host-a"), "PortConflict"))
        and cond["status"] == "True"))
    probe = wait_for("probe-a's Reachable condition", lambda: (
        (o := kube.get(IOC_API, "IOC", main, "probe-a")) and condition(o, "Reachable") and o))
    # the probe is the operator's own task: no finalizer holds the IOC if it is gone
    assert not probe["metadata"].get("finalizers"), probe["metadata"]

    def directory(ns: str, name: str = "epics-client-env") -> dict[str, str] | None:
        cm = kube.get("v1", "ConfigMap", ns, name)
        return (cm or {}).get("data")

    constant = (name_service_env(NameService(rel.name_service)) if rel.name_service
                else None)

    def lists_all(data: dict[str, str] | None) -> bool:
        if constant is not None:  # only the name service, whatever the IOCs
            return {k: v for k, v in (data or {}).items() if k.startswith("EPICS_")} \
                == constant
        addrs = (data or {}).get("EPICS_CA_ADDR_LIST", "").split()
        wanted = [done["pod-a"]["status"]["clientEnv"]["EPICS_CA_ADDR_LIST"],
                  done["side-a"]["status"]["clientEnv"]["EPICS_CA_ADDR_LIST"],
                  f"{rel.node_ip}:5070"]
        return all(w in addrs for w in wanted)

    wait_for(f"directory in {main}", lambda: lists_all(directory(main)))
    wait_for(f"directory in {other}", lambda: directory(other))
    versions = {ns: kube.get("v1", "ConfigMap", ns, "epics-client-env")["metadata"][
        "resourceVersion"] for ns in (main, other)}
    if rel.directory_namespace:
        wait_for("cluster directory", lambda: lists_all(
            directory(rel.directory_namespace, "epics-client-env-cluster")))
    events = kube.list("v1", "Event", main)
    assert any(e["involvedObject"].get("name") == "pod-a" and e["reason"] == "Applied"
               for e in events), "kopf posts condition changes as events"

    # A mode change prunes what the IOC no longer renders: its Service, gateway config
    # and NetworkPolicy.
    kube.request("PATCH", f"/apis/{IOC_API}/namespaces/{main}/iocs/side-a",
                 body={"spec": {"network": {"mode": "host", "allowedNamespaces": None},
                                "servers": {"pva": {"implementation": "pvxs"}},
                                "scheduling": {"nodeName": rack1}}},
                 content_type="application/merge-patch+json")
    wait_for("side-a pruned", lambda: (
        kube.get("v1", "Service", main, "side-a") is None
        and kube.get("v1", "ConfigMap", main, "side-a-pvagw") is None
        and kube.get("networking.k8s.io/v1", "NetworkPolicy", main, "side-a") is None))

    # The last IOC of a namespace gone: its directory goes too, unless it is the name
    # service's constant one, which was never rewritten and stays.
    for name in ("pod-a", "side-a", "host-a", "host-b", "probe-a", "cfg-a"):
        kube.delete(IOC_API, "IOC", main, name)
    kube.delete(IOC_API, "IOC", other, "pod-b")
    wait_for("IOCs gone", lambda: not kube.list(IOC_API, "IOC", main)
             and not kube.list(IOC_API, "IOC", other))
    if constant is None:
        wait_for("directories deleted", lambda: directory(main) is None
                 and directory(other) is None)
        return
    time.sleep(2)  # a publish would follow the deletions within a fraction of a second
    for ns, version in versions.items():
        cm = kube.get("v1", "ConfigMap", ns, "epics-client-env")
        assert cm is not None and cm["metadata"]["resourceVersion"] == version, ns


@pytest.fixture
def operator_as(chart_plane: ControlPlane,
                tmp_path: Path) -> Iterator[Callable[[Installed], ChartOperator]]:
    started: list[ChartOperator] = []

    def start(installed: Installed) -> ChartOperator:
        (deployment,) = [d for d in by_kind(installed.objects, "Deployment")
                         if component(d) == "operator"]
        op = ChartOperator(deployment, installed.kubeconfig, tmp_path / "operator.log")
        op.start()
        started.append(op)
        wait_for("the liveness endpoint", lambda: op.healthy() or not op.running())
        assert op.running(), op.log()[-3000:]
        return op

    yield start
    for op in started:
        op.stop()
        print(f"operator log: {op.log_path}")


@pytest.mark.parametrize("scope", sorted(RELEASES))
def test_operator_reconciles_with_exactly_the_chart_rbac(chart_plane, admin, install,
                                                        operator_as, scope):
    installed = install(scope)
    rel = installed.release
    op = operator_as(installed)
    run_scenario(admin, rel)
    assert op.healthy()
    # the chart's metrics endpoint (here on loopback) counted the scenario's reconciles
    assert op.metrics()[("ioc_operator_reconciles_total", (("result", "applied"),))] > 0
    op.stop()

    log = op.log()
    denied = [line for line in log.splitlines() if DENIED.search(line)]
    assert not denied, "\n".join(denied[:10])

    audit = chart_plane.workdir / "audit.log"
    requests = [r for r in audited(audit, rel.user) if r.group != "authorization.k8s.io"]
    assert requests, f"no requests of {rel.user} audited"
    refused = sorted({f"{r.verb} {r.uri} -> {r.code} ({r.decision})"
                      for r in requests if r.decision != "allow"})
    assert not refused, refused
    # Every request is one the chart grants in that namespace (or cluster-wide).
    assert all(installed.allows(r) for r in requests)
    watched = set(rel.iocs_in) | {rel.directory_namespace} - {None}
    if scope == "namespaced":
        assert {r.namespace for r in requests if r.namespace} <= watched
    # Without a namespace: cluster-scoped reads, and (all namespaces) kopf's watches.
    unscoped = [r for r in requests if r.namespace is None and r.resource not in CLUSTER_SCOPED]
    assert all(r.verb in ("list", "watch") for r in unscoped), unscoped
    assert not unscoped or scope == "cluster", unscoped
    # ... and the chart grants nothing that was not used.
    used = {r.triple for r in requests}
    assert installed.granted() - set(IMPLIED) == used, (
        f"granted but never used: {sorted(installed.granted() - set(IMPLIED) - used)}; "
        f"used but not granted: {sorted(used - installed.granted())}")
    # Discovery only (the API server grants it to everyone authenticated).
    paths = nonresource_paths(audit, rel.user)
    assert all(p == "/api" or p.startswith(("/api/", "/apis")) for p in paths), paths


# ----------------------------------------------------------------- implied verbs


def token_client(plane: ControlPlane, namespace: str, account: str) -> client.ApiClient:
    token = plane.kubectl("create", "token", account, "-n", namespace).stdout.strip()
    assert plane.pki is not None
    configuration = client.Configuration()
    configuration.host = plane.server
    configuration.ssl_ca_cert = str(plane.pki.ca.cert)
    configuration.api_key = {"authorization": f"Bearer {token}"}
    configuration.proxy = None
    return client.ApiClient(configuration)


def without(rules: list[dict[str, Any]], drop: Triple | None) -> list[dict[str, Any]]:
    """The same grants as `rules`, minus one (group, resource, verb)."""
    return [{"apiGroups": [g], "resources": [res], "verbs": [v]}
            for g, res, v in sorted(rule_triples(rules)) if (g, res, v) != drop]


@pytest.mark.parametrize("drop", [None, *sorted(IMPLIED)],
                         ids=lambda d: "all-granted" if d is None else "-".join(d).strip("-"))
def test_implied_permission_is_needed(chart_plane, admin, install, drop):
    """The operator's own apply (a dry run, as each reconcile starts) of a sidecar IOC
    with autosave and a NetworkPolicy (every kind it renders), as an account with the
    chart's namespaced rules minus `drop`."""
    installed = install("namespaced")
    role = by_kind(installed.objects, "Role")[0]
    ns = "ablation"
    account = "all-granted" if drop is None else "-".join(drop).replace("/", "-").strip("-")
    account = account.replace(".", "-")
    ensure_namespaces(chart_plane, [ns])
    binding = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account}
    chart_plane.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": account, "namespace": ns}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": account, "namespace": ns},
             "rules": without(role["rules"], drop)},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": account, "namespace": ns}, "roleRef": binding,
             "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns}]},
        ]}))
    name = f"ioc-{account}"[:50]
    body = admin.create(ioc(name, ns, network={"mode": "sidecar", "allowedNamespaces": [ns]},
                            autosave={"enabled": True},
                            servers={"pva": {"implementation": "classic"}}))
    with token_client(chart_plane, ns, account) as api:
        kube = Kube(api)
        errors = {}
        for obj in render(parse_ioc(body)):
            try:
                kube.apply(obj, dry_run=True)
            except KubeError as exc:
                errors[obj["kind"]] = exc
    if drop is None:
        assert not errors, errors
        return
    assert errors, f"nothing refused without {drop}"
    for kind, exc in errors.items():
        assert exc.status == 403, (kind, exc)
        assert IMPLIED[drop] in exc.message, (kind, exc.message)


# ------------------------------------------------------------------------ can-i


# (verb, resource, namespace or "-A" or None, expected) as the ServiceAccount.
CLUSTER_CAN_I = [
    ("list", "iocs.epics-operator.io", "-A", True),
    ("watch", "iocs.epics-operator.io", "-A", True),
    ("patch", "iocs.epics-operator.io/status", "beamline", True),
    ("update", "iocs.epics-operator.io/finalizers", "beamline", True),
    ("patch", "statefulsets.apps", "beamline", True),
    ("delete", "services", "beamline", True),
    ("delete", "configmaps", "beamline", True),
    ("delete", "networkpolicies.networking.k8s.io", "beamline", True),
    ("create", "persistentvolumeclaims", "beamline", True),
    ("list", "pods", "beamline", True),
    ("create", "events", "beamline", True),
    ("get", "nodes", None, True),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io", None, True),
    # Never: secrets, workloads of its own making, deleting IOCs, escalation.
    ("get", "secrets", "beamline", False),
    ("list", "secrets", "-A", False),
    ("watch", "secrets", "ioc-system", False),
    ("create", "pods", "beamline", False),
    ("delete", "pods", "beamline", False),
    ("create", "pods/exec", "beamline", False),
    ("create", "iocs.epics-operator.io", "beamline", False),
    ("update", "iocs.epics-operator.io", "beamline", False),
    ("delete", "iocs.epics-operator.io", "beamline", False),
    ("delete", "statefulsets.apps", "beamline", False),
    ("delete", "persistentvolumeclaims", "beamline", False),
    # spec.config.configMap: the operator reads the ConfigMap an IOC mounts (its hash)
    ("get", "configmaps", "beamline", True),
    ("get", "servicecidrs.networking.k8s.io", None, True),
    ("list", "servicecidrs.networking.k8s.io", None, False),
    ("update", "networkpolicies.networking.k8s.io", "beamline", False),
    ("create", "deployments.apps", "beamline", False),
    ("list", "nodes", None, False),
    ("patch", "nodes", None, False),
    ("list", "namespaces", None, False),
    ("delete", "namespaces", None, False),
    ("patch", "customresourcedefinitions.apiextensions.k8s.io", None, False),
    ("create", "serviceaccounts/token", "ioc-system", False),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", None, False),
    ("bind", "clusterroles.rbac.authorization.k8s.io", None, False),
    ("escalate", "roles.rbac.authorization.k8s.io", "beamline", False),
    ("impersonate", "serviceaccounts", "ioc-system", False),
]
NAMESPACED_CAN_I = [
    ("list", "iocs.epics-operator.io", "bl-12", True),
    ("watch", "iocs.epics-operator.io", "bl-13", True),
    ("patch", "statefulsets.apps", "bl-12", True),
    ("update", "iocs.epics-operator.io/finalizers", "bl-13", True),
    ("create", "configmaps", "epics-dir", True),
    ("patch", "configmaps", "epics-dir", True),
    ("get", "nodes", None, True),
    ("list", "namespaces", None, True),
    # Nothing outside its namespaces, and nothing cluster-wide but the reads above.
    ("list", "iocs.epics-operator.io", "-A", False),
    ("list", "iocs.epics-operator.io", "default", False),
    ("patch", "statefulsets.apps", "default", False),
    ("create", "networkpolicies.networking.k8s.io", "default", False),
    ("list", "configmaps", "epics-dir", False),
    ("delete", "configmaps", "epics-dir", False),
    ("patch", "iocs.epics-operator.io/status", "beamline", False),
    ("get", "secrets", "bl-12", False),
    ("list", "secrets", "-A", False),
    ("create", "pods", "bl-12", False),
    ("delete", "iocs.epics-operator.io", "bl-12", False),
    ("get", "namespaces", None, False),
]


def can_i_mismatches(plane: ControlPlane, kubeconfig: Path,
                     table: list[tuple[str, str, str | None, bool]]) -> list[str]:
    """`kubectl auth can-i` as the account for each (verb, resource, where, expected)."""
    wrong = []
    for verb, resource, where, expected in table:
        args = ["auth", "can-i", verb]
        resource, _, sub = resource.partition("/")
        args.append(resource)
        if sub:
            args.append(f"--subresource={sub}")
        if where == "-A":
            args.append("--all-namespaces")
        elif where:
            args += ["-n", where]
        done = kubectl_as(plane, kubeconfig, *args)
        answer = done.stdout.strip()
        if answer not in ("yes", "no"):
            wrong.append(f"{' '.join(args)}: {done.stdout} {done.stderr}")
        elif (answer == "yes") != expected:
            wrong.append(f"{' '.join(args)}: {answer}, expected {'yes' if expected else 'no'}")
    return wrong


@pytest.mark.parametrize("scope", sorted(RELEASES))
def test_service_account_can_and_cannot(chart_plane, install, scope):
    installed = install(scope)
    table = CLUSTER_CAN_I if scope == "cluster" else NAMESPACED_CAN_I
    wrong = can_i_mismatches(chart_plane, installed.kubeconfig, table)
    assert not wrong, "\n".join(wrong)


# ------------------------------------------------------------------- name server


NAME_SERVER_CAN_I = [
    ("get", "iocs.epics-operator.io", "beamline", True),
    ("list", "iocs.epics-operator.io", "-A", True),
    ("watch", "iocs.epics-operator.io", "-A", True),
    ("patch", "iocs.epics-operator.io", "beamline", False),
    ("patch", "iocs.epics-operator.io/status", "beamline", False),
    ("list", "services", "beamline", False),
    ("list", "pods", "-A", False),
    ("get", "secrets", "ioc-system", False),
    ("list", "configmaps", "beamline", False),
    ("get", "nodes", None, False),
]


def test_name_server_reads_iocs_and_nothing_else(chart_plane, admin, install, tmp_path):
    """ioc-name-server, started with the chart's arguments as its own ServiceAccount,
    follows IOC objects' status into its table; the audit log shows it only listing
    and watching IOCs, and its account can do nothing else."""
    installed = install("cluster")
    rel = installed.release
    account = "ioc-operator-name-server"
    (deployment,) = [d for d in by_kind(installed.objects, "Deployment")
                     if component(d) == "name-server"]
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    kubeconfig = service_account_kubeconfig(chart_plane, rel.namespace, account,
                                            tmp_path / "kubeconfig")
    ports = [free_port() for _ in range(3)]
    argv = [sys.executable, "-m", "ioc_operator.nameserver.main", *c["args"],
            "--kubeconfig", str(kubeconfig), "--listen", "127.0.0.1",
            "--ca-port", str(ports[0]), "--pva-port", str(ports[1]),
            "--pva-udp-port", str(ports[2]), "--metrics-port", str(free_port())]
    log_path = tmp_path / "name-server.log"
    main = rel.iocs_in[0]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                     "NO_PROXY": "127.0.0.1"})
    try:
        wait_for("the name server listening", lambda: "answering for" in log_path.read_text()
                 or proc.poll() is not None)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        admin.create(ioc("ns-seen", main))
        admin.patch_status(IOC_API, "IOC", main, "ns-seen", {
            "mode": "pod", "endpoints": {"ca": "198.19.7.7:5064", "pva": "198.19.7.7:5075"},
            "ports": {"ca": 5064, "pvaServer": 5075, "pvaBroadcast": 5076}})
        wait_for("the IOC in its table", lambda: f"IOC {main}/ns-seen: new at "
                 "ca=198.19.7.7:5064 pva=198.19.7.7:5075" in log_path.read_text())
        admin.delete(IOC_API, "IOC", main, "ns-seen")
        wait_for("the IOC gone", lambda: f"IOC {main}/ns-seen deleted" in log_path.read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    text = log_path.read_text()
    assert not DENIED.search(text), text[-3000:]
    user = f"system:serviceaccount:{rel.namespace}:{account}"
    requests = [r for r in audited(chart_plane.workdir / "audit.log", user)
                if r.group != "authorization.k8s.io"]
    assert requests and all(r.decision == "allow" for r in requests)
    used = {r.triple for r in requests}
    assert used == {("epics-operator.io", "iocs", "list"), ("epics-operator.io", "iocs", "watch")}
    granted = set().union(*(rule_triples(r["rules"]) for r in
                            by_kind(installed.objects, "ClusterRole")
                            + by_kind(installed.objects, "Role") if component(r) == "name-server"))
    assert granted == {("epics-operator.io", "iocs", v) for v in ("get", "list", "watch")}
    wrong = can_i_mismatches(chart_plane, kubeconfig, NAME_SERVER_CAN_I)
    assert not wrong, "\n".join(wrong)
