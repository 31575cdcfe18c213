"""Host CCSDS/PUS-C twin (host/protocol/ccsds.py) against the golden vectors the firmware
also passes, and against an independent parser: the `spacepackets` package."""

import hashlib
import hmac
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spacepackets.ecss.tc import PusTc
from spacepackets.ecss.tm import PusTm

from host.protocol import ccsds

VECTORS = json.loads((Path(__file__).parent / "vectors" / "ccsds.json").read_text())
KEY = bytes.fromhex(VECTORS["key"])


@pytest.mark.parametrize("case", VECTORS["tc"], ids=lambda c: c["note"])
def test_telecommands_match_vectors_and_parse_with_spacepackets(case):
    packet = ccsds.build_tc(
        KEY,
        case["counter"],
        case["service"],
        case["subtype"],
        bytes.fromhex(case["app_data"]),
        sequence_count=case["sequence_count"],
        source_id=case["source_id"],
        ack=case["ack"],
    )
    assert packet.hex() == case["packet"]
    tc = PusTc.unpack(packet)  # verifies the PEC too
    assert (tc.service, tc.message_subtype, tc.apid) == (case["service"], case["subtype"], 0x0C8)
    assert tc.seq_count == case["sequence_count"] and tc.source_id == case["source_id"]
    app_data = tc.app_data
    assert app_data[:-20] == bytes.fromhex(case["app_data"])
    assert int.from_bytes(app_data[-20:-16], "big") == case["counter"]
    signed = packet[:-18]
    assert app_data[-16:] == hmac.new(KEY, signed, hashlib.sha256).digest()[:16]


@pytest.mark.parametrize("case", VECTORS["tm"], ids=lambda c: c["note"])
def test_telemetry_matches_vectors_and_parses_with_spacepackets(case):
    packet = bytes.fromhex(case["packet"])
    tm = ccsds.parse_tm(packet, KEY)
    assert (tm.service, tm.subtype) == (case["service"], case["subtype"])
    assert tm.data.hex() == case["data"]
    assert tm.security_counter == case["security_counter"]
    built = ccsds.build_tm(
        KEY, case["service"], case["subtype"], bytes.fromhex(case["data"]),
        sequence_count=case["sequence_count"], message_counter=case["message_counter"],
        destination_id=case["destination_id"], time_seconds=case["time_seconds"],
        time_fraction=case["time_fraction"], security_counter=case["security_counter"],
    )  # fmt: skip
    assert built == packet
    theirs = PusTm.unpack(packet, timestamp_len=ccsds.TIMESTAMP_BYTES)
    assert (theirs.service, theirs.message_subtype, theirs.apid) == (tm.service, tm.subtype, 0x0C8)
    # spacepackets sees the counter and the tag as the last 20 bytes of the source data
    tag = hmac.new(KEY, packet[:-18], hashlib.sha256).digest()[:16]
    counter = case["security_counter"].to_bytes(4, "big")
    assert theirs.source_data == tm.data + counter + tag
    assert theirs.seq_count == case["sequence_count"]
    assert theirs.timestamp == case["time_seconds"].to_bytes(4, "big") + case[
        "time_fraction"
    ].to_bytes(2, "big")


@pytest.mark.parametrize("case", VECTORS["hmac_sha256_rfc4231"])
def test_hmac_vectors_are_rfc4231(case):
    key, data = bytes.fromhex(case["key"]), bytes.fromhex(case["data"])
    assert hmac.new(key, data, hashlib.sha256).hexdigest() == case["hmac"]


def test_damaged_telemetry_is_refused_with_the_field_named():
    packet = bytearray.fromhex(VECTORS["tm"][2]["packet"])
    with pytest.raises(ccsds.PacketError, match="PEC"):
        ccsds.parse_tm(bytes(packet[:-1]) + bytes([packet[-1] ^ 1]), KEY)
    with pytest.raises(ccsds.PacketError, match="data length"):
        ccsds.parse_tm(bytes(packet[:-3]) + bytes(packet[-2:]), KEY)
    with pytest.raises(ccsds.PacketError, match="APID"):
        ccsds.parse_tm(ccsds.build_tm(KEY, 1, 1, b"abcd")[:1] + b"\x00" + packet[2:], KEY)
    with pytest.raises(ccsds.PacketError, match="shorter"):
        ccsds.parse_tm(packet[:10], KEY)


def _fix_pec(packet: bytearray) -> bytes:
    packet[-2:] = ccsds.crc16(bytes(packet[:-2])).to_bytes(2, "big")
    return bytes(packet)


def test_telemetry_with_a_bad_hmac_is_refused():
    """A forger can build a packet whose CRCs all check; only the tag tells it apart."""
    for case in VECTORS["tm"]:
        packet = bytearray.fromhex(case["packet"])
        altered = bytearray(packet)
        altered[7] ^= 0x01  # another service, PEC recomputed
        bad_tag = bytearray(packet)
        bad_tag[-3] ^= 0x80  # last tag byte
        for forged in (_fix_pec(altered), _fix_pec(bad_tag)):
            with pytest.raises(ccsds.TagMismatch, match="HMAC tag"):
                ccsds.parse_tm(forged, KEY)
        with pytest.raises(ccsds.TagMismatch):
            ccsds.parse_tm(bytes(packet), ccsds.DEVELOPMENT_KEY)  # another payload's key
        # a telecommand reflected back never passes as telemetry, even with the right key
        tc = bytes.fromhex(VECTORS["tc"][0]["packet"])
        with pytest.raises(ccsds.PacketError):
            ccsds.parse_tm(tc, KEY)


def test_replayed_or_reordered_telemetry_is_refused_and_counted():
    """A captured packet sent again, or an older one after a newer, is authentic (its tag
    checks) but its counter is not above the last accepted: refused, with the reason."""
    first, second, third = (ccsds.parse_tm(bytes.fromhex(c["packet"]), KEY) for c in VECTORS["tm"])
    guard = ccsds.TelemetryCounter()
    assert guard.accept(first) is first and guard.accept(second) is second
    with pytest.raises(
        ccsds.TelemetryReplayed, match="counter 2 is not above the last accepted 2"
    ):
        guard.accept(second)  # the same packet again
    with pytest.raises(ccsds.TelemetryReplayed, match="replayed or reordered"):
        guard.accept(first)  # an older packet after a newer one
    assert guard.refused == 2 and guard.last == 2
    assert guard.accept(third) is third and guard.last == 0xFFFFFFFF


def test_counter_range_is_enforced():
    with pytest.raises(ValueError, match="counter"):
        ccsds.build_tc(KEY, 0, 17, 1)
    with pytest.raises(ValueError, match="counter"):
        ccsds.build_tc(KEY, 2**32, 17, 1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 255), st.integers(0, 255))
def test_any_telemetry_parses_or_raises_packet_error(data, service, subtype):
    """The ground side never crashes on what the link delivers: every parser either
    returns or raises PacketError (which the client counts and skips)."""
    for packet in (data, ccsds.build_tm(KEY, service, subtype, data)):
        try:
            tm = ccsds.parse_tm(packet, KEY)
        except ccsds.PacketError:
            continue
        for parse in (ccsds.parse_verification, ccsds.parse_chunk, ccsds.parse_list):
            try:
                parse(tm)
            except ccsds.PacketError:
                pass
