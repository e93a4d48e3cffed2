"""Property-based tests of the pure renderer (hypothesis).

Two strategies span the whole IOC model: `valid_manifests` (every mode, server kind,
explicit and allocated ports, gateways in sidecar mode, autosave, scheduling, env,
resources, probe, suspend, console, injectClientEnv, ...) and `invalid_manifests`
(each draw breaks exactly one rule, tagged with whether the API server's schema/CEL
refuses it too, or only the operator's semantic checks do). The same strategies are
used against the real API server by tests/integration/test_faults.py.

The structural check here (`structural_problems`) is a local stand-in for the parts of
Kubernetes validation the renderer can get wrong; the real-server dry runs confirm it.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ioc_operator.allocation.plan import render_all
from ioc_operator.model.errors import IOCValidationError
from ioc_operator.model.ioc import IOC
from ioc_operator.model.validation import parse_ioc
from ioc_operator.render import pvagw as pvagw_render
from ioc_operator.render import render
from ioc_operator.render.names import IOC_LABEL

API_VERSION = "epics-operator.io/v1alpha1"
PROPS = settings(max_examples=120, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ building blocks

DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,14}[a-z0-9])?"
LABEL_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,10}[A-Za-z0-9])?)?"
PREFIX_CHARS = r"[A-Za-z0-9_:\-\[\]<>;.{}$]"

names = st.from_regex(rf"\A{DNS_LABEL}\Z")
long_names = st.from_regex(r"\A[a-z]([-a-z0-9]{0,50}[a-z0-9])?\Z")  # up to 52
subdomains = st.from_regex(rf"\A{DNS_LABEL}(\.{DNS_LABEL})?\Z")
prefixes = st.from_regex(rf"\A{PREFIX_CHARS}{{1,60}}\Z")
ports = st.integers(1024, 65535)
label_keys = st.tuples(st.sampled_from(["", "example.org/", "beamline.io/"]),
                       st.from_regex(r"\A[a-z0-9]([a-z0-9._-]{0,12}[a-z0-9])?\Z")
                       ).map("".join)
label_values = st.from_regex(rf"\A{LABEL_VALUE}\Z")
labels = st.dictionaries(label_keys, label_values, max_size=3)
text = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=16)
images = st.tuples(st.sampled_from(["registry.example/", "ghcr.io/beamline/", ""]),
                   names, st.sampled_from([":1", ":7.0.7", "@sha256:" + "a" * 64, ""])
                   ).map("".join)


def resources() -> st.SearchStrategy[dict[str, Any]]:
    """Requests never exceed limits: every request below is below every limit."""
    requests = st.fixed_dictionaries({}, optional={
        "cpu": st.sampled_from(["50m", "100m", 1]),
        "memory": st.sampled_from(["64Mi", "128Mi", 100000000])})
    limits = st.fixed_dictionaries({}, optional={
        "cpu": st.sampled_from(["2", "2000m", 4]),
        "memory": st.sampled_from(["512Mi", "1Gi"])})
    return st.fixed_dictionaries({}, optional={"requests": requests, "limits": limits})


env_names = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,12}\Z").filter(
    lambda n: not n.startswith("EPICS_"))
value_froms = st.sampled_from([
    {"fieldRef": {"fieldPath": "metadata.name"}},
    {"configMapKeyRef": {"name": "site-config", "key": "motors", "optional": True}},
    {"secretKeyRef": {"name": "site-secret", "key": "token"}},
    {"resourceFieldRef": {"resource": "limits.memory", "containerName": "ioc"}},
])
env_vars = st.one_of(
    st.builds(lambda n, v: {"name": n, "value": v}, env_names, text),
    st.builds(lambda n, f: {"name": n, "valueFrom": f}, env_names, value_froms),
    st.builds(lambda n: {"name": n}, env_names),
)
tolerations = st.one_of(
    st.builds(lambda k, e: {"key": k, "operator": "Exists", "effect": e},
              label_keys, st.sampled_from(["NoSchedule", "PreferNoSchedule", "NoExecute"])),
    st.builds(lambda k, v: {"key": k, "operator": "Equal", "value": v, "effect": "NoSchedule"},
              label_keys, label_values),
    st.builds(lambda k, s: {"key": k, "operator": "Exists", "effect": "NoExecute",
                            "tolerationSeconds": s}, label_keys, st.integers(0, 3600)),
    st.just({"operator": "Exists"}),
)
affinities = st.sampled_from([
    {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "epics.io/beamline", "operator": "In", "values": ["bl01", "bl02"]}]}]}}},
    {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
        "weight": 10, "preference": {"matchExpressions": [
            {"key": "rack", "operator": "Exists"}]}}]}},
    {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
        "labelSelector": {"matchLabels": {"app.kubernetes.io/part-of": "epics"}},
        "topologyKey": "kubernetes.io/hostname"}]}},
])


def _opt(draw: st.DrawFn, out: dict[str, Any], key: str,
         strategy: st.SearchStrategy[Any]) -> None:
    """Set `key` in half the draws: the model's default is exercised as often."""
    if draw(st.booleans()):
        out[key] = draw(strategy)


# --------------------------------------------------------------------- valid specs


def resolved_clash(spec: dict[str, Any]) -> bool:
    """Whether the ports the IOC ends up with collide inside its own pod (the same port
    and protocol twice: CA TCP vs PVA server TCP, CA UDP vs PVA search UDP). The model
    accepts such specs; see test_intra_pod_port_collision_is_refused_offline (a bug)."""
    servers = spec.get("servers") or {}
    network = spec.get("network") or {}
    bridge = ((spec.get("gateways") or {}).get("bridge") or {}).get("enabled", False)
    if not ((servers.get("ca") or {}).get("enabled", True)
            and ((servers.get("pva") or {}).get("enabled", True) or bridge)):
        return False
    explicit = network.get("ports") or {}
    if network.get("mode") == "host":  # unset ports are allocated around explicit ones
        ca, server, bcast = (explicit.get(k) for k in ("ca", "pvaServer", "pvaBroadcast"))
        return ca is not None and ca in (server, bcast)
    ca = explicit.get("ca", 5064)
    return ca in (explicit.get("pvaServer", 5075), explicit.get("pvaBroadcast", 5076))


