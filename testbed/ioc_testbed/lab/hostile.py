"""Hostile clients for the lab (tests/lab/test_bounds.py): run in a pod, print one JSON
line when done, and stop by themselves (every loop is bounded in time and count).

    python -m ioc_testbed.lab.hostile ATTACK --host IP [--port N] [--seconds S] ...

Attackers run at the lowest CPU priority: one elsewhere would not take the servers'
CPU, and in the lab they share two cores with them. CA messages are framed with
caproto's message classes where a valid message is meant,
and with the header layout by hand only where the point is to be invalid; PVA with the
project's PVA codec (ioc_operator.nameserver.pva; p4p exposes none of pvxs's).

Attacks:
* ``circuits``: open ``--count`` TCP connections and hold them for ``--seconds``.
* ``subscribe``: one CA circuit, a channel to ``--pv``, ``--count`` subscriptions to it,
  then read nothing for ``--seconds`` (4 kB receive buffer).
* ``never-read``: one CA circuit, a channel to ``--pv``, reads of it sent for
  ``--seconds`` and none of the answers read.
* ``put``: one CA circuit, channels to ``--pv`` (and ``--deny``), WRITE and WRITE_NOTIFY
  of ``--value`` to each, ``--count`` times; reports what was answered.
* ``udp-flood``: CA (``--proto ca``) or PVA searches for new names, ``--count`` names in
  datagrams of 40 names, ``--rate`` datagrams a second, for at most ``--seconds``.
* ``junk``: malformed bytes to a TCP or UDP port (``--proto ca|pva``, ``--udp``): random
  bytes, truncated headers, wrong payload sizes, extended headers with huge counts,
  unknown commands, the wrong byte order, names with every byte value.
* ``pva-search``: a PVA TCP circuit (connection validation as pvxs's client does), then
  searches for ``--count`` names in messages of up to 65,535 names, and names with every
  byte value; reads what comes back for ``--seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import struct
import sys
import threading
import time
from typing import Any

import caproto as ca
from caproto._commands import read_from_bytestream

from ioc_operator.nameserver import pva

WATCHDOG_SLACK = 30.0


def _ca_circuit(host: str, port: int, rcvbuf: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5.0)
    sock.connect((host, port))
    sock.sendall(b"".join(bytes(m) for m in (
        ca.VersionRequest(0, 13), ca.HostNameRequest("hostile"),
        ca.ClientNameRequest("hostile"))))
    return sock


def _ca_wait(sock: socket.socket, want: Any, buf: bytearray, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = memoryview(bytearray(buf))  # a copy: buf grows while messages refer to it
        while len(view):
            rest, message, _ = read_from_bytestream(view, ca.SERVER)
            if message is ca.NEED_DATA:
                break
            view = rest
            if isinstance(message, want | ca.CreateChFailResponse):
                del buf[:len(buf) - len(view)]
                return message
        del buf[:len(buf) - len(view)]
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        if not data:
            return None
        buf += data
    return None


def _create(sock: socket.socket, name: str, cid: int, buf: bytearray) -> tuple[int, int] | None:
    sock.sendall(bytes(ca.CreateChanRequest(name, cid, 13)))
    reply = _ca_wait(sock, ca.CreateChanResponse, buf)
    if not isinstance(reply, ca.CreateChanResponse):
        return None
    return int(reply.sid), int(reply.data_type)


def circuits(args: argparse.Namespace) -> dict[str, Any]:
    held: list[socket.socket] = []
    refused = 0
    deadline = time.monotonic() + args.seconds
    for _ in range(args.count):
        if time.monotonic() > deadline:
            break
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(2.0)
        try:
            sock.connect((args.host, args.port))
            held.append(sock)
        except OSError:
            refused += 1
            sock.close()
    time.sleep(1.0)
    closed = 0  # circuits the server closed at once
    for sock in held:
        sock.setblocking(False)
        try:
            if sock.recv(65536, socket.MSG_PEEK) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    print(json.dumps({"progress": "holding", "open": len(held) - closed}), flush=True)
    time.sleep(max(0.0, deadline - time.monotonic()))
    for sock in held:
        sock.close()
    return {"connected": len(held), "refused": refused, "closed_by_server": closed}


def subscribe(args: argparse.Namespace) -> dict[str, Any]:
    sock = _ca_circuit(args.host, args.port, rcvbuf=4096)
    buf = bytearray()
    created = _create(sock, args.pv, 1, buf)
    if created is None:
        return {"error": "no channel"}
    sid, data_type = created
    sock.sendall(b"".join(bytes(ca.EventAddRequest(data_type, 1, sid, i, 0, 0, 0, 1))
                          for i in range(args.count)))
    print(json.dumps({"progress": "subscribed"}), flush=True)
    time.sleep(args.seconds)  # reading nothing
    sock.close()
    return {"subscriptions_sent": args.count}


def never_read(args: argparse.Namespace) -> dict[str, Any]:
    sock = _ca_circuit(args.host, args.port, rcvbuf=4096)
    buf = bytearray()
    created = _create(sock, args.pv, 1, buf)
    if created is None:
        return {"error": "no channel"}
    sid, data_type = created
    sock.settimeout(0.5)
    sent = 0
    closed = False
    deadline = time.monotonic() + args.seconds
    batch = b"".join(bytes(ca.ReadNotifyRequest(data_type, 0, sid, i)) for i in range(256))
    print(json.dumps({"progress": "reading"}), flush=True)
    while time.monotonic() < deadline and sent < args.count:
        try:
            sock.sendall(batch)
            sent += 256
        except TimeoutError:
            time.sleep(0.1)  # the server stopped reading us: what it should do
        except OSError:
            closed = True  # the server closed the circuit
            break
    sock.close()
    return {"reads_sent": sent, "closed_by_server": closed}


def put(args: argparse.Namespace) -> dict[str, Any]:
    sock = _ca_circuit(args.host, args.port)
    buf = bytearray()
    out: dict[str, Any] = {"created": {}, "answers": {}}
    names = [args.pv] + ([args.deny] if args.deny else [])
    channels = {}
    for cid, name in enumerate(names, start=1):
        created = _create(sock, name, cid, buf)
        out["created"][name] = created is not None
        if created is not None:
            channels[name] = created
    for name, (sid, data_type) in channels.items():
        answers: dict[str, int] = {}
        for i in range(args.count):
            sock.sendall(bytes(ca.WriteRequest([args.value], data_type, 1, sid, i))
                         + bytes(ca.WriteNotifyRequest([args.value], data_type, 1, sid, i)))
            reply = _ca_wait(sock, ca.WriteNotifyResponse | ca.ErrorResponse, buf, 2.0)
            key = type(reply).__name__ if reply is None or isinstance(reply, ca.ErrorResponse) \
                else f"status {reply.status.name}"
            answers[key] = answers.get(key, 0) + 1
        out["answers"][name] = answers
    sock.close()
    return out


def udp_flood(args: argparse.Namespace) -> dict[str, Any]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    tag = os.urandom(3).hex()
    sent = datagrams = 0
    start = time.monotonic()
    deadline = start + args.seconds
    while sent < args.count and time.monotonic() < deadline:
        ahead = datagrams / args.rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
        names = [f"{args.pv}{tag}:{i}" for i in range(sent, sent + 40)]
        if args.proto == "ca":
            data = b"".join([bytes(ca.VersionRequest(0, 13))] + [
                bytes(ca.SearchRequest(n, i, 13)) for i, n in enumerate(names)])
        else:
            data = pva.encode_search(datagrams, list(enumerate(names)), 1, big_endian=False)
        try:
            sock.sendto(data, (args.host, args.port))
        except OSError:
            time.sleep(0.001)
            continue
        sent += len(names)
        datagrams += 1
    return {"names": sent, "datagrams": datagrams}


def _ca_header(command: int, size: int, dtype: int, count: int, p1: int, p2: int,
               order: str = ">") -> bytes:
    return struct.pack(order + "HHHHII", command, size, dtype, count, p1, p2)


def _junk_ca(rng: random.Random) -> list[bytes]:
    every_byte = [b"X:" + bytes([b]) + b"y\0\0\0\0\0" for b in range(256)]
    out = [
        rng.randbytes(rng.randrange(1, 3000)),  # random bytes
        _ca_header(6, 8, 5, 13, 1, 1)[:11],  # a truncated header
        _ca_header(6, 64, 5, 13, 1, 1) + b"X:short\0",  # payload shorter than it says
        _ca_header(6, 0xFFFF, 5, 13, 1, 1) + struct.pack(">II", 0xFFFFFFF0, 0xFFFFFFF0),
        _ca_header(1, 0xFFFF, 6, 0, 1, 1) + struct.pack(">II", 16, 0x7FFFFFFF) + bytes(16),
        b"".join(_ca_header(c, 0, 0, 0, 0, 0) for c in (99, 200, 0x7FFF, 0xFFFF)),
        _ca_header(6, 8, 5, 13, 1, 1, "<") + b"X:order\0",  # little-endian
        b"".join(bytes(ca.VersionRequest(0, 13)) + _ca_header(6, len(n), 5, 13, i, i) + n
                 for i, n in enumerate(every_byte)),
    ]
    return out


def _junk_pva(rng: random.Random) -> list[bytes]:
    good = pva.encode_search(1, [(1, "X:y")], 5076, big_endian=True)
    flipped = bytearray(good)
    flipped[2] &= ~pva.FLAG_MSB  # says little-endian, is big-endian
    every = pva.encode_search(2, [(b, f"X:{chr(b)}y") for b in range(1, 128)], 5076)
    return [
        rng.randbytes(rng.randrange(1, 3000)),
        good[:5],  # truncated header
        good[:20],  # truncated body
        bytes(flipped),
        struct.pack("<BBBBI", 0xCA, 2, 0, pva.SEARCH, 0xFFFFFFF0),  # huge size
        pva.message(77, b"xyz", big_endian=False, server=False),  # unknown command
        struct.pack("<BBBBI", 0xCA, 2, 0x10, pva.SEARCH, 4) + b"abcd",  # segmented
        every,
        _raw_name_search(bytes(range(256))),  # one name holding every byte value
    ]


def _raw_name_search(name: bytes, sequence: int = 3) -> bytes:
    body = (struct.pack("<IB3x", sequence, 0x81) + b"\0" * 10 + b"\xff\xff" + b"\0" * 4
            + struct.pack("<H", 5076) + pva.encode_size(1, False)
            + pva.encode_string("tcp", False) + struct.pack("<HI", 1, 7)
            + pva.encode_size(len(name), False) + name)
    return pva.message(pva.SEARCH, body, big_endian=False, server=False)


def junk(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    sent = 0
    deadline = time.monotonic() + args.seconds
    rounds = 0
    while rounds < args.count and time.monotonic() < deadline:
        rounds += 1
        pieces = _junk_ca(rng) if args.proto == "ca" else _junk_pva(rng)
        for piece in pieces:
            if args.udp:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.sendto(piece[:65000], (args.host, args.port))
                sock.close()
            else:
                try:
                    with socket.create_connection((args.host, args.port), timeout=2.0) as s:
                        s.sendall(piece)
                        s.settimeout(0.05)
                        with contextlib.suppress(TimeoutError, OSError):
                            s.recv(65536)
                except OSError:
                    pass
            sent += 1
    return {"sent": sent, "rounds": rounds}


def _pva_validate(sock: socket.socket) -> None:
    """Answer the server's connection validation as pvxs's client does."""
    body = (struct.pack("<IHH", 0x10000, 0x7FFF, 0) + pva.encode_string("anonymous", False)
            + b"\xff")
    sock.sendall(pva.control(pva.CONTROL_SET_BYTE_ORDER, 0, big_endian=False, server=False)
                 + pva.message(pva.CONNECTION_VALIDATION, body, big_endian=False,
                               server=False))


def pva_search(args: argparse.Namespace) -> dict[str, Any]:
    sock = socket.create_connection((args.host, args.port), timeout=5.0)
    _pva_validate(sock)
    tag = os.urandom(3).hex()
    messages = 0
    closed = False
    try:
        for start in range(0, args.count, 65535):
            names = [(i, f"{args.pv}{tag}:{i}") for i in range(start, min(args.count,
                                                                            start + 65535))]
            sock.sendall(pva.encode_search(messages, names, 0, big_endian=False))
            messages += 1
        for b in range(256):  # names with every byte value, one message each
            sock.sendall(_raw_name_search(b"X:" + bytes([b]) + b"y", 1000 + b))
    except (ConnectionResetError, BrokenPipeError):
        # The server dropped a client that sends without reading its answers: its
        # defence, reported as such.
        closed = True
    sock.settimeout(0.5)
    received = 0
    deadline = time.monotonic() + args.seconds
    while not closed and time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        if not data:
            closed = True
            break
        received += len(data)
    sock.close()
    return {"messages": messages, "received": received, "closed_by_server": closed}


ATTACKS = {"circuits": circuits, "subscribe": subscribe, "never-read": never_read,
           "put": put, "udp-flood": udp_flood, "junk": junk, "pva-search": pva_search}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hostile")
    parser.add_argument("attack", choices=sorted(ATTACKS))
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=5064)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--pv", default="")
    parser.add_argument("--deny", default="")
    parser.add_argument("--value", type=float, default=99.0)
    parser.add_argument("--proto", choices=("ca", "pva"), default="ca")
    parser.add_argument("--udp", action="store_true")
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--rate", type=float, default=2000.0,
                        help="udp-flood: datagrams per second at most")
    args = parser.parse_args(argv)
    # An attacker elsewhere does not take the servers' CPU; in the lab it shares it.
    os.nice(19)
    watchdog = threading.Timer(args.seconds + WATCHDOG_SLACK, lambda: os._exit(3))
    watchdog.daemon = True
    watchdog.start()
    result = ATTACKS[args.attack](args)
    print(json.dumps({"attack": args.attack, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
