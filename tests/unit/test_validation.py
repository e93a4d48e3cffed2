"""A user's mistake is one IOCValidationError naming the field, never a traceback."""

from __future__ import annotations

import pytest

from ioc_operator.model.config import OperatorConfig
from ioc_operator.model.errors import IOCValidationError
from ioc_operator.model.validation import check_config, check_semantics, parse_ioc

from iocs import make_ioc


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"image": "x"}, "spec.prefix", "Field required"),
        ({"prefix": "A:"}, "spec.image", "Field required"),
        ({"image": "x", "prefix": "A B"}, "spec.prefix", "pattern"),
        ({"image": "x", "prefix": "A:", "network": {"mode": "bridge"}}, "spec.network.mode",
         "'host', 'pod' or 'sidecar'"),
        ({"image": "x", "prefix": "A:", "netwrk": {}}, "spec.netwrk", "unknown field"),
        ({"image": "x", "prefix": "A:", "network": {"ports": {"ca": 80}}},
         "spec.network.ports.ca", "greater than or equal to 1024"),
        ({"image": "x", "prefix": "A:", "gateways": {"pva": {}}}, "spec",
         "gateways may only be set when network.mode is sidecar"),
        ({"image": "x", "prefix": "A:", "servers": {"ca": {"enabled": False},
                                                     "pva": {"enabled": False}}},
         "spec", "must serve CA or PVA"),
        ({"image": "x", "prefix": "A:", "network": {"mode": "sidecar"},
          "gateways": {"bridge": {"enabled": True}}}, "spec", "bridge is for IOCs without"),
        ({"image": "x", "prefix": "A:",
          "network": {"ports": {"pvaServer": 5090, "pvaBroadcast": 5090}}}, "spec",
         "pvaServer and ports.pvaBroadcast must differ"),
    ],
)
def test_schema_errors_name_the_field(spec, field, words):
    with pytest.raises(IOCValidationError) as info:
        parse_ioc({"metadata": {"name": "a"}, "spec": spec})
    assert info.value.field == field
    assert words in str(info.value)


def test_bad_name_is_reported_on_metadata():
    with pytest.raises(IOCValidationError) as info:
        parse_ioc({"metadata": {"name": "Bad_Name"}, "spec": {"image": "x", "prefix": "A:"}})
    assert info.value.field == "metadata.name"


def test_classic_pva_cannot_promise_name_servers_without_sidecar():
    with pytest.raises(IOCValidationError) as info:
        make_ioc(network={"requireNameServers": True},
                 servers={"pva": {"implementation": "classic"}})
    assert info.value.field == "spec.network.requireNameServers"
    assert "sidecar" in str(info.value)
    # the sidecar's pvagw answers name-server searches, so this one is fine
    make_ioc(network={"mode": "sidecar", "requireNameServers": True},
             servers={"pva": {"implementation": "classic"}})


def test_caproto_cannot_promise_ca_name_servers():
    with pytest.raises(IOCValidationError, match="caproto CA server"):
        make_ioc(network={"requireNameServers": True}, servers={"ca": {"implementation":
                                                                       "caproto"}})


def test_ca_port_colliding_with_gateway_internal_port():
    with pytest.raises(IOCValidationError) as info:
        make_ioc(network={"mode": "sidecar", "ports": {"ca": 15075}})
    assert info.value.field == "spec.network.ports.ca"


@pytest.mark.parametrize("mode", ["pod", "sidecar"])
def test_pcas_needs_host_mode_or_the_ca_gateway(mode):
    servers = {"ca": {"implementation": "pcas"}, "pva": {"enabled": mode == "sidecar"}}
    gateways = {"gateways": {"ca": {"enabled": False}}} if mode == "sidecar" else {}
    with pytest.raises(IOCValidationError) as info:
        make_ioc(network={"mode": mode}, servers=servers, **gateways)
    assert info.value.field == "spec.servers.ca.implementation"
    assert "network.mode: host" in str(info.value)
    make_ioc(network={"mode": "host"}, servers=servers)
    make_ioc(network={"mode": "sidecar"}, servers=servers)  # on loopback behind the gateway


@pytest.mark.parametrize(("gateways", "field", "words"), [
    ({"ca": {"enabled": False}}, "spec.network.mode", "no gateway to run"),
    ({"ca": {"access": "ASG(DEFAULT) {}"}}, "spec.gateways.ca.access", "only for"),
    ({"ca": {"command": ["gw"]}}, "spec.gateways.ca.command", "only for"),
    ({"ca": {"implementation": "ca-gateway", "image": "gw:1", "readOnly": True,
             "access": "ASG(DEFAULT) {}"}}, "spec.gateways.ca.readOnly", "not both"),
    ({"ca": {"internalPort": 15075}, "pva": {}}, "spec.gateways.ca.internalPort",
     "internalServerPort"),
    ({"ca": {"implementation": "ca-gateway"}}, "spec.gateways.ca.image", "needs an image"),
])
def test_sidecar_gateway_settings_are_checked(gateways, field, words):
    pva = {"enabled": "pva" in gateways}
    with pytest.raises(IOCValidationError) as info:
        ioc = make_ioc(network={"mode": "sidecar"}, servers={"pva": pva}, gateways=gateways)
        check_semantics(ioc)
        check_config(ioc, OperatorConfig())
    assert info.value.field == field
    assert words in str(info.value)
