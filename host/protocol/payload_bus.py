"""Payload bus (docs/payload-bus.md): request and reply bodies between the controller and
the optical head, carried in frames (host/protocol/framing.py: COBS + CRC-16).

The CPython twin of firmware/payload/bus.py; both are tested against
tests/vectors/payload_bus.json. The emulated optical head (emulator/optical_head.py)
serves these requests.

    READ       01 tag addr:u16 count:u8               -> 81 tag status addr:u16 count:u8 u32*count
    WRITE      02 tag addr:u16 count:u8 u32*count     -> 82 tag status
    FIFO_READ  03 tag fifo:u8 max_bytes:u16           -> 83 tag status fifo:u8 n:u16 bytes*n
    MEM_WRITE  04 tag mem:u8 offset:u32 n:u16 bytes*n -> 84 tag status
    READ_WRITE 06 tag waddr:u16 wcount:u8 raddr:u16 rcount:u8 u32*wcount
                                                      -> 86 tag status raddr:u16 rcount:u8 u32*n
    TRACK      08 tag flags:u8 cmd:u32*6 state:u8     -> 88 tag status qpd:u16*4 cam_new:u8 u32*7

(READ_WRITE: the writes first, then the read, in one transaction; TRACK: the tracking
loop's period in a fixed layout, the command block 0x0510.. written first when flags bit 0
is set, then the sensor block 0x0500.. read, docs/payload-bus.md), and, on the head's
pattern-memory port only (the payload processor's link to the head's pattern memory;
never on the controller's bus, never off the satellite):

    PATTERN_READ      05 tag base:u64 count:u16 offset:u32*count
                      -> 85 tag status count:u16 nibble*count (two per byte, padded)
    PATTERN_READ_RUNS 07 tag base:u64 count:u16 (offset:u32 length:u16)*count
                      -> 87 tag status n:u16 nibble*n (n = the lengths' sum)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

OP_READ = 0x01
OP_WRITE = 0x02
OP_FIFO_READ = 0x03
OP_MEM_WRITE = 0x04
OP_PATTERN_READ = 0x05
OP_READ_WRITE = 0x06
OP_PATTERN_READ_RUNS = 0x07
OP_TRACK = 0x08
REPLY_FLAG = 0x80

OK = 0
E_UNKNOWN_OP = 1
E_BAD_ADDRESS = 2
E_BAD_LENGTH = 3
E_READ_ONLY = 4
E_REFUSED = 5
STATUS_NAMES = {
    OK: "ok",
    E_UNKNOWN_OP: "unknown op",
    E_BAD_ADDRESS: "bad address",
    E_BAD_LENGTH: "bad length",
    E_READ_ONLY: "read only",
    E_REFUSED: "refused",
}

MAX_DATA_BYTES = 2048
MAX_BODY_BYTES = 2064
MAX_REGS = 64

FIFO_QRNG = 1
FIFO_TDC = 2
MEM_PATTERN = 1
TDC_EVENT_BYTES = 9

# Register map: word addresses, one block of 0x100 per function (docs/payload-bus.md).
REG_ID = 0x0000
REG_VERSION = 0x0001
REG_BUS_ERRORS = 0x0002
REG_TIME_SCALE_PPM = 0x0003
REG_TIME_PS_LO = 0x0004
REG_TIME_PS_HI = 0x0005
REG_LASER_CTRL = 0x0100
REG_FRAME_SLOTS = 0x0101
REG_SLOT_RATE_HZ = 0x0102
REG_FRAME_COUNT = 0x0103
REG_BACK_STATE = 0x0104
REG_COMMIT = 0x0105
REG_FRAMES_EMITTED = 0x0106
REG_UNDERRUNS = 0x0107
REG_LASER_ACTIVE = 0x0108  # 1 while a frame is being emitted
REG_LAST_COMMIT = 0x0109  # frame number of the last accepted commit
REG_QRNG_CTRL = 0x0200
REG_QRNG_BYTES = 0x0201
REG_TDC_CTRL = 0x0300
REG_TDC_LEVEL = 0x0301
REG_TDC_DEPTH = 0x0302
REG_TDC_OVERFLOW = 0x0303
REG_TDC_EVENTS = 0x0304
REG_TDC_DELIVERED = 0x0305  # events handed out by FIFO_READ
REG_HK_LASER_POWER_UW = 0x0400
REG_HK_TEMP_LASER_MC = 0x0401
REG_HK_TEMP_TDC_MC = 0x0402
REG_HK_TEMP_BOARD_MC = 0x0403
REG_TRACKING_BASE = 0x0500  # 0x0500-0x05FF reserved for tracking (issue 6)
# TRACK (docs/payload-bus.md "TRACK"): the tracking loop's period in one fixed-layout
# exchange. The request carries the command block (FSM_X, FSM_Y, RATE_X, RATE_Y, PA_X,
# PA_Y as u32 words, STATE as a byte) written from TRACK_COMMANDS_ADDR on when flags bit 0
# is set; the reply the sensor block read from TRACK_SENSORS_ADDR: the four QPD quadrants
# as u16 (a 16-bit ADC), CAM_NEW as a byte (0/1), the seven others as u32 words.
TRACK_SENSORS_ADDR = REG_TRACKING_BASE
TRACK_COMMANDS_ADDR = REG_TRACKING_BASE + 0x10
TRACK_SENSOR_WORDS = 12
TRACK_COMMAND_WORDS = 7
TRACK_FLAG_COMMANDS = 0x01
TRACK_REQUEST_BYTES = 28  # op, tag, flags, 6 x u32, state
TRACK_REPLY_BYTES = 40  # op, tag, status, 4 x u16, u8, 7 x u32
_TRACK_REQUEST = struct.Struct("<BBB6IB")
_TRACK_REPLY = struct.Struct("<BBB4HB7I")

HEAD_ID = 0x31444851  # b"QHD1" little-endian
HEAD_VERSION = 1


class BusProtocolError(ValueError):
    """A body that is not a well-formed request or reply; the message says what."""


@dataclass(frozen=True)
class Request:
    op: int
    tag: int
    addr: int = 0  # READ(_WRITE)/WRITE: register; FIFO_READ: fifo id; MEM_WRITE: memory id
    count: int = 0  # READ(_WRITE): registers read; FIFO_READ: max bytes
    words: tuple[int, ...] = ()  # WRITE, READ_WRITE (the words written)
    offset: int = 0  # MEM_WRITE
    data: bytes = b""  # MEM_WRITE
    write_addr: int = 0  # READ_WRITE: first register written

    def pack(self) -> bytes:
        head = bytes((self.op, self.tag))
        if self.op == OP_READ:
            return head + struct.pack("<HB", self.addr, self.count)
        if self.op == OP_WRITE:
            n = len(self.words)
            return head + struct.pack(f"<HB{n}I", self.addr, n, *self.words)
        if self.op == OP_FIFO_READ:
            return head + struct.pack("<BH", self.addr, self.count)
        if self.op == OP_MEM_WRITE:
            return head + struct.pack("<BIH", self.addr, self.offset, len(self.data)) + self.data
        if self.op == OP_READ_WRITE:
            n = len(self.words)
            return head + struct.pack(
                f"<HBHB{n}I", self.write_addr, n, self.addr, self.count, *self.words
            )
        if self.op == OP_TRACK:
            if self.words:
                commands = self.words
                if len(commands) != TRACK_COMMAND_WORDS or not 0 <= commands[6] <= 0xFF:
                    raise BusProtocolError("TRACK: 7 command words, STATE a byte")
                return _TRACK_REQUEST.pack(self.op, self.tag, TRACK_FLAG_COMMANDS, *commands)
            return _TRACK_REQUEST.pack(self.op, self.tag, 0, *(0,) * TRACK_COMMAND_WORDS)
        raise BusProtocolError(f"unknown op {self.op:#04x}")


def read(tag: int, addr: int, count: int) -> Request:
    return Request(OP_READ, tag, addr, count)


def write(tag: int, addr: int, *words: int) -> Request:
    return Request(OP_WRITE, tag, addr, len(words), tuple(words))


def fifo_read(tag: int, fifo: int, max_bytes: int) -> Request:
    return Request(OP_FIFO_READ, tag, fifo, max_bytes)


def mem_write(tag: int, mem: int, offset: int, data: bytes) -> Request:
    return Request(OP_MEM_WRITE, tag, mem, len(data), offset=offset, data=bytes(data))


def read_write(
    tag: int, write_addr: int, words: tuple[int, ...], read_addr: int, read_count: int
) -> Request:
    """Write `words` from write_addr (none: a plain read), then read read_count registers
    from read_addr, in one transaction."""
    return Request(OP_READ_WRITE, tag, read_addr, read_count, tuple(words), write_addr=write_addr)


def track(tag: int, commands: tuple[int, ...] = ()) -> Request:
    """The tracking loop's period: the 7 command words (none: the first period, nothing
    written) out, the 12 sensor words back."""
    return Request(
        OP_TRACK, tag, TRACK_SENSORS_ADDR, TRACK_SENSOR_WORDS, tuple(commands),
        write_addr=TRACK_COMMANDS_ADDR,
    )  # fmt: skip


def unpack_request(body: bytes) -> Request:
    """Parse a request body; raises BusProtocolError naming what is wrong."""
    if len(body) < 2:
        raise BusProtocolError(f"request of {len(body)} bytes: need op and tag")
    op, tag = body[0], body[1]
    rest = body[2:]
    if op == OP_READ:
        if len(rest) != 3:
            raise BusProtocolError(f"READ: {len(rest)} argument bytes, expected 3")
        addr, count = struct.unpack("<HB", rest)
        if not 1 <= count <= MAX_REGS:
            raise BusProtocolError(f"READ: count {count} not in [1, {MAX_REGS}]")
        return Request(op, tag, addr, count)
    if op == OP_WRITE:
        if len(rest) < 3:
            raise BusProtocolError("WRITE: missing address and count")
        addr, count = struct.unpack_from("<HB", rest)
        if not 1 <= count <= MAX_REGS or len(rest) != 3 + 4 * count:
            raise BusProtocolError(f"WRITE: count {count} does not match {len(rest)} bytes")
        return Request(op, tag, addr, count, struct.unpack_from(f"<{count}I", rest, 3))
    if op == OP_FIFO_READ:
        if len(rest) != 3:
            raise BusProtocolError(f"FIFO_READ: {len(rest)} argument bytes, expected 3")
        fifo, max_bytes = struct.unpack("<BH", rest)
        if not 1 <= max_bytes <= MAX_DATA_BYTES:
            raise BusProtocolError(
                f"FIFO_READ: max_bytes {max_bytes} not in [1, {MAX_DATA_BYTES}]"
            )
        return Request(op, tag, fifo, max_bytes)
    if op == OP_MEM_WRITE:
        if len(rest) < 7:
            raise BusProtocolError("MEM_WRITE: missing memory, offset and length")
        mem, offset, n = struct.unpack_from("<BIH", rest)
        if n > MAX_DATA_BYTES or len(rest) != 7 + n:
            raise BusProtocolError(f"MEM_WRITE: length {n} does not match {len(rest) - 7} bytes")
        return Request(op, tag, mem, n, offset=offset, data=bytes(rest[7:]))
    if op == OP_READ_WRITE:
        if len(rest) < 6:
            raise BusProtocolError("READ_WRITE: missing addresses and counts")
        write_addr, wcount, read_addr, rcount = struct.unpack_from("<HBHB", rest)
        if not 1 <= rcount <= MAX_REGS:
            raise BusProtocolError(f"READ_WRITE: read count {rcount} not in [1, {MAX_REGS}]")
        if wcount > MAX_REGS or len(rest) != 6 + 4 * wcount:
            raise BusProtocolError(
                f"READ_WRITE: write count {wcount} does not match {len(rest) - 6} bytes"
            )
        words = struct.unpack_from(f"<{wcount}I", rest, 6)
        return Request(op, tag, read_addr, rcount, words, write_addr=write_addr)
    if op == OP_TRACK:
        if len(body) != TRACK_REQUEST_BYTES:
            raise BusProtocolError(f"TRACK: {len(body)} bytes, expected {TRACK_REQUEST_BYTES}")
        fields = _TRACK_REQUEST.unpack(body)
        flags = fields[2]
        if flags & ~TRACK_FLAG_COMMANDS:
            raise BusProtocolError(f"TRACK: unknown flags {flags:#04x}")
        return track(tag, fields[3:] if flags & TRACK_FLAG_COMMANDS else ())
    raise BusProtocolError(f"unknown op {op:#04x}")


@dataclass(frozen=True)
class Reply:
    op: int  # the request's op (without REPLY_FLAG)
    tag: int
    status: int
    addr: int = 0
    words: tuple[int, ...] = ()
    data: bytes = b""

    def pack(self) -> bytes:
        head = bytes((self.op | REPLY_FLAG, self.tag, self.status))
        if self.status != OK:
            return head
        if self.op in (OP_READ, OP_READ_WRITE):
            n = len(self.words)
            return head + struct.pack(f"<HB{n}I", self.addr, n, *self.words)
        if self.op == OP_TRACK:
            words = self.words
            if len(words) != TRACK_SENSOR_WORDS:
                raise BusProtocolError(f"TRACK reply: {len(words)} sensor words, expected 12")
            if max(words[:4]) > 0xFFFF or words[4] > 0xFF:
                raise BusProtocolError("TRACK reply: a QPD quadrant above u16 or CAM_NEW above u8")
            return _TRACK_REPLY.pack(*head, *words)
        if self.op == OP_FIFO_READ:
            return head + struct.pack("<BH", self.addr, len(self.data)) + self.data
        return head


def unpack_reply(body: bytes) -> Reply:
    if len(body) < 3 or not body[0] & REPLY_FLAG:
        raise BusProtocolError(f"not a reply: {body[:3].hex()}")
    op, tag, status = body[0] & 0x7F, body[1], body[2]
    rest = body[3:]
    if status != OK:
        return Reply(op, tag, status)
    if op in (OP_READ, OP_READ_WRITE):
        addr, n = struct.unpack_from("<HB", rest)
        if len(rest) != 3 + 4 * n:
            raise BusProtocolError("READ reply: length does not match count")
        return Reply(op, tag, status, addr, struct.unpack_from(f"<{n}I", rest, 3))
    if op == OP_TRACK:
        if len(body) != TRACK_REPLY_BYTES:
            raise BusProtocolError(f"TRACK reply: {len(body)} bytes, expected {TRACK_REPLY_BYTES}")
        return Reply(op, tag, status, TRACK_SENSORS_ADDR, _TRACK_REPLY.unpack(body)[3:])
    if op == OP_FIFO_READ:
        fifo, n = struct.unpack_from("<BH", rest)
        if len(rest) != 3 + n:
            raise BusProtocolError("FIFO_READ reply: length does not match count")
        return Reply(op, tag, status, fifo, data=bytes(rest[3:]))
    return Reply(op, tag, status)


def error_reply(body: bytes, status: int) -> bytes:
    """The reply to a request that could not be served (needs at least op and tag)."""
    return bytes(((body[0] & 0x7F) | REPLY_FLAG, body[1], status))


# ---------------------------------------------------------------- pattern-memory port

MAX_PATTERN_READ_SLOTS = 16384
PATTERN_READ_HEADER_BYTES = 12  # op, tag, base u64, count u16
PATTERN_PORT_MAX_BODY_BYTES = PATTERN_READ_HEADER_BYTES + 4 * MAX_PATTERN_READ_SLOTS
# PATTERN_READ_RUNS: runs of consecutive slots, 6 bytes each; as many as keep the body
# within the port's PATTERN_READ maximum (12 + 6 x 8,192 = 49,164 bytes)
MAX_PATTERN_READ_RUNS = 8192
PATTERN_RUN_BYTES = 6  # offset u32, length u16


def pack_pattern_read(tag: int, base: int, offsets) -> bytes:
    """Ask for the symbols of slots base + offsets[k] (u32 offsets, any order)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if not 1 <= offsets.size <= MAX_PATTERN_READ_SLOTS:
        raise BusProtocolError(f"PATTERN_READ: {offsets.size} slots, 1..{MAX_PATTERN_READ_SLOTS}")
    if offsets.min() < 0 or offsets.max() >= 2**32 or not 0 <= base < 2**64:
        raise BusProtocolError("PATTERN_READ: base u64 and offsets u32")
    head = struct.pack("<BBQH", OP_PATTERN_READ, tag, base, offsets.size)
    return head + offsets.astype("<u4").tobytes()