@st.composite
def valid_specs(draw: st.DrawFn, name: str = "ioc") -> dict[str, Any]:
    mode = draw(st.sampled_from(["host", "pod", "sidecar"]))
    ca_on = draw(st.booleans())
    pva_on = True if not ca_on else draw(st.booleans())
    # sidecar mode: which gateways run (at least one must)
    cagw_on = mode == "sidecar" and ca_on and draw(st.booleans())
    bridge_on = mode == "sidecar" and not pva_on and draw(st.booleans())
    if mode == "sidecar" and not (pva_on or cagw_on or bridge_on):
        cagw_on = True
    ca_impls = ["rsrv", "caproto"] + (["pcas"] if mode == "host" or cagw_on else [])
    ca: dict[str, Any] = {}
    if not ca_on:
        ca["enabled"] = False
        _opt(draw, ca, "implementation", st.sampled_from(["rsrv", "caproto", "pcas"]))
    elif impl := draw(st.sampled_from([None, *ca_impls])):  # None: the default, rsrv
        ca["implementation"] = impl
    pva: dict[str, Any] = {} if pva_on else {"enabled": False}
    _opt(draw, pva, "implementation", st.sampled_from(["pvxs", "classic"]))

    network: dict[str, Any] = {}
    if mode != "pod" or draw(st.booleans()):
        network["mode"] = mode
    explicit = draw(st.lists(ports, min_size=3, max_size=3, unique=True))
    port_map = {k: p for k, p in zip(("ca", "pvaServer", "pvaBroadcast"), explicit,
                                     strict=True) if draw(st.booleans())}
    if port_map or draw(st.booleans()):
        network["ports"] = port_map
    if mode != "host" and draw(st.booleans()):
        network["allowedNamespaces"] = draw(st.lists(names, min_size=1, max_size=3))
    ca_tcp_search = not ca_on or cagw_on or ca.get("implementation", "rsrv") != "caproto"
    pva_tcp_search = not pva_on or mode == "sidecar" or pva.get(
        "implementation", "pvxs") == "pvxs"
    if ca_tcp_search and pva_tcp_search:
        _opt(draw, network, "requireNameServers", st.booleans())

    spec: dict[str, Any] = {"image": draw(images), "prefix": draw(prefixes)}
    servers = {k: v for k, v in (("ca", ca), ("pva", pva)) if v or draw(st.booleans())}
    if servers:
        spec["servers"] = servers
    if network:
        spec["network"] = network
    if mode == "sidecar":
        gateways = draw(sidecar_gateways(ca_on, cagw_on, bridge_on, port_map))
        if gateways is not None:
            spec["gateways"] = gateways
    gw_set = ((spec.get("gateways") or {}).get("pva") or {})
    internal_ports = (gw_set.get("internalServerPort", 15075),
                      gw_set.get("internalBroadcastPort", 15076))
    if mode == "sidecar" and ca_on and port_map.get("ca") in internal_ports:
        del port_map["ca"]  # the CA port may not be one of the gateway's loopback ports

    _opt(draw, spec, "imagePullPolicy", st.sampled_from(["Always", "IfNotPresent", "Never"]))
    _opt(draw, spec, "imagePullSecrets", st.lists(names, max_size=2, unique=True))
    _opt(draw, spec, "command", st.lists(text, max_size=3))
    _opt(draw, spec, "args", st.lists(text, max_size=3))
    _opt(draw, spec, "workingDir", st.from_regex(r"\A/[a-z]{1,8}(/[a-z]{1,8})?\Z"))
    _opt(draw, spec, "env", st.lists(env_vars, max_size=4, unique_by=lambda e: e["name"]))
    _opt(draw, spec, "resources", resources())
    _opt(draw, spec, "description", text)
    sched: dict[str, Any] = {}
    _opt(draw, sched, "nodeName", subdomains)
    _opt(draw, sched, "nodeSelector", labels)
    _opt(draw, sched, "affinity", affinities)
    _opt(draw, sched, "tolerations", st.lists(tolerations, max_size=3))
    _opt(draw, sched, "priorityClassName", names)
    if sched or draw(st.booleans()):
        spec["scheduling"] = sched
    autosave: dict[str, Any] = {}
    _opt(draw, autosave, "enabled", st.booleans())
    _opt(draw, autosave, "size", st.one_of(
        st.sampled_from(["1Gi", "500Mi", "2G", "1.5Gi", "10"]),
        st.from_regex(r"\A[1-9][0-9]{0,3}(Ki|Mi|Gi|Ti|k|M|G|T)?\Z")))
    _opt(draw, autosave, "storageClassName", subdomains)
    _opt(draw, autosave, "mountPath", st.sampled_from(
        ["/autosave", "/var/lib/autosave", "/epics/as"]))
    if autosave or draw(st.booleans()):
        spec["autosave"] = autosave
    n_volumes = draw(st.integers(0, 2))
    if n_volumes or draw(st.booleans()):
        spec["volumes"] = [{"name": f"vol{i}", "emptyDir": {}} for i in range(n_volumes)]
        spec["volumeMounts"] = [{"name": f"vol{i}", "mountPath": f"/mnt/vol{i}"}
                                for i in range(n_volumes)]
    probe: dict[str, Any] = {}
    _opt(draw, probe, "pv", prefixes)
    _opt(draw, probe, "periodSeconds", st.integers(5, 3600))
    if probe or draw(st.booleans()):
        spec["probe"] = probe
    for key in ("injectClientEnv", "suspend", "console"):
        _opt(draw, spec, key, st.booleans())
    _opt(draw, spec, "serviceAccountName", names)
    _opt(draw, spec, "podLabels", labels)
    _opt(draw, spec, "podAnnotations", st.dictionaries(label_keys, text, max_size=3))
    return spec


