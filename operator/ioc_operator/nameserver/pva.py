"""PV Access search framing for the name server (sans I/O: bytes in, bytes out).

p4p wraps pvxs but exposes no part of its wire codec to Python, so this module writes
the few PVA messages a name server needs, as pvxs lays them out (``pvaproto.h``,
``udp_collector.cpp``, ``serverconn.cpp``, ``client.cpp``):

* header: ``0xCA | version | flags | command | size(4)``; flags bit 0 control message,
  bits 4-5 segmentation, bit 6 sent by a server, bit 7 big-endian. Every multi-byte
  field of the message is in the byte order its header announces.
* SEARCH: sequence id, flags (0x01 must reply, 0x80 unicast), 3 reserved bytes, reply
  address (16 bytes, IPv4-mapped IPv6), reply port, protocols, count, {cid, name}...
* SEARCH_RESPONSE: server GUID (12), sequence id, server address (16), server port,
  protocol, found, count, cids. A client connects to the address given; "any" means
  the sender (pvxs ``procSearchReply``). One response names one server.
* connection set-up on TCP: SET_BYTE_ORDER (control), CONNECTION_VALIDATION both ways,
  CONNECTION_VALIDATED; then pvxs clients send SEARCH on the circuit.

Sizes are PVA's variable-length counts: one byte below 254, 0xFE then four bytes, 0xFF
for null. Every decoder raises `ProtocolError` on anything short or malformed.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "Header",
    "ProtocolError",
    "SearchRequest",
    "SearchResponse",
    "StreamParser",
    "beacon",
    "connection_validated",
    "connection_validation_request",
    "decode_search",
    "decode_search_response",
    "echo",
    "encode_search",
    "encode_search_response",
    "iter_datagram",
    "set_byte_order",
]

MAGIC = 0xCA
PROTOCOL_VERSION = 2
HEADER = 8

FLAG_CONTROL = 0x01
SEGMENT_MASK = 0x30
FLAG_SERVER = 0x40
FLAG_MSB = 0x80

BEACON = 0
CONNECTION_VALIDATION = 1
ECHO = 2
SEARCH = 3
SEARCH_RESPONSE = 4
CONNECTION_VALIDATED = 9
ORIGIN_TAG = 22
CONTROL_SET_BYTE_ORDER = 2

SEARCH_MUST_REPLY = 0x01
SEARCH_UNICAST = 0x80

MAX_NAME = 1024  # bytes of one PV name; longer ones are skipped
MAX_UDP = 1400  # bytes per datagram we send (below a typical MTU)

_ANY = b"\0" * 10 + b"\xff\xff" + b"\0" * 4  # ::ffff:0.0.0.0, as pvxs writes "any"
_PRINTABLE = bytes(range(0x20, 0x7F))


class ProtocolError(ValueError):
    """Bytes that are not the PVA message they claim to be."""


class Header(NamedTuple):
    version: int
    flags: int
    command: int
    size: int

    @property
    def big_endian(self) -> bool:
        return bool(self.flags & FLAG_MSB)

    @property
    def control(self) -> bool:
        return bool(self.flags & FLAG_CONTROL)

    @property
    def segmented(self) -> bool:
        return bool(self.flags & SEGMENT_MASK)


def parse_header(data: bytes | bytearray | memoryview, pos: int = 0) -> Header:
    if len(data) - pos < HEADER:
        raise ProtocolError("short header")
    if data[pos] != MAGIC or data[pos + 1] == 0:
        raise ProtocolError(f"not a PVA header: {bytes(data[pos:pos + 4]).hex()}")
    flags = data[pos + 2]
    size = struct.unpack_from(">I" if flags & FLAG_MSB else "<I", data, pos + 4)[0]
    return Header(data[pos + 1], flags, data[pos + 3], size)


class Reader:
    """Reads fields of one message body in its byte order."""

    __slots__ = ("_u16", "_u32", "data", "end", "pos")

    def __init__(self, data: bytes, big_endian: bool, pos: int = 0) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data)
        self._u16 = struct.Struct(">H" if big_endian else "<H").unpack_from
        self._u32 = struct.Struct(">I" if big_endian else "<I").unpack_from

    def _need(self, n: int) -> int:
        pos = self.pos
        if self.end - pos < n:
            raise ProtocolError(f"message ends {n - (self.end - pos)} byte(s) short")
        self.pos = pos + n
        return pos

    def u8(self) -> int:
        return self.data[self._need(1)]

    def u16(self) -> int:
        return self._u16(self.data, self._need(2))[0]

    def u32(self) -> int:
        return self._u32(self.data, self._need(4))[0]

    def raw(self, n: int) -> bytes:
        pos = self._need(n)
        return self.data[pos:pos + n]

    def size(self) -> int:
        first = self.u8()
        if first < 254:
            return first
        if first == 255:
            return -1  # null
        return self.u32()

    def string(self, limit: int = MAX_NAME) -> bytes:
        """A string's bytes (undecoded); ProtocolError past `limit` bytes."""
        n = self.size()
        if n < 0:
            return b""
        if n > limit:
            raise ProtocolError(f"string of {n} bytes")
        return self.raw(n)

    def address(self) -> str | None:
        """A 16-byte address: the IPv4 (or IPv6) address it holds, None for "any"."""
        raw = self.raw(16)
        if raw[:12] == _ANY[:12]:
            ip = str(ipaddress.IPv4Address(raw[12:]))
            return None if ip == "0.0.0.0" else ip
        if not any(raw):
            return None
        return str(ipaddress.IPv6Address(raw))


