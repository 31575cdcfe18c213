# Payload-bus client: the controller's only way to the optical head (docs/payload-bus.md).
#
# Requests and replies are frame bodies (framing.py: COBS + CRC-16), one reply per request:
#   READ       01 tag addr:u16 count:u8               -> 81 tag status addr:u16 count:u8 u32*n
#   WRITE      02 tag addr:u16 count:u8 u32*count     -> 82 tag status
#   FIFO_READ  03 tag fifo:u8 max_bytes:u16           -> 83 tag status fifo:u8 n:u16 bytes*n
#   MEM_WRITE  04 tag mem:u8 offset:u32 n:u16 bytes*n -> 84 tag status
#   READ_WRITE 06 tag waddr:u16 wcount:u8 raddr:u16 rcount:u8 u32*wcount
#                                                     -> 86 tag status raddr:u16 rcount:u8 u32*n
#   TRACK      08 tag flags:u8 u32*6 state:u8         -> 88 tag status u16*4 u8 u32*7
#     (the tracking loop's period in a fixed layout: the command block 0x0510.. written
#      first when flags bit 0 is set, then the sensor block 0x0500.. read; `track()`)
# All integers little-endian. The CPython twin is host/protocol/payload_bus.py; both pass
# tests/vectors/payload_bus.json. Every call is synchronous with a timeout and returns a
# status (never raises on a bad reply): the hot path allocates nothing, and a sick bus
# shows up in the error counters instead of crashing the controller.
import array

import micropython
from micropython import const

from payload import framing
from payload.waits import BUS_RETRIES

try:  # TRACK in two Thumb calls (QEMU, STM32); viper and the general path elsewhere (unix)
    from payload._crc_thumb import track_reply_thumb, track_request_thumb
except (ImportError, SyntaxError, AttributeError):
    track_reply_thumb = track_request_thumb = None

OP_READ = const(0x01)
OP_WRITE = const(0x02)
OP_FIFO_READ = const(0x03)
OP_MEM_WRITE = const(0x04)
OP_READ_WRITE = const(0x06)  # 0x05 is PATTERN_READ, on the head's pattern-memory port only
OP_TRACK = const(0x08)  # 0x07 is PATTERN_READ_RUNS (pattern-memory port)
REPLY_FLAG = const(0x80)

# Reply status codes (from the head) and local outcomes (negative, from this client).
OK = const(0)
E_UNKNOWN_OP = const(1)
E_BAD_ADDRESS = const(2)
E_BAD_LENGTH = const(3)
E_READ_ONLY = const(4)
E_REFUSED = const(5)
E_TIMEOUT = const(-1)
E_BAD_REPLY = const(-2)
_E_NOT_MINE = const(-3)  # track()'s fast path: a frame that is not its reply
# The counters track() moves every period wrap to 0 past this, the largest small int of a
# 32-bit port: one more would be a big int, allocated every period from then on (after
# 2^30 periods, 6 days of tracking at 2 kHz), and the fast path allocates nothing.
COUNTER_WRAP = const(0x3FFFFFFF)

# Bus.state: the words the tracking loop's period reads and writes (an array("i"), so a
# viper period reaches them without an attribute lookup: tracking_duty._paced_period)
B_TAG = const(0)  # the last request's tag
B_CHUNK_FILL = const(1)  # bytes in the link's chunk
B_CHUNK_POS = const(2)  # bytes of it consumed (< fill: the next frame starts there)
B_TRANSACTIONS = const(3)  # (wrap at 2^30 - 1, as every counter here)
B_ERROR_STATUS = const(4)  # replies with a status other than OK
B_TRACK_REPLIES = const(5)  # TRACK replies the paced period took (not in rx.frames_ok)
_B_WORDS = const(6)

# TRACK's fixed layout (docs/payload-bus.md "TRACK"): every field little-endian.
TRACK_FLAG_COMMANDS = const(0x01)
TRACK_REQUEST_BYTES = const(28)  # op, tag, flags, FSM_X..PA_Y u32 * 6, STATE u8
TRACK_REPLY_BYTES = const(40)  # op, tag, status, QA..QD u16 * 4, CAM_NEW u8, u32 * 7
# A body under 254 bytes always encodes to body + CRC + COBS code + delimiter: fixed.
TRACK_REQUEST_FRAME_BYTES = const(32)

