"""Record logs (`.qrec`, docs/formats.md): the firmware's storage records and products.

    record = "QR" | version u8 | kind u8 | seq u32 | length u32 | payload | crc32 u32

The firmware writes them (firmware/payload/storage.py); this is the host's one reader and
one writer. A torn tail (power cut mid-write) ends the valid part: what precedes it is
returned, the rest is reported with its offset and reason, never silently used.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np

MAGIC = b"QR"
VERSION = 1
HEADER = struct.Struct("<2sBBII")
CRC = struct.Struct("<I")
MAX_PAYLOAD_BYTES = 1 << 24


class Kind(IntEnum):
    PATTERN_FRAME = 1
    TDC_BLOCK = 2
    HOUSEKEEPING = 3
    TRACKING = 4
    CLOCK_DISCIPLINE = 5
    RETIRED_PATTERN_SOURCE = 6  # a splitmix64 seed: refused (docs/formats.md)
    PATTERN_RUN = 7


@dataclass(frozen=True)
class Record:
    kind: int
    seq: int
    payload: bytes
    offset: int


@dataclass
class RecordLog:
    records: list[Record] = field(default_factory=list)
    valid_bytes: int = 0
    total_bytes: int = 0
    problem: str | None = None  # why reading stopped before the end, with the offset

    @property
    def complete(self) -> bool:
        return self.problem is None


def encode_record(kind: int, seq: int, payload: bytes) -> bytes:
    head = HEADER.pack(MAGIC, VERSION, int(kind), seq, len(payload)) + payload
    return head + CRC.pack(zlib.crc32(head))


def parse_records(data: bytes) -> RecordLog:
    log = RecordLog(total_bytes=len(data))
    offset = 0
    expected_seq = 0
    while offset < len(data):
        if len(data) - offset < HEADER.size + CRC.size:
            log.problem = f"offset {offset}: torn record ({len(data) - offset} bytes left)"
            break
        magic, version, kind, seq, length = HEADER.unpack_from(data, offset)
        if magic != MAGIC:
            log.problem = f"offset {offset}: bad magic {magic!r}"
            break
        if version != VERSION:
            log.problem = f"offset {offset}: record format version {version}, expected {VERSION}"
            break
        if length > MAX_PAYLOAD_BYTES:
            log.problem = f"offset {offset}: payload length {length} is implausible"
            break
        end = offset + HEADER.size + length
        if end + CRC.size > len(data):
            log.problem = f"offset {offset}: torn record (needs {end + CRC.size - offset} bytes)"
            break
        (stored_crc,) = CRC.unpack_from(data, end)
        if zlib.crc32(data[offset:end]) != stored_crc:
            log.problem = f"offset {offset}: CRC mismatch"
            break
        if seq != expected_seq:
            log.problem = f"offset {offset}: sequence {seq}, expected {expected_seq}"
            break
        log.records.append(Record(kind, seq, bytes(data[offset + HEADER.size : end]), offset))
        expected_seq += 1
        offset = end + CRC.size
        log.valid_bytes = offset
    return log


def read_records(path: str | Path) -> RecordLog:
    return parse_records(Path(path).read_bytes())


class RecordWriter:
    """Appends records to a file, continuing the sequence of the valid records in it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        existing = read_records(self.path) if self.path.exists() else RecordLog()
        if existing.problem:
            with open(self.path, "r+b") as handle:  # drop a torn tail before appending
                handle.truncate(existing.valid_bytes)
        self.next_seq = len(existing.records)

    def append(self, kind: int, payload: bytes) -> None:
        with open(self.path, "ab") as handle:
            handle.write(encode_record(kind, self.next_seq, payload))
        self.next_seq += 1


# ---------------------------------------------------------------- record payloads

PATTERN_HEAD = struct.Struct("<IQI")


@dataclass(frozen=True)
class PatternFrame:
    frame_number: int
    first_slot: int
    slot_count: int
    packed_symbols: bytes  # two slots per byte, slot 2k in the low nibble

    def encode(self) -> bytes:
        expected = (self.slot_count + 1) // 2
        if len(self.packed_symbols) != expected:
            raise ValueError(
                f"{len(self.packed_symbols)} packed bytes for {self.slot_count} slots"
            )
        return PATTERN_HEAD.pack(self.frame_number, self.first_slot, self.slot_count) + bytes(
            self.packed_symbols
        )

    @classmethod
    def decode(cls, payload: bytes) -> PatternFrame:
        if len(payload) < PATTERN_HEAD.size:
            raise ValueError(f"pattern frame payload of {len(payload)} bytes is too short")
        frame_number, first_slot, slot_count = PATTERN_HEAD.unpack_from(payload)
        packed = payload[PATTERN_HEAD.size :]
        if len(packed) != (slot_count + 1) // 2:
            raise ValueError(
                f"pattern frame {frame_number}: {len(packed)} packed bytes for {slot_count} slots"
            )
        return cls(frame_number, first_slot, slot_count, packed)


TDC_EVENT_DTYPE = np.dtype([("channel", "u1"), ("time_ps", "<u8")])
TDC_COUNT = struct.Struct("<I")


def encode_tdc_block(channels: np.ndarray, times_ps: np.ndarray) -> bytes:
    events = np.empty(len(channels), dtype=TDC_EVENT_DTYPE)
    events["channel"] = channels
    events["time_ps"] = times_ps
    return TDC_COUNT.pack(len(events)) + events.tobytes()


def decode_tdc_block(payload: bytes) -> np.ndarray:
    (count,) = TDC_COUNT.unpack_from(payload)
    body = payload[TDC_COUNT.size :]
    if len(body) != count * TDC_EVENT_DTYPE.itemsize:
        raise ValueError(f"TDC block says {count} events but holds {len(body)} bytes")
    return np.frombuffer(body, dtype=TDC_EVENT_DTYPE)
