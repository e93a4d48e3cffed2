"""What a facility expects of an IOC resource (issue 21), rendered and validated
offline: instance config files, health probes, security contexts, init and extra
containers, a stable ClusterIP, rollout from a failing state."""

from __future__ import annotations

import ipaddress

import pytest

from ioc_operator.allocation import clusterip
from ioc_operator.model.config import OperatorConfig
from ioc_operator.model.errors import IOCValidationError
from ioc_operator.model.ioc import CONFIG_TOTAL_MAX
from ioc_operator.model.validation import check_config
from ioc_operator.render import names, render, resolve_ports
from ioc_operator.render.service import service

from iocs import by_kind, make_ioc

ST_CMD = 'dbLoadRecords("/epics/ioc/config/ioc.db", "P=T:")\niocInit()\n'


def pod_of(objects: list[dict]) -> dict:
    return by_kind(objects)["StatefulSet"]["spec"]["template"]


def ioc_container(objects: list[dict]) -> dict:
    return next(c for c in pod_of(objects)["spec"]["containers"] if c["name"] == "ioc")


# ---------------------------------------------------------------- spec.config

def test_inline_files_become_a_configmap_mounted_read_only_with_their_hash():
    ioc = make_ioc(config={"files": {"st.cmd": ST_CMD, "ioc.db": 'record(ai, "$(P)x") {}'}})
    objects = render(ioc)
    cm = next(o for o in objects if o["metadata"]["name"] == "ioc1-config")
    assert cm["data"] == {"ioc.db": 'record(ai, "$(P)x") {}', "st.cmd": ST_CMD}
    kinds = [o["kind"] for o in objects]
    assert kinds.index("ConfigMap") < kinds.index("StatefulSet")  # files before the pod
    pod = pod_of(objects)
    assert {"name": "ioc-config", "configMap": {"name": "ioc1-config"}} in pod["spec"]["volumes"]
    assert {"name": "ioc-config", "mountPath": "/epics/ioc/config", "readOnly": True} in (
        ioc_container(objects)["volumeMounts"])
    assert pod["metadata"]["annotations"][names.FILES_HASH_ANNOTATION]


def test_a_changed_file_changes_the_pod_template_and_nothing_else_does():
    def template(files: dict[str, str], **spec) -> dict:
        return pod_of(render(make_ioc(config={"files": files}, **spec)))

    first = template({"st.cmd": ST_CMD})
    assert template({"st.cmd": ST_CMD}) == first
    edited = template({"st.cmd": ST_CMD + "dbl\n"})
    assert edited["metadata"]["annotations"] != first["metadata"]["annotations"]


def test_an_existing_configmap_is_mounted_and_its_hash_comes_from_the_operator():
    ioc = make_ioc(config={"configMap": "bl01-motors-files", "mountPath": "/opt/ioc"})
    objects = render(ioc, mounted_config_hash="abc123")
    assert not [o for o in objects if o["metadata"]["name"] == "ioc1-config"]
    pod = pod_of(objects)
    assert {"name": "ioc-config", "configMap": {"name": "bl01-motors-files"}} in (
        pod["spec"]["volumes"])
    assert pod["metadata"]["annotations"][names.FILES_HASH_ANNOTATION] == "abc123"
    assert names.FILES_HASH_ANNOTATION not in (
        pod_of(render(ioc)).get("metadata", {}).get("annotations") or {})


