"""A generic soft IOC whose instance is its config folder, as IOC images of the
epics-containers kind run: one image, each instance's st.cmd and databases mounted at
/epics/ioc/config (spec.config).

    python /epics/example/config_ioc.py [CONFIG_DIR]

Loads EPICS Base's and PVXS's record and device support (rsrv for CA, QSRV2 for PVA),
runs CONFIG_DIR/st.cmd in the IOC shell from CONFIG_DIR (so st.cmd names its databases
relatively), then serves the IOC shell on stdin for `kubectl attach`. Without stdin it
keeps running.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import pvxslibs.path
from epicscorelibs import ioc as base
from setuptools_dso import find_dso

DEFAULT_DIR = "/epics/ioc/config"


def main() -> int:
    config_dir = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_DIR
    st_cmd = os.path.join(config_dir, "st.cmd")
    if not os.path.isfile(st_cmd):
        print(f"config_ioc: no st.cmd in {config_dir} (mount the IOC's files there: "
              "spec.config)", file=sys.stderr)
        return 2
    os.environ.setdefault("PVXS_QSRV_ENABLE", "YES")
    ctypes.CDLL(find_dso("pvxslibs.lib.pvxsIoc"), ctypes.RTLD_GLOBAL)
    base.iocshRegisterCommon()
    for dbd, where in (("base.dbd", base.DEFAULT_DBD_PATH),
                       ("pvxsIoc.dbd", pvxslibs.path.dbd_path)):
        if base.dbLoadDatabase(dbd.encode(), where.encode(), None):
            print(f"config_ioc: cannot load {dbd} from {where}", file=sys.stderr)
            return 2
    if base.registerRecordDeviceDriver(base.pdbbase):
        return 2
    iocsh = base.Com.iocsh
    iocsh.argtypes = [ctypes.c_char_p]
    iocsh.restype = ctypes.c_int
    os.chdir(config_dir)
    if iocsh(b"st.cmd"):
        print(f"config_ioc: {st_cmd} failed", file=sys.stderr)
        return 1
    if sys.stdin is not None and sys.stdin.isatty():
        iocsh(None)  # the interactive IOC shell, until EOF
    while True:  # serve until stopped
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
