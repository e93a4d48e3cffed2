"""The table and the resolver: longest prefix, confirmation by the IOC, the defined
answer for a name two IOCs claim, caches that follow moves, clients answered later,
bounds. The prober here records what would be sent; the lab tests send it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest

from ioc_operator.nameserver.kubewatch import ioc_from_object
from ioc_operator.nameserver.resolver import Limits, Resolver
from ioc_operator.nameserver.table import CA, IOC, PVA, Endpoint, Table, TableError
from ioc_operator.nameserver.tablefile import parse_table


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Probes:
    sent: list[tuple[str, str, str]] = field(default_factory=list)  # proto, ioc key, name

    def probe(self, proto: str, ioc: IOC, name: str) -> None:
        self.sent.append((proto, ioc.key, name))


@dataclass
class Client:
    key: object
    answers: list[IOC] = field(default_factory=list)
    open: bool = True

    def answer(self, ioc: IOC) -> None:
        self.answers.append(ioc)

    def alive(self) -> bool:
        return self.open


def ioc(key: str, prefix: str, host: str = "198.18.16.2", created: str = "",
        pva: bool = True, **kw: object) -> IOC:
    return IOC(key=key, prefix=prefix, ca=Endpoint(host, 5064),
               pva=Endpoint(host, 5075) if pva else None, created=created, **kw)  # type: ignore[arg-type]


def make(*iocs: IOC, **limits: object) -> tuple[Table, Resolver, Probes, Clock]:
    table, probes, clock = Table(), Probes(), Clock()
    for entry in iocs:
        table.put(entry)
    return table, Resolver(table, probes, Limits(**limits), clock), probes, clock  # type: ignore[arg-type]


def confirm(resolver: Resolver, table: Table, proto: str, name: str, key: str,
            found: bool | None = True) -> None:
    entry = table.get(key)
    assert entry is not None
    resolver.probe_result(proto, name, entry, found)


# ------------------------------------------------------------------------------ table
def test_longest_prefix_first_then_the_older_ioc():
    table = Table()
    table.put(ioc("ns/a", "BL01:", created="2026-01-02"))
    table.put(ioc("other/a", "BL01:", created="2026-01-01"))
    table.put(ioc("ns/mot", "BL01:MOT:"))
    table.put(ioc("ns/x", "X:"))
    assert [i.key for i in table.candidates(CA, "BL01:MOT:m1")] == ["ns/mot", "other/a", "ns/a"]
    assert [i.key for i in table.candidates(CA, "BL01:VAC")] == ["other/a", "ns/a"]
    assert table.candidates(CA, "BL0") == []
    assert set(table.claims()) == {"BL01:"}


def test_a_move_is_a_new_entry_and_kills_the_old_one():
    table = Table()
    old = ioc("ns/a", "A:", host="198.19.0.1")
    table.put(old)
    assert not table.put(ioc("ns/a", "A:", host="198.19.0.1"))  # nothing changed
    assert old.live
    moved = ioc("ns/a", "A:", host="198.19.0.9")
    assert table.put(moved)
    assert not old.live and moved.live and table.get("ns/a") is moved
    assert old.guid != moved.guid  # a moved PVA server looks like a new one


def test_readiness_changes_in_place():
    table = Table()
    entry = ioc("ns/a", "A:", ready=False)
    seen: list[tuple[list[IOC], list[IOC]]] = []
    table.put(entry)
    table.listeners.append(lambda c, r: seen.append((c, r)))
    table.put(ioc("ns/a", "A:", ready=True))
    assert table.get("ns/a") is entry and entry.ready and entry.live
    assert seen == [([entry], [])]


def test_replace_all_within_a_scope():
    table = Table()
    table.put(ioc("a/1", "A1:"))
    table.put(ioc("b/1", "B1:"))
    table.replace_all([ioc("a/2", "A2:")], scope=lambda k: k.startswith("a/"))
    assert sorted(i.key for i in table) == ["a/2", "b/1"]


def test_entries_need_an_ipv4_endpoint():
    with pytest.raises(TableError):
        IOC(key="x", prefix="X:")
    with pytest.raises(TableError):
        Endpoint("ioc.example", 5064)
    with pytest.raises(TableError):
        Endpoint.parse("198.18.0.1:70000", 5064)


# --------------------------------------------------------------------------- resolver
def test_a_name_is_answered_only_once_its_ioc_confirms_it():
    table, resolver, probes, _ = make(ioc("ns/a", "A:"))
    client = Client("c1")
    assert resolver.resolve(CA, "A:x", client) is None
    assert probes.sent == [(CA, "ns/a", "A:x")]
    confirm(resolver, table, CA, "A:x", "ns/a")
    assert client.answers == [table.get("ns/a")]
    assert resolver.cached(CA, "A:x") is table.get("ns/a")
    # cached per protocol: PVA asks again
    assert resolver.cached(PVA, "A:x") is None


def test_an_ioc_without_the_name_leaves_it_unanswered_and_negative_for_a_while():
    table, resolver, probes, clock = make(ioc("ns/a", "A:"), negative_ttl=2.0)
    client = Client("c1")
    resolver.resolve(CA, "A:nope", client)
    confirm(resolver, table, CA, "A:nope", "ns/a", found=False)
    assert client.answers == [] and resolver.negative_hit(CA, "A:nope")
    resolver.resolve(CA, "A:nope", Client("c2"))
    assert len(probes.sent) == 1  # not asked again while negative
    clock.now += 2.5
    assert not resolver.negative_hit(CA, "A:nope")


def test_two_iocs_claiming_a_prefix_the_older_one_wins_even_if_it_answers_last():
    table, resolver, probes, _ = make(ioc("young/a", "A:", created="2026-02-01"),
                                      ioc("old/a", "A:", created="2026-01-01"))
    client = Client("c")
    resolver.resolve(CA, "A:v", client)
    assert {k for _, k, _ in probes.sent} == {"young/a", "old/a"}
    confirm(resolver, table, CA, "A:v", "young/a")
    assert client.answers == []  # the older one has not answered yet
    confirm(resolver, table, CA, "A:v", "old/a")
    assert [i.key for i in client.answers] == ["old/a"]


def test_the_younger_claimant_answers_names_the_older_does_not_have():
    table, resolver, _, _ = make(ioc("young/a", "A:", created="2026-02-01"),
                                 ioc("old/a", "A:", created="2026-01-01"))
    client = Client("c")
    resolver.resolve(CA, "A:only-young", client)
    confirm(resolver, table, CA, "A:only-young", "old/a", found=False)
    confirm(resolver, table, CA, "A:only-young", "young/a")
    assert [i.key for i in client.answers] == ["young/a"]


def test_a_name_matching_no_prefix_is_asked_of_every_ioc_of_the_protocol():
    _table, resolver, probes, _ = make(ioc("ns/a", "A:"), ioc("ns/b", "B:"),
                                      ioc("ns/c", "C:", pva=False))
    resolver.resolve(PVA, "weird", Client("c"))
    assert sorted(k for _, k, _ in probes.sent) == ["ns/a", "ns/b"]


def test_fanout_is_paced_by_the_probe_budget():
    iocs = [ioc(f"ns/{i}", f"P{i}:") for i in range(10)]
    _table, resolver, probes, clock = make(*iocs, probe_rate=100.0, probe_burst=20.0)
    for n in range(5):
        resolver.resolve(CA, f"orphan{n}", Client(n))
    assert len(probes.sent) == 20  # two names' fan-outs fit the burst
    clock.now += 0.1  # 10 more tokens: one more fan-out
    resolver.tick()
    assert len(probes.sent) == 30


def test_a_moved_ioc_is_answered_at_its_new_address_and_the_old_answer_is_dropped():
    table, resolver, _, _ = make(ioc("ns/a", "A:", host="198.19.0.1"))
    resolver.resolve(CA, "A:x", Client("c"))
    confirm(resolver, table, CA, "A:x", "ns/a")
    old = table.get("ns/a")
    table.put(ioc("ns/a", "A:", host="198.19.0.2"))
    assert resolver.cached(CA, "A:x") is None  # never the old address again
    client = Client("c2")
    resolver.resolve(CA, "A:x", client)
    confirm(resolver, table, CA, "A:x", "ns/a")
    assert client.answers[0].ca == Endpoint("198.19.0.2", 5064)
    assert old is not None and not old.live


def test_a_client_waiting_for_a_new_ioc_is_answered_when_the_table_learns_it():
    table, resolver, probes, _ = make(ioc("ns/a", "A:"))
    waiting = Client("early")
    resolver.resolve(CA, "NEW:x", waiting)  # no such prefix: fan-out, nobody has it
    confirm(resolver, table, CA, "NEW:x", "ns/a", found=False)
    assert resolver.negative_hit(CA, "NEW:x")
    table.put(ioc("ns/new", "NEW:", host="198.19.0.7"))
    resolver.tick()  # the rescan after a table change
    assert probes.sent[-1] == (CA, "ns/new", "NEW:x")
    confirm(resolver, table, CA, "NEW:x", "ns/new")
    assert [i.key for i in waiting.answers] == ["ns/new"]


def test_a_waiting_name_whose_ioc_is_not_up_yet_is_asked_again_with_backoff():
    table, resolver, probes, clock = make(ioc("ns/a", "A:"), retry_first=0.25, retry_max=1.0)
    client = Client("c")
    resolver.resolve(CA, "A:x", client)
    confirm(resolver, table, CA, "A:x", "ns/a", found=None)  # silent: starting up
    times = []
    for _ in range(60):  # 6 s in steps of 0.1 s
        clock.now += 0.1
        before = len(probes.sent)
        resolver.tick()
        if len(probes.sent) > before:
            times.append(round(clock.now - 1000.0, 1))
            confirm(resolver, table, CA, "A:x", "ns/a", found=None)
    gaps = [round(b - a, 1) for a, b in itertools.pairwise(times)]
    assert gaps[:2] == [0.5, 1.0] and max(gaps) == 1.0
    confirm(resolver, table, CA, "A:x", "ns/a", found=None)
    resolver.tick()
    clock.now += 1.1
    resolver.tick()
    confirm(resolver, table, CA, "A:x", "ns/a", found=True)
    assert [i.key for i in client.answers] == ["ns/a"]


def test_waiting_clients_are_bounded_and_expire():
    _table, resolver, _, clock = make(ioc("ns/a", "A:"), max_parked=3, max_askers=2,
                                     park_ttl=10.0)
    for n in range(5):
        resolver.resolve(CA, f"A:{n}", Client(("c", n)))
    assert len(resolver.parked) == 3
    for n in range(5):
        resolver.resolve(CA, "A:4", Client(("d", n)))
    assert len(resolver.parked[(CA, "A:4")].askers) == 2
    clock.now += 11
    resolver.tick()
    assert not resolver.parked


def test_caches_are_bounded():
    table, resolver, _, _ = make(ioc("ns/a", "A:"), cache_size=10, max_lookups=5)
    for n in range(30):
        resolver.resolve(CA, f"A:{n}", Client(n))
        confirm(resolver, table, CA, f"A:{n}", "ns/a")
    assert len(resolver.positive[CA]) == 10
    for n in range(30, 40):
        resolver.resolve(CA, f"A:{n}", Client(n))  # never confirmed
    assert len(resolver.lookups) == 5 and resolver.stats["dropped_lookups"] == 5


def test_a_lookup_whose_only_candidate_dies_settles_negative():
    table, resolver, _, _ = make(ioc("ns/a", "A:"))
    resolver.resolve(CA, "A:x", Client("c"))
    table.remove("ns/a")
    assert not resolver.lookups and resolver.negative_hit(CA, "A:x")


def test_a_closed_client_is_not_answered():
    table, resolver, _, _ = make(ioc("ns/a", "A:"))
    client = Client("c", open=False)
    resolver.resolve(CA, "A:x", client)
    confirm(resolver, table, CA, "A:x", "ns/a")
    assert client.answers == []


# ------------------------------------------------------------------------ table sources
def test_table_file_format():
    iocs = parse_table("""
