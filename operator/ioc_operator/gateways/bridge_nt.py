"""Channel Access DBR types to PVA Normative Types, for the CA-to-PVA bridge.

Pure functions and small value objects, no I/O: which NT a CA channel becomes
(`NTSpec.for_channel`), its metadata fields from a DBR_CTRL reply (`metadata_fields`),
the first value (`NTSpec.initial`), an update's value from a DBR_TIME reply
(`NTSpec.value_of`, or straight from the message's bytes: `NTSpec.time_decoder`) and
what a PVA put becomes on the CA side (`NTSpec.put_data`). See docs/ca-pva-bridge.md for the table.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy
from caproto import ChannelType, field_types
from caproto._dbr import DBR_TYPES
from p4p import Type, Value
from p4p.nt import NTEnum, NTScalar

__all__ = [
    "ALARM_MESSAGES",
    "ALARM_STATUS",
    "POSIX_TIME_AT_EPICS_EPOCH",
    "NTSpec",
    "TimeUpdate",
    "alarm_fields",
    "metadata_fields",
]

# CA timestamps count from 1990-01-01; PVA's timeStamp.secondsPastEpoch from 1970-01-01.
POSIX_TIME_AT_EPICS_EPOCH = 631152000

# epicsAlarmConditionStrings, indexed by the CA alarm status (0 = NO_ALARM).
ALARM_MESSAGES: tuple[str, ...] = (
    "NO_ALARM", "READ", "WRITE", "HIHI", "HIGH", "LOLO", "LOW", "STATE", "COS", "COMM",
    "TIMEOUT", "HWLIMIT", "CALC", "SCAN", "LINK", "SOFT", "BAD_SUB", "UDF", "DISABLE",
    "SIMM", "READ_ACCESS", "WRITE_ACCESS",
)
# CA alarm status -> PVA alarm.status (NONE 0, DEVICE 1, DRIVER 2, RECORD 3, DB 4, CONF 5,
# UNDEFINED 6, CLIENT 7). The same grouping as QSRV2 (pvxs ioc/iocsource.cpp), so a bridged
# CA-only IOC reports alarms as an EPICS 7 IOC with QSRV would.
ALARM_STATUS: tuple[int, ...] = (
    0,  # NO_ALARM
    1, 1, 1, 1, 1, 1, 1, 1,  # READ WRITE HIHI HIGH LOLO LOW STATE COS
    2, 2,  # COMM TIMEOUT
    1,  # HWLIMIT
    3, 3, 3, 3, 3,  # CALC SCAN LINK SOFT BAD_SUB
    2,  # UDF
    4, 4, 4, 4,  # DISABLE SIMM READ_ACCESS WRITE_ACCESS
)
UNDEFINED_STATUS = 6

# display.form choices, as QSRV2 publishes them; the bridge always says "Default" (0).
FORM_CHOICES = ["Default", "String", "Binary", "Decimal", "Hex", "Exponential", "Engineering"]

# Native CA type -> p4p type code of the value field (prefix "a" for arrays).
# DBR_CHAR is epicsUInt8 on the wire, DBR_ENUM arrays epicsUInt16 indices.
_CODES: dict[ChannelType, str] = {
    ChannelType.STRING: "s",
    ChannelType.INT: "h",
    ChannelType.FLOAT: "f",
    ChannelType.ENUM: "H",
    ChannelType.CHAR: "B",
    ChannelType.LONG: "i",
    ChannelType.DOUBLE: "d",
}
_FLOATING = {ChannelType.FLOAT, ChannelType.DOUBLE}
# One value on the wire (big-endian): struct code and numpy dtype.
_WIRE: dict[ChannelType, tuple[str, str]] = {
    ChannelType.STRING: ("40s", "S40"),
    ChannelType.INT: ("h", ">i2"),
    ChannelType.FLOAT: ("f", ">f4"),
    ChannelType.ENUM: ("H", ">u2"),
    ChannelType.CHAR: ("B", "u1"),
    ChannelType.LONG: ("i", ">i4"),
    ChannelType.DOUBLE: ("d", ">f8"),
}
# What a decoded DBR_TIME update is: (PVA value, severity, status, CA seconds, nanoseconds).
TimeUpdate = tuple[Any, int, int, int, int]
_ENUM_DISPLAY = [("display", ("S", None, [("description", "s")]))]
_STRING_ENCODING = "utf-8"  # PVA strings are UTF-8; CA strings are bytes, usually ASCII


def _text(raw: bytes | str) -> str:
    """A CA string (bytes, NUL-padded) as text; undecodable bytes become U+FFFD."""
    if isinstance(raw, str):
        return raw
    return raw.split(b"\0", 1)[0].decode(_STRING_ENCODING, errors="replace")


def _ca_string(text: Any) -> bytes:
    """A PVA string for a DBR_STRING: UTF-8, cut to 39 bytes on a character boundary
    (CA strings are 40 bytes with their NUL; caproto would cut at 40 and drop the NUL)."""
    raw = str(text).encode(_STRING_ENCODING)[:39]
    return raw.decode(_STRING_ENCODING, errors="ignore").encode(_STRING_ENCODING)


def alarm_fields(severity: int, status: int) -> dict[str, Any]:
    """alarm.* of one CA (severity, status) pair."""
    if status == 0:
        return {"alarm.severity": severity, "alarm.status": 0, "alarm.message": ""}
    if 0 < status < len(ALARM_STATUS):
        return {"alarm.severity": severity, "alarm.status": ALARM_STATUS[status],
                "alarm.message": ALARM_MESSAGES[status]}
    return {"alarm.severity": severity, "alarm.status": UNDEFINED_STATUS,
            "alarm.message": f"status {status}"}


@dataclass(frozen=True)
class NTSpec:
    """How one CA channel (native type and element count) is served over PVA."""

    native: ChannelType
    count: int
    kind: str  # "scalar", "array", "enum" or "string"
    type: Type

    @property
    def time_dbr(self) -> int:
        """The DBR_TIME_* type id of this channel's updates (compared on the hot path
        as a plain int, without building a ChannelType)."""
        return int(field_types["time"][self.native])

    @classmethod
    def for_channel(cls, native: ChannelType | int, count: int) -> NTSpec:
        """The NT for a channel: NTEnum for a scalar DBR_ENUM, NTScalarArray when the
        channel has more than one element, otherwise NTScalar."""
        native = ChannelType(native)
        array = count > 1
        if native == ChannelType.ENUM and not array:
            # display.description as QSRV2's NTEnum has it (pvxs nt.cpp)
            return cls(native, count, "enum", NTEnum.buildType(extra=_ENUM_DISPLAY))
        code = ("a" if array else "") + _CODES[native]
        if native == ChannelType.STRING and not array:
            return cls(native, count, "string", NTScalar.buildType(code, display=True))
        numeric = native != ChannelType.STRING
        nt_type = NTScalar.buildType(code, display=True, control=numeric,
                                     valueAlarm=numeric, form=numeric)
        return cls(native, count, "array" if array else "scalar", nt_type)

    @property
    def type_id(self) -> str:
        return self.type.getID()

    @property
    def value_key(self) -> str:
        """The field an update sets: ``value`` (``value.index`` for NTEnum)."""
        return "value.index" if self.kind == "enum" else "value"

    def time_decoder(self) -> Callable[[bytearray, int, int, int], TimeUpdate | None]:
        """A decoder for this channel's DBR_TIME_* monitor payloads, straight from the
        received bytes: ``decode(buf, start, end, count)`` with the payload at
        ``buf[start:end]`` and ``count`` elements (from the CA header) returns the PVA
        value (as `value_of` would), severity, status, seconds and nanoseconds, or None if
        the payload is not what this spec expects (the caller then takes caproto's path).

        The payload is caproto's DBR_TIME_* struct (status, severity, stamp, padding that
        aligns the value) then the value(s), big-endian. One ``struct`` call for a scalar
        instead of caproto's message object, ctypes metadata and numpy array per update.
        """
        md_size = ctypes.sizeof(DBR_TYPES[field_types["time"][self.native]])
        code, dtype = _WIRE[self.native]
        kind = self.kind
        if kind != "array":  # scalar, enum, string: exactly one element
            fmt = struct.Struct(f">hhII{md_size - 12}x{code}" if md_size > 12 else f">hhII{code}")
            unpack_from, size = fmt.unpack_from, fmt.size

            def scalar(buf: bytearray, start: int, end: int, count: int) -> TimeUpdate | None:
                if count != 1 or end - start < size:
                    return None
                status, severity, seconds, nanoseconds, value = unpack_from(buf, start)
                if kind == "string":
                    value = _text(value)
                return value, severity, status, seconds, nanoseconds

            return scalar

        head = struct.Struct(">hhII")
        wire = numpy.dtype(dtype)
        native = wire.newbyteorder("=")
        strings = self.native == ChannelType.STRING

        def array(buf: bytearray, start: int, end: int, count: int) -> TimeUpdate | None:
            if end - start < md_size + count * wire.itemsize:
                return None
            status, severity, seconds, nanoseconds = head.unpack_from(buf, start)
            first = start + md_size
            if strings:
                value: Any = [_text(bytes(buf[first + 40 * i:first + 40 * (i + 1)]))
                              for i in range(count)]
            else:  # a native-order copy: p4p stores it as is, and it keeps no buffer alive
                value = numpy.frombuffer(buf, wire, count, first).astype(native)
            return value, severity, status, seconds, nanoseconds

        return array

    # ------------------------------------------------------------------ CA -> PVA
    def value_of(self, data: Any) -> Any:
        """The PVA value field of a CA reply's data (a numpy array or a list of bytes)."""
        if self.kind == "enum":
            return int(data[0])  # stored in value.index
        if self.kind == "string":
            return _text(data[0]) if len(data) else ""
        if self.kind == "scalar":
            return data[0] if len(data) else 0
        if self.native == ChannelType.STRING:
            return [_text(item) for item in data]
        return data  # numpy array: p4p copies it without a Python loop

    def initial(self, metadata: dict[str, Any], value: Any, severity: int, status: int,
                seconds: int, nanoseconds: int) -> Value:
        """The complete first value (SharedPV.open() stores only marked fields); `value`
        as `value_of` gives it. Later updates fill a reused Value field by field
        (bridge_channel.BridgeChannel._deliver)."""
        fields: dict[str, Any] = {
            self.value_key: value,
            "timeStamp.secondsPastEpoch": seconds + POSIX_TIME_AT_EPICS_EPOCH,
            "timeStamp.nanoseconds": nanoseconds,
            **alarm_fields(severity, status),
        }
        out = Value(self.type, fields)
        for key, item in metadata.items():
            out[key] = item
        return out

    # ------------------------------------------------------------------ PVA -> CA
    def put_data(self, value: Value) -> list[Any] | numpy.ndarray:
        """What to write over CA for a PVA put: a list (scalars) or a numpy array."""
        if self.kind == "enum":
            if not value.changed("value.index"):
                raise ValueError("put to an NTEnum must set value.index")
            return [int(value["value.index"])]
        if not value.changed("value"):
            raise ValueError("put must set the value field")
        item = value["value"]
        if self.kind == "string":
            return [_ca_string(item)]
        if self.kind == "scalar":
            return [item]
        if self.native == ChannelType.STRING:
            return [_ca_string(s) for s in item]
        return numpy.asarray(item)


