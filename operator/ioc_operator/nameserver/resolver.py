"""Which IOC holds a name: longest-prefix match, confirmed by the IOC itself.

A search for a name not in the cache starts a *lookup*: the IOCs whose prefix starts the
name (longest first, then the older one) are asked by a unicast search (`Prober`); the
best-ranked IOC that confirms wins. Names matching no prefix are asked of every IOC
serving the protocol, paced by a token bucket shared by all confirmation searches, so
a client (or an attacker) asking for many names costs the IOCs a bounded rate. One
client cannot starve the others: each may start lookups at a bounded rate of its own,
lookups of names matching a prefix go before fan-outs, and fan-outs may hold only a
quarter of the lookup slots.

Answers are cached per protocol until the IOC's entry dies (it moved or went away:
`IOC.live`); names nobody has are cached briefly. A cached answer older than
`revalidate_after` is still given at once, but the IOC is asked again in the background:
clients search a name they hold an answer for only when they lost it (the IOC
restarted without the record, or its pod is gone while its object still names the old
address), and then the answer is dropped if the IOC does not confirm it.

Every client that asked for a name nobody had is remembered (*parked*, bounded, for
`park_ttl`) and answered the moment an IOC confirms the name: when the table learns a
new IOC, when one becomes ready, or at the next retry. That is how running clients
reach a new IOC without waiting for their own search backoff (libca's grows to
minutes). Every table and queue is bounded.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

from .table import IOC, PROTOCOLS, Table

__all__ = ["Asker", "Limits", "Prober", "Resolver"]

log = logging.getLogger("ioc_name_server.resolver")


class Asker(Protocol):
    """A client waiting for an answer (a search over one transport)."""

    key: Hashable  # the same client asking again is the same key

    def answer(self, ioc: IOC) -> None: ...

    def alive(self) -> bool: ...


class Prober(Protocol):
    """Sends confirmation searches; reports through `Resolver.probe_result`."""

    def probe(self, proto: str, ioc: IOC, name: str) -> None: ...


@dataclass(frozen=True)
class Limits:
    cache_size: int = 200_000  # positive answers kept, per protocol
    negative_size: int = 100_000  # names nobody has, per protocol
    negative_ttl: float = 2.0  # seconds a name nobody has is not looked up again
    max_lookups: int = 20_000  # lookups in flight
    max_parked: int = 50_000  # names with clients waiting for them
    max_askers: int = 32  # clients remembered per waiting name ...
    max_askers_total: int = 200_000  # ... and for all names together (~200 bytes each)
    park_ttl: float = 600.0  # s; libca's search period grows to 300 s by default
    retry_first: float = 0.25  # s; waiting names with a candidate IOC are asked again ...
    retry_max: float = 2.0  # ... with doubling gaps up to this
    probe_rate: float = 50_000.0  # confirmation searches per second (names x IOCs)
    probe_burst: float = 10_000.0
    fanout_queue: int = 10_000  # names matching no prefix, waiting for probe tokens
    revalidate_after: float = 5.0  # s; an older cached answer is confirmed again when used
    client_rate: float = 5_000.0  # lookups one client (address) may start per second ...
    client_burst: float = 20_000.0  # ... after a burst of this many
    max_clients: int = 10_000  # client addresses whose rate is tracked


class _Answer:
    __slots__ = ("confirmed", "ioc")

    def __init__(self, ioc: IOC, confirmed: float) -> None:
        self.ioc = ioc
        self.confirmed = confirmed


class _Lookup:
    __slots__ = ("candidates", "fanout", "name", "proto", "results")

    def __init__(self, proto: str, name: str, candidates: list[IOC], fanout: bool) -> None:
        self.proto = proto
        self.name = name
        self.candidates = candidates
        self.results: list[bool | None] = [None] * len(candidates)
        self.fanout = fanout


class _Parked:
    __slots__ = ("askers", "backoff", "due", "expires")

    def __init__(self, expires: float) -> None:
        self.askers: OrderedDict[Hashable, Asker] = OrderedDict()
        self.expires = expires
        self.due = 0.0
        self.backoff = 0.0


class _Tokens:
    """A token bucket (probes per second)."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.level = burst
        self.at = clock()

    def take(self, n: int) -> bool:
        now = self.clock()
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level < n and n <= self.burst:
            return False
        self.level -= n  # a fan-out larger than the burst goes into debt, then waits
        return True


