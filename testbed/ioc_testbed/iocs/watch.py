"""A running EPICS client: monitors PVs from the start, whether they exist yet or not, and
prints one JSON line per event, so a test knows when a running client first reached an
IOC, lost it and reached it again.

    python watch.py --lib pyepics|caproto|p4p --pv A:counter [--pv B:value] --duration 60

Output: ``{"t": <time.time()>, "lib": ..., "pv": ..., "event": "started" | "connected" |
"disconnected" | "value", "value": ...}``. Wall-clock time: a pod and its node share
the kernel's clock, so a test on the node compares it with its own. Settings come from
the environment only (EPICS_CA_*, EPICS_PVA_*). Ends after --duration seconds, or when
its stdin closes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

_lock = threading.Lock()


def emit(lib: str, pv: str, event: str, value: Any = None) -> None:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if value is not None and not isinstance(value, int | float | str | list):
        value = str(value)
    with _lock:
        sys.stdout.write(json.dumps({"t": time.time(), "lib": lib, "pv": pv,
                                     "event": event, "value": value}) + "\n")
        sys.stdout.flush()


def watch_pyepics(names: list[str]) -> list[Any]:
    import epics

    def on_value(pvname: str = "", value: Any = None, **_: Any) -> None:
        emit("pyepics", pvname, "value", value)

    def on_connection(pvname: str = "", conn: bool = False, **_: Any) -> None:
        emit("pyepics", pvname, "connected" if conn else "disconnected")

    # Referenced until the end: a collected PV's callbacks crash libca.
    return [epics.PV(n, callback=on_value, connection_callback=on_connection,
                     auto_monitor=True) for n in names]


def watch_caproto(names: list[str]) -> list[Any]:
    from caproto.threading.client import Context

    ctx = Context()
    held: list[Any] = [ctx]
    for pv in ctx.get_pvs(*names, timeout=3600):
        def on_state(_pv: Any, state: str, name: str = pv.name) -> None:
            if state in ("connected", "disconnected"):
                emit("caproto", name, state)

        def on_value(_sub: Any, response: Any, name: str = pv.name) -> None:
            emit("caproto", name, "value", response.data[0] if len(response.data) == 1
                 else response.data)

        pv.connection_state_callback.add_callback(on_state)
        sub = pv.subscribe()
        sub.add_callback(on_value)
        held += [pv, sub, on_state, on_value]  # caproto keeps weak references
    return held


def watch_p4p(names: list[str]) -> list[Any]:
    from p4p.client.thread import Context, Disconnected

    ctx = Context("pva")

    def callback(value: Any, name: str) -> None:
        if isinstance(value, Disconnected):
            emit("p4p", name, "disconnected")
        elif isinstance(value, Exception):
            emit("p4p", name, "error", str(value))
        else:
            emit("p4p", name, "value", value)

    subs = [ctx.monitor(n, lambda v, n=n: callback(v, n), notify_disconnect=True)
            for n in names]
    return [ctx, *subs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lib", choices=("pyepics", "caproto", "p4p"), required=True)
    parser.add_argument("--pv", action="append", required=True)
    parser.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args()
    watchers = {"pyepics": watch_pyepics, "caproto": watch_caproto, "p4p": watch_p4p}
    held = watchers[args.lib](args.pv)
    emit(args.lib, ",".join(args.pv), "started")
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait(args.duration)
    del held
    sys.stdout.flush()
    os._exit(0)  # skip the libraries' teardown: bounded exit


if __name__ == "__main__":
    main()
