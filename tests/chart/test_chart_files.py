"""The chart, the image Dockerfiles and the kind files, without an API server: helm lint,
values schema, rendered shape, the operator's own settings and CLI against what the chart
renders, shellcheck."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartlib import CHART, REPO, by_kind, rule_triples, run, shellcheck
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ioc_operator.cli import parser
from ioc_operator.model.config import DEFAULT_GATEWAY_IMAGE, OperatorConfig
from ioc_operator.model.crd import crd_yaml
from ioc_testbed import resource

NAMESPACED = {"rbac": {"scope": "namespaced"}, "watchNamespaces": ["bl-12", "bl-13"],
              "directory": {"clusterNamespace": "epics-dir"}}
VALUE_SETS = {"default": {}, "namespaced": NAMESPACED,
              "cluster-some-namespaces": {"watchNamespaces": ["bl-12"], "verbose": True}}


def chart_meta() -> dict[str, Any]:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def deployment_of(objects: list[dict[str, Any]], component: str = "operator") -> dict[str, Any]:
    (deployment,) = [d for d in by_kind(objects, "Deployment")
                     if d["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return deployment


def container(objects: list[dict[str, Any]], component: str = "operator") -> dict[str, Any]:
    (c,) = deployment_of(objects, component)["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env") or [] if "value" in e}


# ------------------------------------------------------------------------ chart


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_helm_lint_strict(helm, values):
    args = ["lint", "--strict", str(CHART)]
    if VALUE_SETS[values]:
        path = helm.home / f"lint-{values}.yaml"
        path.write_text(yaml.safe_dump(VALUE_SETS[values]))
        args += ["--values", str(path)]
    done = helm(*args)
    assert "0 chart(s) failed" in done.stdout, done.stdout
    assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


@pytest.mark.parametrize(("values", "words"), [
    ({"rbac": {"scope": "everywhere"}}, "/rbac/scope"),
    ({"rbac": {"scope": "namespaced"}}, "watchNamespaces"),
    ({"watchNamespaces": ["Not_A_Namespace"]}, "watchNamespaces"),
    ({"hostPorts": {"min": 80, "max": 5999}}, "/hostPorts/min"),
    ({"hostPorts": {"min": 6000, "max": 5999}}, "hostPorts.min must not exceed"),
    ({"directory": {"name": "Bad Name"}}, "/directory/name"),
    ({"imageTag": "0.2.0"}, "imageTag"),  # a typo is an error, not silently ignored
    ({"nameService": {"service": {"type": "ExternalName"}}}, "/nameService/service/type"),
    ({"nameService": {"clusterIP": "not-an-ip"}}, "/nameService/clusterIP"),
    ({"nameService": {"service": {"type": "NodePort", "nodePorts": {"ca": 5064}}}},
     "/nameService/service/nodePorts/ca"),
    ({"nameService": {"replicas": 0}}, "/nameService/replicas"),
    ({"nameService": {"internalNetworks": ["everyone"]}}, "/nameService/internalNetworks"),
    ({"nameService": {"adress": "x"}}, "adress"),
], ids=["scope", "namespaced-without-namespaces", "namespace-name", "port-range",
        "ports-reversed", "directory-name", "unknown-key", "name-service-type",
        "name-service-cluster-ip", "name-service-node-port", "name-service-replicas",
        "name-service-network", "name-service-unknown-key"])
def test_bad_values_are_refused(helm, values, words):
    path = helm.home / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    done = helm("template", "x", str(CHART), "--values", str(path), check=False)
    assert done.returncode != 0, done.stdout
    assert words in done.stderr, done.stderr


def test_chart_crd_is_the_generated_one():
    """The chart ships exactly what `ioc-operator crd` prints (and crds/ holds)."""
    chart_crds = sorted(p.name for p in (CHART / "crds").iterdir())
    assert chart_crds == sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    for name in chart_crds:
        assert (CHART / "crds" / name).read_text() == (REPO / "crds" / name).read_text(), (
            f"charts/ioc-operator/crds/{name} differs from crds/{name}: copy it again")
    assert (CHART / "crds" / "iocs.epics-operator.io.yaml").read_text() == crd_yaml(), (
        "the chart's CRD is stale: ioc-operator crd > charts/ioc-operator/crds/"
        "iocs.epics-operator.io.yaml (and crds/)")


def test_versions_and_default_images_match():
    meta = chart_meta()
    assert meta["appVersion"] == version("ioc-operator") == "0.1.0"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    gateway = f"{values['gateway']['image']['repository']}:{meta['appVersion']}"
    assert values["gateway"]["image"]["tag"] == ""  # the appVersion
    assert gateway == DEFAULT_GATEWAY_IMAGE


def test_default_deployment(helm):
    objects = helm.template("ioc-operator", "ioc-system")
    spec = deployment_of(objects)["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}  # never two operators at once
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "ioc-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    c = container(objects)
    assert c["image"] == f"ghcr.io/epics-operator/ioc-operator:{chart_meta()['appVersion']}"
    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    # The kubelet probes kopf's liveness endpoint where the operator serves it.
    url = c["args"][c["args"].index("--liveness") + 1]
    m = re.fullmatch(r"http://0\.0\.0\.0:(\d+)(/\S*)", url)
    assert m, url
    probe = c["livenessProbe"]["httpGet"]
    assert probe["path"] == m.group(2)
    (port,) = [p for p in c["ports"] if p["name"] == probe["port"]]
    assert port["containerPort"] == int(m.group(1))
    # The writable /tmp of a read-only root file system.
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
    # The chart's defaults are the operator's defaults, plus the name service (on by
    # default) at its Service's DNS name.
    assert c["command"] == ["ioc-operator"]
    args = parser().parse_args(c["args"])
    assert args.command == "run" and args.namespace is None and not args.verbose
    assert OperatorConfig.from_env(env_of(c)) == OperatorConfig(
        name_service_address="ioc-operator-name-server.ioc-system.svc")


def test_values_reach_the_operator(helm):
    values = {**NAMESPACED, "verbose": True, "directory": {
        "name": "epics-env", "clusterNamespace": "epics-dir"},
        "hostPorts": {"min": 6000, "max": 6100},
        "gateway": {"image": {"repository": "registry.example/gw", "tag": "7"},
                    "caGatewayImage": "registry.example/ca-gateway:2.1.3"}}
    c = container(helm.template("epics", "epics-ops", values))
    env = env_of(c)
    assert all(k in {f"IOC_OPERATOR_{f.upper()}" for f in OperatorConfig.model_fields}
               for k in env if k.startswith("IOC_OPERATOR_")), env
    assert OperatorConfig.from_env(env) == OperatorConfig(
        gateway_image="registry.example/gw:7",
        ca_gateway_image="registry.example/ca-gateway:2.1.3", directory_name="epics-env",
        cluster_directory_namespace="epics-dir", host_port_min=6000, host_port_max=6100,
        name_service_address="epics-ioc-operator-name-server.epics-ops.svc")
    args = parser().parse_args(c["args"])
    assert args.namespace == ["bl-12", "bl-13"] and args.verbose


def operators(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The operator's own objects (not the name server's)."""
    return [o for o in objects
            if o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"]


def test_namespaced_rbac(helm):
    objects = operators(helm.template("epics", "epics-ops", NAMESPACED))
    (cluster_role,) = by_kind(objects, "ClusterRole")
    assert {r for _, r, _ in rule_triples(cluster_role["rules"])} == {
        "nodes", "namespaces", "customresourcedefinitions", "servicecidrs"}
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]) for r in by_kind(objects, "Role")}
    assert roles == {("bl-12", "epics-ioc-operator"), ("bl-13", "epics-ioc-operator"),
                     ("epics-dir", "epics-ioc-operator-directory")}
    bindings = by_kind(objects, "RoleBinding") + by_kind(objects, "ClusterRoleBinding")
    assert len(bindings) == 4
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "epics-ioc-operator",
                                        "namespace": "epics-ops"}]
    # The directory namespace is written, not watched.
    (directory,) = [r for r in by_kind(objects, "Role")
                    if r["metadata"]["namespace"] == "epics-dir"]
    assert rule_triples(directory["rules"]) == {("", "configmaps", "create"),
                                                ("", "configmaps", "patch")}


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_rbac_has_no_wildcards_secrets_or_escalation(helm, values):
    objects = helm.template("ioc-operator", "ioc-system", VALUE_SETS[values])
    triples = set()
    for role in by_kind(objects, "ClusterRole") + by_kind(objects, "Role"):
        triples |= rule_triples(role["rules"])
        assert all("resourceNames" not in r and "nonResourceURLs" not in r
                   for r in role["rules"])
    assert triples
    assert not [t for t in triples if "*" in t]
    resources = {r for _, r, _ in triples}
    assert not resources & {"secrets", "pods/exec", "pods/attach", "serviceaccounts/token",
                            "roles", "clusterroles", "rolebindings", "clusterrolebindings"}
    assert not {v for *_, v in triples} & {"escalate", "bind", "impersonate",
                                            "deletecollection"}
    assert not [t for t in triples if t[1] == "pods" and t[2] != "list"]


