"""Channel Access search framing for the name server (sans I/O: bytes in, bytes out).

Built on the project's CA framing (``gateways.ca_wire``: caproto's command ids, the
16/24-byte header, the stream framer). Written here is only what a name server says
that a CA server does not: search replies that carry *another* server's address.

A search reply's ``parameter1`` is the IPv4 address of the server to use (0xFFFFFFFF:
"the sender") and its ``data_type`` that server's TCP port. libca follows it over UDP
(CA >= 4.8) and over a name-server TCP circuit (``tcpiiu::searchRespNotify``), and
caproto's clients over UDP, so clients connect straight to the IOC.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

import caproto as ca

from ..gateways import ca_wire as w

__all__ = [
    "Search",
    "beacon",
    "confirmation_datagrams",
    "create_channel_failed",
    "decode_name",
    "echo",
    "ip_number",
    "not_found",
    "pack_datagrams",
    "parse_confirmation",
    "parse_datagram",
    "search_reply_tcp",
    "search_reply_udp",
    "search_request",
    "version",
]

MAX_NAME = 1024  # bytes; longer names are refused (no CA server holds one)
MAX_REPLY_DATAGRAM = 1400  # below a typical MTU, like the gateway's replies
MAX_SEARCH_DATAGRAM = 1024  # confirmation searches: like libca, never fragmented
DO_REPLY = ca.DO_REPLY  # 10: the client wants NOT_FOUND for names nobody has
DONT_REPLY = ca.NO_REPLY  # 5
BEACON = ca.Beacon.ID  # 13 (CA_PROTO_RSRV_IS_UP)
MIN_SEARCH_VERSION = 4  # clients older than CA 4.4 cannot follow a redirect

_MINOR = struct.pack(">H6x", w.CA_MINOR_VERSION)  # UDP search replies end with it
_PRINTABLE = bytes(range(0x20, 0x7F))  # what a name may hold (filters may hold spaces)


@dataclass(slots=True, frozen=True)
class Search:
    """One name a client is looking for."""

    name: str
    cid: int
    reply: bool  # DO_REPLY: answer NOT_FOUND when nobody has it
    version: int  # the client's minor protocol version


def decode_name(payload: bytes) -> str | None:
    """A search payload's NUL-padded name, or None when it cannot be a PV name
    (empty, too long, or holding control or non-ASCII bytes)."""
    raw = payload.split(b"\0", 1)[0]
    if not raw or len(raw) > MAX_NAME or raw.translate(None, _PRINTABLE):
        return None
    return raw.decode("ascii")


def _search(data_type: int, count: int, p1: int, payload: bytes) -> Search | None:
    name = decode_name(payload)
    if name is None or count < MIN_SEARCH_VERSION:
        return None
    return Search(name, p1, data_type == DO_REPLY, count)


def parse_datagram(data: bytes) -> tuple[int, list[Search], int]:
    """The searches of one UDP datagram: (sequence number, searches, messages ignored).

    libca numbers its search datagrams in a leading VERSION message; the reply repeats
    the number so the client can estimate round trips. A truncated tail is dropped."""
    sequence = 0
    searches: list[Search] = []
    ignored = 0
    for command, data_type, count, p1, _p2, payload in w.iter_datagram(data):
        if command == w.SEARCH:
            found = _search(data_type, count, p1, payload)
            if found is None:
                ignored += 1
            else:
                searches.append(found)
        elif command == w.VERSION:
            sequence = p1
        else:
            ignored += 1
    return sequence, searches, ignored


def stream_search(data_type: int, count: int, p1: int, payload: bytes) -> Search | None:
    """A SEARCH message read from a TCP circuit (libca's EPICS_CA_NAME_SERVERS)."""
    return _search(data_type, count, p1, payload)


def ip_number(address: str) -> int:
    """An IPv4 address as the 32-bit number search replies carry."""
    return int(ipaddress.IPv4Address(address))


def search_reply_udp(ip: int, port: int, cid: int) -> bytes:
    """UDP search reply naming the server at ip:port (our minor version as payload)."""
    return w.pack(w.SEARCH, port, 0, ip, cid, _MINOR)


def search_reply_tcp(ip: int, port: int, cid: int) -> bytes:
    """TCP search reply naming the server at ip:port (no payload, as rsrv sends)."""
    return w.pack(w.SEARCH, port, 0, ip, cid)


def not_found(search: Search) -> bytes:
    return w.not_found(DO_REPLY, search.version, search.cid)


def version() -> bytes:
    """Sent first on every circuit: libca sends TCP searches only to a server that has
    announced minor version >= 12."""
    return w.version_message()


def echo() -> bytes:
    return w.pack(w.ECHO, 0, 0, 0, 0)


def create_channel_failed(cid: int) -> bytes:
    """The name server holds no channels: a client that tries to create one here is told
    so at once instead of waiting for its connection timeout."""
    return w.caproto_bytes(ca.CreateChFailResponse(cid))


def pack_datagrams(sequence: int, messages: list[bytes],
                   limit: int = MAX_REPLY_DATAGRAM) -> list[bytes]:
    """Messages packed into datagrams of at most `limit` bytes, each led by a VERSION
    carrying the client's sequence number."""
    head = w.version_message(0, sequence)
    out: list[bytes] = []
    parts: list[bytes] = [head]
    size = len(head)
    for message in messages:
        if size + len(message) > limit and len(parts) > 1:
            out.append(b"".join(parts))
            parts, size = [head], len(head)
        parts.append(message)
        size += len(message)
    if len(parts) > 1:
        out.append(b"".join(parts))
    return out


# ------------------------------------------------------------------ confirmation searches
def search_request(name: str, cid: int) -> bytes:
    """A search the name server sends to an IOC. DO_REPLY: the IOC says NOT_FOUND at
    once instead of leaving us to time out (rsrv, pcas and caproto servers do)."""
    return w.search_request(name, cid, DO_REPLY)


def confirmation_datagrams(sequence: int, requests: list[bytes]) -> list[bytes]:
    return pack_datagrams(sequence, requests, MAX_SEARCH_DATAGRAM)


def parse_confirmation(data: bytes) -> list[tuple[int, bool]]:
    """(cid, found) for each answer in an IOC's reply datagram."""
    out = []
    for command, _type, _count, _p1, p2, _payload in w.iter_datagram(data):
        if command == w.SEARCH:
            out.append((p2, True))
        elif command == w.NOT_FOUND:
            out.append((p2, False))
    return out


def beacon(ip: int, port: int, number: int) -> bytes:
    """A server beacon (CA_PROTO_RSRV_IS_UP) for the server at ip:port, as
    ``udpiiu::beaconAction`` reads it: minor version in data_type, server port in count,
    beacon number in parameter1, server address in parameter2."""
    return w.pack(BEACON, w.CA_MINOR_VERSION, port, number & 0xFFFFFFFF, ip)
