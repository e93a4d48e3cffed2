"""Long-running EPICS clients for the lab, and pvaPy (pvAccessCPP) one-shot operations.

    python -m ioc_testbed.lab.running_client --lib p4p --pv A:counter --pv B:counter \\
        --duration 60          # watch: one JSON line per event, until stdin closes
    python -m ioc_testbed.lab.running_client --lib pvapy --op get --pv A:value

Watch mode keeps a monitor on every PV from the start, whether or not the PV exists
yet, and prints ``{"t": <CLOCK_MONOTONIC>, "pv": ..., "event": "connected" |
"disconnected" | "value", "value": ...}`` per event, so a test knows when a running
client first reached an IOC, lost it, and reached it again. ``t`` is the system-wide
monotonic clock, comparable with the test's ``time.monotonic()``.

Libraries: ``pyepics`` / ``pyepics-base7`` (libca 3.16 / 7.0), ``caproto`` (threading
client), ``p4p`` (pvxs), ``pvapy`` (pvAccessCPP). One-shot operations of the first four
are those of ``ioc_testbed.lab.client``; pvaPy's are here. Every process is bounded by
``--duration`` (watch) or a watchdog (one-shot).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .client import _jsonable, _parse_value, _scalar, _wait_for, run_operation
from .clients import ClientResult
from .netns import Lab, LabError, Node, Pod

__all__ = ["LIBS", "Events", "read_events", "run_once", "start_watch"]

LIBS = ("pyepics", "pyepics-base7", "caproto", "p4p", "pvapy")
_lock = threading.Lock()


def _emit(pv: str, event: str, value: Any = None) -> None:
    line = json.dumps({"t": time.monotonic(), "pv": pv, "event": event,
                       "value": _jsonable(value)})
    with _lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


# ------------------------------------------------------------------------ watchers
def _watch_pyepics(names: Sequence[str], base7: bool) -> list[Any]:
    if base7:
        import epicscorelibs.path.pyepics  # noqa: F401  (sets PYEPICS_LIBCA)
    import epics

    def on_value(pvname: str = "", value: Any = None, **_kw: Any) -> None:
        _emit(pvname, "value", _scalar(value))

    def on_connection(pvname: str = "", conn: bool = False, **_kw: Any) -> None:
        _emit(pvname, "connected" if conn else "disconnected")

    return [epics.PV(n, callback=on_value, connection_callback=on_connection,
                     auto_monitor=True, connection_timeout=3600) for n in names]


def _watch_caproto(names: Sequence[str]) -> list[Any]:
    from caproto.threading.client import Context

    ctx = Context()
    keep: list[Any] = [ctx]

    def on_state(pv: Any, state: str) -> None:
        _emit(pv.name, "connected" if state == "connected" else "disconnected")

    for pv in ctx.get_pvs(*names, connection_state_callback=on_state, timeout=3600):
        sub = pv.subscribe()

        def on_update(_sub: Any, response: Any, name: str = pv.name) -> None:
            _emit(name, "value", _scalar(response.data))

        sub.add_callback(on_update)  # caproto holds callbacks weakly: keep them
        keep += [pv, sub, on_update]
    return keep


def _watch_p4p(names: Sequence[str]) -> list[Any]:
    from p4p.client.thread import Context, Disconnected

    ctx = Context("pva")
    keep: list[Any] = [ctx]
    for name in names:
        connected = [False]

        def on_update(value: Any, name: str = name, connected: list[bool] = connected) -> None:
            if isinstance(value, Disconnected):
                connected[0] = False
                _emit(name, "disconnected")
            elif isinstance(value, Exception):
                _emit(name, "error", str(value))
            else:
                if not connected[0]:
                    connected[0] = True
                    _emit(name, "connected")
                _emit(name, "value", _scalar(value))

        keep.append(ctx.monitor(name, on_update, notify_disconnect=True))
    return keep


def _watch_pvapy(names: Sequence[str], duration: float) -> list[Any]:
    """pvaPy 5.6 needs care: its connection callback is called without the GIL when a
    server goes away ("PyThreadState_Get: the function must be called with the GIL
    held"), startMonitor() on a channel that does not connect in time crashes the
    process (SIGSEGV), and so, now and then, does a get() that times out as the channel
    connects. So each channel is first read with one get() that waits as long as the
    client runs, then monitored; the monitor survives the server going away and coming
    back."""
    import pvaccess

    keep: list[Any] = []

    def follow(name: str, channel: Any) -> None:
        channel.setTimeout(duration)
        try:
            channel.get()
        except Exception as exc:  # never found: nothing more to watch
            _emit(name, "error", str(exc))
            return
        _emit(name, "connected")

        def on_update(value: Any) -> None:
            _emit(name, "value", _scalar(value["value"]))

        channel.subscribe("watch", on_update)
        channel.startMonitor()

    for name in names:
        channel = pvaccess.Channel(name, pvaccess.PVA)
        keep.append(channel)
        threading.Thread(target=follow, args=(name, channel), daemon=True).start()
    return keep


def watch(lib: str, names: Sequence[str], duration: float) -> None:
    if lib in ("pyepics", "pyepics-base7"):
        keep = _watch_pyepics(names, lib == "pyepics-base7")
    elif lib == "caproto":
        keep = _watch_caproto(names)
    elif lib == "p4p":
        keep = _watch_p4p(names)
    elif lib == "pvapy":
        keep = _watch_pvapy(names, duration)
    else:
        raise ValueError(f"unknown lib {lib!r}")
    _emit("", "started")
    stdin_closed = threading.Event()

    def watch_stdin() -> None:
        try:
            sys.stdin.read()
        finally:
            stdin_closed.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    stdin_closed.wait(duration)
    del keep


# ------------------------------------------------------------------------ pvaPy one-shot
def _pvapy_operation(op: str, names: Sequence[str], value: Any, timeout: float,
                     updates: int) -> dict[str, Any]:
    import pvaccess

    t0 = time.monotonic()
    results = []
    channels: list[Any] = []  # pvAccessCPP crashes collecting a channel it monitored
    for name in names:
        start = time.monotonic()
        entry: dict[str, Any] = {"pv": name, "ok": False, "value": None, "error": None}
        try:
            channel = pvaccess.Channel(name, pvaccess.PVA)
            channels.append(channel)
            channel.setTimeout(timeout)
            if op == "get":
                entry["value"] = _scalar(channel.get()["value"])
                entry["ok"] = True
            elif op == "put":
                channel.put(value)
                got = _scalar(channel.get()["value"])
                entry.update(value=got, ok=got == value,
                             error=None if got == value else f"read back {got!r}")
            else:
                # Connected first: pvAccessCPP can crash the process when a monitor is
                # started on a channel that never connects.
                channel.get()
                seen: list[Any] = []
                channel.subscribe("once", lambda v, seen=seen: seen.append(_scalar(v["value"])))
                channel.startMonitor()
                ok = _wait_for(lambda seen=seen: len(seen) >= updates, timeout)
                channel.stopMonitor()
                channel.unsubscribe("once")
                entry.update(value=seen[:updates], ok=ok,
                             error=None if ok else f"{len(seen)} updates in {timeout}s")
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["elapsed"] = round(time.monotonic() - start, 3)
        results.append(entry)
    failed = [r for r in results if not r["ok"]]
    return {"lib": "pvapy", "op": op, "ok": bool(results) and not failed,
            "error": "; ".join(f"{r['pv']}: {r['error']}" for r in failed) or None,
            "results": results, "elapsed": round(time.monotonic() - t0, 3)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lib", choices=LIBS, required=True)
    parser.add_argument("--op", choices=("watch", "get", "put", "monitor"), default="watch")
    parser.add_argument("--pv", action="append", required=True)
    parser.add_argument("--value")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--updates", type=int, default=2)
    parser.add_argument("--duration", type=float, default=60.0,
                        help="watch: end after this many seconds at the latest")
    args = parser.parse_args(argv)
    faulthandler.enable()  # a client library crashing leaves its stack in the log
    if args.op == "watch":
        threading.Timer(args.duration + 10, lambda: os._exit(3)).start()  # a hard bound
        watch(args.lib, args.pv, args.duration)
        sys.stdout.flush()
        os._exit(0)  # skip library teardown (libca, pvAccessCPP threads): bounded exit
    watchdog_s = 3 * args.timeout + 5
    threading.Timer(watchdog_s, lambda: os._exit(3)).start()
    value = _parse_value(args.value)
    if args.lib == "pvapy":
        out = _pvapy_operation(args.op, args.pv, value, args.timeout, args.updates)
    else:
        out = run_operation(args.lib, args.op, args.pv, value, args.timeout, args.updates)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0 if out["ok"] else 1)


# ------------------------------------------------------------------------ test side
def run_once(lab: Lab, where: str | Node | Pod, lib: str, op: str, pvs: Sequence[str],
             env: Mapping[str, str], *, value: Any = None, timeout: float = 5.0) -> ClientResult:
    """One bounded operation of any of LIBS in a lab namespace."""
    argv = [sys.executable, "-m", "ioc_testbed.lab.running_client", "--lib", lib, "--op", op,
            "--timeout", str(timeout)]
    argv += [arg for pv in pvs for arg in ("--pv", pv)]
    if value is not None:
        argv += ["--value", str(value)]
    try:
        proc = lab.exec(where, argv, env, timeout=3 * timeout + 20)
    except LabError as exc:
        return ClientResult(lib, op, False, str(exc), 0.0)
    data = next((json.loads(line) for line in reversed(proc.stdout.splitlines())
                 if line.startswith("{")), None)
    if data is None:
        return ClientResult(lib, op, False, f"no result (rc {proc.returncode})", 0.0,
                            returncode=proc.returncode, stderr=proc.stderr[-2000:])
    return ClientResult(lib, op, bool(data["ok"]), data.get("error"),
                        float(data.get("elapsed", 0.0)), list(data.get("results", [])),
                        proc.returncode, proc.stderr[-2000:])


class Events:
    """The events a watching client printed so far (read from its log)."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.items: list[dict[str, Any]] = []
        for line in lines:
            if line.startswith("{"):
                try:
                    self.items.append(json.loads(line))
                except ValueError:
                    continue  # a line being written

    def first(self, pv: str, event: str, after: float = 0.0,
              where: Callable[[dict[str, Any]], bool] | None = None) -> float | None:
        for item in self.items:
            if item["pv"] == pv and item["event"] == event and item["t"] >= after \
                    and (where is None or where(item)):
                return float(item["t"])
        return None

    def count(self, pv: str, event: str, after: float = 0.0, before: float = float("inf")
              ) -> int:
        return sum(1 for i in self.items if i["pv"] == pv and i["event"] == event
                   and after <= i["t"] < before)


def start_watch(lab: Lab, where: str | Node | Pod, lib: str, pvs: Sequence[str],
                env: Mapping[str, str], duration: float = 120.0) -> Any:
    """A watching client (a Popen the lab stops by PID); read it with read_events."""
    argv = [sys.executable, "-m", "ioc_testbed.lab.running_client", "--lib", lib,
            "--duration", str(duration)]
    argv += [arg for pv in pvs for arg in ("--pv", pv)]
    return lab.spawn(where, argv, env, log=lab.tmpdir / f"watch-{lib}-{len(lab.processes)}.log")


def read_events(popen: Any) -> Events:
    try:
        text = popen.log_path.read_text(errors="replace")
    except OSError:
        text = ""
    return Events(text.splitlines())


if __name__ == "__main__":
    main()
