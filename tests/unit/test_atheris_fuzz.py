"""Coverage-guided fuzzing (atheris, libFuzzer) of every parser of network input in the
CA gateway, the bridge and the name server, as a bounded run per target in CI.

Each test runs this file as a script in a subprocess (libFuzzer ends the process when
it is done) with one target, seeded with well-formed messages made by caproto and the
project's PVA codec; a target fails on any exception a parser may not raise, and on a
bound it breaks. libFuzzer prints the crashing input (hex) when one is found; the
finding then becomes a regression test in test_ca_gateway_fuzz.py or here.

    .venv/bin/python tests/unit/test_atheris_fuzz.py TARGET -max_total_time=600   # longer
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
SECONDS = 5  # per target in CI; the targets reach their coverage plateau within seconds


# ------------------------------------------------------------------ the targets
def _seeds() -> list[bytes]:
    import caproto as ca

    from ioc_operator.nameserver import pva

    return [
        bytes(ca.VersionRequest(0, 13)) + bytes(ca.SearchRequest("GW:ai", 1, 13)),
        bytes(ca.CreateChanRequest("GW:ai", 2, 13)),
        bytes(ca.ReadNotifyRequest(6, 1, 1, 3)) + bytes(ca.EventAddRequest(6, 1, 1, 4, 0, 0, 0, 1)),
        bytes(ca.WriteNotifyRequest([1.5], 6, 1, 1, 5)),
        struct.pack(">HHHHII", 1, 0xFFFF, 6, 0, 1, 1) + struct.pack(">II", 16, 2) + bytes(16),
        pva.encode_search(1, [(1, "A:x"), (2, "A:y")], 5076, big_endian=True),
        pva.encode_search(1, [(1, "A:x")], 5076, big_endian=False),
        pva.encode_search_response(b"G" * 12, 1, "198.18.16.2", 5075, [1, 2], big_endian=True),
        pva.connection_validated(False) + pva.echo(b"hi", False),
    ]


def target_ca_framing(data: bytes) -> None:
    """The CA framing every CA listener of the gateway and the name server uses."""
    from ioc_operator.gateways import ca_wire as w

    framer = w.StreamFramer(4096)
    cut = data[0] if data else 0
    for piece in (data[:cut], data[cut:]):
        try:
            framer.feed(piece, lambda *_m: None)
        except ValueError:  # a header claiming more than max_payload: the circuit closes
            return
        assert framer.pending() <= 4096 + w.EXTENDED_SIZE + len(piece)
    for _message in w.iter_datagram(data):
        pass
    name = w.pv_name(data)
    assert name is None or (0 < len(name.encode()) <= w.MAX_NAME and w.name_ok(name))


def target_name_server_ca(data: bytes) -> None:
    from ioc_operator.nameserver import ca

    _sequence, searches, _ignored = ca.parse_datagram(data)
    for search in searches:
        assert 0 < len(search.name) <= ca.MAX_NAME and search.name.isascii()
    ca.parse_confirmation(data)


def target_name_server_pva(data: bytes) -> None:
    from ioc_operator.nameserver import pva

    for head, payload in pva.iter_datagram(data):
        for big in (head.big_endian, not head.big_endian):
            try:
                request = pva.decode_search(payload, big)
                assert len(request.names) <= 65535
                assert all(0 < len(n) <= pva.MAX_NAME for _c, n in request.names)
            except pva.ProtocolError:
                pass
            with contextlib.suppress(pva.ProtocolError):
                pva.decode_search_response(payload, big)
    parser = pva.StreamParser(4096)
    try:
        parser.feed(data)
        assert parser.pending() <= 4096 + pva.HEADER + len(data)
    except pva.ProtocolError:
        pass


def target_bridge_decoders(data: bytes) -> None:
    """The bridge's short path for monitor updates: DBR_TIME payloads straight from the
    bytes the IOC sent, for every type and count."""
    import caproto as ca

    from ioc_operator.gateways.bridge_nt import NTSpec

    if len(data) < 3:
        return
    natives = (ca.ChannelType.DOUBLE, ca.ChannelType.FLOAT, ca.ChannelType.LONG,
               ca.ChannelType.INT, ca.ChannelType.CHAR, ca.ChannelType.STRING,
               ca.ChannelType.ENUM)
    native = natives[data[0] % len(natives)]
    count = 1 + data[1] % 16
    spec = NTSpec.for_channel(native, count)
    decode = spec.time_decoder()
    payload = bytearray(data[3:])
    # the caller (bridge_channel._on_raw_update) catches and logs these; anything else
    # would escape into caproto's selector thread
    with contextlib.suppress(struct.error, ValueError, IndexError):
        decode(payload, 0, len(payload), data[2] % 20)


_HARNESS: dict[str, object] = {}


def target_name_server_listeners(data: bytes) -> None:
    """The name server's four listeners (sans sockets), whatever comes."""
    sys.path.insert(0, str(HERE.parent))
    import test_name_server_hostile as nsh

    from ioc_operator.nameserver import server as srv

    loop = _HARNESS.setdefault("loop", asyncio.new_event_loop())
    assert isinstance(loop, asyncio.AbstractEventLoop)
    server = nsh.make_server(loop)
    for proto in (srv.CaUdp(server), srv.PvaUdp(server)):
        proto.connection_made(nsh.Transport())
        proto.datagram_received(data, nsh.CLIENT)
    for factory in (srv.CaCircuit, srv.PvaCircuit):
        circuit = factory(server)
        circuit.connection_made(nsh.Transport())
        circuit.data_received(data)
        circuit.connection_lost(None)
    nsh.drain(loop, server)
    nsh.bounded(server)


