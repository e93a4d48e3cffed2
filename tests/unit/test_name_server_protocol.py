"""The name server's search framing: CA checked against caproto's own decoder, PVA
against the bytes pvxs sends (docs in name-service-facts) and by round trips in both
byte orders."""

from __future__ import annotations

import struct

import caproto as ca
import pytest
from caproto._commands import read_datagram, read_from_bytestream

from ioc_operator.nameserver import ca as nca
from ioc_operator.nameserver import pva

IOC_IP = "198.18.16.3"


# ------------------------------------------------------------------------------- CA
def test_udp_reply_names_another_server_as_caproto_reads_it():
    datagram = nca.pack_datagrams(77, [nca.search_reply_udp(nca.ip_number(IOC_IP), 5070, 9)])
    assert len(datagram) == 1
    version, reply = read_datagram(datagram[0], ("198.18.0.1", 5064), ca.SERVER)
    assert isinstance(version, ca.VersionResponse) and version.version == 13
    assert isinstance(reply, ca.SearchResponse)
    assert (reply.cid, ca.extract_address(reply)) == (9, (IOC_IP, 5070))


def test_tcp_reply_is_rsrvs_layout_with_the_iocs_address():
    data = nca.version() + nca.search_reply_tcp(nca.ip_number(IOC_IP), 5064, 3)
    header = struct.unpack(">HHHHII", data[16:32])
    # command 6, no payload, data_type = port, count 0, p1 = IOC address, p2 = cid
    assert header == (6, 0, 5064, 0, nca.ip_number(IOC_IP), 3)
    assert struct.unpack(">HHHHII", data[:16])[3] == 13  # VERSION minor 13 first


def test_searches_from_a_libca_style_datagram():
    request = bytes(ca.VersionRequest(0, 13)) + b"".join(
        bytes(ca.SearchRequest(f"A:{i}", i, 13)) for i in range(30))
    _sequence, searches, ignored = nca.parse_datagram(request)
    assert ignored == 0
    assert [(s.name, s.cid, s.reply) for s in searches] == [(f"A:{i}", i, False)
                                                           for i in range(30)]


def test_stream_search_of_libca_with_do_reply_gets_not_found():
    message = bytes(ca.SearchRequest("X:y", 12, 13, reply=ca.DO_REPLY))
    _command, _size, data_type, count, p1, _p2 = struct.unpack(">HHHHII", message[:16])
    search = nca.stream_search(data_type, count, p1, message[16:])
    assert search is not None and search.reply
    buffer = bytearray(nca.not_found(search))
    _, command_read, _ = read_from_bytestream(buffer, ca.SERVER)
    assert isinstance(command_read, ca.NotFoundResponse)
    assert command_read.cid == 12


@pytest.mark.parametrize("payload", [b"", b"\0\0\0\0", b"a\x01b\0\0\0\0\0", b"\xff\xfe\0\0",
                                     b"x" * (nca.MAX_NAME + 1)])
def test_names_that_cannot_be_pv_names_are_refused(payload):
    assert nca.decode_name(payload) is None