def _number(raw: Any) -> Any:
    """A DBR_CTRL limit as a number: ctypes hands DBR_CTRL_CHAR's c_char limits out as a
    one-byte bytes object, the other types' limits as int or float."""
    if isinstance(raw, bytes):
        return raw[0] if raw else 0
    return raw


def metadata_fields(spec: NTSpec, ctrl: Any) -> dict[str, Any]:
    """display/control/valueAlarm (or value.choices) fields from a DBR_CTRL_* reply."""
    if spec.kind == "enum":
        return {"value.choices": [_text(s) for s in ctrl.enum_strings],
                "display.description": ""}
    if spec.native == ChannelType.STRING:
        # DBR_CTRL_STRING carries only status and severity.
        return {"display.description": "", "display.units": ""}
    if spec.native == ChannelType.ENUM:  # enum array: indices, no limits in CA
        return {"display.units": "", "display.form.choices": FORM_CHOICES}
    return {
        "display.limitLow": _number(ctrl.lower_disp_limit),
        "display.limitHigh": _number(ctrl.upper_disp_limit),
        "display.description": "",  # CA has no description field in DBR_CTRL
        "display.units": _text(ctrl.units),
        "display.precision": int(ctrl.precision) if spec.native in _FLOATING else 0,
        "display.form.index": 0,
        "display.form.choices": FORM_CHOICES,
        "control.limitLow": _number(ctrl.lower_ctrl_limit),
        "control.limitHigh": _number(ctrl.upper_ctrl_limit),
        "control.minStep": 0,
        "valueAlarm.active": False,  # the IOC evaluates alarms; the bridge only reports
        "valueAlarm.lowAlarmLimit": _number(ctrl.lower_alarm_limit),
        "valueAlarm.lowWarningLimit": _number(ctrl.lower_warning_limit),
        "valueAlarm.highWarningLimit": _number(ctrl.upper_warning_limit),
        "valueAlarm.highAlarmLimit": _number(ctrl.upper_alarm_limit),
    }