def _order(big_endian: bool) -> str:
    return ">" if big_endian else "<"


def encode_size(n: int, big_endian: bool) -> bytes:
    if n < 0:
        return b"\xff"
    if n < 254:
        return bytes((n,))
    return b"\xfe" + struct.pack(_order(big_endian) + "I", n)


def encode_string(text: str | bytes, big_endian: bool) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return encode_size(len(raw), big_endian) + raw


def encode_address(ip: str | None) -> bytes:
    if not ip:
        return _ANY
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv4Address):
        return _ANY[:12] + addr.packed
    return addr.packed


def message(command: int, payload: bytes, *, big_endian: bool, server: bool = True) -> bytes:
    flags = (FLAG_SERVER if server else 0) | (FLAG_MSB if big_endian else 0)
    return struct.pack(_order(big_endian) + "BBBBI", MAGIC, PROTOCOL_VERSION, flags, command,
                       len(payload)) + payload


def control(command: int, value: int, *, big_endian: bool, server: bool = True) -> bytes:
    """A control message: no body, `value` in the size field."""
    flags = FLAG_CONTROL | (FLAG_SERVER if server else 0) | (FLAG_MSB if big_endian else 0)
    return struct.pack(_order(big_endian) + "BBBBI", MAGIC, PROTOCOL_VERSION, flags, command,
                       value)


def valid_name(raw: bytes) -> str | None:
    """A PV name we will look up, or None (empty, too long, control characters)."""
    if not raw or len(raw) > MAX_NAME or raw.translate(None, _PRINTABLE):
        return None
    return raw.decode("ascii")


# --------------------------------------------------------------------------- search
@dataclass(slots=True)
class SearchRequest:
    sequence: int
    flags: int
    reply_address: str | None  # None: "any", reply to the sender
    reply_port: int
    tcp: bool  # "tcp" among the protocols (the only transport clients use)
    names: list[tuple[int, str]]  # (cid, name) of every valid name
    skipped: int = 0  # names that were not valid PV names, or over the limit

    @property
    def must_reply(self) -> bool:
        return bool(self.flags & SEARCH_MUST_REPLY)


def decode_search(payload: bytes, big_endian: bool, max_names: int = 65535) -> SearchRequest:
    """A SEARCH body. Names past `max_names` are counted in `skipped`, not decoded."""
    r = Reader(payload, big_endian)
    sequence = r.u32()
    flags = r.u8()
    r.raw(3)
    reply_address = r.address()
    reply_port = r.u16()
    nproto = r.size()
    if nproto > 16:
        raise ProtocolError(f"{nproto} protocols")
    tcp = False
    for _ in range(max(0, nproto)):
        tcp |= r.string(64) == b"tcp"
    count = r.u16()
    names: list[tuple[int, str]] = []
    skipped = 0
    for i in range(count):
        if i >= max_names:
            skipped += count - i
            break
        cid = r.u32()
        name = valid_name(r.string())
        if name is None:
            skipped += 1
        else:
            names.append((cid, name))
    return SearchRequest(sequence, flags, reply_address, reply_port, tcp, names, skipped)


def encode_search(sequence: int, names: Sequence[tuple[int, str]], reply_port: int, *,
                  big_endian: bool = False, must_reply: bool = True,
                  unicast: bool = True) -> bytes:
    """A SEARCH for `names` asking for replies to the sender's address at `reply_port`."""
    o = _order(big_endian)
    flags = (SEARCH_MUST_REPLY if must_reply else 0) | (SEARCH_UNICAST if unicast else 0)
    parts = [struct.pack(o + "IB3x", sequence, flags), _ANY,
             struct.pack(o + "H", reply_port), encode_size(1, big_endian),
             encode_string("tcp", big_endian), struct.pack(o + "H", len(names))]
    for cid, name in names:
        parts.append(struct.pack(o + "I", cid))
        parts.append(encode_string(name, big_endian))
    return message(SEARCH, b"".join(parts), big_endian=big_endian, server=False)