@st.composite
def sidecar_gateways(draw: st.DrawFn, ca_on: bool, cagw_on: bool, bridge_on: bool,
                     port_map: dict[str, int]) -> dict[str, Any] | None:
    """gateways: for a sidecar IOC (None: left out, where the defaults fit)."""
    gw: dict[str, Any] = {}
    _opt(draw, gw, "image", images)
    _opt(draw, gw, "readOnly", st.booleans())
    _opt(draw, gw, "statusPrefix", prefixes)
    internal = draw(st.lists(ports, min_size=3, max_size=3, unique=True).filter(
        lambda p: not ca_on or port_map.get("ca", 5064) not in p[:2]))
    if draw(st.booleans()):
        gw["internalServerPort"], gw["internalBroadcastPort"] = internal[:2]
    _opt(draw, gw, "resources", resources())
    ca: dict[str, Any] = {} if cagw_on else {"enabled": False}
    if cagw_on and draw(st.booleans()):
        ca["enabled"] = True
    cpp = draw(st.booleans())
    if cpp:
        ca["implementation"] = "ca-gateway"
        ca["image"] = draw(images)
        _opt(draw, ca, "command", st.just(["/epics/ca-gateway/bin/linux-x86_64/gateway"]))
        _opt(draw, ca, "access", st.just("ASG(DEFAULT) {\n RULE(1, READ)\n}\n"))
    if "access" not in ca:
        _opt(draw, ca, "readOnly", st.booleans())
    _opt(draw, ca, "pvlist", st.sampled_from(
        ["EVALUATION ORDER ALLOW, DENY\n.* ALLOW\n", ".*:SECRET DENY\n"]))
    pvagw_ports = (gw.get("internalServerPort", 15075), gw.get("internalBroadcastPort", 15076))
    if draw(st.booleans()) and internal[2] not in pvagw_ports:  # never one of pvagw's
        ca["internalPort"] = internal[2]
    _opt(draw, ca, "inactiveTimeoutSeconds", st.integers(1, 86400))
    _opt(draw, ca, "resources", resources())
    bridge: dict[str, Any] = {"enabled": True} if bridge_on else {}
    _opt(draw, bridge, "image", images)
    _opt(draw, bridge, "readOnly", st.booleans())
    out = {k: v for k, v in (("pva", gw), ("ca", ca), ("bridge", bridge))
           if v or draw(st.booleans())}
    if out or not cagw_on or bridge_on or draw(st.booleans()):
        return out
    return None


@st.composite
def valid_manifests(draw: st.DrawFn, namespace: str = "ns",
                    with_uid: bool | None = None) -> dict[str, Any]:
    name = draw(long_names)
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if with_uid is None:
        with_uid = draw(st.booleans())
    if with_uid:
        meta["uid"] = draw(st.uuids()).hex
    spec = draw(valid_specs(name).filter(lambda s: not resolved_clash(s)))
    return {"apiVersion": API_VERSION, "kind": "IOC", "metadata": meta, "spec": spec}


# ------------------------------------------------------------------- invalid specs

SCHEMA, SEMANTIC = "schema", "semantic"  # refused by the CRD too / only by the operator


def _spec(body: dict[str, Any]) -> dict[str, Any]:
    return body["spec"]


