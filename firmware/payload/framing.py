# Byte-stream framing shared by the ground link and the payload bus (docs/framing.md):
#   frame = COBS(body || CRC-16/CCITT-FALSE(body), big-endian) || 0x00
# COBS removes every zero from the encoded bytes, so 0x00 marks frame ends and a receiver
# resynchronises after any corruption at the next zero. The CPython twin is
# host/protocol/framing.py; both are tested against tests/vectors/framing.json.
#
# Kernels are viper over caller-provided buffers: no allocation per byte or per frame.
import array
import sys

import micropython
from micropython import const

_CRC16_INIT = const(0xFFFF)
_CRC16_POLY = const(0x1021)
CRC_BYTES = const(2)


# CRCs are table-driven (one lookup per byte instead of eight shift/xor steps: on the
# Cortex-M3 the bitwise viper loops cost 315 (CRC-16) and 381 (CRC-32) instructions a
# byte; docs/sequencer.md has the measured figures). CRC-32 uses the port's C
# binascii.crc32 where it has one (the QEMU image and the unix port do).
def _crc16_table():
    table = array.array("H", bytes(512))
    for n in range(256):
        crc = n << 8
        for _ in range(8):
            crc = ((crc << 1) ^ _CRC16_POLY) if crc & 0x8000 else (crc << 1)
        table[n] = crc & 0xFFFF
    return table


def _crc32_table():
    table = array.array("I", bytes(1024))
    poly = 0x3B6E20C8 << 2  # 0xEDB88320, reflected 0x04C11DB7 (a heap int, at import only)
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table[n] = crc
    return table


_CRC16_TABLE = _crc16_table()
_CRC32_TABLE = _crc32_table()


