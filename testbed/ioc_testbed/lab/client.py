"""One bounded EPICS client operation; prints one JSON line. Run inside a lab namespace.

    python -m ioc_testbed.lab.client --lib pyepics --op get --pv P:value [--pv P:wave]
    python -m ioc_testbed.lab.client --lib p4p --op put --pv P:value --value 2.5
    python -m ioc_testbed.lab.client --lib caproto --op monitor --pv P:counter --updates 2

Libraries: ``pyepics`` (libca bundled with pyepics), ``pyepics-base7`` (pyepics on the libca
of epicscorelibs), ``caproto`` (threading client), ``p4p`` (PVXS). The client reads its
settings from the environment only (EPICS_CA_*, EPICS_PVA_*). Output::

    {"ok": bool, "error": str|null, "elapsed": s, "lib": ..., "op": ...,
     "results": [{"pv": ..., "ok": bool, "value": ..., "error": ..., "elapsed": s}]}

``ok`` is true when every PV succeeded. A watchdog ends the process after
``3 * timeout + 5`` seconds whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

LIBS = ("pyepics", "pyepics-base7", "caproto", "p4p")
OPS = ("get", "put", "monitor")


def _jsonable(value: Any) -> Any:
    """numpy arrays/scalars, bytes and p4p wrappers to plain JSON values."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if hasattr(value, "tolist"):
        value = value.tolist()
        return value if not isinstance(value, list) else [_jsonable(v) for v in value]
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    for cast in (int, float):
        try:
            return cast(value)
        except (TypeError, ValueError):
            continue
    return str(value)


def _scalar(data: Any) -> Any:
    data = _jsonable(data)
    if isinstance(data, list) and len(data) == 1:
        return data[0]
    return data


