"""Channel Access wire format for the gateway: framing, and packing of the messages it
relays.

The gateway relays DBR payloads byte for byte (a DBR_CTRL_DOUBLE the IOC sends is the
DBR_CTRL_DOUBLE the client gets), so the hot path never decodes values: it reads the
16-byte header (24 with the large-array extension), rewrites the ids and forwards the
payload. Command ids, status codes and the messages the gateway originates come from
caproto, so there is one definition of the protocol.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable

import caproto as ca
from caproto import _dbr as dbr

HEADER = struct.Struct(">HHHHII")
LARGE_SIZES = struct.Struct(">II")
HEADER_SIZE = HEADER.size  # 16
EXTENDED_SIZE = HEADER_SIZE + LARGE_SIZES.size  # 24
LARGE = 0xFFFF  # payload_size marker of the extended header (CA >= 4.9)
MAX_PAYLOAD = 256 * 1024 * 1024  # a larger claimed size is a broken or hostile peer
MAX_NAME = 1024  # bytes of a PV name (with field and filter); no IOC holds a longer one
# caproto refuses to build a search for a record part longer than this (EPICS 3.14's
# limit, rsrv's too): such a name can be on no IOC behind us.
MAX_RECORD_NAME: int = ca.MAX_RECORD_LENGTH
EVENT_REQUEST_SIZE = 16  # EVENT_ADD payload: low, high, to (floats), mask, pad

CA_MINOR_VERSION: int = ca.DEFAULT_PROTOCOL_VERSION  # 13; >= 12 enables TCP name service
ANY_ADDRESS = 0xFFFFFFFF  # search reply "server IP": use the address the reply came from
ACCESS_READ, ACCESS_WRITE = int(ca.AccessRights.READ), int(ca.AccessRights.WRITE)


def _eca(name: str) -> int:
    return int(ca.CAStatus[name].value.code_with_severity)


ECA_NORMAL = _eca("ECA_NORMAL")
ECA_NOWTACCESS = _eca("ECA_NOWTACCESS")
ECA_BADCHID = _eca("ECA_BADCHID")
ECA_BADMONID = _eca("ECA_BADMONID")
ECA_DISCONN = _eca("ECA_DISCONN")
ECA_BADTYPE = _eca("ECA_BADTYPE")
ECA_ALLOCMEM = _eca("ECA_ALLOCMEM")
DBR_TYPES = frozenset(int(t) for t in ca.ChannelType)  # every type a request may ask for
ECA_BADCOUNT = _eca("ECA_BADCOUNT")


def _layout(data_type: int) -> tuple[int, int]:
    """(bytes of metadata, bytes per element) of a DBR type, from caproto's structures."""
    native = int(dbr.native_type(data_type))
    element = ctypes.sizeof(dbr.DBR_TYPES[native])
    return (ctypes.sizeof(dbr.DBR_TYPES[data_type]) if native != data_type else 0), element


_LAYOUT = {t: _layout(t) for t in DBR_TYPES}


_STRINGS = frozenset(t for t in DBR_TYPES if int(dbr.native_type(t)) == int(ca.ChannelType.STRING))


def dbr_size(data_type: int, count: int) -> int:
    """The fewest bytes a value of this DBR type and element count can be sent in: the
    metadata and every element, except that the last of a string array may be cut after
    its NUL (libca sends "abc" as 8 bytes, not 40)."""
    metadata, element = _LAYOUT[data_type]
    if data_type in _STRINGS and count > 0:
        return metadata + element * (count - 1) + 1
    return metadata + element * count

# Command ids, from caproto's message classes.
VERSION = ca.VersionRequest.ID
EVENT_ADD = ca.EventAddRequest.ID
EVENT_CANCEL = ca.EventCancelRequest.ID
READ = ca.ReadRequest.ID
WRITE = ca.WriteRequest.ID
SEARCH = ca.SearchRequest.ID
EVENTS_OFF = ca.EventsOffRequest.ID
EVENTS_ON = ca.EventsOnRequest.ID
READ_SYNC = ca.ReadSyncRequest.ID
ERROR = ca.ErrorResponse.ID
CLEAR_CHANNEL = ca.ClearChannelRequest.ID
NOT_FOUND = ca.NotFoundResponse.ID
READ_NOTIFY = ca.ReadNotifyRequest.ID
CREATE_CHAN = ca.CreateChanRequest.ID
WRITE_NOTIFY = ca.WriteNotifyRequest.ID
CLIENT_NAME = ca.ClientNameRequest.ID
HOST_NAME = ca.HostNameRequest.ID
ACCESS_RIGHTS = ca.AccessRightsResponse.ID
ECHO = ca.EchoRequest.ID
CREATE_CH_FAIL = ca.CreateChFailResponse.ID
SERVER_DISCONN = ca.ServerDisconnResponse.ID
DO_REPLY = ca.DO_REPLY

# handler(command, data_type, data_count, parameter1, parameter2, payload)
MessageHandler = Callable[[int, int, int, int, int, bytes], None]

pack_header = HEADER.pack
unpack_header = HEADER.unpack_from
unpack_large = LARGE_SIZES.unpack_from


def pack(command: int, data_type: int, data_count: int, p1: int, p2: int,
         payload: bytes = b"") -> bytes:
    """One message; the extended header when the payload or count needs 32 bits."""
    size = len(payload)
    if size < LARGE and data_count < LARGE:
        return pack_header(command, size, data_type, data_count, p1, p2) + payload
    return (pack_header(command, LARGE, data_type, 0, p1, p2)
            + LARGE_SIZES.pack(size, data_count) + payload)


def decode_name(payload: bytes) -> str:
    """A NUL-padded PV name (search and create-channel payloads)."""
    return payload.split(b"\0", 1)[0].decode("latin-1")


