"""CCSDS space packets with PUS-C secondary headers on the ground link
(docs/ground-link.md); the CPython twin of firmware/payload/ccsds.py and the telecommand
side of firmware/payload/telecommands.py. Tested against tests/vectors/ccsds.json, and
the telemetry against `spacepackets` (PusTm.unpack).

    TC: primary(6) | pus_version<<4|ack, service, subtype, source_id u16
        | application data | security counter u32 | HMAC-SHA256 tag[:16] | PEC CRC-16
    TM: primary(6) | pus_version<<4, service, subtype, message_counter u16,
        destination_id u16, time: seconds u32 + fraction/65536 u16 | source data
        | security counter u32 | HMAC-SHA256 tag[:16] | PEC

Both directions are tagged with the payload's link key; the packet type bit is under the
tag, so a packet of one direction never verifies as the other. Both carry a security
counter under the tag: the payload refuses a telecommand whose counter is not above the
last it accepted, and the ground (`TelemetryCounter`) refuses telemetry likewise, so a
recorded packet can be neither replayed nor reordered in either direction.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from host.protocol.framing import crc16

APID = 0x0C8
PUS_VERSION = 2
TM_HEADER_BYTES = 19
TC_HEADER_BYTES = 11
TAG_BYTES = 16
COUNTER_BYTES = 4
PEC_BYTES = 2
TM_TRAILER_BYTES = COUNTER_BYTES + TAG_BYTES + PEC_BYTES
TIMESTAMP_BYTES = 6
MAX_CHUNK_BYTES = 1024
GROUND_MAX_BODY_BYTES = 1200
ACK_ACCEPTANCE = 0x1

# A public key that the firmware never accepts (it has no built-in key); tests use it as
# the key an intruder would try.
DEVELOPMENT_KEY = hashlib.sha256(b"qkdsat development key, not for flight").digest()
# Counters above this are only for the rekey telecommand (firmware/payload/telecommands.py).
ORDINARY_COUNTER_MAX = 0xFFFFFEFF
REKEY_KEY_BYTES = 32
REKEY_LABEL = b"qkdsat rekey"

SVC_VERIFICATION = 1
SVC_HOUSEKEEPING = 3
SVC_FUNCTION = 8
SVC_TIME = 9
SVC_TEST = 17
SVC_PRODUCTS = 128

FN_CONFIGURE = 1
FN_START = 2
FN_STOP = 3
FN_REBOOT = 4
FN_MAINTENANCE = 5
FN_MAINTENANCE_ARM = 6
FN_REKEY = 7
FN_CODE_PUT = 8
FN_CODE_COMMIT = 9
FN_CODE_ACTIVATE = 10
# The code-update session closes this long after its last accepted command (and the
# maintenance telecommand is accepted this long after the arm one):
# firmware/payload/telecommands.py MAINTENANCE_WINDOW_US
CODE_SESSION_S = 60

REJECT_NAMES = (
    "",
    "short",
    "header",
    "length",
    "pec",
    "apid",
    "auth",
    "replay",
    "service",
    "argument",
    "product",
    "range",
    "state",
    "unavailable",
    "storage",
    "protected",
)
REJECT_REPLAY = 7
REJECT_PROTECTED = 15
# Rejections that mean the packet was damaged on the way (it passed the frame CRC by
# chance or by a cut that left a valid-looking frame): the request was lost, not refused.
TRANSPORT_REJECTIONS = frozenset({1, 2, 3, 4})


class PacketError(ValueError):
    """Telemetry that does not parse; the message says which field is wrong."""


class TagMismatch(PacketError):
    """Telemetry whose HMAC tag is wrong: forged, altered, or from another key."""


class TelemetryReplayed(PacketError):
    """Authentic telemetry whose security counter is not above the last one accepted: a
    replayed or reordered packet."""


class TelemetryCounter:
    """The ground's record of the payload's telemetry counter: `accept(tm)` passes a packet
    whose counter is above every one accepted before and raises TelemetryReplayed
    otherwise (counted in `refused`)."""

    def __init__(self, last: int | None = None):
        self.last = last  # None: nothing accepted yet
        self.refused = 0

    def accept(self, tm: Tm) -> Tm:
        if self.last is not None and tm.security_counter <= self.last:
            self.refused += 1
            raise TelemetryReplayed(
                f"telemetry security counter {tm.security_counter} is not above the last"
                f" accepted {self.last}: a replayed or reordered packet, refused"
            )
        self.last = tm.security_counter
        return tm


def hmac_tag(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()[:TAG_BYTES]


def build_tc(
    key: bytes,
    counter: int,
    service: int,
    subtype: int,
    app_data: bytes = b"",
    *,
    sequence_count: int = 0,
    source_id: int = 0,
    ack: int = ACK_ACCEPTANCE,
) -> bytes:
    """An authenticated telecommand packet (without framing)."""
    if not 0 < counter < 2**32:
        raise ValueError(f"security counter {counter} outside 1..2**32-1")
    length = TC_HEADER_BYTES + len(app_data) + COUNTER_BYTES + TAG_BYTES + PEC_BYTES
    head = struct.pack(
        ">HHHBBBH",
        0x1800 | APID,  # version 0, type TC, secondary header, APID
        0xC000 | (sequence_count & 0x3FFF),
        length - 7,
        (PUS_VERSION << 4) | (ack & 0xF),
        service,
        subtype,
        source_id,
    )
    signed = head + app_data + counter.to_bytes(4, "big")
    packet = signed + hmac_tag(key, signed)
    return packet + crc16(packet).to_bytes(2, "big")


def wrap_next_key(key: bytes, counter: int, next_key: bytes) -> bytes:
    """The rekey telecommand's argument: next_key XOR HMAC(key, REKEY_LABEL || counter),
    where counter is the rekey telecommand's own (each pad is used once)."""
    if len(next_key) != REKEY_KEY_BYTES:
        raise ValueError(f"next key: {len(next_key)} bytes, need {REKEY_KEY_BYTES}")
    pad = hmac.new(key, REKEY_LABEL + counter.to_bytes(4, "big"), hashlib.sha256).digest()
    return bytes(a ^ b for a, b in zip(next_key, pad, strict=True))


