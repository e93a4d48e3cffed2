"""Load for the soak (ioc_testbed.lab.soak): one role per process, in a client pod.

    python -m ioc_testbed.lab.soak_load --role ROLE --seconds S --prefix SOAK: ...

Every role prints one JSON line per ``--report`` seconds (``{"role": ..., "t": ...}``)
and stops by itself after ``--seconds`` (a watchdog ends it a little later whatever it
is doing). Clients find the IOC through the name service only (the directory's
EPICS_CA_*/EPICS_PVA_* in the environment), so every search goes to the name server,
every CA channel through the CA gateway and every PVA channel through the bridge.

Roles:
* ``ca-monitor``: libca (pyepics) monitors ``tick`` (about 1 kHz), counts updates and
  connection changes.
* ``pva-monitor``: p4p monitors ``tick`` through the bridge.
* ``ca-churn``: over and over: search ``--names`` random names by UDP at the name
  server, open a circuit to the gateway it names, create the channels, read each, put
  ``value``, subscribe to ``tick`` until one update, close the circuit. caproto's
  message classes frame every message; the sockets are plain, so nothing is left over
  from one cycle to the next. Each report carries the time (ms) each search took until
  every name was answered (the name server's latency).
* ``pva-churn``: over and over: a new p4p context, get ``--names`` random names, put
  ``value``, close the context.
* ``latency``: one CA circuit to the gateway reading ``value`` every 20 ms and one p4p
  context getting it every 50 ms through the bridge; each report carries the round
  trips (ms) of its window.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import caproto as ca
from caproto._commands import read_datagram, read_from_bytestream

WATCHDOG_SLACK = 30.0  # s past --seconds before the process ends itself


def emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


class Reporter:
    """Calls ``report()`` every ``period`` seconds from the role's own loop."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.next = time.monotonic() + period

    def due(self) -> bool:
        if time.monotonic() < self.next:
            return False
        self.next += self.period
        return True


# ------------------------------------------------------------------ raw CA (caproto)
class CaError(Exception):
    pass


def _addr_list() -> tuple[str, int]:
    entry = os.environ["EPICS_CA_ADDR_LIST"].split()[0]
    host, _, port = entry.partition(":")
    return host, int(port or 5064)


def search(names: list[str], timeout: float = 2.0) -> dict[str, tuple[str, int]]:
    """Where each name is, by UDP search of the address list (the name server)."""
    target = _addr_list()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.2)
    try:
        cids = {i + 1: name for i, name in enumerate(names)}
        request = b"".join([bytes(ca.VersionRequest(0, 13))] + [
            bytes(ca.SearchRequest(name, cid, 13)) for cid, name in cids.items()])
        found: dict[str, tuple[str, int]] = {}
        deadline = time.monotonic() + timeout
        sent = 0.0
        while len(found) < len(names) and time.monotonic() < deadline:
            if time.monotonic() - sent > 0.5:  # again, as a client's search timer does
                sock.sendto(request, target)
                sent = time.monotonic()
            try:
                data, addr = sock.recvfrom(65536)
            except TimeoutError:
                continue
            for message in read_datagram(bytearray(data), addr, ca.SERVER):
                if isinstance(message, ca.SearchResponse) and message.cid in cids:
                    ip = message.ip if message.ip != "255.255.255.255" else addr[0]
                    found[cids[message.cid]] = (ip, message.port)
        return found
    finally:
        sock.close()


class Circuit:
    """One CA circuit, blocking, with a bounded wait for every answer."""

    def __init__(self, address: tuple[str, int], timeout: float = 3.0) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.events = 0
        self.send(ca.VersionRequest(0, 13), ca.HostNameRequest("soak"),
                  ca.ClientNameRequest("soak"))

    def close(self) -> None:
        self.sock.close()

    def send(self, *messages: Any) -> None:
        self.sock.sendall(b"".join(bytes(m) for m in messages))

    def wait(self, match: Callable[[Any], bool]) -> Any:
        deadline = time.monotonic() + self.timeout
        while True:
            view = memoryview(self.buf)
            while len(view):
                rest, message, _ = read_from_bytestream(view, ca.SERVER)
                if message is ca.NEED_DATA:
                    break
                view = rest
                if isinstance(message, ca.EventAddResponse):
                    self.events += 1
                if isinstance(message, ca.ErrorResponse | ca.CreateChFailResponse
                              | ca.ServerDisconnResponse):
                    raise CaError(type(message).__name__)
                if match(message):
                    self.buf = bytearray(view)
                    return message
            self.buf = bytearray(view)
            left = deadline - time.monotonic()
            if left <= 0:
                raise CaError("timeout")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise CaError("timeout") from None
            if not data:
                raise CaError("circuit closed")
            self.buf += data

    def create(self, name: str, cid: int) -> tuple[int, int]:
        """(sid, native type)."""
        self.send(ca.CreateChanRequest(name, cid, 13))
        reply = self.wait(lambda m: isinstance(m, ca.CreateChanResponse) and m.cid == cid)
        return int(reply.sid), int(reply.data_type)

    def read(self, sid: int, data_type: int, ioid: int) -> Any:
        self.send(ca.ReadNotifyRequest(data_type, 1, sid, ioid))
        return self.wait(lambda m: isinstance(m, ca.ReadNotifyResponse) and m.ioid == ioid)