def _sub(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    for key in keys:
        d = d.setdefault(key, {})
    return d


def _force_mode(spec: dict[str, Any], mode: str) -> None:
    """Put an otherwise valid spec in `mode` without breaking any other rule."""
    net = _sub(spec, "network")
    net["mode"] = mode
    servers = _sub(spec, "servers")
    if mode != "sidecar":
        spec.pop("gateways", None)
    else:
        _sub(servers, "pva")["enabled"] = True
        (spec.get("gateways") or {}).pop("bridge", None)
    if mode == "host":
        net.pop("allowedNamespaces", None)
    elif _sub(servers, "ca").get("implementation") == "pcas":
        servers["ca"]["implementation"] = "rsrv"
    net.pop("requireNameServers", None)
    gw = ((spec.get("gateways") or {}).get("pva")) or {}
    internal = (gw.get("internalServerPort", 15075), gw.get("internalBroadcastPort", 15076))
    if mode == "sidecar" and (net.get("ports") or {}).get("ca") in internal:
        del net["ports"]["ca"]


def _bad_enum(draw: st.DrawFn, spec: dict[str, Any]) -> str:
    where = draw(st.sampled_from(["mode", "ca", "pva"]))
    bad = draw(st.sampled_from(["bridge", "HOST", "Pod", "", "rsrv ", "pvxs2", "cas", "none"]))
    if where == "mode":
        _sub(spec, "network")["mode"] = bad
    else:
        _sub(spec, "servers", where)["implementation"] = bad
    return "wrong enum"


def _bad_port(draw: st.DrawFn, spec: dict[str, Any]) -> str:
    bad = draw(st.one_of(st.integers(-70000, 1023), st.integers(65536, 10**9)))
    key = draw(st.sampled_from(["ca", "pvaServer", "pvaBroadcast", "internalServerPort",
                                "internalBroadcastPort"]))
    if key.startswith("internal"):
        _force_mode(spec, "sidecar")
        _sub(spec, "gateways", "pva")[key] = bad
    else:
        _sub(spec, "network", "ports")[key] = bad
    return "port out of range"


def _unknown_field(draw: st.DrawFn, spec: dict[str, Any]) -> str:
    typo = draw(st.sampled_from(["netwrk", "replicas", "Image", "hostNetwork", "portz",
                                 "enable", "x"]))
    where = draw(st.sampled_from([(), ("network",), ("servers", "ca"), ("autosave",),
                                  ("probe",), ("scheduling",), ("network", "ports")]))
    _sub(spec, *where)[typo] = draw(st.one_of(st.booleans(), st.integers(), text))
    return "unknown field"


def _bad_prefix(draw: st.DrawFn, spec: dict[str, Any]) -> str:
    bad = draw(st.one_of(
        st.just(""),
        st.from_regex(rf"\A{PREFIX_CHARS}{{61,70}}\Z"),
        st.tuples(st.from_regex(rf"\A{PREFIX_CHARS}{{0,5}}\Z"),
                  st.sampled_from([" ", "#", "/", ",", "@", "!", "%", "é", "\t", "'", '"']),
                  st.from_regex(rf"\A{PREFIX_CHARS}{{0,5}}\Z")).map("".join),
        st.from_regex(rf"\A{PREFIX_CHARS}{{1,5}}\Z").map(lambda p: p + "\n"),
    ))
    where = draw(st.sampled_from(["prefix", "probe", "status"]))
    if where == "prefix":
        spec["prefix"] = bad
    elif where == "probe":
        if len(bad) > 60:
            bad = bad + "#"  # the probe PV has no length limit: break the pattern too
        _sub(spec, "probe")["pv"] = bad
    else:
        _force_mode(spec, "sidecar")
        _sub(spec, "gateways", "pva")["statusPrefix"] = bad + ("#" if len(bad) > 60 else "")
    return "bad prefix"


def _gateways_outside_sidecar(draw: st.DrawFn, spec: dict[str, Any]) -> str:
    _force_mode(spec, draw(st.sampled_from(["host", "pod"])))
    spec["gateways"] = draw(st.sampled_from([{}, {"pva": {}}, {"pva": {"readOnly": True}}]))
    return "gateways outside sidecar"


def _no_server(draw: st.DrawFn, spec: dict[str, Any]) -> str:
    _force_mode(spec, draw(st.sampled_from(["host", "pod"])))
    _sub(spec, "servers", "ca")["enabled"] = False
    _sub(spec, "servers", "pva")["enabled"] = False
    return "both servers disabled"


def _bridge_with_pva(draw: st.DrawFn, spec: dict[str, Any]) -> str:
    _force_mode(spec, "sidecar")
    _sub(spec, "gateways", "bridge")["enabled"] = True
    return "CA-to-PVA bridge for an IOC that serves PVA"


def _host_allowed_namespaces(draw: st.DrawFn, spec: dict[str, Any]) -> str:
    _force_mode(spec, "host")
    _sub(spec, "network")["allowedNamespaces"] = draw(st.lists(names, min_size=1, max_size=2))
    return "allowedNamespaces in host mode"


def _same_pva_ports(draw: st.DrawFn, spec: dict[str, Any]) -> str:
    port = draw(ports)
    _sub(spec, "network", "ports").update(pvaServer=port, pvaBroadcast=port)
    return "pvaServer == pvaBroadcast"


def _bad_field_value(draw: st.DrawFn, spec: dict[str, Any]) -> str:
    choice = draw(st.sampled_from(["period", "size", "mount", "image", "type", "nsname"]))
    if choice == "period":
        _sub(spec, "probe")["periodSeconds"] = draw(st.one_of(
            st.integers(-5, 4), st.integers(3601, 10**6)))
    elif choice == "size":
        _sub(spec, "autosave")["size"] = draw(st.sampled_from(
            ["1 Gi", "1GB", "-1Gi", "Gi", "1e3", "lots", ""]))
    elif choice == "mount":
        _sub(spec, "autosave")["mountPath"] = draw(st.sampled_from(
            ["autosave", "", "./as", "~/as"]))
    elif choice == "image":
        spec["image"] = ""
    elif choice == "type":
        key, value = draw(st.sampled_from([
            ("env", {"name": "A"}), ("command", "softIoc"), ("servers", []),
            ("suspend", [True]), ("podLabels", ["a"]), ("resources", "big")]))
        spec[key] = value
    else:
        _sub(spec, "network")["allowedNamespaces"] = [draw(st.sampled_from(
            ["Ops", "ops_1", "-ops", "a" * 64, ""]))]
        _force_mode(spec, draw(st.sampled_from(["pod", "sidecar"])))
    return "bad field value"


def _missing_required(draw: st.DrawFn, spec: dict[str, Any]) -> str:
    del spec[draw(st.sampled_from(["image", "prefix"]))]
    return "missing required field"


# Semantic rules: the CRD cannot see them; the operator refuses with InvalidSpec.
def _no_ca_gateway(spec: dict[str, Any]) -> None:
    """Sidecar mode without the CA gateway: the IOC's own CA server serves the pod IP."""
    if spec["network"]["mode"] == "sidecar":
        _sub(spec, "gateways", "ca")["enabled"] = False


def _pcas_outside_host(draw: st.DrawFn, spec: dict[str, Any]) -> str:
    _force_mode(spec, draw(st.sampled_from(["pod", "sidecar"])))
    _sub(spec, "servers", "ca").update(enabled=True, implementation="pcas")
    _no_ca_gateway(spec)
    return "pcas on a pod network, not behind the CA gateway"


def _classic_requires_name_servers(draw: st.DrawFn, spec: dict[str, Any]) -> str:
    _force_mode(spec, draw(st.sampled_from(["pod", "host"])))
    _sub(spec, "servers", "pva").update(enabled=True, implementation="classic")
    _sub(spec, "network")["requireNameServers"] = True
    if _sub(spec, "servers", "ca").get("implementation") == "caproto":
        spec["servers"]["ca"]["implementation"] = "rsrv"
    return "classic PVA with requireNameServers outside sidecar"


def _caproto_requires_name_servers(draw: st.DrawFn, spec: dict[str, Any]) -> str:
    _force_mode(spec, draw(st.sampled_from(["pod", "host", "sidecar"])))
    _sub(spec, "servers", "ca").update(enabled=True, implementation="caproto")
    _sub(spec, "network")["requireNameServers"] = True
    if spec["network"]["mode"] != "sidecar":
        _sub(spec, "servers", "pva")["implementation"] = "pvxs"
    _no_ca_gateway(spec)
    return "caproto with requireNameServers, not behind the CA gateway"


def _gateway_internal_ports(draw: st.DrawFn, spec: dict[str, Any]) -> str:
    _force_mode(spec, "sidecar")
    gw = _sub(spec, "gateways", "pva")
    if draw(st.booleans()):
        port = draw(ports)
        gw.update(internalServerPort=port, internalBroadcastPort=port)
    else:
        _sub(spec, "servers", "ca")["enabled"] = True
        spec["servers"]["ca"]["implementation"] = "rsrv"
        port = draw(st.sampled_from([gw.get("internalServerPort", 15075),
                                     gw.get("internalBroadcastPort", 15076)]))
        _sub(spec, "network", "ports")["ca"] = port
    return "gateway internal port clash"


def _bad_name(draw: st.DrawFn, body: dict[str, Any]) -> str:
    """A name the API server refuses too: not a DNS subdomain."""
    body["metadata"]["name"] = draw(st.sampled_from(
        ["Bad", "under_score", "-lead", "trail-", "has space"]))
    return "bad metadata.name"


def _long_name(draw: st.DrawFn, body: dict[str, Any]) -> str:
    """A name too long for the pod's controller-revision-hash label: the CRD's CEL rule
    refuses it too."""
    body["metadata"]["name"] = draw(st.sampled_from(["a" * 53, "b" * 63, "c" * 253]))
    return "metadata.name over 52 characters"


def _unusable_name(draw: st.DrawFn, body: dict[str, Any]) -> str:
    """A name the API server accepts but the operator cannot build objects from: a
    dotted one (a Service name is a DNS label)."""
    body["metadata"]["name"] = draw(st.sampled_from(["dotted.name", "a.b"]))
    return "metadata.name the operator cannot use"


def _on_spec(fn: Any) -> Any:
    def mutate(draw: st.DrawFn, body: dict[str, Any]) -> str:
        return fn(draw, _spec(body))
    mutate.__name__ = fn.__name__
    return mutate


# (mutation, whether the API server refuses it too: SCHEMA, or only the operator)
MUTATIONS = [(_on_spec(fn), SCHEMA) for fn in (
    _bad_enum, _bad_port, _unknown_field, _bad_prefix, _gateways_outside_sidecar,
    _no_server, _bridge_with_pva, _host_allowed_namespaces, _same_pva_ports,
    _bad_field_value, _missing_required)] + [(_bad_name, SCHEMA), (_long_name, SCHEMA)] + [
    (_on_spec(fn), SEMANTIC) for fn in (
        _pcas_outside_host, _classic_requires_name_servers,
        _caproto_requires_name_servers, _gateway_internal_ports)] + [(_unusable_name, SEMANTIC)]
MUTATION_IDS = [fn.__name__.strip("_") for fn, _ in MUTATIONS]


@st.composite
def invalid_manifests(draw: st.DrawFn, namespace: str = "ns",
                      mutations: list[tuple[Any, str]] | None = None
                      ) -> tuple[dict[str, Any], str, str]:
    """(manifest, which rule it breaks, SCHEMA or SEMANTIC). Each mutation is drawn
    evenly (sampled_from would favour the first ones)."""
    choices = mutations or MUTATIONS
    body = copy.deepcopy(draw(valid_manifests(namespace)))
    index = draw(st.integers(0, 2**16)) % len(choices)
    mutate, level = choices[index]
    return body, mutate(draw, body), level


json_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True)
    | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*path, i))
    return out


