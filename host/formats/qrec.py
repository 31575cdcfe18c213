"""Record logs (`.qrec`, docs/formats.md): the firmware's storage records and products.

    record = "QR" | version u8 | kind u8 | seq u32 | length u32 | payload | crc32 u32

The firmware writes them (firmware/payload/storage.py); this is the host's one reader and
one writer. A torn record (power cut mid-write) or a corrupt one (bit flip) is skipped and
reported with its offset and reason, never returned; the records after it are kept.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np

from host.errors import BadInput

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
    PATTERN_CONFIG = 8  # JSON: the sequencer's configuration at a pass start (docs/formats.md)
    EMISSION_EPOCH = 9  # u32 mark index, u64 local_ps: the laser's sync marks (docs/formats.md)


@dataclass(frozen=True)
class Record:
    kind: int
    seq: int
    payload: bytes
    offset: int


@dataclass
class RecordLog:
    records: list[Record] = field(default_factory=list)
    valid_bytes: int = 0  # end of the last valid record
    total_bytes: int = 0
    problem: str | None = None  # the first thing not read as a record, with its offset
    skipped: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, bytes, why)
    missing_records: int = 0  # sequence numbers absent between valid records

    @property
    def complete(self) -> bool:
        return self.problem is None


def encode_record(kind: int, seq: int, payload: bytes) -> bytes:
    head = HEADER.pack(MAGIC, VERSION, int(kind), seq, len(payload)) + payload
    return head + CRC.pack(zlib.crc32(head))


def _record_at(data: bytes, offset: int, last_seq: int) -> tuple[int, str]:
    """(payload length, "") for a valid record at offset, else (-1, why not)."""
    if len(data) - offset < HEADER.size + CRC.size:
        return -1, f"torn record ({len(data) - offset} bytes left)"
    magic, version, _kind, seq, length = HEADER.unpack_from(data, offset)
    if magic != MAGIC:
        return -1, f"bad magic {magic!r}"
    if version != VERSION:
        return -1, f"record format version {version}, expected {VERSION}"
    if length > MAX_PAYLOAD_BYTES:
        return -1, f"payload length {length} is implausible"
    end = offset + HEADER.size + length
    if end + CRC.size > len(data):
        return -1, f"torn record (needs {end + CRC.size - offset} bytes)"
    (stored_crc,) = CRC.unpack_from(data, end)
    if zlib.crc32(data[offset:end]) != stored_crc:
        return -1, "CRC mismatch"
    if seq <= last_seq:
        return -1, f"sequence {seq} repeats (after {last_seq})"
    return length, ""


def parse_records(data: bytes) -> RecordLog:
    """Every valid record of a log. A torn or corrupt record (power cut, bit flip) is
    skipped and reported in `skipped`; reading resynchronises on the next record magic, as
    the firmware's recovery does (firmware/payload/storage.py), so one bad record costs
    that record only."""
    log = RecordLog(total_bytes=len(data))
    offset = 0
    last_seq = -1
    bad_from, bad_why = -1, ""
    resync = MAGIC + bytes([VERSION])
    while offset < len(data):
        length, why = _record_at(data, offset, last_seq)
        if length < 0:
            if bad_from < 0:
                bad_from, bad_why = offset, why
            found = data.find(resync, offset + 1)
            offset = len(data) if found < 0 else found
            continue
        if bad_from >= 0:
            log.skipped.append((bad_from, offset - bad_from, bad_why))
            bad_from = -1
        _, _, kind, seq, _ = HEADER.unpack_from(data, offset)
        if seq != last_seq + 1:
            log.missing_records += seq - last_seq - 1
            if log.problem is None:
                log.problem = f"offset {offset}: sequence {seq}, expected {last_seq + 1}"
        end = offset + HEADER.size + length
        log.records.append(Record(kind, seq, bytes(data[offset + HEADER.size : end]), offset))
        last_seq = seq
        offset = end + CRC.size
        log.valid_bytes = offset
    if bad_from >= 0:
        log.skipped.append((bad_from, len(data) - bad_from, bad_why))
    if log.skipped and (log.problem is None or log.skipped[0][0] < log.records[-1].offset):
        first = log.skipped[0]
        log.problem = f"offset {first[0]}: {first[2]} ({first[1]} bytes skipped)"
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
        self.next_seq = existing.records[-1].seq + 1 if existing.records else 0

    def append(self, kind: int, payload: bytes) -> None:
        with open(self.path, "ab") as handle:
            handle.write(encode_record(kind, self.next_seq, payload))
        self.next_seq += 1


class AppendedRecords:
    """A record log still being appended (a product the controller spools during the
    pass): each poll() returns the records made whole since the last one, in log order.
    A record whose bytes have not all come is one being written: it is waited for, not
    skipped. A whole record that fails its checks (magic, CRC, a repeated sequence) is
    skipped up to the next record magic, as parse_records does, once that magic has come.
    poll(final=True) (the writer has ended) reads what is left and skips a torn tail.
    Limit: a record whose length field was corrupted reads as one still being written
    until the writer ends."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset = 0  # bytes consumed: the end of the last record read or skipped
        self.last_seq = -1
        self.records_read = 0
        self.missing_records = 0  # sequence numbers absent between valid records
        self.skipped: list[tuple[int, int, str]] = []  # (offset, bytes, why)

    def poll(self, final: bool = False) -> list[Record]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []  # not created yet: the writer opens it at its first record
        except OSError as error:
            raise BadInput(f"{self.path}: cannot read ({error.strerror})") from None
        records, at = [], 0
        resync = MAGIC + bytes([VERSION])
        while at < len(data):
            length, why = _record_at(data, at, self.last_seq)
            if length < 0:
                if why.startswith("torn record") and not final:
                    break  # still being written
                found = data.find(resync, at + 1)
                if found < 0 and not final:
                    break  # the next record has not come: nothing to resynchronise on
                found = len(data) if found < 0 else found
                self.skipped.append((self.offset + at, found - at, why))
                at = found
                continue
            _, _, kind, seq, _ = HEADER.unpack_from(data, at)
            self.missing_records += seq - self.last_seq - 1
            end = at + HEADER.size + length
            records.append(
                Record(kind, seq, bytes(data[at + HEADER.size : end]), self.offset + at)
            )
            self.last_seq = seq
            at = end + CRC.size
        self.offset += at
        self.records_read += len(records)
        return records


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


