"""Byte-stream framing shared by the ground link and the payload bus (docs/framing.md).

    frame = COBS(body || CRC-16/CCITT-FALSE(body), big-endian) || 0x00

The CPython twin of firmware/payload/framing.py; both are tested against
tests/vectors/framing.json.
"""

from __future__ import annotations

import binascii
import zlib
from dataclasses import dataclass, field

import numpy as np

CRC_BYTES = 2
DROP_REASONS = ("oversize", "cobs", "crc", "short")


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, no final xor.

    binascii.crc_hqx is exactly this CRC (XMODEM's, from a chosen initial value), in C:
    the emulated payload bus moves megabytes through it."""
    return binascii.crc_hqx(data, 0xFFFF)


def crc32(data: bytes, value: int = 0) -> int:
    """CRC-32 as zlib (IEEE 802.3); the firmware's Crc32 gives the same numbers."""
    return zlib.crc32(data, value)


# Frames from this size on go through numpy: the pattern-memory port's 64 kB requests are
# half zero bytes, ~33,000 COBS blocks, and one Python step per block cost 5 ms to encode
# and 9 ms to decode each (docs/streaming.md). Smaller frames (the bus's registers, the
# ground link's packets) stay block by block, where numpy's per-call cost would dominate.
# Both paths give the same bytes (tests/test_framing.py checks them against the byte-wise
# reference, tests/cobs_reference.py): the wire format is the firmware's, unchanged.
VECTORISE_FROM_BYTES = 1024


def cobs_encode(data: bytes) -> bytes:
    data = bytes(data)
    if len(data) >= VECTORISE_FROM_BYTES:
        encoded = _cobs_encode_short_runs(data)
        if encoded is not None:
            return encoded
        return _cobs_encode_vectorised(data)
    return _cobs_encode_blocks(data)


def _cobs_encode_blocks(data: bytes) -> bytes:
    # Block by block over the zero-free runs (bytes.split is C-speed): a run of n bytes
    # is a code n+1 block whose implied zero is the split point; runs of 254 or more go
    # out as 0xFF blocks (no implied zero). A final run filling its 0xFF blocks exactly
    # needs no closing 0x01 block, as in the byte-wise encoder (firmware/payload/framing.py).
    out = bytearray()
    runs = data.split(b"\x00")
    last = len(runs) - 1
    for index, run in enumerate(runs):
        while len(run) >= 254:
            out.append(0xFF)
            out += run[:254]
            run = run[254:]
            if not run and index == last:
                return bytes(out)
        out.append(len(run) + 1)
        out += run
    return bytes(out)


def _cobs_encode_short_runs(data: bytes) -> bytes | None:
    """COBS of data whose zero-free runs are all shorter than 254 bytes, else None.

    Then every block ends at a zero (or at the end) and no 0xFF block occurs: the encoding
    is one code byte in front, then the data with each zero replaced by the distance to the
    next zero (or to one past the end)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    zeros = np.flatnonzero(raw == 0)
    marks = np.empty(zeros.size + 2, dtype=np.int64)  # -1, the zeros, len(data)
    marks[0] = -1
    marks[1:-1] = zeros
    marks[-1] = raw.size
    codes = np.diff(marks)
    if codes.max() > 254:
        return None
    out = np.empty(raw.size + 1, dtype=np.uint8)
    out[1:] = raw
    out[marks[:-1] + 1] = codes
    return out.tobytes()


def _cobs_encode_vectorised(data: bytes) -> bytes:
    """COBS of any data, in numpy: as _cobs_encode_short_runs, each zero (and the front)
    becomes the code of the block after it, and a zero-free run of 254 bytes or more is
    cut every 254 bytes by one more code byte inserted there (0xFF while 254 or more
    follow in the run, else what is left + 1); a last run that ends exactly at a cut
    needs no closing 0x01 block. The pattern-memory port's slot lists (u32 offsets above
    2^24: long zero-free runs) took 1.8 ms a 64 kB request block by block in Python."""
    raw = np.frombuffer(data, dtype=np.uint8)
    zeros = np.flatnonzero(raw == 0)
    starts = np.empty(zeros.size + 1, dtype=np.int64)  # each run's first byte
    starts[0] = 0
    starts[1:] = zeros + 1
    ends = np.empty(zeros.size + 1, dtype=np.int64)  # one past its last byte
    ends[:-1] = zeros
    ends[-1] = raw.size
    lengths = ends - starts
    out = np.empty(raw.size + 1, dtype=np.uint8)
    out[1:] = raw
    out[starts] = np.where(lengths >= 254, 0xFF, lengths + 1)  # the zero before each run
    cuts_per_run = lengths // 254
    if cuts_per_run[-1] and lengths[-1] % 254 == 0:
        cuts_per_run[-1] -= 1  # the last run ends at a cut: no closing block
    run = np.repeat(np.arange(lengths.size), cuts_per_run)
    if run.size == 0:
        return out.tobytes()
    # j = 1, 2, ... within each run
    first_of_run = np.cumsum(cuts_per_run) - cuts_per_run
    j = np.arange(run.size) - np.repeat(first_of_run, cuts_per_run) + 1
    left = lengths[run] - 254 * j
    codes = np.where(left >= 254, 0xFF, left + 1).astype(np.uint8)
    return np.insert(out, starts[run] + 254 * j + 1, codes).tobytes()


class CobsError(ValueError):
    pass


def cobs_decode(data: bytes) -> bytes:
    data = bytes(data)
    if len(data) >= VECTORISE_FROM_BYTES and 0 not in data:
        decoded = _cobs_decode_vectorised(data)
        if decoded is not None:
            return decoded
    return _cobs_decode_blocks(data)  # small frames, and the exact error of a bad one


def _cobs_decode_blocks(data: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(data):
        code = data[i]
        if code == 0:
            raise CobsError(f"zero byte at offset {i} inside a COBS block")
        end = i + code
        if end > len(data):
            raise CobsError(f"COBS code at offset {i} runs past the end ({len(data)} bytes)")
        block = data[i + 1 : end]
        if 0 in block:
            raise CobsError(f"zero byte inside COBS block starting at offset {i}")
        out += block
        i = end
        if code != 0xFF and i < len(data):
            out.append(0)
    return bytes(out)


def _cobs_decode_vectorised(data: bytes) -> bytes | None:
    """Decode zero-free data; None if its last block runs past the end.

    Only the walk from code to code is a Python loop (each code says where the next one
    is); the rest is numpy: a code byte sits exactly where its predecessor's implied zero
    goes, so it becomes that zero, or is dropped after a 0xFF block, and the first code
    is dropped."""
    size = len(data)
    starts = []
    append = starts.append
    at = 0
    while at < size:
        append(at)
        at += data[at]
    if at != size:
        return None
    raw = np.frombuffer(data, dtype=np.uint8)
    code_at = np.array(starts, dtype=np.int64)
    out = raw.copy()
    out[code_at] = 0
    keep = np.ones(size, dtype=bool)
    keep[0] = False
    keep[code_at[1:]] = raw[code_at[:-1]] != 0xFF
    return out[keep].tobytes()


def encode_frame(body: bytes) -> bytes:
    crc = crc16(body)
    return cobs_encode(body + bytes((crc >> 8, crc & 0xFF))) + b"\x00"


class FrameError(ValueError):
    """A received frame that was dropped; `reason` is one of DROP_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def decode_frame(encoded: bytes, max_body_bytes: int) -> bytes:
    """Decode one frame without its delimiter; raises FrameError with the drop reason."""
    if len(encoded) > max_body_bytes + CRC_BYTES + (max_body_bytes + CRC_BYTES) // 254 + 1:
        raise FrameError("oversize", f"{len(encoded)} encoded bytes")
    try:
        raw = cobs_decode(encoded)
    except CobsError as error:
        raise FrameError("cobs", str(error)) from None
    if len(raw) > max_body_bytes + CRC_BYTES:
        raise FrameError("oversize", f"{len(raw) - CRC_BYTES} body bytes > {max_body_bytes}")
    if len(raw) < CRC_BYTES + 1:
        raise FrameError("short", f"{len(raw)} bytes after decoding")
    body, received = raw[:-CRC_BYTES], int.from_bytes(raw[-CRC_BYTES:], "big")
    computed = crc16(body)
    if computed != received:
        raise FrameError("crc", f"received {received:#06x}, computed {computed:#06x}")
    return body