def target_gateway(data: bytes) -> None:
    """The CA gateway's client side and its IOC side (test_ca_gateway_fuzz's harness:
    caproto plays the IOC and parses everything the gateway writes)."""
    sys.path.insert(0, str(HERE.parent))
    import test_ca_gateway_fuzz as gwf

    loop = _HARNESS.setdefault("loop", asyncio.new_event_loop())
    assert isinstance(loop, asyncio.AbstractEventLoop)
    h = gwf.Harness(loop)
    client = h.client()
    client.send(gwf.create("GW:ai", 1) + gwf.create("GW:wave", 2))
    h.settle(2)
    client.send(data)
    h.udp.datagram_received(data, (gwf.CLIENT_HOST, 40001))
    h.settle(2)
    client.read()
    h.check()
    client.disconnect()
    h.check()


TARGETS: dict[str, Callable[[bytes], None]] = {
    "ca_framing": target_ca_framing,
    "name_server_ca": target_name_server_ca,
    "name_server_pva": target_name_server_pva,
    "name_server_listeners": target_name_server_listeners,
    "bridge_decoders": target_bridge_decoders,
    "gateway": target_gateway,
}


def _fuzz(name: str, libfuzzer_args: list[str]) -> None:
    import logging
    import tempfile

    import atheris

    logging.disable(logging.CRITICAL)  # rate-limited warnings are expected here
    with atheris.instrument_imports(include=["ioc_operator"]):
        import ioc_operator.gateways.bridge_nt
        import ioc_operator.gateways.ca_downstream
        import ioc_operator.gateways.ca_upstream
        import ioc_operator.gateways.ca_wire
        import ioc_operator.nameserver.ca
        import ioc_operator.nameserver.pva
        import ioc_operator.nameserver.server  # noqa: F401
    corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    for i, seed in enumerate(_seeds()):
        (corpus / f"seed{i}").write_bytes(seed)
    atheris.Setup([sys.argv[0], *libfuzzer_args, str(corpus)], TARGETS[name])
    atheris.Fuzz()


# ------------------------------------------------------------------ the tests
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz(target: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(HERE), target, f"-max_total_time={SECONDS}", "-rss_limit_mb=2048",
         f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"],
        capture_output=True, text=True, timeout=SECONDS * 6 + 60, cwd=tmp_path)
    tail = proc.stderr[-4000:]
    assert proc.returncode == 0, f"{target}: libFuzzer found a crash\n{tail}"
    runs = [line for line in proc.stderr.splitlines() if "stat::number_of_executed_units" in line]
    assert runs and int(runs[0].split(":")[-1]) > 100, tail  # it really ran
    print(f"{target}: {runs[0].split(':')[-1].strip()} inputs")


if __name__ == "__main__":
    _fuzz(sys.argv[1], sys.argv[2:])
