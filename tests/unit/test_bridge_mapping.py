"""The CA-to-PVA bridge's mapping of CA types, alarms and time stamps to normative
types: pure, no network (the bridge itself is tested in tests/lab/test_bridge.py)."""

from __future__ import annotations

from typing import Any

import pytest
from caproto import ChannelType

from ioc_operator.gateways.bridge_nt import NTSpec, alarm_fields

NTSCALAR, NTARRAY, NTENUM = ("epics:nt/NTScalar:1.0", "epics:nt/NTScalarArray:1.0",
                             "epics:nt/NTEnum:1.0")


@pytest.mark.parametrize("native,count,type_id,code,meta", [
    (ChannelType.DOUBLE, 1, NTSCALAR, "d", True), (ChannelType.FLOAT, 1, NTSCALAR, "f", True),
    (ChannelType.LONG, 1, NTSCALAR, "i", True), (ChannelType.INT, 1, NTSCALAR, "h", True),
    (ChannelType.CHAR, 1, NTSCALAR, "B", True), (ChannelType.STRING, 1, NTSCALAR, "s", False),
    (ChannelType.ENUM, 1, NTENUM, None, False), (ChannelType.DOUBLE, 8, NTARRAY, "ad", True),
    (ChannelType.CHAR, 40, NTARRAY, "aB", True), (ChannelType.STRING, 3, NTARRAY, "as", False),
    (ChannelType.ENUM, 4, NTARRAY, "aH", True),
])
def test_type_mapping(native, count, type_id, code, meta):
    """Native CA type and element count -> NT (docs/ca-pva-bridge.md has the table)."""
    spec = NTSpec.for_channel(native, count)
    assert spec.type_id == type_id
    fields = set(spec.type.keys())
    if code is not None:
        assert spec.type["value"] == code
    assert {"alarm", "timeStamp"} <= fields
    assert ({"display", "control", "valueAlarm"} <= fields) == meta


@pytest.mark.parametrize("native", [ChannelType.STRING, ChannelType.INT, ChannelType.FLOAT,
                                    ChannelType.ENUM, ChannelType.CHAR, ChannelType.LONG,
                                    ChannelType.DOUBLE])
@pytest.mark.parametrize("count", [1, 5])
def test_time_decoder_matches_caproto(native, count):
    """The bridge decodes DBR_TIME monitor payloads from the bytes (NTSpec.time_decoder):
    the same value, alarm and stamp as caproto's message objects give."""
    import caproto as ca
    import numpy
    from caproto import field_types
    from caproto._commands import read_from_bytestream
    from caproto._dbr import DBR_TYPES

    spec = NTSpec.for_channel(native, count)
    time_type = field_types["time"][native]
    md = DBR_TYPES[time_type]()
    md.status, md.severity = 3, 2
    md.stamp.secondsSinceEpoch, md.stamp.nanoSeconds = 1_000_000_123, 456_789
    data: list[Any] = {
        ChannelType.STRING: [b"caf\xc3\xa9 %d" % i for i in range(count)],
        ChannelType.FLOAT: [1.5 * i - 2.25 for i in range(count)],
        ChannelType.DOUBLE: [1.5 * i - 2.25 for i in range(count)],
        ChannelType.CHAR: [200 + i for i in range(count)],
        ChannelType.ENUM: [3 * i for i in range(count)],
    }.get(native, [3 * i - 1 for i in range(count)])
    wire = bytearray(bytes(ca.EventAddResponse(data=data, data_type=time_type, data_count=count,
                                               status=1, subscriptionid=7, metadata=md)))
    _, message, _ = read_from_bytestream(memoryview(bytearray(wire)), ca.SERVER)
    want = (spec.value_of(message.data), message.metadata.severity, message.metadata.status,
            message.metadata.secondsSinceEpoch, message.metadata.nanoSeconds)
    got = spec.time_decoder()(wire, 16, len(wire), count)
    assert got is not None
    if isinstance(want[0], numpy.ndarray):
        assert numpy.array_equal(got[0], want[0]) and got[0].dtype.isnative
    else:
        assert got[0] == want[0]
    assert got[1:] == want[1:]
    assert spec.time_decoder()(wire, 16, 16 + 12, count) is None  # no room for the value
    if count == 1:
        assert spec.time_decoder()(wire, 16, len(wire), 2) is None  # not one element


def test_alarm_mapping():
    assert alarm_fields(0, 0) == {"alarm.severity": 0, "alarm.status": 0, "alarm.message": ""}
    assert alarm_fields(2, 3) == {"alarm.severity": 2, "alarm.status": 1,  # HIHI: DEVICE
                                  "alarm.message": "HIHI"}
    assert alarm_fields(3, 17)["alarm.status"] == 2  # UDF: DRIVER, as QSRV2 maps it
    assert alarm_fields(1, 99)["alarm.status"] == 6  # unknown: UNDEFINED