def test_replies_are_split_below_the_mtu_and_each_starts_with_the_sequence():
    messages = [nca.search_reply_udp(1, 5064, i) for i in range(200)]
    datagrams = nca.pack_datagrams(5, messages)
    assert len(datagrams) > 1
    for datagram in datagrams:
        assert len(datagram) <= nca.MAX_REPLY_DATAGRAM
        first = read_datagram(datagram, ("198.18.0.1", 5064), ca.SERVER)[0]
        assert isinstance(first, ca.VersionResponse)
    assert sum((len(d) - 16) // 24 for d in datagrams) == 200


def test_confirmation_search_and_replies_round_trip_through_caproto():
    datagram = nca.confirmation_datagrams(3, [nca.search_request("T1:value", 41)])[0]
    _version, search = read_datagram(datagram, ("198.18.0.1", 40000), ca.CLIENT)
    assert isinstance(search, ca.SearchRequest)
    assert (search.name, search.cid, search.reply) == ("T1:value", 41, ca.DO_REPLY)
    found = bytes(ca.VersionResponse(13)) + bytes(ca.SearchResponse(5064, None, 41, 13))
    missing = bytes(ca.NotFoundResponse(13, 42))
    assert nca.parse_confirmation(found + missing) == [(41, True), (42, False)]


def test_beacon_fields_as_caproto_reads_them():
    (beacon,) = read_datagram(nca.beacon(nca.ip_number(IOC_IP), 5070, 9),
                              ("198.18.0.1", 5065), ca.SERVER)
    assert isinstance(beacon, ca.Beacon)
    assert (beacon.address, beacon.server_port, beacon.beacon_id) == (IOC_IP, 5070, 9)


# ------------------------------------------------------------------------------ PVA
def test_connection_set_up_bytes_are_what_pvxs_clients_accepted():
    # name-service-facts: SET_BYTE_ORDER ca 02 c1 02 00000000, then the validation
    # request with buffer 0x10000, registry 0x7fff and "anonymous"
    assert pva.set_byte_order(True).hex() == "ca02c10200000000"
    request = pva.connection_validation_request(True)
    assert request[:4].hex() == "ca02c001"
    assert request[8:].hex() == "00010000" + "7fff" + "01" + "09" + b"anonymous".hex()
    assert struct.unpack(">I", request[4:8])[0] == len(request) - 8
    assert pva.connection_validated(True).hex() == "ca02c00900000001ff"


@pytest.mark.parametrize("big_endian", [True, False])
def test_search_round_trip(big_endian):
    names = [(i, f"PV:{i}") for i in range(300)]  # 300 > 253: the long size form
    message = pva.encode_search(0x01020304, names, 40123, big_endian=big_endian)
    (head, payload), = pva.iter_datagram(message)
    assert head.command == pva.SEARCH and head.big_endian is big_endian
    request = pva.decode_search(payload, head.big_endian)
    assert request.sequence == 0x01020304 and request.reply_port == 40123
    assert request.reply_address is None and request.tcp and request.must_reply
    assert request.names == names


@pytest.mark.parametrize("big_endian", [True, False])
def test_search_response_round_trip(big_endian):
    guid = bytes(range(12))
    message = pva.encode_search_response(guid, 7, IOC_IP, 5081, [1, 2, 3],
                                         big_endian=big_endian)
    (head, payload), = pva.iter_datagram(message)
    assert head.command == pva.SEARCH_RESPONSE and head.flags & pva.FLAG_SERVER
    response = pva.decode_search_response(payload, head.big_endian)
    assert (response.guid, response.sequence, response.address, response.port,
            response.protocol, response.found, response.cids) == (
        guid, 7, IOC_IP, 5081, b"tcp", True, [1, 2, 3])
    assert len(message) == pva.response_size(3)


def test_search_response_address_is_ipv4_mapped_and_any_is_zero():
    message = pva.encode_search_response(b"g" * 12, 1, IOC_IP, 5075, [9], big_endian=True)
    assert message[8 + 16:8 + 32] == bytes(10) + b"\xff\xff" + bytes([198, 18, 16, 3])
    anyone = pva.encode_search_response(b"g" * 12, 1, None, 5075, [], big_endian=True,
                                        found=False)
    assert pva.decode_search_response(anyone[8:], True).address is None


def test_a_little_endian_search_from_pvxs_decodes():
    # One name, as a pvxs client on x86 lays it out (flags 0x00: client, LSB first).
    body = (struct.pack("<IB3x", 5, 0x80) + bytes(10) + b"\xff\xff" + bytes(4)
            + struct.pack("<H", 41000) + b"\x01\x03tcp" + struct.pack("<H", 1)
            + struct.pack("<I", 0x11223344) + b"\x07ABC:def")
    message = struct.pack("<BBBBI", 0xCA, 2, 0x00, 3, len(body)) + body
    (head, payload), = pva.iter_datagram(message)
    request = pva.decode_search(payload, head.big_endian)
    assert request.names == [(0x11223344, "ABC:def")] and not request.must_reply


def test_stream_parser_splits_and_keeps_partial_messages():
    parser = pva.StreamParser()
    data = pva.set_byte_order(True) + pva.echo(b"hello", True) + pva.echo(b"x" * 10, True)
    messages = []
    for i in range(0, len(data), 3):
        messages += parser.feed(data[i:i + 3])
    assert [(h.command, h.control, p) for h, p in messages] == [
        (2, True, b""), (2, False, b"hello"), (2, False, b"x" * 10)]
    assert parser.pending() == 0


def test_stream_parser_refuses_oversized_and_foreign_bytes():
    parser = pva.StreamParser(max_message=1024)
    with pytest.raises(pva.ProtocolError):
        parser.feed(struct.pack(">BBBBI", 0xCA, 2, 0x80, 3, 1 << 20))
    with pytest.raises(pva.ProtocolError):
        pva.StreamParser().feed(b"GET / HTTP/1.1\r\n\r\n")


def test_names_over_the_limit_are_counted_not_decoded():
    names = [(i, f"N{i}") for i in range(50)] + [(99, "bad\x01name")]
    message = pva.encode_search(1, names, 1, big_endian=True)
    request = pva.decode_search(message[8:], True, max_names=20)
    assert len(request.names) == 20 and request.skipped == 31
    request = pva.decode_search(message[8:], True)
    assert len(request.names) == 50 and request.skipped == 1
