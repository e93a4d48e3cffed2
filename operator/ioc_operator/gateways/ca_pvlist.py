"""The subset of EPICS ca-gateway's pvlist format the builtin gateway understands.

    # comment
    EVALUATION ORDER ALLOW, DENY        (the default) or DENY, ALLOW
    <regex>  ALLOW  [ASG [ASL]]
    <regex>  DENY

Patterns must match the whole PV name (Python ``re`` syntax; ca-gateway's GNU and PCRE
patterns of the usual ``PREFIX:.*`` kind read the same). The decision is ca-gateway's
(``gateAs::findEntry``): with ALLOW, DENY a name is served if it matches an ALLOW line
and no DENY line; with DENY, ALLOW, DENY lines are overridden by ALLOW lines, so a name
is served exactly when it matches an ALLOW line. No file means everything is served.
ALIAS lines and ``DENY FROM host`` need features this gateway does not have and are
refused, so a pvlist never silently means something else here than in ca-gateway.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

__all__ = ["PVList", "PVListError", "load_pvlist", "parse_pvlist"]


class PVListError(ValueError):
    """A pvlist line this gateway cannot honour."""


@dataclass(frozen=True)
class PVList:
    """Which PV names the gateway serves."""

    allow_first: bool = True  # EVALUATION ORDER ALLOW, DENY
    allow: tuple[re.Pattern[str], ...] = (re.compile(".*"),)
    deny: tuple[re.Pattern[str], ...] = ()
    ignored: tuple[str, ...] = field(default=(), compare=False)  # warnings for the log

    def allowed(self, name: str) -> bool:
        if self is _EVERYTHING or self == _EVERYTHING:  # no -pvlist: no regex per name
            return True
        return _decide(self, name)

    def _decide_uncached(self, name: str) -> bool:
        if self.allow_first and any(p.fullmatch(name) for p in self.deny):
            return False
        return any(p.fullmatch(name) for p in self.allow)


_EVERYTHING = PVList()


@lru_cache(maxsize=65536)
def _decide(pvlist: PVList, name: str) -> bool:
    # Searches repeat the same names over and over (every client retries with backoff):
    # cache decisions per (list, name).
    return pvlist._decide_uncached(name)


def _compile(pattern: str, lineno: int) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise PVListError(f"line {lineno}: bad regular expression {pattern!r}: {exc}") from exc


def parse_pvlist(text: str) -> PVList:
    """Parse pvlist text; raises PVListError for lines this gateway cannot honour."""
    allow: list[re.Pattern[str]] = []
    deny: list[re.Pattern[str]] = []
    ignored: list[str] = []
    allow_first = True
    for lineno, raw in enumerate(text.splitlines(), start=1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) < 2:
            raise PVListError(f"line {lineno}: missing command after {words[0]!r}")
        pattern, command, rest = words[0], words[1].upper(), words[2:]
        if command == "ORDER":  # "EVALUATION ORDER ALLOW, DENY"
            order = [w.upper() for w in " ".join(rest).replace(",", " ").split()]
            if order == ["ALLOW", "DENY"]:
                allow_first = True
            elif order == ["DENY", "ALLOW"]:
                allow_first = False
            else:
                raise PVListError(f"line {lineno}: EVALUATION ORDER must be "
                                  f"'ALLOW, DENY' or 'DENY, ALLOW', not {' '.join(rest)!r}")
        elif command == "ALLOW":
            allow.append(_compile(pattern, lineno))
            if rest:  # access security groups/levels need an access file we do not read
                ignored.append(f"line {lineno}: ASG/ASL {' '.join(rest)!r} ignored")
        elif command == "DENY":
            if rest:
                raise PVListError(f"line {lineno}: 'DENY FROM host' is not supported")
            deny.append(_compile(pattern, lineno))
        else:
            raise PVListError(f"line {lineno}: unsupported command {words[1]!r} "
                              "(this gateway understands ALLOW, DENY and EVALUATION ORDER)")
    return PVList(allow_first=allow_first, allow=tuple(allow), deny=tuple(deny),
                  ignored=tuple(ignored))


def load_pvlist(path: str | Path | None) -> PVList:
    """The pvlist in ``path``; everything allowed when ``path`` is None."""
    if path is None:
        return PVList()
    return parse_pvlist(Path(path).read_text())
