"""Count the UDP datagrams a CA server answers a burst of name searches with.

    python -m ioc_testbed.lab.ca_search_probe --to 198.18.16.2:5064 --name M:v0 ... \\
        [--names-from FILE] [--wait 5]

Sends every name once, packed into datagrams as caproto's threading client packs them
(a VERSION message, then SEARCH messages up to ``SEARCH_MAX_DATAGRAM_BYTES``), then
collects the replies until each name is answered (plus a short quiet period, so that
late duplicates are counted too) or ``--wait`` seconds pass. Prints one JSON line:
``{"names", "request_datagrams", "reply_datagrams", "answered", "largest", "elapsed"}``.

Each reply datagram is one batch a client must act on: caproto's threading client sends
one create-channel write per search reply datagram it receives (see docs/ca-gateway.md).
Framing and parsing are caproto's.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import caproto as ca

QUIET = 0.3  # s without a datagram after the last answer: the burst is over


def requests(names: Sequence[str]) -> tuple[list[bytes], dict[int, str]]:
    """The search datagrams for ``names`` and the cid given to each name."""
    version = bytes(ca.VersionRequest(priority=0, version=ca.DEFAULT_PROTOCOL_VERSION))
    cids = {cid: name for cid, name in enumerate(names, start=1)}
    searches = (ca.SearchRequest(name, cid, ca.DEFAULT_PROTOCOL_VERSION)
                for cid, name in cids.items())
    datagrams = [version + b"".join(bytes(c) for c in batch)
                 for batch in ca.batch_requests(searches,
                                             ca.SEARCH_MAX_DATAGRAM_BYTES - len(version))]
    return datagrams, cids


def probe(to: tuple[str, int], names: Sequence[str], wait: float) -> dict[str, object]:
    datagrams, cids = requests(names)
    broadcaster = ca.Broadcaster(our_role=ca.CLIENT)  # parses replies
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # as much as the kernel allows: the probe must count every datagram, not drop some
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind(("0.0.0.0", 0))
    start = time.monotonic()
    for datagram in datagrams:
        sock.sendto(datagram, to)
    answered: set[int] = set()
    replies, largest = 0, 0
    deadline = start + wait
    quiet_until = float("inf")
    for _ in range(10 * len(names) + 100):  # more datagrams than that: something is wrong
        now = time.monotonic()
        if now >= min(deadline, quiet_until):
            break
        ready, _, _ = select.select([sock], [], [], min(deadline, quiet_until) - now)
        if not ready:
            break
        data, addr = sock.recvfrom(65536)
        found = [c.cid for c in broadcaster.recv(data, addr)
                 if isinstance(c, ca.SearchResponse) and c.cid in cids]
        if found:
            replies += 1
            largest = max(largest, len(found))
            answered.update(found)
        if len(answered) == len(cids):
            quiet_until = min(quiet_until, time.monotonic() + QUIET)
    sock.close()
    return {"names": len(names), "request_datagrams": len(datagrams),
            "reply_datagrams": replies, "answered": len(answered), "largest": largest,
            "elapsed": round(time.monotonic() - start, 3)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--to", required=True, help="HOST:PORT of the server")
    parser.add_argument("--name", action="append", default=[])
    parser.add_argument("--names-from", type=Path, help="a file with one name per line")
    parser.add_argument("--wait", type=float, default=5.0, help="seconds at most")
    args = parser.parse_args(argv)
    names = list(args.name)
    if args.names_from:
        names += args.names_from.read_text().split()
    host, _, port = args.to.rpartition(":")
    sys.stdout.write(json.dumps(probe((host, int(port)), names, args.wait)) + "\n")


if __name__ == "__main__":
    main()