MAX_DATA_BYTES = const(2048)  # largest FIFO burst or memory write in one frame
MAX_BODY_BYTES = const(2064)  # MAX_DATA_BYTES plus the largest header, with margin
# Link reads one _next_frame call makes at most (of the 512-byte chunk): a whole frame of
# MAX_BODY_BYTES takes 5, so a frame that is arriving is never cut into two calls by this.
_MAX_READS_PER_CALL = const(8)
# Unsolicited frames one poll() hands on at most (a head that floods them cannot hold it)
_MAX_POLL_FRAMES = const(8)
MAX_REGS = const(64)

# FIFOs and memories
FIFO_QRNG = const(1)
FIFO_TDC = const(2)
MEM_PATTERN = const(1)

# Register map (word addresses; docs/payload-bus.md). Blocks of 0x100 per function, so
# new functions (tracking: 0x0500) join without moving anything.
REG_ID = const(0x0000)
REG_VERSION = const(0x0001)
REG_BUS_ERRORS = const(0x0002)
REG_TIME_SCALE_PPM = const(0x0003)
REG_TIME_PS_LO = const(0x0004)
REG_TIME_PS_HI = const(0x0005)
REG_LASER_CTRL = const(0x0100)
REG_FRAME_SLOTS = const(0x0101)
REG_SLOT_RATE_HZ = const(0x0102)
REG_FRAME_COUNT = const(0x0103)
REG_BACK_STATE = const(0x0104)
REG_COMMIT = const(0x0105)
REG_FRAMES_EMITTED = const(0x0106)
REG_UNDERRUNS = const(0x0107)
REG_LASER_ACTIVE = const(0x0108)
REG_LAST_COMMIT = const(0x0109)
REG_QRNG_CTRL = const(0x0200)
REG_QRNG_BYTES = const(0x0201)
REG_TDC_CTRL = const(0x0300)
REG_TDC_LEVEL = const(0x0301)
REG_TDC_DEPTH = const(0x0302)
REG_TDC_OVERFLOW = const(0x0303)
REG_TDC_EVENTS = const(0x0304)
REG_TDC_DELIVERED = const(0x0305)
REG_HK_LASER_POWER_UW = const(0x0400)
REG_HK_TEMP_LASER_MC = const(0x0401)
REG_HK_TEMP_TDC_MC = const(0x0402)
REG_HK_TEMP_BOARD_MC = const(0x0403)
HK_REGS = const(4)
REG_TRACKING_BASE = const(0x0500)  # reserved for the tracking work (docs/payload-bus.md)


@micropython.viper
def _put_u16(buf: ptr8, offset: int, value: int):
    buf[offset] = value & 0xFF
    buf[offset + 1] = (value >> 8) & 0xFF


@micropython.viper
def _get_u16(buf: ptr8, offset: int) -> int:
    return buf[offset] | (buf[offset + 1] << 8)


@micropython.viper
def _words_to_bytes(words: ptr32, count: int, buf: ptr8, offset: int):
    for i in range(count):
        value = words[i]
        j = offset + 4 * i
        buf[j] = value & 0xFF
        buf[j + 1] = (value >> 8) & 0xFF
        buf[j + 2] = (value >> 16) & 0xFF
        buf[j + 3] = (value >> 24) & 0xFF


@micropython.viper
def _bytes_to_words(buf: ptr8, offset: int, count: int, words: ptr32):
    for i in range(count):
        j = offset + 4 * i
        words[i] = buf[j] | (buf[j + 1] << 8) | (buf[j + 2] << 16) | (buf[j + 3] << 24)


@micropython.viper
def _build_read_write(req: ptr8, words: ptr32, write: int, read: int):
    # write = tag << 16 | write_addr; read = write_count << 23 | read_count << 16 |
    # read_addr (counts <= MAX_REGS: both stay small ints, < 2**30, on a 32-bit port)
    req[0] = OP_READ_WRITE
    req[1] = (write >> 16) & 0xFF
    req[2] = write & 0xFF
    req[3] = (write >> 8) & 0xFF
    count = (read >> 23) & 0x7F
    req[4] = count
    req[5] = read & 0xFF
    req[6] = (read >> 8) & 0xFF
    req[7] = (read >> 16) & 0x7F
    for i in range(count):
        value = words[i]
        j = 8 + 4 * i
        req[j] = value & 0xFF
        req[j + 1] = (value >> 8) & 0xFF
        req[j + 2] = (value >> 16) & 0xFF
        req[j + 3] = (value >> 24) & 0xFF


