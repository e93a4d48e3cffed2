"""The rendered objects per network mode: pod spec, ports, Service, gateway."""

from __future__ import annotations

import json

import pytest

from ioc_operator.discovery.clientenv import for_ioc
from ioc_operator.model.errors import IOCValidationError
from ioc_operator.render import render, resolve_ports
from ioc_operator.render.names import CONFIG_HASH_ANNOTATION

from iocs import by_kind, env_of, make_ioc


def pod_spec(objects):
    return by_kind(objects)["StatefulSet"]["spec"]["template"]["spec"]


def test_host_mode_uses_node_network_and_own_ports():
    ioc = make_ioc(network={"mode": "host", "ports": {"ca": 5070, "pvaServer": 5081,
                                                      "pvaBroadcast": 5082}})
    objects = render(ioc)
    assert [o["kind"] for o in objects] == ["StatefulSet"]  # no Service in host mode
    pod = pod_spec(objects)
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    ioc_c = pod["containers"][0]
    env = env_of(ioc_c)
    assert env["EPICS_CAS_SERVER_PORT"] == "5070"
    assert "EPICS_CA_SERVER_PORT" not in env  # would move rsrv's own client searches
    assert env["EPICS_PVAS_SERVER_PORT"] == "5081"
    assert env["EPICS_PVAS_BROADCAST_PORT"] == "5082"
    host_ports = {(p["containerPort"], p["protocol"], p["hostPort"]) for p in ioc_c["ports"]}
    assert host_ports == {(5070, "TCP", 5070), (5070, "UDP", 5070),
                          (5081, "TCP", 5081), (5082, "UDP", 5082)}


def test_host_mode_defaults_and_caproto_port_variable():
    ioc = make_ioc(network={"mode": "host"}, servers={"ca": {"implementation": "caproto"},
                                                      "pva": {"enabled": False}})
    env = env_of(pod_spec(render(ioc))["containers"][0])
    assert env == {"EPICS_CAS_SERVER_PORT": "5064", "EPICS_CA_SERVER_PORT": "5064"}


def test_pod_mode_service_fronts_standard_ports():
    objects = render(make_ioc(network={"mode": "pod"}))
    kinds = by_kind(objects)
    assert list(kinds) == ["Service", "StatefulSet"]
    pod = pod_spec(objects)
    assert "hostNetwork" not in pod
    svc = kinds["Service"]["spec"]
    assert svc["type"] == "ClusterIP"
    assert svc["selector"] == {"epics-operator.io/ioc": "ioc1"}
    ports = {(p["name"], p["protocol"], p["port"], p["targetPort"]) for p in svc["ports"]}
    assert ports == {("ca-tcp", "TCP", 5064, 5064), ("ca-udp", "UDP", 5064, 5064),
                     ("pva-tcp", "TCP", 5075, 5075), ("pva-udp", "UDP", 5076, 5076)}
    assert all("hostPort" not in p for p in pod["containers"][0]["ports"])


def test_pod_mode_only_serves_enabled_protocols():
    ioc = make_ioc(servers={"pva": {"enabled": False}})
    svc = by_kind(render(ioc))["Service"]["spec"]
    assert {p["name"] for p in svc["ports"]} == {"ca-tcp", "ca-udp"}
    assert "EPICS_PVAS_SERVER_PORT" not in env_of(pod_spec(render(ioc))["containers"][0])