class Resolver:
    def __init__(self, table: Table, prober: Prober, limits: Limits | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.table = table
        self.prober = prober
        self.limits = limits or Limits()
        self.clock = clock
        self.positive: dict[str, OrderedDict[str, _Answer]] = {
            p: OrderedDict() for p in PROTOCOLS}
        self._revalidating: dict[tuple[str, str], IOC] = {}
        self.negative: dict[str, OrderedDict[str, float]] = {p: OrderedDict() for p in PROTOCOLS}
        self.lookups: dict[tuple[str, str], _Lookup] = {}
        self.parked: OrderedDict[tuple[str, str], _Parked] = OrderedDict()
        self._askers_total = 0  # clients remembered in `parked`
        self._retries: list[tuple[float, str, str]] = []  # heap of (due, proto, name)
        self._waiting: dict[bool, deque[_Lookup]] = {False: deque(), True: deque()}  # fanout?
        self._fanouts = 0  # fan-out lookups in flight or waiting
        self._clients: OrderedDict[str, list[float]] = OrderedDict()  # level, time
        self._changed: list[IOC] = []
        self.tokens = _Tokens(self.limits.probe_rate, self.limits.probe_burst, clock)
        self.stats: dict[str, int] = dict.fromkeys(
            ("lookups", "found", "not_found", "answered_later", "dropped_lookups",
             "dropped_fanout", "throttled", "parked_evicted", "retries", "revalidated",
             "revoked"), 0)
        table.listeners.append(self.table_changed)

    # ------------------------------------------------------------------ searches
    def cached(self, proto: str, name: str) -> IOC | None:
        """The answer, if one is cached and still good (the hot path: no allocation)."""
        cache = self.positive[proto]
        answer = cache.get(name)
        if answer is None:
            return None
        ioc = answer.ioc
        if not ioc.live:
            del cache[name]
            return None
        if self.clock() - answer.confirmed > self.limits.revalidate_after:
            self._revalidate(proto, name, answer)
        return ioc

    def remember(self, proto: str, name: str, ioc: IOC) -> None:
        """Cache an answer (confirmed now)."""
        cache = self.positive[proto]
        cache[name] = _Answer(ioc, self.clock())
        cache.move_to_end(name)
        if len(cache) > self.limits.cache_size:
            cache.popitem(last=False)

    def _revalidate(self, proto: str, name: str, answer: _Answer) -> None:
        key = (proto, name)
        if key in self._revalidating or len(self._revalidating) >= self.limits.max_lookups:
            return
        if not self.tokens.take(1):
            return
        answer.confirmed = self.clock()  # not again until this one is old
        self._revalidating[key] = answer.ioc
        self.stats["revalidated"] += 1
        self.prober.probe(proto, answer.ioc, name)

    def negative_hit(self, proto: str, name: str) -> bool:
        """Whether `name` was recently looked for and nobody had it."""
        until = self.negative[proto].get(name)
        return until is not None and until > self.clock()

    def resolve(self, proto: str, name: str, asker: Asker, client: str = "") -> IOC | None:
        """The IOC holding `name`, or None: then `asker` is answered later if an IOC
        confirms the name while it is remembered. `client` (its address) is charged
        for the lookup."""
        ioc = self.cached(proto, name)
        if ioc is not None:
            return ioc
        key = (proto, name)
        self._park(key, asker)  # every waiting client is kept here, lookup or not
        if key in self.lookups or self.negative_hit(proto, name):
            return None
        self._start(proto, name, client=client)
        return None

    def _client_allows(self, client: str) -> bool:
        now = self.clock()
        entry = self._clients.get(client)
        if entry is None:
            entry = self._clients[client] = [self.limits.client_burst, now]
            if len(self._clients) > self.limits.max_clients:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(client)
            entry[0] = min(self.limits.client_burst,
                           entry[0] + (now - entry[1]) * self.limits.client_rate)
            entry[1] = now
        if entry[0] < 1:
            return False
        entry[0] -= 1
        return True

    def _start(self, proto: str, name: str, only: list[IOC] | None = None,
               client: str | None = None) -> None:
        key = (proto, name)
        if key in self.lookups:
            return
        if len(self.lookups) >= self.limits.max_lookups:
            self.stats["dropped_lookups"] += 1  # the client will ask again
            return
        if only is not None:
            candidates, fanout = only, True
        else:
            candidates = self.table.candidates(proto, name)
            fanout = not candidates
            if fanout:
                candidates = self.table.serving(proto)
        if not candidates:
            self._settle_negative(proto, name)
            return
        if fanout and self._fanouts >= self.limits.max_lookups // 4:
            self.stats["dropped_fanout"] += 1  # parked; looked for when asked again
            return
        if client is not None and not self._client_allows(client):
            self.stats["throttled"] += 1  # parked; looked for when asked again
            return
        lookup = _Lookup(proto, name, candidates, fanout)
        self.lookups[key] = lookup
        self._fanouts += fanout
        self.stats["lookups"] += 1
        waiting = self._waiting[fanout]
        if not waiting and self.tokens.take(len(candidates)):
            self._send(lookup)
        elif len(waiting) < self.limits.fanout_queue:
            waiting.append(lookup)  # sent from tick() when tokens allow
        else:
            self.stats["dropped_lookups"] += 1
            self._finish(lookup)
            self._settle_negative(proto, name)

    def _finish(self, lookup: _Lookup) -> None:
        del self.lookups[(lookup.proto, lookup.name)]
        self._fanouts -= lookup.fanout

    def _send(self, lookup: _Lookup) -> None:
        for ioc in lookup.candidates:
            self.prober.probe(lookup.proto, ioc, lookup.name)

    # ------------------------------------------------------------------ probe results
    def probe_result(self, proto: str, name: str, ioc: IOC, found: bool | None) -> None:
        """An IOC said whether it has `name` (None: it did not answer in time)."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s: %s says %s", proto, name, ioc.key,
                      {True: "found", False: "not found", None: "nothing"}[found])
        key = (proto, name)
        if self._revalidating.get(key) is ioc:
            del self._revalidating[key]
            answer = self.positive[proto].get(name)
            if answer is not None and answer.ioc is ioc:
                if found:
                    answer.confirmed = self.clock()
                else:  # gone from there: the next search looks again
                    del self.positive[proto][name]
                    self.stats["revoked"] += 1
        lookup = self.lookups.get(key)
        if lookup is None:
            return
        for i, candidate in enumerate(lookup.candidates):
            if candidate is ioc:
                lookup.results[i] = bool(found)
                break
        else:
            return
        self._decide(lookup)

    def _decide(self, lookup: _Lookup) -> None:
        for ioc, result in zip(lookup.candidates, lookup.results, strict=True):
            if not ioc.live or result is False:
                continue
            if result is None:
                return  # a better-ranked IOC has not answered yet
            self._settle_found(lookup, ioc)
            return
        self._finish(lookup)
        self._settle_negative(lookup.proto, lookup.name)

    def _settle_found(self, lookup: _Lookup, ioc: IOC) -> None:
        proto, name = lookup.proto, lookup.name
        key = (proto, name)
        self._finish(lookup)
        self.stats["found"] += 1
        self.remember(proto, name, ioc)
        self.negative[proto].pop(name, None)
        parked = self._unpark(key)
        if parked is None:
            return
        for asker in parked.askers.values():
            if asker.alive():
                asker.answer(ioc)
                self.stats["answered_later"] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s: %s (%d waiting client(s) told)", proto, name, ioc,
                      len(parked.askers))

    def _settle_negative(self, proto: str, name: str) -> None:
        self.stats["not_found"] += 1
        negative = self.negative[proto]
        negative[name] = self.clock() + self.limits.negative_ttl
        negative.move_to_end(name)
        if len(negative) > self.limits.negative_size:
            negative.popitem(last=False)
        parked = self.parked.get((proto, name))
        if parked is not None and parked.due == 0.0 and self.table.candidates(proto, name):
            # An IOC claims the prefix but does not (yet) answer: it may be starting.
            parked.backoff = self.limits.retry_first
            parked.due = self.clock() + parked.backoff
            heapq.heappush(self._retries, (parked.due, proto, name))

    # ------------------------------------------------------------------ waiting clients
    def _park(self, key: tuple[str, str], asker: Asker) -> None:
        parked = self.parked.get(key)
        now = self.clock()
        if parked is None:
            parked = _Parked(now + self.limits.park_ttl)
            self.parked[key] = parked
        else:
            parked.expires = now + self.limits.park_ttl
            self.parked.move_to_end(key)
        askers = parked.askers
        if asker.key not in askers:
            self._askers_total += 1
        askers[asker.key] = asker
        askers.move_to_end(asker.key)
        if len(askers) > self.limits.max_askers:
            askers.popitem(last=False)
            self._askers_total -= 1
        while (len(self.parked) > self.limits.max_parked
               or self._askers_total > self.limits.max_askers_total):
            self._unpark(next(iter(self.parked)))  # the longest untouched
            self.stats["parked_evicted"] += 1

    def _unpark(self, key: tuple[str, str]) -> _Parked | None:
        parked = self.parked.pop(key, None)
        if parked is not None:
            self._askers_total -= len(parked.askers)
        return parked

    # ------------------------------------------------------------------ the table moved
    def table_changed(self, changed: list[IOC], removed: list[IOC]) -> None:
        """New, moved or newly ready IOCs may hold names clients wait for: forget the
        negative answers and look again (in `tick`, once per burst of changes).
        Answers cached from dead entries are dropped lazily (`IOC.live`)."""
        if changed:
            for negative in self.negative.values():
                negative.clear()
            self._changed.extend(changed)
        if removed:
            for lookup in list(self.lookups.values()):
                if any(not c.live for c in lookup.candidates):
                    self._decide(lookup)

    def _rescan(self) -> None:
        changed = [i for i in self._changed if i.live]
        self._changed = []
        if not changed or not self.parked:
            return
        now = self.clock()
        for (proto, name), parked in list(self.parked.items()):
            if parked.expires < now:
                continue
            news = [i for i in changed if i.endpoint(proto) is not None]
            if not news:
                continue
            candidates = self.table.candidates(proto, name)
            if candidates:
                if any(c in news for c in candidates):
                    parked.backoff = self.limits.retry_first
                    self._start(proto, name)
            else:  # matches no prefix: only the new IOCs can have it now
                self._start(proto, name, only=sorted(news, key=IOC.rank))

    # ------------------------------------------------------------------ housekeeping
    def tick(self) -> None:
        """Call every few tens of ms: rescans after table changes, paced fan-outs,
        retries of waiting names, expiry."""
        if self._changed:
            self._rescan()
        for waiting in (self._waiting[False], self._waiting[True]):  # prefix lookups first
            while waiting:
                lookup = waiting[0]
                if self.lookups.get((lookup.proto, lookup.name)) is not lookup:
                    waiting.popleft()
                    continue
                if not self.tokens.take(len(lookup.candidates)):
                    break
                waiting.popleft()
                self._send(lookup)
            else:
                continue
            break
        now = self.clock()
        retries = self._retries
        while retries and retries[0][0] <= now:
            _, proto, name = heapq.heappop(retries)
            key = (proto, name)
            parked = self.parked.get(key)
            if parked is None or parked.due == 0.0 or parked.due > now:
                continue
            if parked.expires < now or not any(a.alive() for a in parked.askers.values()):
                self._unpark(key)
                continue
            parked.backoff = min(self.limits.retry_max, parked.backoff * 2)
            parked.due = now + parked.backoff
            heapq.heappush(retries, (parked.due, proto, name))
            if key not in self.lookups:
                self.stats["retries"] += 1
                self._start(proto, name)
        # Expired waiting names, oldest first (touching moves a name to the end).
        while self.parked:
            key, parked = next(iter(self.parked.items()))
            if parked.expires >= now:
                break
            self._unpark(key)
        if len(self._retries) > 4 * self.limits.max_parked:
            self._retries = [r for r in self._retries if (r[1], r[2]) in self.parked]
            heapq.heapify(self._retries)

    def sizes(self) -> dict[str, int]:
        return {
            "cached_ca": len(self.positive["ca"]),
            "cached_pva": len(self.positive["pva"]),
            "negative": sum(len(n) for n in self.negative.values()),
            "lookups_in_flight": len(self.lookups),
            "parked": len(self.parked),
            "waiting_clients": self._askers_total,
            "waiting_prefix": len(self._waiting[False]),
            "waiting_fanout": len(self._waiting[True]),
        }