@st.composite
def junk_manifests(draw: st.DrawFn) -> dict[str, Any]:
    """A valid manifest with one value anywhere (or a new key) replaced by JSON junk."""
    body = copy.deepcopy(draw(valid_manifests()))
    path = draw(st.sampled_from([p for p in _paths(body) if p]))
    parent: Any = body
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and draw(st.booleans()):
        parent[draw(text)] = draw(json_junk)
    else:
        parent[path[-1]] = draw(json_junk)
    return body


# ----------------------------------------------------------- the structural check

DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_VALUE_RE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
IANA_SVC_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
ENV_NAME = re.compile(r"[ -<>-~]+")  # printable ASCII except '='


def pod_ports(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for c in pod["containers"] for p in c.get("ports", [])]


def structural_problems(objects: list[dict[str, Any]], mode: str) -> list[str]:
    """What the Kubernetes API server would refuse (or what breaks an IOC) in the
    rendered objects, as far as a local check can tell."""
    problems: list[str] = []
    kinds = [o["kind"] for o in objects if o["kind"] != "ConfigMap"]
    if len(set(kinds)) != len(kinds):
        problems.append(f"two objects of one kind: {kinds}")
    by_kind = {o["kind"]: o for o in objects}
    for obj in objects:
        meta = obj["metadata"]
        if not DNS1123_SUBDOMAIN.fullmatch(meta["name"]) or len(meta["name"]) > 253:
            problems.append(f"{obj['kind']} name {meta['name']!r}")
        for key, value in meta.get("labels", {}).items():
            if len(value) > 63 or not LABEL_VALUE_RE.fullmatch(value):
                problems.append(f"label {key}={value!r}")
    sts = by_kind.get("StatefulSet")
    if sts is None:
        return [*problems, "no StatefulSet"]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    if spec["replicas"] not in (0, 1):
        problems.append(f"replicas {spec['replicas']}")
    selector = spec["selector"]["matchLabels"]
    template_labels = spec["template"]["metadata"]["labels"]
    if any(template_labels.get(k) != v for k, v in selector.items()):
        problems.append("the selector does not select the template")
    # ports: range, unique per protocol over the whole pod, host ports only in host mode
    seen: set[tuple[int, str]] = set()
    for port in pod_ports(pod):
        key = (port["containerPort"], port["protocol"])
        if not 1024 <= port["containerPort"] <= 65535:
            problems.append(f"container port {key} out of 1024..65535")
        if key in seen:
            problems.append(f"container port {key} twice in the pod")
        seen.add(key)
        if ("hostPort" in port) != (mode == "host"):
            problems.append(f"hostPort on {key} in {mode} mode")
        if "hostPort" in port and port["hostPort"] != port["containerPort"]:
            problems.append(f"hostPort != containerPort on {key}")
    port_names = [p["name"] for c in pod["containers"] for p in c.get("ports", [])]
    for c in pod["containers"]:
        names_here = [p["name"] for p in c.get("ports", [])]
        if len(set(names_here)) != len(names_here):
            problems.append(f"port names repeat in container {c['name']}")
    if any(len(n) > 15 or not IANA_SVC_NAME.fullmatch(n) for n in port_names):
        problems.append(f"bad port names {port_names}")
    if pod.get("hostNetwork", False) != (mode == "host"):
        problems.append(f"hostNetwork={pod.get('hostNetwork')} in {mode} mode")
    if pod.get("hostNetwork") and pod.get("dnsPolicy") != "ClusterFirstWithHostNet":
        problems.append("hostNetwork without ClusterFirstWithHostNet")
    # containers: unique names, env names, probes on declared ports, mounts on volumes
    container_names = [c["name"] for c in pod["containers"]]
    if len(set(container_names)) != len(container_names):
        problems.append(f"container names {container_names}")
    volumes = [v["name"] for v in pod.get("volumes", [])]
    if len(set(volumes)) != len(volumes):
        problems.append(f"volume names repeat: {volumes}")
    declared = {p["containerPort"] for p in pod_ports(pod)}
    for c in pod["containers"]:
        env_names_here = [e["name"] for e in c.get("env", [])]
        if len(set(env_names_here)) != len(env_names_here):  # server-side apply refuses
            problems.append(f"env names repeat in {c['name']}: {env_names_here}")
        for env in c.get("env", []):
            if not ENV_NAME.fullmatch(env["name"]):
                problems.append(f"env name {env['name']!r}")
            if "value" in env and "valueFrom" in env:
                problems.append(f"env {env['name']} has value and valueFrom")
        probe_port = (c.get("readinessProbe") or {}).get("tcpSocket", {}).get("port")
        if probe_port is not None and probe_port not in declared:
            problems.append(f"readiness probe on undeclared port {probe_port}")
        paths = [m["mountPath"] for m in c.get("volumeMounts", [])]
        if len(set(paths)) != len(paths):
            problems.append(f"mount paths repeat in {c['name']}: {paths}")
        for mount in c.get("volumeMounts", []):
            if mount["name"] not in volumes:
                problems.append(f"mount of missing volume {mount['name']}")
    # the Service: port == targetPort, unique (port, protocol), selects the pod
    svc = by_kind.get("Service")
    if (svc is None) != (mode == "host"):
        problems.append(f"Service present={svc is not None} in {mode} mode")
    if svc:
        ports = svc["spec"]["ports"]
        keys = [(p["port"], p["protocol"]) for p in ports]
        if len(set(keys)) != len(keys):
            problems.append(f"Service ports repeat: {keys}")
        if len({p["name"] for p in ports}) != len(ports):
            problems.append("Service port names repeat")
        for p in ports:
            if p["port"] != p["targetPort"] or not 1024 <= p["port"] <= 65535:
                problems.append(f"Service port {p}")
        if svc["spec"]["selector"] != selector:
            problems.append("the Service does not select the IOC pod")
        if svc["metadata"]["name"] != spec["serviceName"]:
            problems.append("serviceName is not the Service")
        if {(p["port"], p["protocol"]) for p in ports} - {
                (p["containerPort"], p["protocol"]) for p in pod_ports(pod)}:
            problems.append("a Service port reaches no container port")
    policy = by_kind.get("NetworkPolicy")
    if policy:
        if not policy["spec"]["ingress"][0]["from"][0]["namespaceSelector"][
                "matchExpressions"][0]["values"]:
            problems.append("NetworkPolicy with an empty namespace list")
        if svc is None or {(p["port"], p["protocol"]) for p in policy["spec"]["ingress"][0][
                "ports"]} != {(p["port"], p["protocol"]) for p in svc["spec"]["ports"]}:
            problems.append("NetworkPolicy ports are not the Service ports")
    config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    cm = next((c for n, c in config_maps.items() if n.endswith("-pvagw")), None)
    runs_pvagw = "pvagw" in container_names
    if (cm is not None) != runs_pvagw:
        problems.append(f"pvagw ConfigMap present={cm is not None}, pvagw runs={runs_pvagw}")
    if mode != "sidecar" and len(container_names) > 1:
        problems.append(f"sidecars {container_names} in {mode} mode")
    if mode == "sidecar" and len(container_names) < 2:
        problems.append("sidecar mode without a gateway")
    problems += _cagw_problems(pod, config_maps)
    if cm:
        config = json.loads(cm["data"][pvagw_render.CONFIG_KEY])
        server = config["servers"][0]
        gw = next(c for c in pod["containers"] if c["name"] == "pvagw")
        gw_ports = {(p["containerPort"], p["protocol"]) for p in gw["ports"]}
        if gw_ports != {(server["serverport"], "TCP"), (server["bcastport"], "UDP")}:
            problems.append("pvagw listens elsewhere than its container ports")
        if {"name": "pvagw-config", "configMap": {"name": cm["metadata"]["name"]}} not in (
                pod.get("volumes") or []):
            problems.append("pvagw config volume does not mount the ConfigMap")
    pvc = by_kind.get("PersistentVolumeClaim")
    if pvc is not None and pvc["metadata"].get("ownerReferences"):
        problems.append("the autosave claim is owned (it must outlive the IOC)")
    return problems