def _parse_value(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


class _Result:
    def __init__(self, pv: str) -> None:
        self.pv = pv
        self.ok = False
        self.value: Any = None
        self.error: str | None = None
        self.t0 = time.monotonic()
        self.elapsed = 0.0
        self.extra: dict[str, Any] = {}

    def done(self, ok: bool, value: Any = None, error: str | None = None) -> None:
        self.ok, self.value, self.error = ok, value, error
        self.elapsed = round(time.monotonic() - self.t0, 3)

    def as_dict(self) -> dict[str, Any]:
        out = {
            "pv": self.pv,
            "ok": self.ok,
            "value": _jsonable(self.value),
            "error": self.error,
            "elapsed": self.elapsed,
        }
        out.update({k: v for k, v in self.extra.items() if not k.startswith("_")})
        return out


def _wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


# ---------------------------------------------------------------------------- pyepics
def _run_pyepics(
    op: str, names: Sequence[str], value: Any, timeout: float, updates: int, base7: bool
) -> list[_Result]:
    if base7:
        import epicscorelibs.path.pyepics  # noqa: F401  (sets PYEPICS_LIBCA)
    from epics import ca

    results = [_Result(n) for n in names]
    # pyepics: a subscription lives only while its returned tuple is referenced; once
    # collected, libca calls freed ctypes memory (seen here: another lambda called with
    # value=..., then SIGSEGV). Keep every one until the end.
    subscriptions: list[Any] = []
    chids = {n: ca.create_channel(n, connect=False, auto_cb=False) for n in names}
    deadline = time.monotonic() + timeout
    for res in results:
        if not ca.connect_channel(chids[res.pv], timeout=max(0.01, deadline - time.monotonic())):
            res.done(False, error=f"not connected within {timeout}s")
    for res in results:
        if res.error:
            continue
        chid = chids[res.pv]
        try:
            if op == "get":
                got = ca.get(chid, timeout=timeout)
                res.done(got is not None, _scalar(got), None if got is not None else "get timeout")
            elif op == "put":
                ca.put(chid, value, wait=True, timeout=timeout)
                got = ca.get(chid, timeout=timeout)
                res.done(
                    got is not None and _scalar(got) == value,
                    _scalar(got),
                    None if _scalar(got) == value else f"read back {got!r}",
                )
            else:
                seen: list[Any] = []

                def callback(value: Any = None, seen: list[Any] = seen, **_kw: Any) -> None:
                    seen.append(_scalar(value))

                subscriptions.append(ca.create_subscription(chid, callback=callback))
                ok = _wait_for(lambda seen=seen: len(seen) >= updates, timeout)
                res.extra["updates"] = len(seen)
                res.done(ok, seen[:updates], None if ok else f"{len(seen)} updates in {timeout}s")
        except Exception as exc:
            res.done(False, error=f"{type(exc).__name__}: {exc}")
    for sub in subscriptions:
        with contextlib.suppress(Exception):  # the results are in; this is tidying up
            ca.clear_subscription(sub[2])
    return results


# ---------------------------------------------------------------------------- caproto
def _run_caproto(
    op: str, names: Sequence[str], value: Any, timeout: float, updates: int
) -> list[_Result]:
    from caproto.threading.client import Context

    results = [_Result(n) for n in names]
    ctx = Context()
    pvs = dict(zip(names, ctx.get_pvs(*names, timeout=timeout), strict=True))
    deadline = time.monotonic() + timeout
    for res in results:
        try:
            pvs[res.pv].wait_for_connection(timeout=max(0.01, deadline - time.monotonic()))
        except Exception as exc:
            res.done(False, error=f"not connected within {timeout}s: {type(exc).__name__}")
    for res in results:
        if res.error:
            continue
        pv = pvs[res.pv]
        try:
            if op == "get":
                res.done(True, _scalar(pv.read(timeout=timeout).data))
            elif op == "put":
                pv.write([value], wait=True, timeout=timeout)
                got = _scalar(pv.read(timeout=timeout).data)
                res.done(got == value, got, None if got == value else f"read back {got!r}")
            else:
                seen: list[Any] = []
                sub = pv.subscribe()

                def on_update(_sub: Any, response: Any, seen: list[Any] = seen) -> None:
                    seen.append(_scalar(response.data))

                # caproto keeps only weak references to callbacks: hold this one.
                res.extra["_cb"] = on_update
                sub.add_callback(on_update)
                ok = _wait_for(lambda seen=seen: len(seen) >= updates, timeout)
                res.extra["updates"] = len(seen)
                res.done(ok, seen[:updates], None if ok else f"{len(seen)} updates in {timeout}s")
        except Exception as exc:
            res.done(False, error=f"{type(exc).__name__}: {exc}")
    return results


# ---------------------------------------------------------------------------- p4p
def _run_p4p(
    op: str, names: Sequence[str], value: Any, timeout: float, updates: int
) -> list[_Result]:
    from p4p.client.thread import Context

    results = [_Result(n) for n in names]
    ctx = Context("pva")
    try:
        if op == "get":
            got = ctx.get(list(names), timeout=timeout, throw=False)
            for res, val in zip(results, got, strict=True):
                if isinstance(val, Exception):
                    res.done(False, error=f"{type(val).__name__}: {val}")
                else:
                    res.done(True, _scalar(val))
        elif op == "put":
            for res in results:
                try:
                    ctx.put(res.pv, value, timeout=timeout)
                    got = _scalar(ctx.get(res.pv, timeout=timeout))
                    res.done(got == value, got, None if got == value else f"read back {got!r}")
                except Exception as exc:
                    res.done(False, error=f"{type(exc).__name__}: {exc}")
        else:
            for res in results:
                seen: list[Any] = []

                def callback(val: Any, seen: list[Any] = seen) -> None:
                    if not isinstance(val, Exception):
                        seen.append(_scalar(val))

                sub = ctx.monitor(res.pv, callback, notify_disconnect=False)
                ok = _wait_for(lambda seen=seen: len(seen) >= updates, timeout)
                sub.close()
                res.extra["updates"] = len(seen)
                res.done(ok, seen[:updates], None if ok else f"{len(seen)} updates in {timeout}s")
    finally:
        ctx.close()
    return results


def run_operation(
    lib: str,
    op: str,
    names: Sequence[str],
    value: Any = None,
    timeout: float = 3.0,
    updates: int = 2,
) -> dict[str, Any]:
    """Run one operation in this process and return the JSON-able result."""
    t0 = time.monotonic()
    out: dict[str, Any] = {"lib": lib, "op": op, "ok": False, "error": None, "results": []}
    try:
        if lib in ("pyepics", "pyepics-base7"):
            results = _run_pyepics(op, names, value, timeout, updates, lib == "pyepics-base7")
        elif lib == "caproto":
            results = _run_caproto(op, names, value, timeout, updates)
        elif lib == "p4p":
            results = _run_p4p(op, names, value, timeout, updates)
        else:
            raise ValueError(f"unknown lib {lib!r}")
        out["results"] = [r.as_dict() for r in results]
        out["ok"] = bool(results) and all(r.ok for r in results)
        failed = [r for r in results if not r.ok]
        if failed:
            out["error"] = "; ".join(f"{r.pv}: {r.error}" for r in failed)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["elapsed"] = round(time.monotonic() - t0, 3)
    return out


def _emit_and_exit(out: dict[str, Any], code: int) -> None:
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip library atexit teardown (libca, threads): bounded exit


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lib", choices=LIBS, required=True)
    parser.add_argument("--op", choices=OPS, default="get")
    parser.add_argument("--pv", action="append", required=True, help="PV name (repeatable)")
    parser.add_argument("--value", help="value to put (float if it parses)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per phase")
    parser.add_argument("--updates", type=int, default=2, help="monitor updates to wait for")
    args = parser.parse_args(argv)
    if args.op == "put" and args.value is None:
        parser.error("--op put needs --value")
    start = time.monotonic()
    watchdog_s = 3 * args.timeout + 5

    def watchdog() -> None:
        time.sleep(watchdog_s)
        _emit_and_exit(
            {
                "lib": args.lib,
                "op": args.op,
                "ok": False,
                "results": [],
                "error": f"watchdog: no result after {watchdog_s}s",
                "elapsed": round(time.monotonic() - start, 3),
            },
            3,
        )

    threading.Thread(target=watchdog, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    out = run_operation(
        args.lib, args.op, args.pv, _parse_value(args.value), args.timeout, args.updates
    )
    _emit_and_exit(out, 0 if out["ok"] else 1)


if __name__ == "__main__":
    main()