def request_id(tc: bytes) -> bytes:
    """What a verification report quotes: the TC's packet id and sequence control."""
    return bytes(tc[:4])


@dataclass(frozen=True)
class Tm:
    service: int
    subtype: int
    sequence_count: int
    message_counter: int
    destination_id: int
    time_seconds: int
    time_fraction: int
    data: bytes
    security_counter: int = 0

    @property
    def time_s(self) -> float:
        return self.time_seconds + self.time_fraction / 65536


def parse_tm(packet: bytes, key: bytes) -> Tm:
    """Check and decode one telemetry packet; PacketError names the field that is wrong
    (a wrong tag: \"HMAC tag\", the packet is not from a payload holding `key`)."""
    if len(packet) < TM_HEADER_BYTES + TM_TRAILER_BYTES:
        raise PacketError(f"telemetry packet of {len(packet)} bytes is shorter than its header")
    (packet_id, seq, data_length, pus, service, subtype, counter, dest, seconds, fraction) = (
        struct.unpack(">HHHBBBHHIH", packet[:TM_HEADER_BYTES])
    )
    if packet_id & 0xF800 != 0x0800:
        raise PacketError(f"packet id {packet_id:#06x} is not TM with a secondary header")
    if packet_id & 0x7FF != APID:
        raise PacketError(f"APID {packet_id & 0x7FF:#x}, expected {APID:#x}")
    if data_length + 7 != len(packet):
        raise PacketError(f"data length field {data_length} vs packet of {len(packet)} bytes")
    if pus >> 4 != PUS_VERSION:
        raise PacketError(f"PUS version {pus >> 4}")
    if crc16(packet[:-2]) != int.from_bytes(packet[-2:], "big"):
        raise PacketError("PEC (CRC-16) does not match")
    tag_at = len(packet) - TAG_BYTES - PEC_BYTES
    if not hmac.compare_digest(hmac_tag(key, packet[:tag_at]), packet[tag_at:-PEC_BYTES]):
        raise TagMismatch("HMAC tag does not match (not from a payload holding this key)")
    counter_at = tag_at - COUNTER_BYTES
    return Tm(
        service,
        subtype,
        seq & 0x3FFF,
        counter,
        dest,
        seconds,
        fraction,
        bytes(packet[TM_HEADER_BYTES:counter_at]),
        int.from_bytes(packet[counter_at:tag_at], "big"),
    )


def build_tm(
    key: bytes,
    service: int,
    subtype: int,
    data: bytes,
    *,
    sequence_count: int = 0,
    message_counter: int = 0,
    destination_id: int = 0,
    time_seconds: int = 0,
    time_fraction: int = 0,
    security_counter: int = 0,
) -> bytes:
    """Telemetry as the firmware builds it (for vectors and tests)."""
    length = TM_HEADER_BYTES + len(data) + TM_TRAILER_BYTES
    head = struct.pack(
        ">HHHBBBHHIH",
        0x0800 | APID,
        0xC000 | (sequence_count & 0x3FFF),
        length - 7,
        PUS_VERSION << 4,
        service,
        subtype,
        message_counter,
        destination_id,
        time_seconds,
        time_fraction,
    )
    packet = head + data + security_counter.to_bytes(COUNTER_BYTES, "big")
    packet += hmac_tag(key, packet)
    return packet + crc16(packet).to_bytes(2, "big")


@dataclass(frozen=True)
class Verification:
    """TM 1,1 (accepted) or 1,2 (rejected, with reason and detail)."""

    request: bytes
    accepted: bool
    code: int = 0
    detail: str = ""
    last_counter: int | None = None  # in replay rejections: the payload's last counter

    @property
    def damaged_in_transit(self) -> bool:
        return not self.accepted and self.code in TRANSPORT_REJECTIONS

    @property
    def reason(self) -> str:
        return REJECT_NAMES[self.code] if 0 < self.code < len(REJECT_NAMES) else f"{self.code}"