iocs:
- name: bl01-vacuum
  prefix: "BL01:VAC:"
  ca: 198.18.0.12:5070
  pva: 198.18.0.12:5081
  pvaSearch: 198.18.0.12:5082
  servers: {ca: rsrv, pva: pvxs}
  external: true
  created: "2026-01-01T00:00:00Z"
- name: caproto-sim
  prefix: "SIM:"
  ca: 198.19.0.5
""")
    first, second = iocs
    assert (first.ca, first.pva, first.pva_search, first.ca_search) == (
        Endpoint("198.18.0.12", 5070), Endpoint("198.18.0.12", 5081),
        Endpoint("198.18.0.12", 5082), Endpoint("198.18.0.12", 5070))
    assert first.external and first.ca_server == "rsrv"
    assert second.pva is None and second.ca == Endpoint("198.19.0.5", 5064)


@pytest.mark.parametrize("text, words", [
    ("iocs: [{name: a, prefix: 'A:'}]", "no CA or PVA endpoint"),
    ("iocs: [{name: a, prefix: 'A:', ca: 'ioc.example'}]", "not an IPv4 address"),
    ("iocs: [{name: a, prefix: 'A:', ca: 198.18.0.1, cah: x}]", "unknown key"),
    ("iocs: [{name: a, prefix: 'A:', ca: 198.18.0.1}, {name: a, prefix: 'B:', "
     "ca: 198.18.0.2}]", "two IOCs named a"),
    ("iocs: {a: b}", "list `iocs`"),
    ("iocs: [", "not valid YAML"),
])
def test_bad_table_files_are_refused_with_a_reason(text, words):
    with pytest.raises(TableError, match=words):
        parse_table(text)


def test_ioc_objects_status_becomes_an_entry():
    obj = {
        "metadata": {"name": "bl01", "namespace": "beam",
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"prefix": "BL01:", "servers": {"ca": {"implementation": "rsrv"},
                                                "pva": {"implementation": "pvxs"}}},
        "status": {"mode": "host", "endpoints": {"ca": "198.18.0.12:5070",
                                                 "pva": "198.18.0.12:5081"},
                   "ports": {"ca": 5070, "pvaServer": 5081, "pvaBroadcast": 5082},
                   "conditions": [{"type": "Ready", "status": "True", "reason": "x"}]},
    }
    entry = ioc_from_object(obj)
    assert entry is not None
    assert entry.key == "beam/bl01" and entry.prefix == "BL01:"
    assert entry.ca == Endpoint("198.18.0.12", 5070)
    assert entry.pva_search == Endpoint("198.18.0.12", 5082)
    assert entry.external and entry.ready and entry.created == "2026-01-01T00:00:00Z"
    obj["status"]["mode"] = "pod"
    obj["status"]["conditions"] = []
    entry = ioc_from_object(obj)
    assert entry is not None and not entry.external and not entry.ready
    del obj["status"]["endpoints"]
    assert ioc_from_object(obj) is None


def test_an_old_answer_is_given_at_once_and_confirmed_again_in_the_background():
    table, resolver, probes, clock = make(ioc("ns/a", "A:"), revalidate_after=5.0)
    resolver.resolve(CA, "A:x", Client("c"))
    confirm(resolver, table, CA, "A:x", "ns/a")
    clock.now += 1
    assert resolver.cached(CA, "A:x") is table.get("ns/a") and len(probes.sent) == 1
    clock.now += 5  # old now: answered, and asked again (once)
    assert resolver.cached(CA, "A:x") is table.get("ns/a")
    assert resolver.cached(CA, "A:x") is table.get("ns/a")
    assert probes.sent[1:] == [(CA, "ns/a", "A:x")]
    confirm(resolver, table, CA, "A:x", "ns/a", found=True)
    assert resolver.cached(CA, "A:x") is not None and len(probes.sent) == 2
    clock.now += 6  # the IOC restarted without the record (or its pod is gone)
    assert resolver.cached(CA, "A:x") is not None
    confirm(resolver, table, CA, "A:x", "ns/a", found=None)
    assert resolver.cached(CA, "A:x") is None and resolver.stats["revoked"] == 1


def test_one_client_flooding_names_does_not_starve_another():
    _table, resolver, _probes, _ = make(ioc("ns/a", "A:"), client_rate=10.0, client_burst=100.0)
    for n in range(1000):
        resolver.resolve(CA, f"A:junk{n}", Client(("flood", n)), client="198.18.17.66")
    assert len(resolver.lookups) == 100 and resolver.stats["throttled"] == 900
    resolver.resolve(CA, "A:wanted", Client("ok"), client="198.18.17.2")
    assert (CA, "A:wanted") in resolver.lookups


def test_fanouts_hold_at_most_a_quarter_of_the_lookups_and_go_after_prefix_lookups():
    _table, resolver, probes, clock = make(ioc("ns/a", "A:"), ioc("ns/b", "B:"),
                                          max_lookups=40, probe_rate=100.0,
                                          probe_burst=10.0)
    for n in range(30):
        resolver.resolve(CA, f"nomatch{n}", Client(n))
    assert sum(lk.fanout for lk in resolver.lookups.values()) == 10  # 40 // 4
    assert resolver.stats["dropped_fanout"] == 20
    sent = len(probes.sent)
    resolver.resolve(CA, "A:wanted", Client("w"))  # no tokens left: it waits ...
    clock.now += 0.02  # ... two tokens later it goes first, before the waiting fan-outs
    resolver.tick()
    assert probes.sent[sent:] == [(CA, "ns/a", "A:wanted")]


def test_all_waiting_clients_together_are_bounded():
    _table, resolver, _, _ = make(ioc("ns/a", "A:"), max_askers_total=100, max_askers=8)
    for n in range(50):
        for c in range(8):
            resolver.resolve(CA, f"A:{n}", Client((n, c)))
    assert resolver.sizes()["waiting_clients"] <= 100
    assert sum(len(p.askers) for p in resolver.parked.values()) \
        == resolver.sizes()["waiting_clients"]
    assert (CA, "A:49") in resolver.parked and (CA, "A:0") not in resolver.parked