_CONTROL = bytes(range(0x20)) + b"\x7f"


def pv_name(payload: bytes) -> str | None:
    """A search or create-channel payload's name, or None when no IOC can hold it or
    it cannot be passed on as it is: empty, longer than MAX_NAME, a record part longer
    than caproto (and rsrv) allow, control characters, or not UTF-8 (caproto encodes the
    names it sends as UTF-8: other bytes would reach the IOC changed)."""
    raw = payload.split(b"\0", 1)[0]
    if not _name_bytes_ok(raw):
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def name_ok(name: str) -> bool:
    """Whether caproto can search for ``name`` and an IOC can hold it (see pv_name)."""
    try:
        return _name_bytes_ok(name.encode())
    except UnicodeEncodeError:  # lone surrogates
        return False


def _name_bytes_ok(raw: bytes) -> bool:
    return (0 < len(raw) <= MAX_NAME and len(raw) == len(raw.translate(None, _CONTROL))
            and len(raw.split(b".", 1)[0]) <= MAX_RECORD_NAME)


class StreamFramer:
    """Splits a TCP byte stream into CA messages and hands each to a handler.

    Partial messages stay buffered until the rest arrives. Payloads are copied out as
    bytes so handlers may keep them (the monitor cache does). A header claiming more
    than ``max_payload`` bytes raises ValueError (the caller closes the circuit) before
    any of it is buffered. ``stop``, if given, is asked after each message: when it
    says so the rest stays buffered until the next ``feed`` (flow control).
    """

    __slots__ = ("_buf", "max_payload")

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self.max_payload = max_payload

    def pending(self) -> int:
        """Bytes waiting for the rest of their message."""
        return len(self._buf)

    def feed(self, data: bytes, handler: MessageHandler,
             stop: Callable[[], bool] | None = None) -> None:
        buf = self._buf
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data  # common case: no leftover, parse the chunk in place
        pos, end = 0, len(view)
        while end - pos >= HEADER_SIZE:
            command, size, data_type, count, p1, p2 = unpack_header(view, pos)
            body = pos + HEADER_SIZE
            if size == LARGE:
                if end - pos < EXTENDED_SIZE:
                    break
                size, count = unpack_large(view, body)
                body += LARGE_SIZES.size
            if size > self.max_payload:
                raise ValueError(f"message of {size} bytes (command {command})")
            last = body + size
            if last > end:
                break
            handler(command, data_type, count, p1, p2, bytes(view[body:last]))
            pos = last
            if stop is not None and stop():
                break
        if view is buf:
            del buf[:pos]
        elif pos < end:
            self._buf = bytearray(view[pos:])


def iter_datagram(data: bytes) -> list[tuple[int, int, int, int, int, bytes]]:
    """The messages of one UDP datagram (a truncated tail is dropped)."""
    out = []
    pos, end = 0, len(data)
    while end - pos >= HEADER_SIZE:
        command, size, data_type, count, p1, p2 = unpack_header(data, pos)
        body = pos + HEADER_SIZE
        if body + size > end:
            break
        out.append((command, data_type, count, p1, p2, data[body:body + size]))
        pos = body + size
    return out


def version_message(priority: int = 0, sequence: int = 0) -> bytes:
    """VERSION: the minor protocol version (count); priority (type); UDP sequence (p1)."""
    return pack(VERSION, priority, CA_MINOR_VERSION, sequence, 0)


def search_reply_udp(port: int, cid: int) -> bytes:
    """UDP search reply as rsrv sends it: TCP port in the type field, server address
    "use the sender" (so replies through a DNAT ClusterIP still work), our minor version
    in the payload."""
    return pack(SEARCH, port, 0, ANY_ADDRESS, cid, struct.pack(">H6x", CA_MINOR_VERSION))


def search_reply_tcp(port: int, cid: int) -> bytes:
    """TCP (name server) search reply as rsrv's search_reply_tcp sends it: no payload;
    libca then creates the channel on this very circuit."""
    return pack(SEARCH, port, 0, ANY_ADDRESS, cid)


def search_request(name: str, cid: int, reply: int = ca.NO_REPLY) -> bytes:
    """A SEARCH for ``name`` (a name pv_name or name_ok accepted), laid out as caproto's
    SearchRequest lays it out: NUL-padded to a multiple of 8, the reply flag in the type
    field, our minor version in the count, the cid in both parameters. Made here because
    caproto's class validates every field again, which made it the most expensive part
    of a lookup (measured: a search storm spent 40 % of the gateway's time there)."""
    raw = name.encode()
    return pack(SEARCH, reply, CA_MINOR_VERSION, cid, cid, raw + b"\0" * (8 - len(raw) % 8))


def not_found(reply_flag: int, version: int, cid: int) -> bytes:
    return pack(NOT_FOUND, reply_flag, version, cid, cid)


def error_message(request_header: bytes, cid: int, status: int, text: str) -> bytes:
    """ERROR: the offending request's header, then a NUL-terminated, padded message."""
    body = request_header + text.encode("latin-1", "replace") + b"\0"
    body += b"\0" * (-len(body) % 8)
    return pack(ERROR, 0, 0, cid, status, body)


def request_header(command: int, data_type: int, count: int, p1: int, p2: int,
                   size: int = 0) -> bytes:
    """A request's header as echoed inside an ERROR message."""
    if size < LARGE and count < LARGE:
        return pack_header(command, size, data_type, count, p1, p2)
    return pack_header(command, LARGE, data_type, 0, p1, p2) + LARGE_SIZES.pack(size, count)


def caproto_bytes(message: ca.Message) -> bytes:
    """Serialise a message built with caproto's command classes."""
    return bytes(message)