def _cagw_problems(pod: dict[str, Any], config_maps: dict[str, Any]) -> list[str]:
    """The CA gateway listens on its container ports and reaches the IOC where it went."""
    gw = next((c for c in pod["containers"] if c["name"] == "cagw"), None)
    if gw is None:
        return []
    problems = []
    args = gw["args"]
    flag = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("-")}
    if {(p["containerPort"], p["protocol"]) for p in gw["ports"]} != {
            (int(flag["-sport"]), "TCP"), (int(flag["-sport"]), "UDP")}:
        problems.append("cagw listens elsewhere than its container ports")
    ioc_env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env", [])}
    if ioc_env.get("EPICS_CAS_SERVER_PORT") != flag["-cport"] or ioc_env.get(
            "EPICS_CAS_INTF_ADDR_LIST") != "127.0.0.1":
        problems.append("cagw looks for the IOC elsewhere than it is")
    for path in (flag.get("-pvlist"), flag.get("-access")):
        if path and not any(path.endswith("/" + k) for c in config_maps.values()
                            for k in c["data"]):
            problems.append(f"cagw reads {path}, which no ConfigMap holds")
    return problems


# ---------------------------------------------------------------------- properties


def render_one(body: dict[str, Any]) -> tuple[IOC, list[dict[str, Any]]]:
    """Parse and render as the operator does (host mode: with an allocation)."""
    ioc = parse_ioc(body)
    (rendered,) = render_all([ioc])
    return ioc, rendered.objects