@pytest.mark.parametrize("config, words", [
    ({}, "exactly one of files and configMap"),
    ({"files": {"st.cmd": "x"}, "configMap": "c"}, "exactly one of files and configMap"),
    ({"files": {"st cmd": "x"}}, "spec.config.files"),
    ({"files": {"a": "x" * (CONFIG_TOTAL_MAX // 2 + 1), "b": "x" * (CONFIG_TOTAL_MAX // 2)}},
     "256 KiB in all"),
    ({"configMap": "c", "mountPath": "relative"}, "spec.config.mountPath"),
])
def test_bad_config_is_refused_naming_the_field(config, words):
    with pytest.raises(IOCValidationError) as err:
        make_ioc(config=config)
    assert words in str(err.value)


# ---------------------------------------------------------------- spec.health

def test_default_probes_are_tcp_with_liveness_in_pod_mode():
    c = ioc_container(render(make_ioc()))
    assert c["startupProbe"]["tcpSocket"] == {"port": 5064}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] == 3600
    assert c["readinessProbe"]["tcpSocket"] == {"port": 5064}
    live = c["livenessProbe"]
    assert live["tcpSocket"] == {"port": 5064}
    assert live["periodSeconds"] * live["failureThreshold"] == 60


def test_sidecar_mode_without_a_heartbeat_has_no_probe_on_the_loopback_ioc():
    c = ioc_container(render(make_ioc(network={"mode": "sidecar"})))
    assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(c)


@pytest.mark.parametrize("mode, port", [("pod", 5064), ("host", 5070), ("sidecar", 15064)])
def test_a_heartbeat_pv_is_read_over_loopback_in_every_mode(mode, port):
    spec = {"network": {"mode": mode, **({"ports": {"ca": 5070}} if mode == "host" else {})},
            "health": {"pv": "T:UPTIME", "restartAfterSeconds": 30, "periodSeconds": 5,
                       "startupSeconds": 120}}
    c = ioc_container(render(make_ioc(**spec)))
    command = c["livenessProbe"]["exec"]["command"]
    assert command[0] == "env" and command[-1] == "T:UPTIME"
    assert f"EPICS_CA_ADDR_LIST=127.0.0.1:{port}" in command
    assert "EPICS_CA_AUTO_ADDR_LIST=NO" in command and "EPICS_CA_NAME_SERVERS=" in command
    assert command[-4:-1] == ["caget", "-w", "4"]
    assert c["livenessProbe"]["periodSeconds"] * c["livenessProbe"]["failureThreshold"] == 30
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] == 120
    assert c["readinessProbe"]["exec"] == c["livenessProbe"]["exec"]


def test_a_pva_only_heartbeat_uses_pvget_on_the_search_port_and_a_custom_command():
    spec = {"servers": {"ca": {"enabled": False}}, "network": {"mode": "sidecar"},
            "health": {"pv": "T:UPTIME", "command": ["python", "-m", "p4p.client.cli", "get"]}}
    command = ioc_container(render(make_ioc(**spec)))["startupProbe"]["exec"]["command"]
    assert "EPICS_PVA_ADDR_LIST=127.0.0.1:15076" in command
    assert command[-5:] == ["python", "-m", "p4p.client.cli", "get", "T:UPTIME"]


def test_restart_after_zero_means_no_liveness_probe():
    c = ioc_container(render(make_ioc(health={"pv": "T:UPTIME", "restartAfterSeconds": 0})))
    assert "livenessProbe" not in c and "readinessProbe" in c


# ------------------------------------------------- security, init and extra containers

def test_the_ioc_container_is_locked_down_by_default_and_the_user_adds_capabilities():
    assert ioc_container(render(make_ioc()))["securityContext"] == {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    sc = ioc_container(render(make_ioc(securityContext={
        "capabilities": {"add": ["SYS_NICE"]}, "runAsUser": 37000})))["securityContext"]
    assert sc == {"allowPrivilegeEscalation": False, "capabilities": {"add": ["SYS_NICE"]},
                  "runAsUser": 37000}


def test_pod_security_context_init_and_extra_containers_are_rendered():
    ioc = make_ioc(podSecurityContext={"fsGroup": 37000},
                   initContainers=[{"name": "wait", "image": "busybox", "command": ["true"]}],
                   extraContainers=[{"name": "logs", "image": "fluent-bit"}])
    spec = pod_of(render(ioc))["spec"]
    assert spec["securityContext"] == {"fsGroup": 37000}
    assert [c["name"] for c in spec["initContainers"]] == ["wait"]
    assert [c["name"] for c in spec["containers"]] == ["ioc", "logs"]


@pytest.mark.parametrize("spec, field, words", [
    ({"extraContainers": [{"image": "x"}]}, "spec.extraContainers[0].name", "required"),
    ({"extraContainers": [{"name": "ioc", "image": "x"}]}, "spec.extraContainers[0].name",
     "the operator runs"),
    ({"initContainers": [{"name": "a", "image": "x"}],
      "extraContainers": [{"name": "a", "image": "x"}]}, "spec.extraContainers[0].name",
     "used twice"),
    ({"extraContainers": [{"name": "a", "image": "x", "ports": [{"containerPort": 5075}]}]},
     "spec.extraContainers[0].ports[0].containerPort", "PVA server port"),
    ({"network": {"mode": "sidecar"},
      "extraContainers": [{"name": "a", "image": "x", "ports": [{"containerPort": 15064}]}]},
     "spec.extraContainers[0].ports[0].containerPort", "loopback CA"),
])
def test_containers_may_not_take_the_operators_names_or_epics_ports(spec, field, words):
    with pytest.raises(IOCValidationError) as err:
        make_ioc(**spec)
    assert err.value.field == field and words in str(err.value)


def test_host_mode_extra_containers_stay_out_of_the_host_port_range():
    ioc = make_ioc(network={"mode": "host"}, extraContainers=[
        {"name": "a", "image": "x", "ports": [{"containerPort": 5100}]}])
    with pytest.raises(IOCValidationError) as err:
        check_config(ioc, OperatorConfig())
    assert "host port range 5064-5999" in str(err.value)
    check_config(ioc, OperatorConfig(host_port_min=6000, host_port_max=6999))


# ---------------------------------------------------------------- ClusterIP

def test_derived_cluster_ips_are_stable_distinct_and_inside_the_range():
    cidr = "198.19.0.0/16"
    first = clusterip.candidates("bl01", "motors", cidr)
    assert first == clusterip.candidates("bl01", "motors", cidr)
    assert len(set(first)) == len(first) == clusterip.CANDIDATES
    assert first != clusterip.candidates("bl02", "motors", cidr)
    net = ipaddress.ip_network(cidr)
    for address in first:
        ip = ipaddress.ip_address(address)
        assert ip in net and ip not in (net.network_address, net.network_address + 1,
                                        net.broadcast_address)
    # 1,000 IOCs: the first candidates rarely collide in a /16
    firsts = {clusterip.candidates("ns", f"ioc{i}", cidr)[0] for i in range(1000)}
    assert len(firsts) > 985


def test_a_tiny_range_gives_what_it_has():
    assert clusterip.candidates("a", "b", "198.19.0.0/30") == ["198.19.0.2"]
    assert clusterip.candidates("a", "b", "198.19.0.0/31") == []


def test_the_service_asks_for_the_given_address_and_the_explicit_one_wins():
    ioc = make_ioc()
    assert "clusterIP" not in service(ioc, resolve_ports(ioc.spec))["spec"]
    assert service(ioc, resolve_ports(ioc.spec), "198.19.3.4")["spec"]["clusterIP"] == (
        "198.19.3.4")
    explicit = make_ioc(network={"clusterIP": "198.19.9.9"})
    assert by_kind(render(explicit, cluster_ip="198.19.3.4"))["Service"]["spec"][
        "clusterIP"] == "198.19.9.9"


def test_a_bad_cluster_ip_is_refused():
    with pytest.raises(IOCValidationError) as err:
        make_ioc(network={"clusterIP": "198.19.300.1"})
    assert "spec.network.clusterIP" in str(err.value)


# ---------------------------------------------------------------- rollout

def test_a_fixed_spec_replaces_a_crash_looping_pod_at_once():
    assert by_kind(render(make_ioc()))["StatefulSet"]["spec"]["podManagementPolicy"] == (
        "Parallel")


# ---------------------------------------------------------------- conditions

def test_ready_says_why_the_ioc_is_not_ready_and_how_often_it_restarted():
    from ioc_operator.controller.reconcile import _not_ready, _restarts

    ioc = make_ioc(health={"startupSeconds": 600})
    assert _not_ready(ioc, None)[0] == "PodNotReady"
    assert _not_ready(ioc, {}) == ("PodNotReady", "waiting for the IOC pod to start")
    reason, message = _not_ready(ioc, {"started": False, "restartCount": 0})
    assert reason == "Starting" and "600 s" in message
    crash = {"started": False, "restartCount": 3,
             "state": {"waiting": {"reason": "CrashLoopBackOff"}},
             "lastState": {"terminated": {"reason": "Error", "exitCode": 2}}}
    assert _not_ready(ioc, crash) == (
        "CrashLoop", "the IOC container keeps exiting; restarted 3 times (last exit: "
        "Error, code 2)")
    assert _restarts({"restartCount": 1}) == "; restarted 1 time"
    assert _not_ready(ioc, {"started": True, "restartCount": 0})[0] == "PodNotReady"


# ---------------------------------------------------------------- sidecar metrics

def test_sidecar_gateways_serve_metrics_on_a_named_port_when_asked():
    spec = {"network": {"mode": "sidecar"}, "servers": {"pva": {"enabled": False}},
            "gateways": {"ca": {"metricsPort": 9101},
                         "bridge": {"enabled": True, "metricsPort": 9102}}}
    containers = {c["name"]: c for c in pod_of(render(make_ioc(**spec)))["spec"]["containers"]}
    cagw, bridge = containers["cagw"], containers["bridge"]
    assert cagw["args"][-2:] == ["-metrics_port", "9101"]
    assert {"name": "cagw-metrics", "containerPort": 9101, "protocol": "TCP"} in cagw["ports"]
    assert bridge["args"][-2:] == ["--metrics-port", "9102"]
    assert {"name": "bridge-metrics", "containerPort": 9102, "protocol": "TCP"} in (
        bridge["ports"])
    plain = {c["name"]: c for c in pod_of(render(make_ioc(network={"mode": "sidecar"})))[
        "spec"]["containers"]}
    assert "-metrics_port" not in plain["cagw"]["args"]


@pytest.mark.parametrize("gateways, field, words", [
    ({"ca": {"metricsPort": 5064}}, "spec.gateways.ca.metricsPort", "EPICS port"),
    ({"ca": {"metricsPort": 9101}, "bridge": {"enabled": True, "metricsPort": 9101}},
     "spec.gateways.bridge.metricsPort", "spec.gateways.ca.metricsPort"),
    ({"ca": {"implementation": "ca-gateway", "image": "gw", "metricsPort": 9101}},
     "spec.gateways.ca.metricsPort", "only for implementation: builtin"),
])
def test_bad_sidecar_metrics_ports_are_refused(gateways, field, words):
    with pytest.raises(IOCValidationError) as err:
        make_ioc(network={"mode": "sidecar"}, servers={"pva": {"enabled": False}},
                 gateways=gateways)
    assert err.value.field == field and words in str(err.value)


def test_extra_containers_stay_off_the_sidecar_metrics_port():
    with pytest.raises(IOCValidationError) as err:
        make_ioc(network={"mode": "sidecar"}, gateways={"ca": {"metricsPort": 9101}},
                 extraContainers=[{"name": "x", "image": "x",
                                   "ports": [{"containerPort": 9101}]}])
    assert "CA gateway metrics" in str(err.value)


def test_the_network_policy_admits_the_sidecar_metrics_ports():
    ioc = make_ioc(network={"mode": "sidecar", "allowedNamespaces": ["monitoring"]},
                   gateways={"ca": {"metricsPort": 9101}})
    policy = by_kind(render(ioc))["NetworkPolicy"]
    assert {"protocol": "TCP", "port": 9101} in policy["spec"]["ingress"][0]["ports"]