@dataclass
class FrameReader:
    """Splits a byte stream into frame bodies; counts what it drops, by reason.

    Feed it whatever a read returned (bulk, not a byte at a time); it returns the good
    bodies completed by that chunk. Bytes past max size are discarded up to the next
    delimiter, so corruption costs at most the frames it touched.
    """

    max_body_bytes: int
    frames_ok: int = 0
    drops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    last_error: FrameError | None = None
    _pending: bytearray = field(default_factory=bytearray)
    _overflowed: bool = False

    def feed(self, chunk: bytes) -> list[bytes]:
        bodies = []
        limit = self.max_body_bytes + CRC_BYTES + (self.max_body_bytes + CRC_BYTES) // 254 + 1
        start = 0
        while True:
            end = chunk.find(b"\x00", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if not self._overflowed:
                self._pending += piece
                if len(self._pending) > limit:
                    self._overflowed = True
                    self._pending.clear()
            if end < 0:
                return bodies
            start = end + 1
            if self._overflowed:
                self._overflowed = False
                self._count(FrameError("oversize", "frame exceeded the maximum size"))
                continue
            if not self._pending:
                continue  # idle delimiter
            encoded = bytes(self._pending)
            self._pending.clear()
            try:
                bodies.append(decode_frame(encoded, self.max_body_bytes))
                self.frames_ok += 1
            except FrameError as error:
                self._count(error)

    def new_stream(self) -> None:
        """A new connection starts: the old one's unfinished frame is dropped, never
        joined to the new stream's first bytes (the counters carry on)."""
        if self._pending or self._overflowed:
            self._count(FrameError("short", "the connection ended inside a frame"))
        self._pending.clear()
        self._overflowed = False

    def _count(self, error: FrameError) -> None:
        self.drops[error.reason] += 1
        self.last_error = error

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())
