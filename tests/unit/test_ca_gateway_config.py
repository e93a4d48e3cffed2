"""The builtin CA gateway's pvlist and command line: pure, no network (the gateway
itself is tested in the lab tier, tests/lab/test_ca_gateway.py)."""

from __future__ import annotations

import pytest

from ioc_operator.gateways.ca_gateway import parse_args
from ioc_operator.gateways.ca_pvlist import PVList, PVListError, parse_pvlist

PVLIST = """\
# served: everything but the string PV
EVALUATION ORDER ALLOW, DENY
.*            ALLOW
.*:str        DENY
"""


def test_pvlist_subset_semantics():
    """ca-gateway's findEntry: ALLOW, DENY lets DENY win; DENY, ALLOW lets ALLOW win."""
    allow_deny = parse_pvlist(PVLIST)
    assert allow_deny.allowed("GW:ao") and not allow_deny.allowed("GW:str")
    deny_allow = parse_pvlist("EVALUATION ORDER DENY, ALLOW\nGW:.* DENY\nGW:a.* ALLOW\n")
    assert deny_allow.allowed("GW:ao") and not deny_allow.allowed("GW:str")
    assert not deny_allow.allowed("OTHER:x")  # no ALLOW line matches
    assert parse_pvlist("").allowed("X") is False  # a file without ALLOW lines serves nothing
    assert PVList().allowed("ANY:thing")  # no -pvlist: everything
    assert not parse_pvlist("GW:a ALLOW\n").allowed("GW:ao")  # patterns match whole names
    for bad in ("X:.* ALIAS Y:\\1\n", "X:.* DENY FROM somehost\n", "X:( ALLOW\n",
                "EVALUATION ORDER ALLOW\n"):
        with pytest.raises(PVListError):
            parse_pvlist(bad)


def test_command_line_mirrors_ca_gateway():
    config = parse_args(["-sip", "198.18.16.2", "-sport", "5064",
                         "-cip", "127.0.0.1 198.18.0.10:5070", "-cport", "15064", "-ro",
                         "-inactive_timeout", "30"])
    assert config.server_hosts == ["198.18.16.2"] and config.server_port == 5064
    assert config.upstream == [("127.0.0.1", 15064), ("198.18.0.10", 5070)]
    assert config.read_only and config.inactive_timeout == 30
    with pytest.raises(SystemExit):
        parse_args(["-inactive_timeout", "0"])