@micropython.viper
def _build_track(req: ptr8, io: ptr32, head: int):
    # head = flags << 8 | tag; the command words are Tracker.io 12..18 (FSM_X .. STATE),
    # sent only with TRACK_FLAG_COMMANDS (zeros otherwise, as the spec's first period)
    req[0] = OP_TRACK
    req[1] = head & 0xFF
    flags = (head >> 8) & 0xFF
    req[2] = flags
    send = flags & TRACK_FLAG_COMMANDS
    for i in range(6):
        value = io[12 + i] if send else 0
        j = 3 + 4 * i
        req[j] = value & 0xFF
        req[j + 1] = (value >> 8) & 0xFF
        req[j + 2] = (value >> 16) & 0xFF
        req[j + 3] = (value >> 24) & 0xFF
    req[27] = (io[18] & 0xFF) if send else 0


@micropython.viper
def _unpack_track(body: ptr8, length: int, io: ptr32, tag: int) -> int:
    # A TRACK reply body -> Tracker.io 0..11; returns the head's status, E_BAD_REPLY (a
    # length that does not match it) or _E_NOT_MINE (another op or tag).
    if length < 3 or body[0] != (OP_TRACK | REPLY_FLAG) or body[1] != tag:
        return _E_NOT_MINE
    status = body[2]
    if status != OK:
        return status if length == 3 else E_BAD_REPLY
    if length != TRACK_REPLY_BYTES:
        return E_BAD_REPLY
    for i in range(4):  # QA..QD: the 16-bit ADC's counts
        io[i] = body[3 + 2 * i] | (body[4 + 2 * i] << 8)
    io[4] = body[11]  # CAM_NEW
    for i in range(7):  # CAM_X .. ARS_Y
        j = 12 + 4 * i
        io[5 + i] = body[j] | (body[j + 1] << 8) | (body[j + 2] << 16) | (body[j + 3] << 24)
    return OK


@micropython.viper
def _address(buf: ptr8) -> uint:
    return uint(buf)


@micropython.viper
def _copy(src: ptr8, src_offset: int, dst: ptr8, dst_offset: int, count: int):
    for i in range(count):
        dst[dst_offset + i] = src[src_offset + i]