# ---------------------------------------------------------------------- images


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line[:-1]}" if line.endswith("\\") else f"{pending} {line}"
        if line.endswith("\\"):
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        pending = ""
    assert not pending, f"{dockerfile}: dangling line continuation"
    return out


def pinned() -> dict[str, str]:
    pins = {}
    for line in (REPO / "docker" / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9._-]+)==([0-9][A-Za-z0-9.+-]*)", line)
            assert m, f"not an exact pin: {line}"
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def test_requirements_pin_every_runtime_dependency():
    pins = pinned()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        assert name in pins, f"{dep.name} is not pinned in docker/requirements.txt"
        assert dep.specifier.contains(pins[name], prereleases=True), (dep, pins[name])
    # The CA/PVA stacks the images exist for.
    assert {"kopf", "kubernetes", "caproto", "p4p", "pvxslibs", "epicscorelibs"} <= set(pins)


@pytest.mark.parametrize("name", ["operator", "gateway"])
def test_dockerfile(name):
    path = REPO / "docker" / f"{name}.Dockerfile"
    steps = instructions(path)
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    froms = [a.split()[0] for w, a in steps if w == "FROM"]
    assert froms and all(f in ("${PYTHON_IMAGE}", "python:3.11-slim") for f in froms), froms
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert args["VERSION"] == chart_meta()["appVersion"]
    users = [a for w, a in steps if w == "USER"]
    assert users[-1] == "65532:65532", "the image runs as the chart's non-root user"
    runs = " ; ".join(a for w, a in steps if w == "RUN")
    # Pinned: everything from docker/requirements.txt, nothing resolved at build time.
    assert "--no-deps -r /tmp/requirements.txt ioc-operator" in runs
    assert "--no-index" in runs and "pip check" in runs
    assert "COPY docker/requirements.txt /tmp/requirements.txt" in [
        f"{w} {a}" for w, a in steps]
    ignore = (REPO / "docker" / f"{name}.Dockerfile.dockerignore").read_text().split()
    for needed in ("!pyproject.toml", "!README.md", "!operator/", "!docker/requirements.txt"):
        assert needed in ignore
    if name == "operator":
        assert ("ENTRYPOINT", '["ioc-operator"]') in steps
    else:
        # The sidecar runs `sh -c 'sed ... && exec pvagw ...'`: the build checks all three.
        assert "command -v sh && command -v sed && command -v pvagw" in runs


