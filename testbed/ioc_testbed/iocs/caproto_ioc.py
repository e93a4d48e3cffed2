"""caproto asyncio IOC for the lab (CA only)."""
import sys

from caproto import ChannelType
from caproto.server import PVGroup, pvproperty, run


class LabIOC(PVGroup):
    value = pvproperty(value=1.5, dtype=float, precision=3)
    counter = pvproperty(value=0, dtype=int, read_only=True)
    mode = pvproperty(value="Off", dtype=ChannelType.ENUM, enum_strings=["Off", "On", "Auto"])
    wave = pvproperty(value=[float(i) for i in range(8)], dtype=float, max_length=8)

    @counter.scan(period=0.2)
    async def counter(self, instance, async_lib):
        await instance.write(instance.value + 1)


if __name__ == "__main__":
    ioc = LabIOC(prefix=sys.argv[1])
    print("caproto IOC serving", sorted(ioc.pvdb), flush=True)
    run(ioc.pvdb)
