"""pcaspy (CAS) server with the same PVs as the rsrv database."""
import sys
import time

from pcaspy import Alarm, Driver, Severity, SimpleServer

PVDB = {
    "ai": {"type": "float", "prec": 2, "unit": "mA", "lolim": -10, "hilim": 10, "value": 9.5},
    "ao": {"type": "float", "prec": 3, "unit": "V", "lolim": -100, "hilim": 100, "value": 1.5},
    "bo": {"type": "enum", "enums": ["Off", "On"], "value": 1},
    "mbbo": {"type": "enum", "enums": ["Off", "On", "Auto"], "value": 2},
    "wave": {"type": "float", "count": 16, "value": [float(i) for i in range(16)]},
    "big": {"type": "float", "count": 20000},
    "str": {"type": "string", "value": "hello gateway"},
    "counter": {"type": "int", "value": 0},
}


class GatewayTestDriver(Driver):
    def write(self, reason, value):
        if reason in ("ai", "counter"):
            return False
        self.setParam(reason, value)
        self.updatePVs()
        return True


server = SimpleServer()
server.createPV(sys.argv[1], PVDB)
driver = GatewayTestDriver()
driver.setParamStatus("ai", Alarm.HIHI_ALARM, Severity.MAJOR_ALARM)
driver.updatePVs()
count, tick = 0, time.monotonic()
while True:
    server.process(0.01)
    if time.monotonic() >= tick:
        tick += 0.1
        count += 1
        driver.setParam("counter", count)
        driver.updatePVs()
