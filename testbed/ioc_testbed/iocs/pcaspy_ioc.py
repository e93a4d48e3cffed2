"""pcaspy (CAS) server for the lab (CA only)."""
import sys
import time

from pcaspy import Driver, SimpleServer

PVDB = {
    "value": {"type": "float", "prec": 3, "value": 1.5},
    "counter": {"type": "int", "value": 0},
    "mode": {"type": "enum", "enums": ["Off", "On", "Auto"], "value": 0},
    "wave": {"type": "float", "count": 8, "value": [float(i) for i in range(8)]},
}


class LabDriver(Driver):
    def write(self, reason, value):
        if reason == "counter":
            return False
        self.setParam(reason, value)
        self.updatePVs()
        return True


if __name__ == "__main__":
    server = SimpleServer()
    server.createPV(sys.argv[1], PVDB)
    driver = LabDriver()
    print("pcaspy server running", flush=True)
    count, next_tick = 0, time.monotonic()
    while True:
        server.process(0.05)
        if time.monotonic() >= next_tick:
            next_tick += 0.2
            count += 1
            driver.setParam("counter", count)
            driver.updatePVs()