# ------------------------------------------------------------------- kind, shell


def test_kind_cluster_has_one_control_plane_and_two_workers():
    config = yaml.safe_load((REPO / "kind" / "cluster.yaml").read_text())
    assert config["kind"] == "Cluster"
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    roles = sorted(n["role"] for n in config["nodes"])
    assert roles == ["control-plane", "worker", "worker"]
    assert "broadcast" in (REPO / "kind" / "cluster.yaml").read_text()


SCRIPTS = sorted([*(REPO / "kind").glob("*.sh"), *resource("kubernetes").glob("*.sh")])


def test_shellcheck():
    assert {p.name for p in SCRIPTS} >= {"create.sh", "try.sh", "delete.sh", "build-helm.sh",
                                        "build.sh"}
    done = run([shellcheck(), "--severity=style", *map(str, SCRIPTS)], check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    for script in SCRIPTS:
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), script
        assert "set -euo pipefail" in text, script


def test_build_helm_pins_a_helm_v3(helm):
    pinned_version = run(["bash", str(resource("kubernetes/build-helm.sh")),
                          "--version"]).stdout.strip()
    assert re.fullmatch(r"v3\.\d+\.\d+", pinned_version)
    assert helm("version", "--template", "{{.Version}}").stdout.strip() == pinned_version
    assert helm.binary.parent.name == f"helm-{pinned_version}"


# ----------------------------------------------------------------------- metrics


