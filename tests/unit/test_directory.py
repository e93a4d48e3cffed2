"""The namespace directory: merged, sorted, each IOC once, phoebus text alongside."""

from __future__ import annotations

from ioc_operator.discovery import clientenv
from ioc_operator.discovery.directory import (
    PHOEBUS_KEY,
    directory_config_map,
    directory_env,
    settings_from_env,
)
from ioc_operator.render import resolve_ports
from ioc_operator.render.ports import ResolvedPorts

from iocs import make_ioc


def env_for(address: str, **spec) -> dict[str, str]:
    ioc = make_ioc(**spec)
    return clientenv.for_ioc(ioc.spec, address, resolve_ports(ioc.spec)).env()


def test_directory_per_server_kind():
    envs = [
        env_for("198.19.0.10"),  # rsrv + pvxs, pod mode
        env_for("198.19.0.11", servers={"ca": {"implementation": "caproto"},
                                        "pva": {"enabled": False}}),
        env_for("198.19.0.12", servers={"pva": {"implementation": "classic"}}),
        env_for("198.19.0.13", network={"mode": "sidecar"},
                servers={"pva": {"implementation": "classic"}}),
        env_for("198.18.0.5", network={"mode": "host", "ports": {
            "ca": 5070, "pvaServer": 5081, "pvaBroadcast": 5082}}),
    ]
    assert directory_env(envs) == {
        "EPICS_CA_ADDR_LIST": "198.18.0.5:5070 198.19.0.10 198.19.0.11 198.19.0.12 198.19.0.13",
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        # caproto (.11) answers no TCP search
        "EPICS_CA_NAME_SERVERS": ("198.18.0.5:5070 198.19.0.10:5064 198.19.0.12:5064 "
                                  "198.19.0.13:5064"),
        "EPICS_PVA_ADDR_LIST": "198.18.0.5:5082 198.19.0.10 198.19.0.12 198.19.0.13",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        # classic (.12) only by address list; sidecar (.13) through pvagw
        "EPICS_PVA_NAME_SERVERS": "198.18.0.5:5081 198.19.0.10:5075 198.19.0.13:5075",
    }


def test_round_trip_through_status_env():
    ioc = make_ioc()
    settings = clientenv.for_ioc(ioc.spec, "198.19.0.9", ResolvedPorts())
    assert settings_from_env(settings.env()) == settings


def test_deterministic_and_deduplicated():
    a, b = env_for("198.19.0.2"), env_for("198.19.0.1")
    one = directory_config_map("ns", "epics-client-env", [a, b, a])
    two = directory_config_map("ns", "epics-client-env", [b, a])
    assert one == two
    assert one["data"]["EPICS_CA_ADDR_LIST"] == "198.19.0.1 198.19.0.2"


def test_empty_namespace_still_disables_broadcast():
    data = directory_config_map("ns", "d", [])["data"]
    assert data["EPICS_CA_AUTO_ADDR_LIST"] == "NO" and data["EPICS_CA_ADDR_LIST"] == ""
    assert "EPICS_CA_NAME_SERVERS" not in data


def test_phoebus_settings():
    text = directory_config_map("ns", "d", [env_for("198.19.0.10")])["data"][PHOEBUS_KEY]
    assert "org.phoebus.pv.ca/addr_list=198.19.0.10\n" in text
    assert "org.phoebus.pv.ca/auto_addr_list=false\n" in text
    assert "org.phoebus.pv.ca/name_servers=198.19.0.10:5064\n" in text
    assert "org.phoebus.pv.pva/epics_pva_name_servers=198.19.0.10:5075\n" in text
    assert "org.phoebus.pv.pva/epics_pva_auto_addr_list=false\n" in text

