"""Client settings per IOC and merged: NAME_SERVERS only for servers answering TCP."""

from __future__ import annotations

from ioc_operator.discovery import clientenv
from ioc_operator.render import resolve_ports
from ioc_operator.render.ports import ResolvedPorts

from iocs import make_ioc


def settings(**spec):
    ioc = make_ioc(**spec)
    return clientenv.for_ioc(ioc.spec, "198.19.0.10", resolve_ports(ioc.spec)).env()


def test_rsrv_and_pvxs_in_pod_mode_get_name_servers():
    assert settings() == {
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_ADDR_LIST": "198.19.0.10",
        "EPICS_CA_NAME_SERVERS": "198.19.0.10:5064",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_ADDR_LIST": "198.19.0.10",
        "EPICS_PVA_NAME_SERVERS": "198.19.0.10:5075",
    }


def test_caproto_is_not_a_name_server_pcas_is():
    env = settings(servers={"ca": {"implementation": "caproto"}, "pva": {"enabled": False}})
    assert env == {"EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CA_ADDR_LIST": "198.19.0.10"}
    env = settings(network={"mode": "host"},
                   servers={"ca": {"implementation": "pcas"}, "pva": {"enabled": False}})
    assert env["EPICS_CA_NAME_SERVERS"] == "198.19.0.10:5064"


def test_classic_pva_in_pod_mode_is_reached_by_address_list_only():
    env = settings(servers={"pva": {"implementation": "classic"}})
    assert env["EPICS_PVA_ADDR_LIST"] == "198.19.0.10"
    assert "EPICS_PVA_NAME_SERVERS" not in env


def test_classic_pva_in_sidecar_mode_gets_the_gateway_name_server():
    env = settings(network={"mode": "sidecar"}, servers={"pva": {"implementation": "classic"}})
    assert env["EPICS_PVA_NAME_SERVERS"] == "198.19.0.10:5075"


def test_host_mode_names_non_default_ports():
    env = settings(network={"mode": "host", "ports": {"ca": 5070, "pvaServer": 5081,
                                                      "pvaBroadcast": 5082}})
    assert env["EPICS_CA_ADDR_LIST"] == "198.19.0.10:5070"
    assert env["EPICS_CA_NAME_SERVERS"] == "198.19.0.10:5070"
    assert env["EPICS_PVA_ADDR_LIST"] == "198.19.0.10:5082"  # UDP: the broadcast port
    assert env["EPICS_PVA_NAME_SERVERS"] == "198.19.0.10:5081"  # TCP: the server port


def test_endpoints():
    ioc = make_ioc()
    assert clientenv.endpoints(ioc.spec, "198.19.0.3", ResolvedPorts()) == {
        "ca": "198.19.0.3:5064", "pva": "198.19.0.3:5075"}


def test_merge_is_sorted_and_lists_each_entry_once():
    a = clientenv.for_ioc(make_ioc().spec, "198.19.0.20", ResolvedPorts())
    b = clientenv.for_ioc(make_ioc().spec, "198.19.0.3", ResolvedPorts())
    merged = clientenv.merge([a, b, a]).env()
    assert merged["EPICS_CA_ADDR_LIST"] == "198.19.0.20 198.19.0.3"
    assert merged == clientenv.merge([b, a]).env()