def unpack_pattern_read(body: bytes) -> tuple[int, np.ndarray]:
    """(tag, slot indices) of a PATTERN_READ request; BusProtocolError names the fault."""
    if len(body) < PATTERN_READ_HEADER_BYTES or body[0] != OP_PATTERN_READ:
        raise BusProtocolError("PATTERN_READ: shorter than its header or another op")
    _op, tag, base, count = struct.unpack_from("<BBQH", body)
    if not 1 <= count <= MAX_PATTERN_READ_SLOTS:
        raise BusProtocolError(f"PATTERN_READ: count {count} not in [1, {MAX_PATTERN_READ_SLOTS}]")
    if len(body) != PATTERN_READ_HEADER_BYTES + 4 * count:
        raise BusProtocolError(f"PATTERN_READ: count {count} does not match {len(body)} bytes")
    offsets = np.frombuffer(body, dtype="<u4", offset=PATTERN_READ_HEADER_BYTES)
    return tag, offsets.astype(np.int64) + base


def pack_pattern_read_runs(tag: int, base: int, offsets, lengths) -> bytes:
    """Ask for the symbols of the runs of slots base + offsets[k] .. + lengths[k] - 1, in
    run order (u32 offsets, u16 lengths >= 1, any order, overlaps allowed)."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if not 1 <= offsets.size <= MAX_PATTERN_READ_RUNS or lengths.size != offsets.size:
        raise BusProtocolError(
            f"PATTERN_READ_RUNS: {offsets.size} runs and {lengths.size} lengths, "
            f"1..{MAX_PATTERN_READ_RUNS} of each"
        )
    if offsets.min() < 0 or offsets.max() >= 2**32 or not 0 <= base < 2**64:
        raise BusProtocolError("PATTERN_READ_RUNS: base u64 and offsets u32")
    if lengths.min() < 1 or int(lengths.sum()) > MAX_PATTERN_READ_SLOTS:
        raise BusProtocolError(
            f"PATTERN_READ_RUNS: run lengths >= 1, {MAX_PATTERN_READ_SLOTS} slots at most"
        )
    runs = np.empty(offsets.size, dtype=[("offset", "<u4"), ("length", "<u2")])
    runs["offset"], runs["length"] = offsets, lengths
    return struct.pack("<BBQH", OP_PATTERN_READ_RUNS, tag, base, offsets.size) + runs.tobytes()


def unpack_pattern_read_runs(body: bytes) -> tuple[int, np.ndarray]:
    """(tag, slot indices, run after run) of a PATTERN_READ_RUNS request; BusProtocolError
    names the fault."""
    if len(body) < PATTERN_READ_HEADER_BYTES or body[0] != OP_PATTERN_READ_RUNS:
        raise BusProtocolError("PATTERN_READ_RUNS: shorter than its header or another op")
    _op, tag, base, count = struct.unpack_from("<BBQH", body)
    if not 1 <= count <= MAX_PATTERN_READ_RUNS:
        raise BusProtocolError(
            f"PATTERN_READ_RUNS: count {count} not in [1, {MAX_PATTERN_READ_RUNS}]"
        )
    if len(body) != PATTERN_READ_HEADER_BYTES + PATTERN_RUN_BYTES * count:
        raise BusProtocolError(
            f"PATTERN_READ_RUNS: count {count} does not match {len(body)} bytes"
        )
    runs = np.frombuffer(
        body, dtype=[("offset", "<u4"), ("length", "<u2")], offset=PATTERN_READ_HEADER_BYTES
    )
    starts = runs["offset"].astype(np.int64) + base
    lengths = runs["length"].astype(np.int64)
    total = int(lengths.sum())
    if lengths.min() < 1 or total > MAX_PATTERN_READ_SLOTS:
        raise BusProtocolError(
            f"PATTERN_READ_RUNS: run lengths >= 1, {total} slots > {MAX_PATTERN_READ_SLOTS}"
            if total > MAX_PATTERN_READ_SLOTS
            else "PATTERN_READ_RUNS: a run of length 0"
        )
    # slot j of run k: starts[k] + j, laid out run after run
    run_first = np.cumsum(lengths) - lengths
    slots = np.arange(total, dtype=np.int64) + np.repeat(starts - run_first, lengths)
    return tag, slots


def pack_pattern_reply(tag: int, status: int, nibbles=None, op: int = OP_PATTERN_READ) -> bytes:
    """The reply to a PATTERN_READ (op 05) or a PATTERN_READ_RUNS (op 07): the same body."""
    head = bytes((op | REPLY_FLAG, tag, status))
    if status != OK:
        return head
    nibbles = np.asarray(nibbles, dtype=np.uint8)
    padded = np.append(nibbles, np.uint8(0)) if nibbles.size % 2 else nibbles
    packed = (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8).tobytes()
    return head + struct.pack("<H", nibbles.size) + packed


def unpack_pattern_reply(body: bytes, op: int = OP_PATTERN_READ) -> tuple[int, int, np.ndarray]:
    """(tag, status, symbol nibbles) of the reply to a PATTERN_READ (or to `op`)."""
    if len(body) < 3 or body[0] != op | REPLY_FLAG:
        raise BusProtocolError(f"not a reply to op {op:02x}: {body[:3].hex()}")
    tag, status = body[1], body[2]
    if status != OK:
        return tag, status, np.zeros(0, np.uint8)
    if len(body) < 5:
        raise BusProtocolError("PATTERN_READ reply: missing count")
    (count,) = struct.unpack_from("<H", body, 3)
    if len(body) != 5 + (count + 1) // 2:
        raise BusProtocolError("PATTERN_READ reply: length does not match count")
    raw = np.frombuffer(body, dtype=np.uint8, offset=5)
    out = np.empty(raw.size * 2, dtype=np.uint8)
    out[0::2] = raw & 0x0F
    out[1::2] = raw >> 4
    return tag, status, out[:count]