# ------------------------------------------------------------------ roles
def ca_monitor(args: argparse.Namespace) -> None:
    import epics  # libca

    state = {"updates": 0, "changes": 0, "connected": False}

    def on_value(**_kw: Any) -> None:
        state["updates"] += 1

    def on_connection(conn: bool = False, **_kw: Any) -> None:
        state["changes"] += 1
        state["connected"] = conn

    pv = epics.PV(args.prefix + "tick", callback=on_value, connection_callback=on_connection,
                  auto_monitor=True)
    report = Reporter(args.report)
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        time.sleep(0.05)
        if report.due():
            emit({"role": args.role, "t": time.time(), "updates": state["updates"],
                  "changes": state["changes"], "connected": state["connected"]})
            state["updates"] = 0
    pv.disconnect()


def pva_monitor(args: argparse.Namespace) -> None:
    from p4p.client.thread import Context, Disconnected

    state = {"updates": 0, "changes": 0, "connected": False}
    lock = threading.Lock()

    def on_update(value: Any) -> None:
        with lock:
            if isinstance(value, Disconnected):
                state["changes"] += 1
                state["connected"] = False
            elif isinstance(value, Exception):
                state["changes"] += 1
            else:
                if not state["connected"]:
                    state["changes"] += 1
                state["connected"] = True
                state["updates"] += 1

    ctx = Context("pva", nt=False)
    sub = ctx.monitor(args.prefix + "tick", on_update, notify_disconnect=True,
                      request="record[queueSize=100]")
    report = Reporter(args.report)
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        time.sleep(0.05)
        if report.due():
            with lock:
                emit({"role": args.role, "t": time.time(), **state})
                state["updates"] = 0
    sub.close()
    ctx.close()


def ca_churn(args: argparse.Namespace) -> None:
    rng = random.Random(os.getpid())
    report = Reporter(args.report)
    counts = {"cycles": 0, "errors": 0, "channels": 0}
    errors: dict[str, int] = {}
    searches: list[float] = []  # ms until the name server had answered every name
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        names = [f"{args.prefix}pv{rng.randrange(args.pvs)}" for _ in range(args.names)]
        names = [*dict.fromkeys(names), args.prefix + "value", args.prefix + "tick"]
        circuit = None
        try:
            started = time.perf_counter()
            where = search(names)
            if len(where) < len(names):
                raise CaError(f"{len(names) - len(where)} names not found")
            searches.append(round((time.perf_counter() - started) * 1e3, 3))
            circuit = Circuit(where[names[0]])
            sids = {name: circuit.create(name, cid)
                    for cid, name in enumerate(names, start=1)}
            for ioid, (sid, data_type) in enumerate(sids.values(), start=1):
                circuit.read(sid, data_type, ioid)
            sid, data_type = sids[args.prefix + "value"]
            circuit.send(ca.WriteNotifyRequest([rng.random()], data_type, 1, sid, 9999))
            circuit.wait(lambda m: isinstance(m, ca.WriteNotifyResponse))
            sid, data_type = sids[args.prefix + "tick"]
            circuit.send(ca.EventAddRequest(data_type, 1, sid, 1, 0, 0, 0, 1))
            circuit.wait(lambda m: isinstance(m, ca.EventAddResponse))
            counts["cycles"] += 1
            counts["channels"] += len(sids)
        except (OSError, CaError) as exc:
            counts["errors"] += 1
            key = str(exc)[:60]
            errors[key] = errors.get(key, 0) + 1
            time.sleep(0.2)
        finally:
            if circuit is not None:
                circuit.close()
        time.sleep(args.pause)
        if report.due():
            emit({"role": args.role, "t": time.time(), **counts, "why": errors,
                  "search": searches})
            counts = dict.fromkeys(counts, 0)
            errors = {}
            searches = []


