"""Read PVs over CA and PVA with nothing but the environment the pod got from the
client directory ConfigMap (envFrom). Run by try.sh in a client pod.

TRY_ITEMS: space-separated "ioc|pv|ca|pva" entries (ca and pva: true or false).
"""

import os
import sys

TIMEOUT = 5.0


def read_ca(pv: str) -> object:
    from caproto.threading.client import Context

    ctx = Context()
    try:
        (chan,) = ctx.get_pvs(pv, timeout=TIMEOUT)
        chan.wait_for_connection(timeout=TIMEOUT)
        return chan.read(timeout=TIMEOUT).data
    finally:
        ctx.disconnect()


def read_pva(pv: str) -> object:
    from p4p.client.thread import Context

    ctx = Context("pva")
    try:
        return ctx.get(pv, timeout=TIMEOUT)
    finally:
        ctx.close()


def main() -> int:
    for key in sorted(k for k in os.environ if k.startswith("EPICS_")):
        print(f"{key}={os.environ[key]}")
    failed = 0
    for item in os.environ.get("TRY_ITEMS", "").split():
        ioc, pv, ca, pva = item.split("|")
        if not pv:
            print(f"{ioc}: skipped (no PV: set spec.probe.pv or pass {ioc}=PV to try.sh)")
            continue
        for proto, read, wanted in (("CA", read_ca, ca), ("PVA", read_pva, pva)):
            if wanted != "true":
                continue
            try:
                print(f"{ioc}: {proto} {pv} = {read(pv)}")
            except Exception as exc:  # report every failure and go on
                failed += 1
                print(f"{ioc}: {proto} {pv} FAILED: {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