def test_sidecar_moves_ioc_pva_to_loopback_and_adds_pvagw():
    ioc = make_ioc(network={"mode": "sidecar"}, servers={"pva": {"implementation": "classic"}},
                   gateways={"pva": {"readOnly": True}})
    objects = render(ioc)
    kinds = by_kind(objects)
    assert list(kinds) == ["ConfigMap", "Service", "StatefulSet"]
    pod = pod_spec(objects)
    ioc_c, gw, cagw = pod["containers"]
    env = env_of(ioc_c)
    assert env["EPICS_PVAS_INTF_ADDR_LIST"] == "127.0.0.1"
    assert env["EPICS_PVAS_SERVER_PORT"] == "15075"
    assert env["EPICS_PVAS_BROADCAST_PORT"] == "15076"
    assert env["EPICS_CAS_INTF_ADDR_LIST"] == "127.0.0.1"  # CA moves behind the gateway
    assert env["EPICS_CAS_SERVER_PORT"] == "15064"
    assert not ioc_c.get("ports")
    assert "readinessProbe" not in ioc_c  # nothing of the IOC listens on the pod IP
    assert cagw["name"] == "cagw"
    assert cagw["command"] == ["ioc-ca-gateway"]
    assert cagw["args"] == ["-sip", "$(POD_IP)", "-sport", "5064", "-cip", "127.0.0.1",
                            "-cport", "15064", "-inactive_timeout", "60"]
    assert {(p["containerPort"], p["protocol"]) for p in cagw["ports"]} == {
        (5064, "TCP"), (5064, "UDP")}
    assert gw["name"] == "pvagw"
    assert gw["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert gw["securityContext"]["runAsNonRoot"] is True
    conf = json.loads(kinds["ConfigMap"]["data"]["pvagw.json"])
    assert conf["readOnly"] is True
    assert conf["clients"][0]["addrlist"] == "127.0.0.1:15076"
    server = conf["servers"][0]
    assert server["interface"] == ["@POD_IP@"]
    assert (server["serverport"], server["bcastport"]) == (5075, 5076)
    assert server["statusprefix"] == "T:PVAGW:"
    template_meta = kinds["StatefulSet"]["spec"]["template"]["metadata"]
    assert CONFIG_HASH_ANNOTATION in template_meta["annotations"]
    svc_ports = {p["name"] for p in kinds["Service"]["spec"]["ports"]}
    assert svc_ports == {"ca-tcp", "ca-udp", "pva-tcp", "pva-udp"}


def test_sidecar_without_the_ca_gateway_keeps_ca_on_the_pod_ip():
    ioc = make_ioc(network={"mode": "sidecar"}, gateways={"ca": {"enabled": False}})
    ioc_c, gw = pod_spec(render(ioc))["containers"]
    assert env_of(ioc_c)["EPICS_CAS_SERVER_PORT"] == "5064"
    assert "EPICS_CAS_INTF_ADDR_LIST" not in env_of(ioc_c)
    assert {p["name"] for p in ioc_c["ports"]} == {"ca-tcp", "ca-udp"}
    assert gw["name"] == "pvagw"


def test_ca_only_ioc_in_sidecar_mode_gets_the_ca_gateway_and_the_bridge():
    ioc = make_ioc(network={"mode": "sidecar"},
                   servers={"ca": {"implementation": "caproto"}, "pva": {"enabled": False}},
                   gateways={"bridge": {"enabled": True, "readOnly": True},
                             "ca": {"readOnly": True, "pvlist": ".*:SECRET DENY\n"}})
    objects = render(ioc)
    kinds = by_kind(objects)
    ioc_c, cagw, bridge = pod_spec(objects)["containers"]
    env = env_of(ioc_c)
    # caproto reads EPICS_CA_SERVER_PORT
    assert env["EPICS_CA_SERVER_PORT"] == env["EPICS_CAS_SERVER_PORT"] == "15064"
    assert "EPICS_PVAS_SERVER_PORT" not in env
    assert cagw["args"][-3:] == ["-pvlist", "/etc/cagw/pvlist", "-ro"]
    assert kinds["ConfigMap"]["metadata"]["name"] == "ioc1-cagw"
    assert kinds["ConfigMap"]["data"] == {"pvlist": ".*:SECRET DENY\n"}
    assert bridge["command"] == ["ioc-ca-pva-bridge"]
    assert bridge["args"] == ["--interface", "$(POD_IP)", "--server-port", "5075",
                              "--broadcast-port", "5076", "--ca-addr-list", "127.0.0.1:15064",
                              "--inactive-timeout", "60", "--prefix", "T:", "--read-only"]
    svc_ports = {p["name"] for p in kinds["Service"]["spec"]["ports"]}
    assert svc_ports == {"ca-tcp", "ca-udp", "pva-tcp", "pva-udp"}
    env_out = for_ioc(ioc.spec, "198.19.1.9", resolve_ports(ioc.spec)).env()
    assert env_out["EPICS_CA_NAME_SERVERS"] == "198.19.1.9:5064"  # the gateway answers
    assert env_out["EPICS_PVA_NAME_SERVERS"] == "198.19.1.9:5075"  # the bridge answers


def test_the_cpp_ca_gateway_gets_the_same_ports_and_an_access_file():
    ioc = make_ioc(network={"mode": "sidecar"},
                   gateways={"ca": {"implementation": "ca-gateway", "image": "site/cagw:2.1",
                                    "command": ["/epics/bin/gateway"], "readOnly": True}})
    objects = render(ioc)
    cagw = pod_spec(objects)["containers"][2]
    assert cagw["image"] == "site/cagw:2.1"
    assert cagw["command"] == ["/epics/bin/gateway"]
    assert cagw["args"][:8] == ["-sip", "$(POD_IP)", "-sport", "5064", "-cip", "127.0.0.1",
                                "-cport", "15064"]
    assert cagw["args"][-4:] == ["-access", "/etc/cagw/access", "-home", "/run/cagw"]
    cms = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    assert "RULE(1, READ)" in cms["ioc1-cagw"]["data"]["access"]
    assert {m["mountPath"] for m in cagw["volumeMounts"]} == {"/etc/cagw", "/run/cagw"}


def test_gateway_config_change_rolls_the_pod():
    a = render(make_ioc(network={"mode": "sidecar"}))
    b = render(make_ioc(network={"mode": "sidecar"}, gateways={"pva": {"readOnly": True}}))

    def hash_of(objects):
        return by_kind(objects)["StatefulSet"]["spec"]["template"]["metadata"][
            "annotations"][CONFIG_HASH_ANNOTATION]

    assert hash_of(a) != hash_of(b)


def test_singleton_statefulset_with_owner_reference():
    sts = by_kind(render(make_ioc()))["StatefulSet"]
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    owner = sts["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "IOC", "ioc1", "uid-1", True)
    assert by_kind(render(make_ioc(suspend=True)))["StatefulSet"]["spec"]["replicas"] == 0


def test_offline_render_without_uid_has_no_owner():
    sts = by_kind(render(make_ioc(uid=None)))["StatefulSet"]
    assert "ownerReferences" not in sts["metadata"]


def test_autosave_claim_is_not_owned_and_is_mounted():
    objects = render(make_ioc(autosave={"enabled": True, "size": "2Gi",
                                        "storageClassName": "fast"}))
    pvc = by_kind(objects)["PersistentVolumeClaim"]
    assert "ownerReferences" not in pvc["metadata"]  # survives deleting the IOC
    assert pvc["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert pvc["spec"]["storageClassName"] == "fast"
    pod = pod_spec(objects)
    assert {"name": "autosave", "persistentVolumeClaim": {"claimName": "ioc1-autosave"}} in (
        pod["volumes"])
    assert {"name": "autosave", "mountPath": "/autosave"} in pod["containers"][0][
        "volumeMounts"]


def test_scheduling_and_container_settings_pass_through():
    ioc = make_ioc(
        command=["softIoc"], args=["st.cmd"], workingDir="/ioc",
        env=[{"name": "A", "value": "1"},
             {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
        resources={"requests": {"cpu": "100m"}, "limits": {"memory": "1Gi"}},
        scheduling={"nodeName": "n1", "nodeSelector": {"rack": "a"},
                    "tolerations": [{"key": "ioc", "operator": "Exists"}],
                    "affinity": {"nodeAffinity": {}}, "priorityClassName": "high"},
        injectClientEnv=True, serviceAccountName="ioc-sa", imagePullSecrets=["regcred"],
    )
    pod = pod_spec(render(ioc))
    c = pod["containers"][0]
    assert (c["command"], c["args"], c["workingDir"]) == (["softIoc"], ["st.cmd"], "/ioc")
    assert {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}} in c["env"]
    assert c["resources"] == {"requests": {"cpu": "100m"}, "limits": {"memory": "1Gi"}}
    assert c["envFrom"] == [{"configMapRef": {"name": "epics-client-env", "optional": True}}]
    assert (c["stdin"], c["tty"]) == (True, True)
    assert pod["nodeName"] == "n1"
    assert pod["nodeSelector"] == {"rack": "a"}
    assert pod["tolerations"] == [{"key": "ioc", "operator": "Exists"}]
    assert pod["priorityClassName"] == "high"
    assert pod["serviceAccountName"] == "ioc-sa"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["enableServiceLinks"] is False


def test_rendering_is_deterministic():
    for mode in ("host", "pod", "sidecar"):
        ioc = make_ioc(network={"mode": mode}, autosave={"enabled": True})
        assert render(ioc) == render(ioc)
        assert render(ioc) == render(make_ioc(network={"mode": mode},
                                              autosave={"enabled": True}))


def test_network_policy_admits_epics_ports_from_listed_namespaces():
    ioc = make_ioc(network={"mode": "sidecar", "allowedNamespaces": ["ops", "ns"]})
    policy = by_kind(render(ioc))["NetworkPolicy"]
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"epics-operator.io/ioc": "ioc1"}}
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert rule["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["ns", "ops"]
    assert {(p["protocol"], p["port"]) for p in rule["ports"]} == {
        ("TCP", 5064), ("UDP", 5064), ("TCP", 5075), ("UDP", 5076)}
    assert "NetworkPolicy" not in by_kind(render(make_ioc()))  # only when asked for


def test_network_policy_not_for_host_mode():
    with pytest.raises(IOCValidationError, match=r"allowedNamespaces needs network\.mode pod"):
        make_ioc(network={"mode": "host", "allowedNamespaces": ["ops"]})
