"""caproto IOC with the same PVs as the rsrv database."""
import sys

from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.server import PVGroup, pvproperty, run


class GatewayTestIOC(PVGroup):
    # its own alarm group: the group's shared default alarm follows the counter's writes
    ai = pvproperty(value=9.5, precision=2, units="mA", read_only=True, alarm_group="ai",
                    upper_disp_limit=10.0, lower_disp_limit=-10.0, upper_alarm_limit=9.0)
    ao = pvproperty(value=1.5, precision=3, units="V", upper_disp_limit=100.0,
                    lower_disp_limit=-100.0, upper_ctrl_limit=50.0, lower_ctrl_limit=-50.0)
    bo = pvproperty(value="On", dtype=ChannelType.ENUM, enum_strings=["Off", "On"])
    mbbo = pvproperty(value="Auto", dtype=ChannelType.ENUM, enum_strings=["Off", "On", "Auto"])
    wave = pvproperty(value=[float(i) for i in range(16)], max_length=16)
    big = pvproperty(value=[0.0] * 20000, max_length=20000)
    text = pvproperty(name="str", value="hello gateway", dtype=ChannelType.STRING)
    counter = pvproperty(value=0, read_only=True)

    @ai.startup
    async def ai(self, instance, async_lib):
        await instance.alarm.write(status=AlarmStatus.HIHI, severity=AlarmSeverity.MAJOR_ALARM)

    @counter.scan(period=0.1)
    async def counter(self, instance, async_lib):
        await instance.write(instance.value + 1)


if __name__ == "__main__":
    run(GatewayTestIOC(prefix=sys.argv[1]).pvdb)
