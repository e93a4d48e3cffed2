"""Reachability probe: read one PV over CA (caproto) and PVA (p4p) and report timings.

Run as `python -m ioc_operator.controller.probe --pv NAME --ca --pva` with exactly the EPICS
client settings the operator publishes in its environment, so a pass means a client
with those settings reaches the IOC. Prints one JSON object. Always bounded in time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def probe_ca(pv: str, timeout: float) -> dict[str, Any]:
    from caproto.threading.client import Context

    start = time.monotonic()
    ctx = Context()
    try:
        (chan,) = ctx.get_pvs(pv, timeout=timeout)
        chan.wait_for_connection(timeout=timeout)
        chan.read(timeout=timeout)
        return {"ok": True, "ms": round((time.monotonic() - start) * 1000, 1)}
    except Exception as exc:  # a probe reports every failure, whatever its kind
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        ctx.disconnect()


def probe_pva(pv: str, timeout: float) -> dict[str, Any]:
    from p4p.client.thread import Context

    start = time.monotonic()
    ctx = Context("pva")
    try:
        ctx.get(pv, timeout=timeout)
        return {"ok": True, "ms": round((time.monotonic() - start) * 1000, 1)}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        ctx.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ioc-operator-probe")
    p.add_argument("--pv", required=True)
    p.add_argument("--ca", action="store_true", help="read it over Channel Access")
    p.add_argument("--pva", action="store_true", help="read it over PV Access")
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    result: dict[str, Any] = {}
    if args.ca:
        result["ca"] = probe_ca(args.pv, args.timeout)
    if args.pva:
        result["pva"] = probe_pva(args.pv, args.timeout)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