@dataclass(slots=True)
class SearchResponse:
    guid: bytes
    sequence: int
    address: str | None
    port: int
    protocol: bytes
    found: bool
    cids: list[int]


def encode_search_response(guid: bytes, sequence: int, address: str | None, port: int,
                           cids: Iterable[int], *, big_endian: bool,
                           found: bool = True) -> bytes:
    """SEARCH_RESPONSE naming the server at address:port for `cids` (at most 65535)."""
    o = _order(big_endian)
    ids = list(cids)
    body = b"".join((
        guid, struct.pack(o + "I", sequence), encode_address(address),
        struct.pack(o + "H", port), encode_string("tcp", big_endian),
        struct.pack(o + "BH", 1 if found else 0, len(ids)),
        struct.pack(f"{o}{len(ids)}I", *ids),
    ))
    return message(SEARCH_RESPONSE, body, big_endian=big_endian)


def response_size(ncids: int) -> int:
    """Bytes of a SEARCH_RESPONSE with `ncids` cids (to fill datagrams)."""
    return HEADER + 12 + 4 + 16 + 2 + 4 + 1 + 2 + 4 * ncids


def decode_search_response(payload: bytes, big_endian: bool) -> SearchResponse:
    r = Reader(payload, big_endian)
    guid = r.raw(12)
    sequence = r.u32()
    address = r.address()
    port = r.u16()
    protocol = r.string(64)
    found = bool(r.u8())
    count = r.u16()
    cids = [r.u32() for _ in range(count)]
    return SearchResponse(guid, sequence, address, port, protocol, found, cids)


# ------------------------------------------------------------------- connection set-up
def set_byte_order(big_endian: bool) -> bytes:
    return control(CONTROL_SET_BYTE_ORDER, 0, big_endian=big_endian)


def connection_validation_request(big_endian: bool) -> bytes:
    """The server's opening: receive buffer size, introspection registry size, the
    authentication methods it accepts (anonymous only: it serves no data)."""
    o = _order(big_endian)
    body = (struct.pack(o + "IH", 0x10000, 0x7FFF) + encode_size(1, big_endian)
            + encode_string("anonymous", big_endian))
    return message(CONNECTION_VALIDATION, body, big_endian=big_endian)


def connection_validated(big_endian: bool) -> bytes:
    """Status OK (0xFF: the short form of a status without message)."""
    return message(CONNECTION_VALIDATED, b"\xff", big_endian=big_endian)


def echo(payload: bytes, big_endian: bool) -> bytes:
    return message(ECHO, payload, big_endian=big_endian)


def beacon(guid: bytes, sequence: int, change: int, address: str | None, port: int, *,
           big_endian: bool = False) -> bytes:
    """A server beacon (status null) for the server at address:port."""
    o = _order(big_endian)
    body = (guid + struct.pack(o + "BBH", 0, sequence & 0xFF, change & 0xFFFF)
            + encode_address(address) + struct.pack(o + "H", port)
            + encode_string("tcp", big_endian) + b"\xff")
    return message(BEACON, body, big_endian=big_endian)


# --------------------------------------------------------------------------- framing
def iter_datagram(data: bytes) -> list[tuple[Header, bytes]]:
    """The application messages of one datagram. Control and segmented messages (never
    valid over UDP) and anything after a malformed header are dropped."""
    out: list[tuple[Header, bytes]] = []
    pos, end = 0, len(data)
    while end - pos >= HEADER:
        try:
            head = parse_header(data, pos)
        except ProtocolError:
            break
        body = pos + HEADER
        if head.control:
            pos = body
            continue
        if head.size > end - body:
            break
        if not head.segmented:
            out.append((head, data[body:body + head.size]))
        pos = body + head.size
    return out


class StreamParser:
    """Splits a TCP byte stream into PVA messages, holding at most `max_message` bytes
    of an incomplete one. Raises ProtocolError on a bad header or an oversized message
    (the caller closes the connection)."""

    __slots__ = ("_buf", "max_message")

    def __init__(self, max_message: int = 1 << 20) -> None:
        self._buf = bytearray()
        self.max_message = max_message

    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[Header, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[Header, bytes]] = []
        pos, end = 0, len(buf)
        try:
            while end - pos >= HEADER:
                head = parse_header(buf, pos)
                body = pos + HEADER
                if head.control:
                    out.append((head, b""))
                    pos = body
                    continue
                if head.size > self.max_message:
                    raise ProtocolError(f"message of {head.size} bytes (command {head.command})")
                if head.size > end - body:
                    break
                out.append((head, bytes(buf[body:body + head.size])))
                pos = body + head.size
        finally:
            del buf[:pos]
        return out