class Bus:
    """Synchronous request/reply client over a byte link (board.payload_bus)."""

    def __init__(self, link, clock, timeout_us=500_000, retries=BUS_RETRIES):
        self.link = link
        self.clock = clock
        self.timeout_us = timeout_us
        self.retries = retries
        self.rx = framing.FrameReader(MAX_BODY_BYTES)
        self.tx = framing.FrameWriter(MAX_BODY_BYTES)
        # requests are built in the writer's own buffer: encoding copies nothing
        self.req = self.tx.body_buffer
        self._chunk = bytearray(512)
        self._chunk_view = memoryview(self._chunk)
        self.state = array.array("i", bytes(4 * _B_WORDS))
        # track()'s fast path: the request frame's fixed view (encoding it in Thumb writes
        # the writer's own buffer), the reader's decode buffer and its capacity argument
        self._track_frame = memoryview(self.tx._out)[:TRACK_REQUEST_FRAME_BYTES]
        self._decode_capacity = len(self.rx._decoded) << 16
        self._track_ctx = None  # the Thumb pair's buffers (_crc_thumb.py): addresses
        if track_request_thumb is not None:
            self._track_ctx = array.array("I", bytes(24))
            for i, buf in enumerate((self.req, self.tx._out, framing.CRC16_TABLE,
                                     self.rx._decoded, None, self.rx._scan_params)):  # fmt: skip
                self._track_ctx[i] = len(self.rx._decoded) if buf is None else _address(buf)
        self.words = array.array("I", bytes(4 * MAX_REGS))  # values of the last READ
        self._one = array.array("I", (0,))
        self.reply = None  # memoryview of the last good reply body
        # error counters (telemetry): bad replies, timeouts, head-reported errors
        self.timeouts = 0
        self.retransmissions = 0
        self.bad_replies = 0
        self.unsolicited = 0
        self.on_unsolicited = None
        # Whether the head is presumed down for the rest of the scheduler pass: -1 never (a
        # Bus used outside the main loop), 0 up, 1 down: a transaction timed out (all its
        # tries) this pass, and every later one fails at once (counted in `skipped`) until
        # app.Controller.poll sets 0 at the next pass. A dead head then costs one timed-out
        # transaction a pass, not one per transaction of every duty: on the STM32 board a
        # stop telecommand's eight (16 s in flight) and the pass's other duties' held one
        # pass 24 s, past the IWDG's 22.3 s (payload/waits.py, docs/targets.md).
        self.down = -1
        self.skipped = 0

    # the state words by name (not on the period's fast path)
    @property
    def _tag(self):
        return self.state[B_TAG]

    @_tag.setter
    def _tag(self, value):
        self.state[B_TAG] = value

    @property
    def _chunk_fill(self):
        return self.state[B_CHUNK_FILL]

    @_chunk_fill.setter
    def _chunk_fill(self, value):
        self.state[B_CHUNK_FILL] = value

    @property
    def _chunk_pos(self):
        return self.state[B_CHUNK_POS]

    @_chunk_pos.setter
    def _chunk_pos(self, value):
        self.state[B_CHUNK_POS] = value

    @property
    def transactions(self):
        return self.state[B_TRANSACTIONS]

    @transactions.setter
    def transactions(self, value):
        self.state[B_TRANSACTIONS] = value & COUNTER_WRAP

    @property
    def error_status(self):
        return self.state[B_ERROR_STATUS]

    @error_status.setter
    def error_status(self, value):
        self.state[B_ERROR_STATUS] = value & COUNTER_WRAP

    @property
    def track_replies(self):
        return self.state[B_TRACK_REPLIES]

    # ---------------------------------------------------------------- request builders
    # Each fills self.req and returns the body length; tested against golden vectors.

    def build_read(self, tag, addr, count):
        req = self.req
        req[0] = OP_READ
        req[1] = tag
        _put_u16(req, 2, addr)
        req[4] = count
        return 5

    def build_write(self, tag, addr, words, count):
        req = self.req
        req[0] = OP_WRITE
        req[1] = tag
        _put_u16(req, 2, addr)
        req[4] = count
        _words_to_bytes(words, count, req, 5)
        return 5 + 4 * count

    def build_fifo_read(self, tag, fifo, max_bytes):
        req = self.req
        req[0] = OP_FIFO_READ
        req[1] = tag
        req[2] = fifo
        _put_u16(req, 3, max_bytes)
        return 5

    def build_mem_write(self, tag, mem, offset, data, data_offset, count):
        req = self.req
        req[0] = OP_MEM_WRITE
        req[1] = tag
        req[2] = mem
        _put_u16(req, 3, offset & 0xFFFF)
        _put_u16(req, 5, offset >> 16)
        _put_u16(req, 7, count)
        _copy(data, data_offset, req, 9, count)
        return 9 + count

    def build_read_write(self, tag, write_addr, words, write_count, read_addr, read_count):
        # one viper call (the tracking duty's every period: eight stores and three calls
        # in bytecode cost ~8k instructions on the M3)
        _build_read_write(
            self.req, words, (tag << 16) | write_addr,
            (write_count << 23) | (read_count << 16) | read_addr,
        )  # fmt: skip
        return 8 + 4 * write_count

    # ---------------------------------------------------------------- transactions

    def _transact(self, length):
        """Send self.req[:length]; wait for the reply with the same tag. Returns the status
        (>= 0 from the head, < 0 local); on OK, self.reply is the reply body.

        On a timeout the identical frame (same tag) is sent again, up to `retries` times:
        the head answers a repeated request from its reply cache without executing it
        again, so a lost reply loses neither FIFO data nor a commit."""
        self.transactions += 1
        return self._exchange(self.tx.encode(self.req, length), -1)

    def _exchange(self, frame, sent):
        """_transact's send-and-wait for the encoded `frame` of self.req; `sent` is how much
        of it the caller already wrote (-1: none, the first attempt sends it)."""
        if self.down > 0:
            self.skipped += 1
            return E_TIMEOUT
        link = self.link
        op = self.req[0] | REPLY_FLAG
        tag = self.req[1]
        clock = self.clock
        total = len(frame)
        attempt = 0
        start = 0
        if sent >= 0:  # the first attempt is under way: finish writing it
            attempt = 1
            start = clock.ticks_us()
            while sent < total:
                if ((clock.ticks_us() - start) & 0x3FFFFFFF) > self.timeout_us:
                    break
                sent += link.write(frame[sent:])
        while True:
            if attempt == 0 or ((clock.ticks_us() - start) & 0x3FFFFFFF) > self.timeout_us:
                if attempt > self.retries:
                    self.timeouts += 1
                    if self.down == 0:
                        self.down = 1
                    return E_TIMEOUT
                if attempt:
                    self.retransmissions += 1
                attempt += 1
                start = clock.ticks_us()
                # Bounded like the reply: a link that takes nothing for timeout_us (back-
                # pressure from a stuck head) counts as a lost attempt.
                # The whole frame first, with no clock read or slice (one write takes it all
                # unless the link pushes back: ~1.6k instructions a clock read on the M3).
                sent = link.write(frame)
                while sent < total:
                    if ((clock.ticks_us() - start) & 0x3FFFFFFF) > self.timeout_us:
                        break
                    sent += link.write(frame[sent:])
            body = self._next_frame()
            if body is None:
                continue
            if len(body) < 3 or body[0] != op or body[1] != tag:
                if len(body) >= 1 and not (body[0] & REPLY_FLAG) and self.on_unsolicited:
                    self.unsolicited += 1
                    self.on_unsolicited(body)
                else:
                    self.bad_replies += 1
                continue
            status = body[2]
            if status != OK:
                self.error_status += 1
            self.reply = body
            return status

    def _next_frame(self):
        """The next good frame body from the link, or None if none is complete yet, or
        after _MAX_READS_PER_CALL reads without one: a link that never stops sending (a
        babbling head, a line stuck at a level that reads as bytes) held this loop for
        good, past every caller's timeout, which is checked between calls."""
        rx = self.rx
        reads = 0
        while True:
            if self._chunk_pos >= self._chunk_fill:
                if reads >= _MAX_READS_PER_CALL:
                    return None
                reads += 1
                count = self.link.readinto(self._chunk)
                if not count:
                    return None
                self._chunk_fill = count
                self._chunk_pos = 0
            self._chunk_pos = rx.feed_from(self._chunk, self._chunk_pos, self._chunk_fill)
            if rx.ready:
                return rx.body

    def _next_tag(self):
        self._tag = (self._tag + 1) & 0xFF
        return self._tag

    def read(self, addr, count):
        """Read count registers into self.words[:count]; returns the status."""
        status = self._transact(self.build_read(self._next_tag(), addr, count))
        if status == OK:
            body = self.reply
            if len(body) != 6 + 4 * count or _get_u16(body, 3) != addr or body[5] != count:
                self.bad_replies += 1
                return E_BAD_REPLY
            _bytes_to_words(body, 6, count, self.words)
        return status

    def read_write(self, write_addr, words, write_count, read_addr, read_count):
        """One transaction: write words[:write_count] from write_addr (0 words: none),
        then read read_count registers from read_addr into self.words. The head does the
        writes first, in order, and stops at the first failing register (its status; no
        read done); returns the status (a loop period of the tracking duty: the last
        period's commands out, this period's sensors in)."""
        status = self._transact(
            self.build_read_write(
                self._next_tag(), write_addr, words, write_count, read_addr, read_count
            )
        )
        if status == OK:
            body = self.reply
            count = read_count
            if len(body) != 6 + 4 * count or _get_u16(body, 3) != read_addr or body[5] != count:
                self.bad_replies += 1
                return E_BAD_REPLY
            _bytes_to_words(body, 6, count, self.words)
        return status

    # native: the tracking loop's every period (machine code instead of bytecode dispatch)
    @micropython.native
    def track(self, io, send_commands):
        """The tracking loop's period in one TRACK transaction (docs/payload-bus.md): the
        command words io[12:19] out when send_commands is 1 (0: the first period, nothing
        written), then the sensor words into io[0:12]. Returns the status, as read_write.

        The period's fast path is a few native calls and allocates nothing: the request
        built and framed in place (its frame length is fixed), and when the whole reply
        frame is the link's next chunk, decoded and unpacked straight from it. Anything
        else (a reply in pieces, a late one, another frame first, a damaged one) goes to
        the general path with the same frame, which counts and retries as any transaction.
        Measured on QEMU (docs/tracking.md "Loop rate in pass mode")."""
        n = self.transactions
        self.transactions = n + 1 if n < COUNTER_WRAP else 0
        tag = (self._tag + 1) & 0xFF
        self._tag = tag
        ctx = self._track_ctx
        link = self.link
        frame = self._track_frame
        if ctx is not None:  # two Thumb calls: request framed, reply checked and unpacked
            track_request_thumb(io, (send_commands << 8) | tag, ctx)
            sent = link.write(frame)
            if sent == TRACK_REQUEST_FRAME_BYTES and self._chunk_pos >= self._chunk_fill:
                count = link.readinto(self._chunk)
                status = track_reply_thumb(self._chunk, count | (tag << 16), io, ctx)
                if status >= 0:
                    n = self.rx.frames_ok
                    self.rx.frames_ok = n + 1 if n < COUNTER_WRAP else 0
                    if status:
                        n = self.error_status
                        self.error_status = n + 1 if n < COUNTER_WRAP else 0
                    return status
                # not the fast case: the general path reads the chunk as any other
                self._chunk_fill = count
                self._chunk_pos = 0
            return self._track_general(io, tag, frame, sent)
        req = self.req
        _build_track(req, io, (send_commands << 8) | tag)
        framing.frame_encode(req, TRACK_REQUEST_BYTES, self.tx._out, framing.CRC16_TABLE)
        sent = link.write(frame)
        if sent == TRACK_REQUEST_FRAME_BYTES and self._chunk_pos >= self._chunk_fill:
            chunk = self._chunk
            count = link.readinto(chunk)
            if count > 4 and chunk[count - 1] == 0 and self.rx._scan_params[3] == 0:
                decoded = self.rx._decoded
                n = framing.frame_decode(
                    chunk, (count - 1) | self._decode_capacity, decoded, framing.CRC16_TABLE
                )
                if n > 0:
                    status = _unpack_track(decoded, n, io, tag)
                    if status != _E_NOT_MINE:
                        n = self.rx.frames_ok
                        self.rx.frames_ok = n + 1 if n < COUNTER_WRAP else 0
                        if status > OK:
                            n = self.error_status
                            self.error_status = n + 1 if n < COUNTER_WRAP else 0
                        elif status == E_BAD_REPLY:
                            self.bad_replies += 1
                        return status
            self._chunk_fill = count
            self._chunk_pos = 0
        return self._track_general(io, tag, frame, sent)

    def _track_general(self, io, tag, frame, sent):
        """track()'s general path: wait (retrying) for the reply, then unpack it."""
        status = self._exchange(frame, sent)
        if status < 0:
            return status
        body = self.reply
        status = _unpack_track(body, len(body), io, tag)
        if status == E_BAD_REPLY:
            self.bad_replies += 1
        return status

    def try_again(self):
        """The next transaction gets its tries even if one timed out earlier in this pass:
        the laser-off command of a stop."""
        if self.down > 0:
            self.down = 0

    def read1(self, addr):
        """One register as an int (small values only on 32-bit targets), or -1 on error."""
        if self.read(addr, 1) != OK:
            return -1
        return self.words[0]

    def write(self, addr, words, count):
        return self._transact(self.build_write(self._next_tag(), addr, words, count))

    def write1(self, addr, value):
        self._one[0] = value
        return self._transact(self.build_write(self._next_tag(), addr, self._one, 1))

    def fifo_read(self, fifo, dest, dest_offset, max_bytes):
        """Read up to max_bytes from a FIFO into dest[dest_offset:]; returns the byte count
        (>= 0) or a negative status."""
        status = self._transact(self.build_fifo_read(self._next_tag(), fifo, max_bytes))
        if status != OK:
            return -status if status > 0 else status
        body = self.reply
        count = _get_u16(body, 4) if len(body) >= 6 else -1
        if count < 0 or count > max_bytes or len(body) != 6 + count or body[3] != fifo:
            self.bad_replies += 1
            return E_BAD_REPLY
        _copy(body, 6, dest, dest_offset, count)
        return count

    def mem_write(self, mem, offset, data, data_offset, count):
        return self._transact(
            self.build_mem_write(self._next_tag(), mem, offset, data, data_offset, count)
        )

    def poll(self):
        """Between transactions: hand unsolicited frames to on_unsolicited (at most
        _MAX_POLL_FRAMES a call)."""
        busy = False
        for _ in range(_MAX_POLL_FRAMES):
            body = self._next_frame()
            if body is None:
                return busy
            busy = True
            if self.on_unsolicited:
                self.unsolicited += 1
                self.on_unsolicited(body)
            else:
                self.bad_replies += 1
        return busy

    def counters(self):
        drops = self.rx.drops
        return {
            "transactions": self.transactions,
            "timeouts": self.timeouts,
            "retransmissions": self.retransmissions,
            "bad_replies": self.bad_replies,
            "error_status": self.error_status,
            # pass-mode TRACK replies the paced period took: not in rx.frames_ok
            "track_replies": self.track_replies,
            "unsolicited": self.unsolicited,
            "skipped": self.skipped,
            "frames_dropped": {
                framing.DROP_REASONS[i]: drops[i] for i in range(len(framing.DROP_REASONS))
            },
        }