@PROPS
@given(valid_manifests())
def test_valid_specs_render_structurally_valid_objects(body):
    ioc, objects = render_one(body)
    mode = ioc.spec.network.mode.value
    assert structural_problems(objects, mode) == []
    for obj in objects:
        assert obj["metadata"]["namespace"] == "ns"
        assert obj["metadata"]["labels"][IOC_LABEL] == body["metadata"]["name"]
        owners = obj["metadata"].get("ownerReferences") or []
        if obj["kind"] != "PersistentVolumeClaim" and body["metadata"].get("uid"):
            assert [o["uid"] for o in owners] == [body["metadata"]["uid"]]
    # also without an allocation (render() alone) outside host mode: the same objects
    if mode != "host":
        assert render(ioc) == objects


@PROPS
@given(valid_manifests())
def test_rendering_is_deterministic_and_idempotent(body):
    before = copy.deepcopy(body)
    ioc, objects = render_one(body)
    assert body == before  # the input is not modified
    assert render_one(copy.deepcopy(body))[1] == objects
    assert json.dumps(objects, sort_keys=True) == json.dumps(render_one(body)[1],
                                                             sort_keys=True)
    # parse -> dump -> parse gives the same IOC and the same objects, with or without
    # the defaults and nulls written out
    for dump in (ioc.model_dump(mode="json", by_alias=True),
                 ioc.model_dump(mode="json", by_alias=True, exclude_none=True),
                 ioc.model_dump(mode="json", by_alias=True, exclude_defaults=True)):
        again = parse_ioc(json.loads(json.dumps(dump)))
        assert again == ioc
        assert render_one(dump)[1] == objects


def used_ports(r: Any) -> dict[int, str]:
    """The host ports an IOC binds: only those of the protocols it serves."""
    spec, ports = r.ioc.spec, r.ports
    used: dict[int, str] = {}
    if spec.servers.ca.enabled:
        used[ports.ca] = "ca"
    if spec.servers.pva.enabled:
        used[ports.pva_server] = "pvaServer"
        used[ports.pva_broadcast] = "pvaBroadcast"
    return used


def shares_node(a: Any, b: Any) -> bool:
    na, nb = a.ioc.spec.scheduling.node_name, b.ioc.spec.scheduling.node_name
    return na is None or nb is None or na == nb


def explicit_ports(r: Any) -> set[int]:
    return {p for p in r.ioc.spec.network.ports.model_dump().values() if p}


@settings(PROPS, max_examples=60)
@given(st.lists(valid_manifests(with_uid=True), min_size=2, max_size=5,
                unique_by=lambda b: b["metadata"]["name"]))
def test_render_all_gives_host_iocs_unique_ports_on_shared_nodes(bodies):
    iocs = [parse_ioc(b) for b in bodies]
    try:
        rendered = render_all(iocs)
    except IOCValidationError as exc:  # two IOCs asked for one explicit port: refused
        assert exc.field == "spec.network.ports"
        return
    assert render_all(iocs) == rendered
    host = [r for r in rendered if r.ioc.spec.network.mode.value == "host"]
    for i, a in enumerate(host):
        for b in host[i + 1:]:
            if not shares_node(a, b):
                continue
            shared = set(used_ports(a)) & set(used_ports(b))
            assert not shared, (a.ioc.metadata.name, b.ioc.metadata.name, shared)
    for r in rendered:
        assert structural_problems(r.objects, r.ioc.spec.network.mode.value) == []
        if r.ioc.spec.network.mode.value == "host":
            allocated = set(r.ports.as_dict().values()) - explicit_ports(r)
            assert all(5064 <= p <= 5999 and p != 5065 for p in allocated), r.ports


