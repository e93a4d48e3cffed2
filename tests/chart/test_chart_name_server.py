"""The chart's name service, rendered: a Deployment of 2 replicas behind one Service,
a PodDisruptionBudget, non-root with a read-only root file system, read-only RBAC on
IOCs, its flags valid for ioc-name-server, and the operator told its address. (Bad
nameService values: test_chart_files.test_bad_values_are_refused.)"""

from __future__ import annotations

from typing import Any

from chartlib import by_kind, rule_triples

from ioc_operator.model.config import OperatorConfig
from ioc_operator.nameserver.main import build_parser

NAME = "ioc-operator-name-server"
READ_IOCS = {("epics-operator.io", "iocs", v) for v in ("get", "list", "watch")}


def epics_services(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The name service's Service (not the name servers' metrics Service)."""
    return [s for s in of(objects, "Service", "name-server")
            if not s["metadata"]["name"].endswith("-metrics")]


def of(objects: list[dict[str, Any]], kind: str, component: str) -> list[dict[str, Any]]:
    return [o for o in by_kind(objects, kind)
            if o["metadata"]["labels"]["app.kubernetes.io/component"] == component]


def name_server(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = of(objects, "Deployment", "name-server")
    return deployment


def operator_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    (deployment,) = of(objects, "Deployment", "operator")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in c["env"] if "value" in e}


def test_default_name_service(helm):
    objects = helm.template("ioc-operator", "ioc-system")
    deployment = name_server(objects)
    assert deployment["metadata"]["name"] == NAME
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == NAME
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/epics-operator/ioc-gateway:0.1.0"  # the gateway image
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert "memory" in c["resources"]["limits"]
    # its flags are ioc-name-server's: the watch of all namespaces
    assert c["command"] == ["ioc-name-server"]
    args = build_parser().parse_args(c["args"])
    assert args.kubernetes and args.namespace == [] and args.internal_network == []
    ports = {(p["containerPort"], p["protocol"]) for p in c["ports"]}
    # the EPICS ports, and Prometheus metrics (test_chart_files.py)
    assert ports == {(5064, "TCP"), (5064, "UDP"), (5075, "TCP"), (5076, "UDP"),
                     (args.metrics_port, "TCP")}
    assert c["readinessProbe"]["tcpSocket"]["port"] == "ca-tcp"
    # replicas apart
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"

    (service,) = epics_services(objects)
    assert service["metadata"]["name"] == NAME
    assert service["spec"]["type"] == "ClusterIP" and "clusterIP" not in service["spec"]
    assert {(p["port"], p["targetPort"], p["protocol"]) for p in service["spec"]["ports"]} == {
        (5064, 5064, "TCP"), (5064, 5064, "UDP"), (5075, 5075, "TCP"), (5076, 5076, "UDP")}
    labels = spec["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()

    (pdb,) = of(objects, "PodDisruptionBudget", "name-server")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()

    # the operator's Deployment does not select the name server's pods, nor the reverse
    (operator,) = of(objects, "Deployment", "operator")
    op_selector = operator["spec"]["selector"]["matchLabels"]
    assert not op_selector.items() <= labels.items()
    op_labels = operator["spec"]["template"]["metadata"]["labels"]
    assert not spec["selector"]["matchLabels"].items() <= op_labels.items()

    # and the operator is told where it is
    env = operator_env(objects)
    assert env["IOC_OPERATOR_NAME_SERVICE_ADDRESS"] == f"{NAME}.ioc-system.svc"


def test_rbac_is_read_only_on_iocs_exactly(helm):
    objects = helm.template("ioc-operator", "ioc-system")
    (role,) = of(objects, "ClusterRole", "name-server")
    assert rule_triples(role["rules"]) == READ_IOCS
    (binding,) = of(objects, "ClusterRoleBinding", "name-server")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": NAME,
                                    "namespace": "ioc-system"}]
    (account,) = of(objects, "ServiceAccount", "name-server")
    assert account["metadata"]["name"] == NAME
    assert not of(objects, "Role", "name-server")


def test_namespaced_scope_reads_iocs_in_its_namespaces_only(helm):
    values = {"rbac": {"scope": "namespaced"}, "watchNamespaces": ["bl-12", "bl-13"]}
    objects = helm.template("epics", "epics-ops", values)
    assert not of(objects, "ClusterRole", "name-server")
    roles = of(objects, "Role", "name-server")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["bl-12", "bl-13"]
    assert all(rule_triples(r["rules"]) == READ_IOCS for r in roles)
    bindings = of(objects, "RoleBinding", "name-server")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["bl-12", "bl-13"]
    args = build_parser().parse_args(name_server(objects)["spec"]["template"]["spec"]
                                     ["containers"][0]["args"])
    assert args.namespace == ["bl-12", "bl-13"]
    # its own namespaces win over the operator's
    values["nameService"] = {"namespaces": ["bl-12"]}
    objects = helm.template("epics", "epics-ops", values)
    assert [r["metadata"]["namespace"] for r in of(objects, "Role", "name-server")] == ["bl-12"]


def test_pinned_address_exposure_and_outside_clients(helm):
    values = {"nameService": {
        "clusterIP": "198.19.0.53", "internalNetworks": ["10.0.0.0/8", "198.18.0.0/15"],
        "service": {"type": "NodePort", "nodePorts": {"ca": 30064, "pva": 30075,
                                                      "pvaUdp": 30076}},
        "replicas": 3, "verbose": True, "extraArgs": ["--cache-size", "500000"]}}
    objects = helm.template("ioc-operator", "ioc-system", values)
    (service,) = epics_services(objects)
    spec = service["spec"]
    assert spec["clusterIP"] == "198.19.0.53" and spec["type"] == "NodePort"
    assert spec["externalTrafficPolicy"] == "Local"  # clients' own addresses reach it
    assert {(p["name"], p["nodePort"]) for p in spec["ports"]} == {
        ("ca-tcp", 30064), ("ca-udp", 30064), ("pva-tcp", 30075), ("pva-udp", 30076)}
    assert operator_env(objects)["IOC_OPERATOR_NAME_SERVICE_ADDRESS"] == "198.19.0.53"
    deployment = name_server(objects)
    assert deployment["spec"]["replicas"] == 3
    args = build_parser().parse_args(deployment["spec"]["template"]["spec"]["containers"][0]
                                     ["args"])
    assert [str(n) for n in args.internal_network] == ["10.0.0.0/8", "198.18.0.0/15"]
    assert args.verbose == 2 and args.cache_size == 500000
    # LoadBalancer: no node ports pinned, same traffic policy
    values["nameService"]["service"] = {"type": "LoadBalancer"}
    (service,) = epics_services(helm.template("ioc-operator", "ioc-system", values))
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    assert not any("nodePort" in p for p in service["spec"]["ports"])
    # an explicit address wins over the ClusterIP
    values["nameService"]["address"] = "epics-ns.site.example"
    env = operator_env(helm.template("ioc-operator", "ioc-system", values))
    assert env["IOC_OPERATOR_NAME_SERVICE_ADDRESS"] == "epics-ns.site.example"


def test_disabled_name_service_leaves_the_per_ioc_directory(helm):
    objects = helm.template("ioc-operator", "ioc-system", {"nameService": {
        "enabled": False, "replicas": 2, "service": {"type": "ClusterIP"},
        "podDisruptionBudget": {"minAvailable": 1}}})
    assert not [o for o in objects
                if o["metadata"].get("labels", {}).get("app.kubernetes.io/component")
                == "name-server"]
    env = operator_env(objects)
    assert "IOC_OPERATOR_NAME_SERVICE_ADDRESS" not in env
    assert OperatorConfig.from_env(env).name_service_address is None
