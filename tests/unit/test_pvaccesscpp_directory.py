"""The per-IOC directory's PVA address list for pvAccessCPP clients (issue 19, item 8).

pvAccessCPP keeps only the first EPICS_PVA_ADDR_LIST entry per IP address, so on a node
with several host-mode IOCs the entry of the one it can reach no other way (no PVA name
server: a classic QSRV1 server) must come first. tests/lab/test_pvaccesscpp.py shows it
with pvaPy; docs/pvaccesscpp.md has the measurements.
"""

from __future__ import annotations

from ioc_operator.allocation.plan import render_all
from ioc_operator.discovery import clientenv
from ioc_operator.discovery.clientenv import NameService, name_service_env
from ioc_operator.discovery.directory import directory_config_map, directory_env, pva_addr_order

from iocs import make_ioc

NODE = "198.18.0.12"
PVXS = {"ca": {"implementation": "rsrv"}, "pva": {"implementation": "pvxs"}}
CLASSIC = {"ca": {"implementation": "rsrv"}, "pva": {"implementation": "classic"}}


def host_envs(*servers: dict[str, object], node: str = NODE) -> list[dict[str, str]]:
    """Client settings of host-mode IOCs on one node, ports allocated as the operator does
    (in this order: the first gets the EPICS defaults)."""
    rendered = render_all([make_ioc(f"h{i}", uid=f"u{i}", prefix=f"H{i}:", servers=s,
                                    network={"mode": "host"}, scheduling={"nodeName": "n2"})
                           for i, s in enumerate(servers)])
    return [clientenv.for_ioc(r.ioc.spec, node, r.ports).env() for r in rendered]


def test_a_classic_ioc_comes_first_among_its_nodes_entries():
    envs = host_envs(PVXS, CLASSIC)  # pvxs on 5076 (no port written), classic on 5068
    assert [e["EPICS_PVA_ADDR_LIST"] for e in envs] == [NODE, f"{NODE}:5068"]
    env = directory_env(envs)
    # sorted alone, "198.18.0.12" would come first and pvaPy would never search 5068
    assert env["EPICS_PVA_ADDR_LIST"] == f"{NODE}:5068 {NODE}"
    assert env["EPICS_PVA_NAME_SERVERS"] == f"{NODE}:5075"  # the pvxs IOC's, for the rest


def test_the_order_is_the_same_whatever_the_order_of_the_iocs():
    envs = host_envs(PVXS, CLASSIC, PVXS)
    assert directory_env(envs) == directory_env(list(reversed(envs)))
    first, *rest = directory_env(envs)["EPICS_PVA_ADDR_LIST"].split()
    assert first == f"{NODE}:5068" and rest == sorted(rest)


def test_other_addresses_keep_their_sorted_places():
    entries = ["198.19.0.10", f"{NODE}:5071", NODE, f"{NODE}:5068", "198.18.0.11:5082"]
    envs = [{"EPICS_PVA_ADDR_LIST": f"{NODE}:5071"},  # no name server: classic
            {"EPICS_PVA_ADDR_LIST": NODE, "EPICS_PVA_NAME_SERVERS": f"{NODE}:5075"},
            {"EPICS_PVA_ADDR_LIST": f"{NODE}:5068", "EPICS_PVA_NAME_SERVERS": f"{NODE}:5067"},
            {"EPICS_PVA_ADDR_LIST": "198.19.0.10"},
            {"EPICS_PVA_ADDR_LIST": "198.18.0.11:5082"}]
    assert pva_addr_order(envs, entries) == (
        "198.18.0.11:5082", f"{NODE}:5071", NODE, f"{NODE}:5068", "198.19.0.10")


def test_without_a_classic_ioc_the_list_is_plainly_sorted():
    envs = host_envs(PVXS, PVXS, PVXS) + host_envs(PVXS, node="198.18.0.10")
    addr = directory_env(envs)["EPICS_PVA_ADDR_LIST"].split()
    assert addr == sorted(addr)


def test_the_constant_directory_is_untouched():
    service = name_service_env(NameService("198.19.0.53"))
    cm = directory_config_map("ns", "epics-client-env", host_envs(PVXS, CLASSIC), service)
    assert cm["data"]["EPICS_PVA_ADDR_LIST"] == "198.19.0.53"
    assert cm["data"]["EPICS_PVA_NAME_SERVERS"] == "198.19.0.53:5075"
