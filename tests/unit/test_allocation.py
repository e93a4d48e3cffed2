"""Host-port allocation rules."""

from __future__ import annotations

import itertools

import pytest

from ioc_operator.allocation.hostports import HostIOC, PortRangeExhausted, allocate
from ioc_operator.render.ports import ResolvedPorts


def ports(a):
    return (a.ports.ca, a.ports.pva_server, a.ports.pva_broadcast)


def test_first_ioc_gets_epics_defaults():
    assert ports(allocate(HostIOC("ns/a", "n1"), [])) == (5064, 5075, 5076)


def test_second_ioc_on_the_node_gets_other_ports_never_the_repeater_port():
    a = HostIOC("ns/a", "n1", recorded=(5064, 5075, 5076), created="1")
    b = allocate(HostIOC("ns/b", "n1", created="2"), [a])
    assert ports(b) == (5066, 5067, 5068)
    assert 5065 not in ports(b)


def test_iocs_pinned_to_different_nodes_may_share_ports():
    a = HostIOC("ns/a", "n1", recorded=(5064, 5075, 5076))
    assert ports(allocate(HostIOC("ns/b", "n2"), [a])) == (5064, 5075, 5076)


def test_unpinned_ioc_is_unique_cluster_wide():
    a = HostIOC("ns/a", "n1", recorded=(5064, 5075, 5076))
    assert 5064 not in ports(allocate(HostIOC("ns/b", None), [a]))
    c = HostIOC("ns/c", None, recorded=(5064, 5075, 5076))
    assert 5064 not in ports(allocate(HostIOC("ns/d", "n9"), [c]))


def test_recorded_allocation_is_stable():
    others = [HostIOC(f"ns/o{i}", "n1", recorded=(6000 + i, 6100 + i, 6200 + i),
                      created="0") for i in range(3)]
    me = HostIOC("ns/me", "n1", recorded=(5070, 5071, 5072), created="5")
    assert ports(allocate(me, others)) == (5070, 5071, 5072)
    assert ports(allocate(me, list(reversed(others)))) == (5070, 5071, 5072)


def test_explicit_ports_win_over_a_recorded_allocation():
    me = HostIOC("ns/me", "n1", recorded=(5066, 5067, 5068), created="5")
    newcomer = HostIOC("ns/x", "n1", explicit=(5066, None, None), created="9")
    assert ports(allocate(me, [newcomer]))[0] != 5066
    assert ports(allocate(me, [newcomer]))[1:] == (5067, 5068)


def test_explicit_clash_reported_on_both_older_keeps_the_port():
    old = HostIOC("ns/old", "n1", explicit=(5070, None, None), created="1")
    new = HostIOC("ns/new", "n1", explicit=(5070, None, None), created="2")
    a_old, a_new = allocate(old, [new]), allocate(new, [old])
    assert a_old.clashes == ("ns/new",) and a_old.refused is None
    assert a_new.clashes == ("ns/old",)
    assert "ns/old" in a_new.refused


def test_three_iocs_asking_for_one_port_whatever_order_the_index_lists_them():
    """Only the oldest runs, and it names both others. (Each port had one owner, the
    first listed: the middle IOC ran beside the oldest when the youngest came first.)"""
    iocs = [HostIOC(f"ns/{n}", "n1", explicit=(5910, None, None), created="1")
            for n in ("a", "b", "c")]
    for order in itertools.permutations(iocs):
        for me in order:
            others = [o for o in order if o is not me]
            allocation = allocate(me, others)
            assert allocation.clashes == tuple(o.key for o in iocs if o is not me)
            assert (allocation.refused is None) == (me.key == "ns/a"), (me.key, order)
            if me.key == "ns/c":
                assert "ns/a, ns/b" in allocation.refused


def test_partial_explicit_ports():
    a = allocate(HostIOC("ns/a", "n1", explicit=(None, 5090, None)), [])
    assert ports(a) == (5064, 5090, 5076)


def test_no_duplicates_among_many_iocs_on_one_node():
    placed: list[HostIOC] = []
    for i in range(40):
        me = HostIOC(f"ns/i{i:02}", "n1" if i % 3 else None, created=f"{i:03}")
        got = allocate(me, placed)
        placed.append(HostIOC(me.key, me.node, recorded=ports(got), created=me.created))
    all_ports = [p for h in placed for p in h.recorded]
    assert len(all_ports) == len(set(all_ports)) == 120


def test_range_exhausted():
    a = HostIOC("ns/a", "n1", recorded=(5064, 5075, 5076))
    with pytest.raises(PortRangeExhausted, match="5064-5066"):
        allocate(HostIOC("ns/b", "n1"), [a], port_range=(5064, 5066))


def test_allocation_is_resolved_ports():
    assert allocate(HostIOC("ns/a", None), []).ports == ResolvedPorts()


def test_explicit_port_evicts_an_allocation_which_then_moves():
    auto = HostIOC("ns/auto", "n1", recorded=(5064, 5075, 5076), created="1")
    pinned = HostIOC("ns/pinned", "n1", explicit=(5064, None, None), created="2")
    got = allocate(pinned, [auto])
    assert got.ports.ca == 5064 and got.evicts == ("ns/auto",) and got.refused is None
    moved = allocate(auto, [HostIOC(pinned.key, "n1", pinned.explicit, ports(got), "2")])
    assert moved.ports.ca != 5064 and moved.ports.pva_server == 5075


# ---- duplicate PV prefixes (prefixes.py): the same rule, older keeps it

def test_the_older_ioc_keeps_a_prefix_and_a_refused_one_is_freed_when_it_goes():
    from ioc_operator.allocation.prefixes import PrefixHolder, freed, taken_by

    a = PrefixHolder("a", "u1", "BL01:", "2026-01-01T00:00:00Z", False)
    b = PrefixHolder("b", "u2", "BL01:", "2026-01-02T00:00:00Z", True)
    c = PrefixHolder("c", "u3", "BL02:", "2026-01-03T00:00:00Z", False)
    assert taken_by(b, [a, b, c]) == "a"
    assert taken_by(a, [a, b, c]) is None  # the newer one never takes it back
    assert taken_by(c, [a, b, c]) is None
    assert freed([a, b, c]) == []
    assert freed([b, c]) == ["b"]  # a deleted (or renamed its prefix): b may run
