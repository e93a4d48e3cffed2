"""The constant directory: what a name service's address makes of the client settings."""

from __future__ import annotations

import pytest

from ioc_operator.cli import main, parser
from ioc_operator.discovery import clientenv
from ioc_operator.discovery.directory import PHOEBUS_KEY, directory_config_map
from ioc_operator.model.config import OperatorConfig
from ioc_operator.render import resolve_ports

from iocs import make_ioc


def per_ioc(address: str, **spec) -> dict[str, str]:
    ioc = make_ioc(**spec)
    return clientenv.for_ioc(ioc.spec, address, resolve_ports(ioc.spec)).env()


def test_constant_settings_name_only_the_name_service():
    env = clientenv.name_service_env(clientenv.NameService("198.19.0.53"))
    assert env == {
        "EPICS_CA_ADDR_LIST": "198.19.0.53",
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_NAME_SERVERS": "198.19.0.53:5064",
        "EPICS_PVA_ADDR_LIST": "198.19.0.53",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_NAME_SERVERS": "198.19.0.53:5075",
    }


def test_other_ports_are_named_where_clients_need_them():
    env = clientenv.name_service_env(clientenv.NameService("ns.site", 30064, 30075, 30076))
    assert env["EPICS_CA_ADDR_LIST"] == "ns.site:30064"
    assert env["EPICS_CA_NAME_SERVERS"] == "ns.site:30064"
    assert env["EPICS_PVA_ADDR_LIST"] == "ns.site:30076"  # UDP: the search port
    assert env["EPICS_PVA_NAME_SERVERS"] == "ns.site:30075"  # TCP


def test_the_setting_comes_from_the_environment():
    assert clientenv.name_service(OperatorConfig.from_env({})) is None
    config = OperatorConfig.from_env({"IOC_OPERATOR_NAME_SERVICE_ADDRESS": "198.19.0.53",
                                      "IOC_OPERATOR_NAME_SERVICE_PVA_PORT": "15075"})
    assert clientenv.name_service(config) == clientenv.NameService("198.19.0.53",
                                                                   pva_port=15075)


def test_the_directory_is_the_same_bytes_whatever_the_iocs():
    constant = clientenv.name_service_env(clientenv.NameService("198.19.0.53"))
    one = directory_config_map("ns", "epics-client-env", [per_ioc("198.19.0.10")], constant)
    two = directory_config_map("ns", "epics-client-env",
                               [per_ioc("198.19.0.10"), per_ioc("198.19.0.11"),
                                per_ioc("198.18.0.5", network={"mode": "host"})], constant)
    assert one == two
    data = one["data"]
    assert {k: v for k, v in data.items() if k != PHOEBUS_KEY} == constant
    assert "org.phoebus.pv.pva/epics_pva_name_servers=198.19.0.53:5075" in data[PHOEBUS_KEY]
    # without a name service: every IOC's address
    listed = directory_config_map("ns", "epics-client-env",
                                  [per_ioc("198.19.0.10"), per_ioc("198.19.0.11")])
    assert listed["data"]["EPICS_CA_ADDR_LIST"] == "198.19.0.10 198.19.0.11"


def test_client_env_prints_the_constant_settings_offline(capsys):
    assert main(["client-env", "--name-service", "198.19.0.53:5064:5075:5076",
                 "--format", "env"]) == 0
    printed = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert printed == clientenv.name_service_env(clientenv.NameService("198.19.0.53"))


@pytest.mark.parametrize("value", ["", "a:b", "a:1:2:3:4", "a:70000"])
def test_client_env_refuses_a_bad_name_service(value, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["client-env", "--name-service", value])
    assert "--name-service" in capsys.readouterr().err


def test_client_env_sources_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["client-env", "--per-ioc", "--name-service", "198.19.0.53"])