def _host(name: str, **network: Any) -> IOC:
    return parse_ioc({"metadata": {"name": name, "namespace": "ns"},
                      "spec": {"image": "reg/ioc:1", "prefix": "H:",
                               "network": {"mode": "host", **network},
                               "scheduling": {"nodeName": "n1"}}})


def test_explicit_port_wins_over_an_earlier_allocation():
    """An IOC listed later that pins 5064 gets it; the earlier one is allocated around it."""
    first, second = render_all([_host("auto"), _host("pinned", ports={"ca": 5064})])
    assert second.ports.ca == 5064
    assert first.ports.ca != 5064
    assert not set(used_ports(first)) & set(used_ports(second))


@pytest.mark.parametrize("mutation", MUTATIONS, ids=MUTATION_IDS)
def test_invalid_specs_raise_one_validation_error_naming_the_field(mutation):
    """Every rule, each with its own examples: a valid manifest broken in one place."""
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(invalid_manifests(mutations=[mutation]))
    def check(case):
        body, rule, _ = case
        with pytest.raises(IOCValidationError) as info:
            render_one(body)
        field = info.value.field
        assert field.split(".")[0] in ("spec", "metadata"), (rule, field)
        assert str(info.value).startswith(field)

    check()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk_manifests())
def test_junk_anywhere_is_a_validation_error_or_renders(body):
    try:
        render_one(body)
    except IOCValidationError as exc:
        assert exc.field.split(".")[0] in ("spec", "metadata"), exc


def test_strategies_reach_every_mode_and_server():
    """Guard against a strategy that quietly stops covering part of the model."""
    seen: set[tuple[str, ...]] = set()

    @settings(max_examples=400, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(valid_manifests(), invalid_manifests())
    def collect(body, case):
        ioc = parse_ioc(body)
        s = ioc.spec
        seen.add(("mode", s.network.mode.value))
        if s.servers.ca.enabled:
            seen.add(("ca", s.servers.ca.implementation.value))
        if s.servers.pva.enabled:
            seen.add(("pva", s.servers.pva.implementation.value))
        if s.gateways is not None:
            seen.add(("gateways",))
        for flag, what in ((s.runs_pvagw, "pvagw"), (s.runs_ca_gateway, "cagw"),
                           (s.runs_bridge, "bridge")):
            if flag:
                seen.add(("sidecar", what))
        if s.runs_ca_gateway and s.ca_gateway.implementation.value == "ca-gateway":
            seen.add(("sidecar", "cagw:ca-gateway"))
        if s.network.ports.ca or s.network.ports.pva_server:
            seen.add(("explicit ports",))
        seen.add(("level", case[2]))
        seen.add(("rule", case[1]))

    collect()
    wanted = {("mode", m) for m in ("host", "pod", "sidecar")} | {
        ("ca", c) for c in ("rsrv", "caproto", "pcas")} | {
        ("sidecar", c) for c in ("pvagw", "cagw", "bridge", "cagw:ca-gateway")} | {
        ("pva", p) for p in ("pvxs", "classic")} | {
        ("gateways",), ("explicit ports",), ("level", SCHEMA), ("level", SEMANTIC)}
    assert wanted <= seen, wanted - seen


# ------------------------------------------- regressions: bugs found by the properties

COLLIDING = [
    ("pod", {"ca": 5075}),                          # CA TCP == default PVA server TCP
    ("pod", {"pvaServer": 5064}),                   # PVA server TCP == default CA TCP
    ("sidecar", {"ca": 5076}),                      # CA UDP == gateway's PVA search UDP
    ("host", {"ca": 5070, "pvaBroadcast": 5070}),   # both explicit, UDP twice
]


@pytest.mark.parametrize(("mode", "explicit"), COLLIDING)
def test_intra_pod_port_collision_is_refused_offline(mode, explicit):
    body = {"metadata": {"name": "clash", "namespace": "ns"},
            "spec": {"image": "reg/ioc:1", "prefix": "C:",
                     "network": {"mode": mode, "ports": explicit}}}
    with pytest.raises(IOCValidationError) as info:
        render_one(body)
    assert info.value.field.startswith("spec.network.ports")


@pytest.mark.parametrize("env", [
    [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}],
    [{"name": "EPICS_CAS_SERVER_PORT", "value": "5070"}],
])
def test_repeated_env_names_are_refused_offline(env):
    body = {"metadata": {"name": "a", "namespace": "ns"},
            "spec": {"image": "reg/ioc:1", "prefix": "A:", "env": env}}
    with pytest.raises(IOCValidationError) as info:
        render_one(body)
    assert info.value.field == "spec.env"


@pytest.mark.parametrize("spec", [
    {"imagePullPolicy": "Sometimes"},
    {"network": {"ports": {"ca": "5070"}}},
    {"servers": {"ca": {"enabled": "yes"}}},
])
def test_offline_render_refuses_what_the_crd_refuses(spec):
    with pytest.raises(IOCValidationError):
        parse_ioc({"metadata": {"name": "a"},
                   "spec": {"image": "reg/ioc:1", "prefix": "A:", **spec}})


@pytest.mark.parametrize("spec", [
    {"network": {"allowedNamespaces": []}},          # NetworkPolicy `In` with no values
    {"autosave": {"enabled": True, "size": "0"}},    # PVC storage must be > 0
])
def test_specs_kubernetes_would_refuse_are_refused_offline(spec):
    """Both once passed the model and the CRD, and Kubernetes refused the rendered object."""
    body = {"metadata": {"name": "a", "namespace": "ns"},
            "spec": {"image": "reg/ioc:1", "prefix": "A:", **spec}}
    with pytest.raises(IOCValidationError) as info:
        render_one(body)
    assert info.value.field.startswith("spec.")