@micropython.viper
def crc16_viper(buf: ptr8, length: int) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final xor)."""
    table = ptr16(_CRC16_TABLE)
    crc = _CRC16_INIT
    for i in range(length):
        crc = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ buf[i]]
    return crc


@micropython.viper
def _crc32_update(state: ptr32, buf: ptr8, length: int):
    table = ptr32(_CRC32_TABLE)
    crc = state[0]
    for i in range(length):
        crc = table[(crc ^ buf[i]) & 0xFF] ^ int(uint(crc) >> 8)
    state[0] = crc


try:
    from payload._crc_thumb import (
        cobs_decode_thumb,
        cobs_encode_thumb,
        crc16_thumb,
        crc32_thumb,
        frame_decode_thumb,
        frame_encode_thumb,
        scan_thumb,
    )
except (ImportError, SyntaxError, AttributeError):  # no inline assembler (unix)
    crc16_thumb = crc32_thumb = scan_thumb = cobs_encode_thumb = cobs_decode_thumb = None
    frame_encode_thumb = frame_decode_thumb = None
try:
    from binascii import crc32 as _c_crc32
except ImportError:
    _c_crc32 = None

if crc16_thumb is not None:

    def crc16(buf, length):
        """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final xor)."""
        return crc16_thumb(buf, length, _CRC16_TABLE)

else:
    crc16 = crc16_viper


class Crc32:
    """CRC-32 (IEEE 802.3, as zlib.crc32) updated in place over many buffers.

    The running value stays in a preallocated word. The loop is the fastest the port
    has that allocates nothing: inline Thumb (QEMU, STM32), else the C binascii.crc32 on a
    64-bit port (unix: its ints never allocate), else the table-driven viper loop. On a
    32-bit port without inline assembly the C call would make an int object per update,
    so the viper loop is used there. `value()` allocates.
    """

    def __init__(self):
        self._state = array.array("I", (0xFFFFFFFF,))

    def reset(self):
        self._state[0] = 0xFFFFFFFF

    def update(self, buf, length=-1):
        if length < 0:
            length = len(buf)
        if crc32_thumb is not None:
            crc32_thumb(self._state, buf, length, _CRC32_TABLE)
        elif _C_CRC32_NOALLOC:
            view = buf if length == len(buf) else memoryview(buf)[:length]
            self._state[0] = _c_crc32(view, self._state[0] ^ 0xFFFFFFFF) ^ 0xFFFFFFFF
        else:
            _crc32_update(self._state, buf, length)

    def value(self):
        return self._state[0] ^ 0xFFFFFFFF


# C binascii.crc32 values are small ints (no allocation) only where ints have >= 33 bits.
_C_CRC32_NOALLOC = _c_crc32 is not None and sys.maxsize > 1 << 32


@micropython.viper
def cobs_encode_viper(src: ptr8, length: int, dst: ptr8) -> int:
    """Encode src[:length] into dst (needs length + length // 254 + 1 bytes), no delimiter.
    Returns the encoded length."""
    code_at = 0
    out = 1
    code = 1
    for i in range(length):
        byte = src[i]
        if byte == 0:
            dst[code_at] = code
            code_at = out
            out += 1
            code = 1
        else:
            dst[out] = byte
            out += 1
            code += 1
            if code == 0xFF and i + 1 < length:  # a full block; more bytes follow
                dst[code_at] = code
                code_at = out
                out += 1
                code = 1
    dst[code_at] = code
    return out


@micropython.viper
def cobs_decode_viper(src: ptr8, length: int, dst: ptr8, capacity: int) -> int:
    """Decode src[:length] (no delimiter) into dst. Returns the decoded length, or -1 if
    the input is not valid COBS (a zero byte, or a code running past the end), or -2 if
    the result would exceed capacity."""
    i = 0
    out = 0
    while i < length:
        code = src[i]
        if code == 0:
            return -1
        i += 1
        end = i + code - 1
        if end > length:
            return -1
        while i < end:
            byte = src[i]
            if byte == 0:
                return -1
            if out >= capacity:
                return -2
            dst[out] = byte
            out += 1
            i += 1
        if code != 0xFF and i < length:
            if out >= capacity:
                return -2
            dst[out] = 0
            out += 1
    return out


# The COBS loops in use: inline Thumb where the port has it (QEMU, STM32: ~10 instructions
# a byte on the M3 against ~120 in viper; a 50-byte bus reply's decode was 5.9k of a pass-
# mode loop period's ~86k, -icount), else viper. Same arguments, same results (tested).
if cobs_decode_thumb is not None:
    cobs_encode = cobs_encode_thumb
    cobs_decode = cobs_decode_thumb
else:
    cobs_encode = cobs_encode_viper
    cobs_decode = cobs_decode_viper


# frame_decode's refusals (negative results) and the drop counter each one goes to.
DECODE_NOT_COBS = const(-1)
DECODE_OVERSIZE = const(-2)
DECODE_SHORT = const(-3)
DECODE_CRC = const(-4)


def frame_decode_viper(src, length_capacity, dst, crc_table):
    """One frame's COBS decode and CRC-16 check: src[:length] (no delimiter) into dst,
    where length_capacity = length | capacity << 16 (dst's room). Returns the body's length
    (the CRC follows it in dst), or DECODE_NOT_COBS, DECODE_OVERSIZE, DECODE_SHORT,
    DECODE_CRC. frame_decode_thumb does the same in one native call."""
    count = cobs_decode_viper(src, length_capacity & 0xFFFF, dst, length_capacity >> 16)
    if count < 0:
        return count
    if count < CRC_BYTES + 1:
        return DECODE_SHORT
    body_bytes = count - CRC_BYTES
    if crc16_viper(dst, body_bytes) != (dst[body_bytes] << 8) | dst[body_bytes + 1]:
        return DECODE_CRC
    return body_bytes


frame_decode = frame_decode_thumb if frame_decode_thumb is not None else frame_decode_viper


def frame_encode_viper(raw, length, out, crc_table):
    """FrameWriter.encode's work with no view made: raw[:length] is the body (2 bytes of
    room after it for the CRC), the frame goes to out; returns its length, delimiter
    included. frame_encode_thumb does the same in one native call."""
    crc = crc16_viper(raw, length)
    raw[length] = crc >> 8
    raw[length + 1] = crc & 0xFF
    count = cobs_encode_viper(raw, length + CRC_BYTES, out)
    out[count] = 0
    return count + 1


frame_encode = frame_encode_thumb if frame_encode_thumb is not None else frame_encode_viper
CRC16_TABLE = _CRC16_TABLE  # frame_decode's and frame_encode_thumb's last argument


@micropython.viper
def _copy_bytes(src: ptr8, dst: ptr8, count: int):
    for i in range(count):
        dst[i] = src[i]


def encoded_capacity(body_bytes):
    """Bytes needed for an encoded frame of body_bytes, CRC and delimiter included."""
    raw = body_bytes + CRC_BYTES
    return raw + raw // 254 + 2


class FrameWriter:
    """Builds frames into one preallocated buffer; returns a memoryview of the frame."""

    def __init__(self, max_body_bytes):
        self.max_body_bytes = max_body_bytes
        self._raw = bytearray(max_body_bytes + CRC_BYTES)
        # a caller may build its body here (encode then copies nothing)
        self.body_buffer = self._raw
        self._out = bytearray(encoded_capacity(max_body_bytes))
        self._out_view = memoryview(self._out)

    def encode(self, body, length=-1):
        if length < 0:
            length = len(body)
        if length > self.max_body_bytes:
            raise ValueError("frame body too long")
        raw = self._raw
        # Not `raw[:length] = body`: MicroPython's slice store also memmoves the rest of
        # the buffer onto itself (~2 kB for the bus's writer: 12k of the 18k instructions
        # a 9-byte frame cost on the M3), and slicing a bytes body would allocate.
        if body is not raw:
            _copy_bytes(body, raw, length)
        if frame_encode_thumb is not None:  # CRC, COBS and delimiter in one Thumb call
            return self._out_view[: frame_encode_thumb(raw, length, self._out, _CRC16_TABLE)]
        if crc16_thumb is not None:  # the Thumb loop called directly: no wrapper call
            crc = crc16_thumb(raw, length, _CRC16_TABLE)
        else:
            crc = crc16_viper(raw, length)
        raw[length] = crc >> 8
        raw[length + 1] = crc & 0xFF
        count = cobs_encode(raw, length + CRC_BYTES, self._out)
        self._out[count] = 0
        return self._out_view[: count + 1]


# Reasons a received frame is dropped; counters are kept per reason.
DROP_OVERSIZE = const(0)
DROP_COBS = const(1)
DROP_CRC = const(2)
DROP_SHORT = const(3)
DROP_REASONS = ("oversize", "cobs", "crc", "short")
_DECODE_DROPS = (-1, DROP_COBS, DROP_OVERSIZE, DROP_SHORT, DROP_CRC)  # by -frame_decode(...)


@micropython.viper
def _scan_until_zero(src: ptr8, dst: ptr8, params: ptr32) -> int:
    """Append src[i:end] to dst[fill:] up to the first zero; returns its index (or end).
    params = [i, end, capacity, fill, overflowed] (scan_thumb's): bytes beyond capacity
    are dropped and flagged; i and fill are updated."""
    i = params[0]
    length = params[1]
    capacity = params[2]
    fill = params[3]
    while i < length:
        byte = src[i]
        if byte == 0:
            break
        if fill < capacity:
            dst[fill] = byte
            fill += 1
        else:
            params[4] = 1
        i += 1
    params[0] = i
    params[3] = fill
    return i


class FrameReader:
    """Accumulates stream bytes; yields each good frame body once, counts every bad one.

    `feed(chunk, length)` returns the number of bytes consumed; after it returns with
    `ready` set, `body` (a memoryview valid until the next feed) holds one frame body.
    Oversized input is discarded up to the next delimiter, so a babbling link cannot
    exhaust memory, and the reader is back in step at the next frame.
    """

    def __init__(self, max_body_bytes):
        if encoded_capacity(max_body_bytes) > 0xFFFF:  # frame_decode takes 16-bit lengths
            raise ValueError("frame body too long")
        self.max_body_bytes = max_body_bytes
        self._encoded = bytearray(encoded_capacity(max_body_bytes))
        self._decoded = bytearray(max_body_bytes + CRC_BYTES)
        self._decoded_view = memoryview(self._decoded)
        self._decode_capacity = len(self._decoded) << 16  # frame_decode's length_capacity
        # the scan's state: [i, end, capacity, fill, overflowed] (scan_thumb's layout)
        self._scan_params = array.array("i", (0, 0, len(self._encoded), 0, 0))
        self.ready = False
        self.body = self._decoded_view[:0]
        self.frames_ok = 0
        self.drops = [0, 0, 0, 0]

    def feed(self, chunk, length):
        return self.feed_from(chunk, 0, length)

    def feed_from(self, chunk, start, end):
        """feed(chunk[start:end]) without slicing chunk (a new memoryview per call);
        returns the index in chunk after the bytes consumed."""
        self.ready = False
        encoded = self._encoded
        # The scan's state lives in params: [i, end, capacity, fill, overflowed] (set here
        # only where it changes: each store is ~150 instructions of bytecode on the M3).
        params = self._scan_params
        i = start
        while i < end:
            # Copy up to the next delimiter in Thumb or viper (the per-byte loop in
            # bytecode was the payload bus's bottleneck on the MCU).
            params[0] = i
            params[1] = end
            if scan_thumb is not None:  # 14 instructions a byte on the M3, viper ~90
                i = scan_thumb(chunk, encoded, params)
            else:
                i = _scan_until_zero(chunk, encoded, params)
            if i >= end:
                break
            # a delimiter: finish this frame
            fill = params[3]
            params[3] = 0
            if params[4]:
                params[4] = 0
                self.drops[DROP_OVERSIZE] += 1
                return i + 1
            if fill == 0:
                i += 1
                continue  # idle delimiters between frames are allowed
            body_bytes = frame_decode(encoded, fill | self._decode_capacity, self._decoded,
                                      _CRC16_TABLE)  # fmt: skip
            if body_bytes < 0:
                self.drops[_DECODE_DROPS[-body_bytes]] += 1
                return i + 1
            self.frames_ok += 1
            self.body = self._decoded_view[:body_bytes]
            self.ready = True
            return i + 1
        return end

    def dropped(self):
        return sum(self.drops)
