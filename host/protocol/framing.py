"""Byte-stream framing shared by the ground link and the payload bus (docs/framing.md).

    frame = COBS(body || CRC-16/CCITT-FALSE(body), big-endian) || 0x00

The CPython twin of firmware/payload/framing.py; both are tested against
tests/vectors/framing.json.
"""

from __future__ import annotations

import binascii
import zlib
from dataclasses import dataclass, field

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


def cobs_encode(data: bytes) -> bytes:
    # Block by block over the zero-free runs (bytes.split is C-speed): a run of n bytes
    # is a code n+1 block whose implied zero is the split point; runs of 254 or more go
    # out as 0xFF blocks (no implied zero). A final run filling its 0xFF blocks exactly
    # needs no closing 0x01 block, as in the byte-wise encoder (firmware/payload/framing.py).
    out = bytearray()
    runs = bytes(data).split(b"\x00")
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


class CobsError(ValueError):
    pass


def cobs_decode(data: bytes) -> bytes:
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
