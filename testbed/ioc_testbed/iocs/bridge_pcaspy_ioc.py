"""pcaspy (CAS) IOC for the bridge tests (CA only, bound by EPICS_CAS_INTF_ADDR_LIST)."""
import sys
import time

from pcaspy import Alarm, Driver, Severity, SimpleServer

PVDB = {
    "temperature": {"type": "float", "prec": 3, "unit": "mm", "value": 1.5,
                    "lolim": -20.0, "hilim": 20.0, "lolo": -9.0, "low": -5.0,
                    "high": 5.0, "hihi": 9.0},
    "count": {"type": "int", "unit": "counts", "value": 7, "lolim": 0, "hilim": 100},
    "label": {"type": "string", "value": "hello"},
    "mode": {"type": "enum", "enums": ["Off", "On", "Auto"], "value": 0},
    "wave": {"type": "float", "count": 8, "prec": 2, "unit": "V",
             "value": [float(i) for i in range(8)]},
    "counter": {"type": "int", "value": 0},
    "alarm": {"type": "float", "value": 12.0},
    "fast": {"type": "int", "value": 0},
    "go": {"type": "int", "value": 0},
}
READ_ONLY = {"counter", "fast"}


class BridgeDriver(Driver):
    def write(self, reason, value):
        if reason in READ_ONLY:
            return False
        self.setParam(reason, value)
        self.updatePVs()
        return True


if __name__ == "__main__":
    server = SimpleServer()
    server.createPV(sys.argv[1], PVDB)
    driver = BridgeDriver()
    for reason in PVDB:  # pcas starts every PV in UDF/INVALID until it is written
        driver.setParamStatus(reason, Alarm.NO_ALARM, Severity.NO_ALARM)
    driver.setParamStatus("alarm", Alarm.HIHI_ALARM, Severity.MAJOR_ALARM)
    driver.updatePVs()
    print("pcaspy IOC running", flush=True)
    count, n, next_tick, stop_at = 0, 0, time.monotonic(), None
    while True:
        if driver.getParam("go") > 0 and stop_at is None:
            stop_at = time.monotonic() + driver.getParam("go")
        if stop_at is not None:
            for _ in range(16):
                n += 1
                driver.setParam("fast", n)
                driver.updatePVs()
            server.process(0)  # let CAS send and serve clients
            if time.monotonic() >= stop_at:
                stop_at = None
                driver.setParam("go", 0)
                driver.updatePVs()
        else:
            server.process(0.02)
        if time.monotonic() >= next_tick:
            next_tick += 0.1
            count += 1
            driver.setParam("counter", count)
            driver.updatePVs()
