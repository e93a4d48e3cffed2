"""caproto IOC for the bridge tests (CA only, bound by EPICS_CAS_INTF_ADDR_LIST)."""
import sys

from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.server import PVGroup, pvproperty, run


class BridgeIOC(PVGroup):
    temperature = pvproperty(
        value=1.5, dtype=float, precision=3, units="mm",
        lower_disp_limit=-20.0, upper_disp_limit=20.0,
        lower_ctrl_limit=-10.0, upper_ctrl_limit=10.0,
        lower_alarm_limit=-9.0, lower_warning_limit=-5.0,
        upper_warning_limit=5.0, upper_alarm_limit=9.0)
    count = pvproperty(value=7, dtype=int, units="counts",
                       lower_disp_limit=0, upper_disp_limit=100,
                       lower_ctrl_limit=0, upper_ctrl_limit=100)
    label = pvproperty(value="hello", dtype=ChannelType.STRING)
    mode = pvproperty(value="Off", dtype=ChannelType.ENUM, enum_strings=["Off", "On", "Auto"])
    wave = pvproperty(value=[float(i) for i in range(8)], dtype=float, max_length=8,
                      units="V", precision=2)
    short = pvproperty(value=-3, dtype=ChannelType.INT, units="steps")
    single = pvproperty(value=0.25, dtype=ChannelType.FLOAT, precision=2, units="A")
    chars = pvproperty(value=b"abc", dtype=ChannelType.CHAR, max_length=16)
    counter = pvproperty(value=0, dtype=int, read_only=True)
    # Its own alarm group: caproto shares one alarm per group and every write (the
    # counter's) re-evaluates it.
    alarm = pvproperty(value=12.0, dtype=float, alarm_group="alarmed")

    @counter.scan(period=0.1)
    async def counter(self, instance, async_lib):
        await instance.write(instance.value + 1)

    @alarm.startup
    async def alarm(self, instance, async_lib):
        await instance.alarm.write(status=AlarmStatus.HIHI,
                                   severity=AlarmSeverity.MAJOR_ALARM)


if __name__ == "__main__":
    ioc = BridgeIOC(prefix=sys.argv[1])
    print("caproto IOC serving", sorted(ioc.pvdb), flush=True)
    run(ioc.pvdb)