def _read_log(path: Path) -> RecordLog:
    """read_records, an unreadable file being bad input naming it."""
    try:
        return read_records(path)
    except OSError as error:
        raise BadInput(f"{path}: cannot read ({error.strerror})") from None


def _of_kind(log: RecordLog, kind: Kind):
    return (record for record in log.records if record.kind == kind)


def read_tdc_events(path: str | Path) -> tuple[np.ndarray, np.ndarray, RecordLog]:
    """Every event of a TDC log (products/tdc.qrec: TDC_BLOCK records, what the
    controller's ring spooled) as (channel uint8, time_ps int64) in log order, with the
    log itself (its `problem`, `skipped` and `missing_records` say what was lost); a
    block that does not decode is bad input naming the file and the record."""
    path = Path(path)
    log = _read_log(path)
    channel, time_ps = tdc_events_of(path, log.records)
    return channel, time_ps, log


def tdc_events_of(path: Path, records) -> tuple[np.ndarray, np.ndarray]:
    """The events of a TDC log's TDC_BLOCK records (a whole log's, or those an
    AppendedRecords poll returned) as (channel uint8, time_ps int64) in log order; a block
    that does not decode is bad input naming the file and the record."""
    blocks = []
    for record in records:
        if record.kind != Kind.TDC_BLOCK:
            continue
        try:
            blocks.append(decode_tdc_block(record.payload))
        except (ValueError, struct.error) as error:
            raise BadInput(f"{path}: record {record.seq}: {error}") from None
    events = np.concatenate(blocks) if blocks else np.zeros(0, dtype=TDC_EVENT_DTYPE)
    return events["channel"].astype(np.uint8), events["time_ps"].astype(np.int64)


EMISSION_EPOCH_RECORD = struct.Struct("<IQ")  # mark index since the pass start, local_ps


def read_emission_epochs(path: str | Path) -> tuple[np.ndarray, np.ndarray, RecordLog]:
    """The emission epochs of an epochs log (products/epochs.qrec: EMISSION_EPOCH
    records, the firmware's EmissionEpochs) as (mark index int64, local_ps int64) in log
    order, with the log itself; a record of the wrong size is bad input naming the file
    and the record."""
    path = Path(path)
    log = _read_log(path)
    marks = []
    for record in _of_kind(log, Kind.EMISSION_EPOCH):
        if len(record.payload) != EMISSION_EPOCH_RECORD.size:
            raise BadInput(
                f"{path}: record {record.seq}: an emission epoch of {len(record.payload)} "
                f"bytes (expected {EMISSION_EPOCH_RECORD.size})"
            )
        marks.append(EMISSION_EPOCH_RECORD.unpack(record.payload))
    table = np.array(marks, dtype=np.int64).reshape(-1, 2)
    return table[:, 0], table[:, 1], log