def service_named(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (svc,) = [s for s in by_kind(objects, "Service") if s["metadata"]["name"] == name]
    return svc


def metrics_port_of(c: dict[str, Any]) -> dict[str, Any]:
    (port,) = [p for p in c["ports"] if p["name"] == "metrics"]
    return port


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_metrics_endpoints_and_services_by_default(helm):
    """The operator and every name server serve metrics where their Services and the
    CLI say: the flag's port is the container port `metrics`, which each ClusterIP
    Service targets by name; no ServiceMonitor unless asked."""
    objects = helm.template("ioc-operator", "ioc-system")
    values = yaml.safe_load((CHART / "values.yaml").read_text())["metrics"]
    for component, parse, svc_name, port in (
            ("operator", parser(), "ioc-operator-metrics", values["port"]),
            ("name-server", name_server_parser(), "ioc-operator-name-server-metrics",
             values["nameServerPort"])):
        c = container(objects, component)
        args = parse.parse_args(c["args"])
        assert args.metrics_port == port
        assert metrics_port_of(c) == {"name": "metrics", "containerPort": port,
                                      "protocol": "TCP"}
        svc = service_named(objects, svc_name)
        assert svc["spec"]["type"] == "ClusterIP"
        assert svc["spec"]["ports"] == [{"name": "metrics", "protocol": "TCP", "port": port,
                                         "targetPort": "metrics"}]
        pod_labels = deployment_of(objects, component)["spec"]["template"]["metadata"][
            "labels"]
        assert selects(svc["spec"]["selector"], pod_labels)
        # the other component's pods are not selected
        other = "name-server" if component == "operator" else "operator"
        assert not selects(svc["spec"]["selector"], deployment_of(objects, other)[
            "spec"]["template"]["metadata"]["labels"])
    # never on the name service's own Service (it may be reachable from outside)
    epics = service_named(objects, "ioc-operator-name-server")
    assert "metrics" not in {p["name"] for p in epics["spec"]["ports"]}
    # the metrics port is not the liveness port
    c = container(objects)
    assert metrics_port_of(c)["containerPort"] != c["livenessProbe"]["httpGet"]["port"]
    assert not by_kind(objects, "ServiceMonitor")


def name_server_parser() -> Any:
    from ioc_operator.nameserver.main import build_parser

    return build_parser()


def test_service_monitor_when_enabled(helm):
    values = {"metrics": {"serviceMonitor": {"enabled": True, "interval": "15s",
                                             "labels": {"release": "prometheus"}}}}
    objects = helm.template("epics", "epics-ops", values)
    (monitor,) = by_kind(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == "epics-ops"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": ["epics-ops"]}
    assert spec["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s",
                                  "scrapeTimeout": "10s"}]
    selected = [s["metadata"]["name"] for s in by_kind(objects, "Service")
                if selects(spec["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert sorted(selected) == ["epics-ioc-operator-metrics",
                                "epics-ioc-operator-name-server-metrics"]
    # without the name service: the operator's alone
    objects = helm.template("epics", "epics-ops", {**values, "nameService": {"enabled": False}})
    (monitor,) = by_kind(objects, "ServiceMonitor")
    assert [s["metadata"]["name"] for s in by_kind(objects, "Service")
            if selects(monitor["spec"]["selector"]["matchLabels"],
                       s["metadata"]["labels"])] == ["epics-ioc-operator-metrics"]


def test_pod_monitor_selects_the_sidecar_gateways_of_rendered_iocs(helm):
    from ioc_operator.model.validation import parse_ioc
    from ioc_operator.render import render

    assert not by_kind(helm.template("epics", "epics-ops", {}), "PodMonitor")
    objects = helm.template("epics", "epics-ops", {"metrics": {"podMonitor": {
        "enabled": True, "labels": {"release": "prometheus"}}}})
    (monitor,) = by_kind(objects, "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"any": True}
    ioc = parse_ioc({"metadata": {"name": "gw", "namespace": "bl"}, "spec": {
        "image": "i", "prefix": "GW:", "network": {"mode": "sidecar"},
        "servers": {"pva": {"enabled": False}},
        "gateways": {"ca": {"metricsPort": 9101},
                     "bridge": {"enabled": True, "metricsPort": 9102}}}})
    (sts,) = [o for o in render(ioc) if o["kind"] == "StatefulSet"]
    template = sts["spec"]["template"]
    assert selects(spec["selector"]["matchLabels"], template["metadata"]["labels"])
    named = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    assert {e["port"] for e in spec["podMetricsEndpoints"]} <= named


def test_metrics_disabled(helm):
    objects = helm.template("ioc-operator", "ioc-system", {"metrics": {"enabled": False}})
    for component in ("operator", "name-server"):
        c = container(objects, component)
        assert "--metrics-port" not in c["args"]
        assert "metrics" not in {p["name"] for p in c["ports"]}
    assert not [s for s in by_kind(objects, "Service")
                if s["metadata"]["name"].endswith("-metrics")]
    assert parser().parse_args(container(objects)["args"]).metrics_port == 0


@pytest.mark.parametrize(("values", "words"), [
    ({"metrics": {"port": 8080}}, "metrics.port must differ from liveness.port"),
    ({"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}},
     "metrics.serviceMonitor.enabled needs metrics.enabled"),
    ({"metrics": {"nameServerPort": 5064}}, "metrics.nameServerPort must not be one"),
    ({"metrics": {"port": 80}}, "/metrics/port"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval"),
    ({"metrics": {"servicemonitor": {"enabled": True}}}, "servicemonitor"),
], ids=["liveness-port", "monitor-without-metrics", "epics-port", "low-port", "interval",
        "unknown-key"])
def test_bad_metrics_values_are_refused(helm, values, words):
    path = helm.home / "bad-metrics.yaml"
    path.write_text(yaml.safe_dump(values))
    done = helm("template", "x", str(CHART), "--values", str(path), check=False)
    assert done.returncode != 0, done.stdout
    assert words in done.stderr, done.stderr