def parse_verification(tm: Tm) -> Verification:
    if tm.service != SVC_VERIFICATION or tm.subtype not in (1, 2) or len(tm.data) < 4:
        raise PacketError(f"TM {tm.service},{tm.subtype} is not a verification report")
    if tm.subtype == 1:
        return Verification(tm.data[:4], True)
    if len(tm.data) < 6:
        raise PacketError("rejection report without a reason code")
    code = int.from_bytes(tm.data[4:6], "big")
    if code == REJECT_REPLAY and len(tm.data) >= 10:
        return Verification(tm.data[:4], False, code, "", int.from_bytes(tm.data[6:10], "big"))
    return Verification(tm.data[:4], False, code, tm.data[6:].decode(errors="replace"))


def name_arg(name: str) -> bytes:
    raw = name.encode()
    if not 0 < len(raw) <= 48:
        raise ValueError(f"product name {name!r}: 1..48 bytes")
    return bytes([len(raw)]) + raw


def read_args(name: str, offset: int, length: int) -> bytes:
    return name_arg(name) + struct.pack(">IH", offset, length)


@dataclass(frozen=True)
class Chunk:
    offset: int
    data: bytes
    crc32: int


def parse_chunk(tm: Tm) -> Chunk:
    if len(tm.data) < 10:
        raise PacketError("chunk report shorter than its fields")
    offset, count, crc = struct.unpack(">IHI", tm.data[:10])
    if count != len(tm.data) - 10:
        raise PacketError(f"chunk says {count} bytes, carries {len(tm.data) - 10}")
    return Chunk(offset, tm.data[10:], crc)


@dataclass(frozen=True)
class ProductEntry:
    name: str
    size: int
    crc32: int


def parse_list(tm: Tm) -> tuple[int, int, int, list[ProductEntry]]:
    """(total products, start index, next page's index, entries) from TM 128,2."""
    data = tm.data
    if len(data) < 6:
        raise PacketError("product list shorter than its header")
    total, start, next_index = struct.unpack(">HHH", data[:6])
    if not start <= next_index <= total:
        raise PacketError(f"product list page {start}..{next_index} of {total}")
    entries = []
    at = 6
    while at < len(data):
        length = data[at]
        end = at + 1 + length + 8
        if end > len(data):
            raise PacketError(f"product list entry at byte {at} runs past the end")
        try:
            name = data[at + 1 : at + 1 + length].decode("ascii")
        except UnicodeDecodeError:
            raise PacketError(f"product list entry at byte {at}: name is not ASCII") from None
        size, crc = struct.unpack(">II", data[at + 1 + length : end])
        entries.append(ProductEntry(name, size, crc))
        at = end
    return total, start, next_index, entries


# ---------------------------------------------------------------- sealed product chunks
# Pattern products (names starting "patterns") are served only as TM 128,6, sealed with
# AES-256-GCM under the payload's product key (firmware/payload/aesgcm.py, docs/
# ground-link.md "Product encryption"). Computationally secure only: whoever breaks
# AES-256 or steals the product key reads Alice's raw data, and with it the keys made
# from that pass.

PROTECTED_PREFIX = "patterns"
SEALED_FIXED_BYTES = 34  # offset u32, count u16, nonce 12, tag 16
GCM_TAG_BYTES = 16


class ChunkRefused(PacketError):
    """A sealed chunk whose GCM tag does not verify (tampered, misplaced, wrong key)."""


@dataclass(frozen=True)
class SealedChunk:
    offset: int
    count: int
    nonce: bytes
    ciphertext_and_tag: bytes


def sealed_chunk_aad(name: str, offset: int, count: int) -> bytes:
    """GCM additional data: the chunk opens only as `name`'s bytes at `offset`."""
    return name_arg(name) + struct.pack(">IH", offset, count)


def parse_sealed_chunk(tm: Tm) -> SealedChunk:
    if len(tm.data) < SEALED_FIXED_BYTES:
        raise PacketError("sealed chunk shorter than its fields")
    offset, count = struct.unpack(">IH", tm.data[:6])
    if count != len(tm.data) - SEALED_FIXED_BYTES:
        raise PacketError(f"sealed chunk says {count} bytes, carries {len(tm.data) - 34}")
    return SealedChunk(offset, count, bytes(tm.data[6:18]), bytes(tm.data[18:]))


def open_sealed_chunk(product_key: bytes, name: str, sealed: SealedChunk) -> bytes:
    """The plaintext of a sealed chunk of product `name`; ChunkRefused if it does not
    authenticate."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aad = sealed_chunk_aad(name, sealed.offset, sealed.count)
    try:
        return AESGCM(product_key).decrypt(sealed.nonce, sealed.ciphertext_and_tag, aad)
    except InvalidTag:
        raise ChunkRefused(
            f"{name}: sealed chunk at offset {sealed.offset} does not authenticate"
        ) from None


def seal_chunk_data(product_key: bytes, name: str, offset: int, data: bytes, nonce: bytes):
    """TM 128,6 source data as the firmware builds it (vectors and tests)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aad = sealed_chunk_aad(name, offset, len(data))
    sealed = AESGCM(product_key).encrypt(nonce, data, aad)
    return struct.pack(">IH", offset, len(data)) + nonce + sealed