def pva_churn(args: argparse.Namespace) -> None:
    from p4p.client.thread import Context

    rng = random.Random(os.getpid())
    report = Reporter(args.report)
    counts = {"cycles": 0, "errors": 0, "channels": 0}
    errors: dict[str, int] = {}
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        names = list(dict.fromkeys(f"{args.prefix}pv{rng.randrange(args.pvs)}"
                                   for _ in range(args.names)))
        ctx = Context("pva", nt=False)
        try:
            values = ctx.get(names, timeout=3.0, throw=False)
            bad = [v for v in values if isinstance(v, Exception)]
            ctx.put(args.prefix + "value", rng.random(), timeout=3.0)
            if bad:
                raise RuntimeError(f"{len(bad)} gets failed: {type(bad[0]).__name__}")
            counts["cycles"] += 1
            counts["channels"] += len(names) + 1
        except Exception as exc:
            counts["errors"] += 1
            key = f"{type(exc).__name__}: {exc}"[:60]
            errors[key] = errors.get(key, 0) + 1
            time.sleep(0.2)
        finally:
            ctx.close()
        time.sleep(args.pause)
        if report.due():
            emit({"role": args.role, "t": time.time(), **counts, "why": errors})
            counts = dict.fromkeys(counts, 0)
            errors = {}


def latency(args: argparse.Namespace) -> None:
    from p4p.client.thread import Context

    window: dict[str, list[float]] = {"ca": [], "pva": []}
    failures = {"ca": 0, "pva": 0}
    lock = threading.Lock()
    end = time.monotonic() + args.seconds
    name = args.prefix + "value"

    def pva_loop() -> None:
        ctx = Context("pva", nt=False)
        try:
            while time.monotonic() < end:
                start = time.perf_counter()
                try:
                    ctx.get(name, timeout=2.0)
                    with lock:
                        window["pva"].append((time.perf_counter() - start) * 1e3)
                except Exception:
                    with lock:
                        failures["pva"] += 1
                time.sleep(0.05)
        finally:
            ctx.close()

    thread = threading.Thread(target=pva_loop, daemon=True)
    thread.start()
    report = Reporter(args.report)
    circuit: Circuit | None = None
    sid = data_type = 0
    ioid = 0
    while time.monotonic() < end:
        try:
            if circuit is None:
                where = search([name])
                if name not in where:
                    raise CaError("not found")
                circuit = Circuit(where[name])
                sid, data_type = circuit.create(name, 1)
            ioid += 1
            start = time.perf_counter()
            circuit.read(sid, data_type, ioid)
            with lock:
                window["ca"].append((time.perf_counter() - start) * 1e3)
        except (OSError, CaError):
            with lock:
                failures["ca"] += 1
            if circuit is not None:
                circuit.close()
                circuit = None
            time.sleep(0.2)
        time.sleep(0.02)
        if report.due():
            with lock:
                emit({"role": args.role, "t": time.time(),
                      "ca": [round(x, 3) for x in window["ca"]],
                      "pva": [round(x, 3) for x in window["pva"]], "failures": failures})
                window = {"ca": [], "pva": []}
                failures = {"ca": 0, "pva": 0}
    thread.join(timeout=5)


ROLES = {"ca-monitor": ca_monitor, "pva-monitor": pva_monitor, "ca-churn": ca_churn,
         "pva-churn": pva_churn, "latency": latency}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="soak_load")
    parser.add_argument("--role", choices=sorted(ROLES), required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--report", type=float, default=10.0)
    parser.add_argument("--prefix", default="SOAK:")
    parser.add_argument("--pvs", type=int, default=200, help="pv0 .. pvN-1 exist")
    parser.add_argument("--names", type=int, default=10, help="names per churn cycle")
    parser.add_argument("--pause", type=float, default=0.2, help="s between churn cycles")
    args = parser.parse_args(argv)
    watchdog = threading.Timer(args.seconds + WATCHDOG_SLACK, lambda: os._exit(3))
    watchdog.daemon = True
    watchdog.start()
    ROLES[args.role](args)
    sys.stdout.flush()
    os._exit(0)  # libca and pvxs threads must not delay the exit


if __name__ == "__main__":
    sys.exit(main())
