"""pvAccessCPP clients (pvaPy 5.6) and the per-IOC directory, with host-mode IOCs sharing
a node (issue 19, item 8; docs/pvaccesscpp.md).

Three host-mode IOCs on node n2, rendered and port-allocated by the operator's renderer
and run by LabRunner: A (soft IOC, QSRV2/pvxs: a PVA name server) gets the EPICS default
ports, B and C (soft IOCs, QSRV1 classic: UDP search only) get ports of their own. A
client pod on n1 runs pvaPy (pvAccessCPP 7.1.8 as pvapy 5.6 bundles it) and p4p (pvxs)
with the PVA settings of `ioc-operator client-env --per-ioc`, i.e. `directory_env`.

Each pvaPy channel is read in a process of its own: pvAccessCPP sometimes dies with
SIGSEGV on a name nobody answers while EPICS_PVA_NAME_SERVERS is set, and that must not
hide what happened to the other names.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from ioc_operator.allocation.plan import Rendered, render_all
from ioc_operator.discovery.directory import directory_env
from ioc_operator.model.validation import parse_ioc
from ioc_testbed.lab import Lab, Pod, run_client
from ioc_testbed.lab.runner import LabRunner, RunningIOC
from ioc_testbed.lab.running_client import run_once

HOST_NODE, CLIENT_NODE = 2, 1
PVXS = {"ca": {"implementation": "rsrv"}, "pva": {"implementation": "pvxs"}}
CLASSIC = {"ca": {"implementation": "rsrv"}, "pva": {"implementation": "classic"}}
FOUND_S, MISSING_S = 5.0, 3.0  # pvaPy timeouts: a found name takes 0.05-0.3 s (measured)


@dataclass
class Site:
    lab: Lab
    client: Pod
    iocs: dict[str, tuple[RunningIOC, Rendered]]

    def pv(self, key: str) -> str:
        return self.iocs[key][0].ioc.spec.prefix + "value"

    def entry(self, key: str) -> str:
        """The IOC's own PVA UDP entry, as its status.clientEnv names it."""
        return self.iocs[key][0].client_env["EPICS_PVA_ADDR_LIST"]

    def directory(self, *keys: str) -> dict[str, str]:
        """The PVA settings of the per-IOC directory of these IOCs."""
        env = directory_env([self.iocs[k][0].client_env for k in keys])
        return {k: v for k, v in env.items() if k.startswith("EPICS_PVA_")}

    def pvapy(self, key: str, env: Mapping[str, str], op: str = "get",
              value: Any = None) -> bool:
        res = run_once(self.lab, self.client, "pvapy", op, [self.pv(key)], env, value=value,
                       timeout=FOUND_S if value is not None else MISSING_S)
        return res.ok

    def p4p(self, keys: list[str], env: Mapping[str, str]) -> list[bool]:
        res = run_client(self.lab, self.client, "p4p", "get", [self.pv(k) for k in keys], env,
                         timeout=MISSING_S)
        return [res.found(self.pv(k)) for k in keys]


def manifest(name: str, servers: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "epics-operator.io/v1alpha1", "kind": "IOC",
            "metadata": {"name": name, "namespace": "lab"},
            "spec": {"image": "lab", "prefix": f"{name.upper()}:", "servers": servers,
                     "network": {"mode": "host"}}}


@pytest.fixture(scope="module")
def site(lab: Lab) -> Iterator[Site]:
    rendered = render_all([parse_ioc(manifest(f"cpp-{k}", s)) for k, s in
                           (("a", PVXS), ("b", CLASSIC), ("c", CLASSIC))])
    runner = LabRunner(lab)
    iocs = {key: (runner.run(r, HOST_NODE), r) for key, r in zip("abc", rendered, strict=True)}
    yield Site(lab, lab.add_pod(CLIENT_NODE, name="cpp-client"), iocs)


def test_the_iocs_share_one_address_with_ports_of_their_own(site: Site):
    node = site.lab.nodes[HOST_NODE].ip
    assert site.entry("a") == node  # the default UDP port 5076: no port written
    assert {site.entry(k).partition(":")[0] for k in "bc"} == {node}
    assert len({site.entry(k) for k in "abc"}) == 3
    assert "EPICS_PVA_NAME_SERVERS" in site.iocs["a"][0].client_env
    assert all("EPICS_PVA_NAME_SERVERS" not in site.iocs[k][0].client_env for k in "bc")


def test_pvaccesscpp_searches_only_the_first_entry_per_address(site: Site):
    """Upstream behaviour (pvAccessCPP's address list de-duplication by IP address alone):
    with both IOCs' entries in EPICS_PVA_ADDR_LIST pvaPy finds whichever comes first;
    p4p (pvxs) searches every entry."""
    for first, second in (("a", "b"), ("b", "a")):
        env = {"EPICS_PVA_AUTO_ADDR_LIST": "NO",
               "EPICS_PVA_ADDR_LIST": f"{site.entry(first)} {site.entry(second)}"}
        assert site.pvapy(first, env), f"{first} first: pvaPy did not find {first}"
        assert not site.pvapy(second, env), f"{first} first: pvaPy found {second} after all"
        assert site.p4p([first, second], env) == [True, True]


def test_the_directory_reaches_a_classic_and_a_pvxs_ioc_on_one_node(site: Site):
    """A classic IOC's entry goes first: pvaPy finds it by UDP and the pvxs IOC through
    its name server. Plainly sorted, the node's bare address (A, port 5076) came first
    and B was never found."""
    env = site.directory("a", "b")
    assert env["EPICS_PVA_ADDR_LIST"].split()[0] == site.entry("b")
    assert site.pvapy("a", env) and site.pvapy("b", env)
    assert site.pvapy("b", env, "put", 2.5)  # read back by the client
    assert site.p4p(["a", "b"], env) == [True, True]


def test_only_one_classic_ioc_per_node_is_found(site: Site):
    """The limit no form of the entries lifts: two classic IOCs on one node have no name
    server, and pvaPy searches one entry of the address. The name service (the chart's
    default) or sidecar mode (a ClusterIP each) reaches both."""
    env = site.directory("a", "b", "c")
    first = env["EPICS_PVA_ADDR_LIST"].split()[0]
    found, hidden = ("b", "c") if first == site.entry("b") else ("c", "b")
    assert site.pvapy("a", env) and site.pvapy(found, env)
    assert not site.pvapy(hidden, env)
    assert site.p4p(["a", "b", "c"], env) == [True, True, True]
