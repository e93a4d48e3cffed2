"""p4p (PVXS) server for the lab (PVA only)."""
import sys
import time

from p4p.nt import NTEnum, NTScalar
from p4p.server import Server
from p4p.server.thread import SharedPV


class Writable:
    def put(self, pv, op):
        pv.post(op.value())
        op.done()


prefix = sys.argv[1]
pvs = {
    prefix + "value": SharedPV(nt=NTScalar("d"), initial=1.5, handler=Writable()),
    prefix + "counter": SharedPV(nt=NTScalar("i"), initial=0),
    prefix + "mode": SharedPV(
        nt=NTEnum(), initial={"index": 0, "choices": ["Off", "On", "Auto"]}, handler=Writable()
    ),
    prefix + "wave": SharedPV(nt=NTScalar("ad"), initial=[float(i) for i in range(8)]),
}
with Server(providers=[pvs]):
    print("p4p server running", flush=True)
    count = 0
    while True:
        time.sleep(0.2)
        count += 1
        pvs[prefix + "counter"].post(count)
