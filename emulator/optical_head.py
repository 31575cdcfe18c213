"""The emulated optical head: the hardware at the far end of the payload bus.

It serves payload-bus requests (host/protocol/payload_bus.py, docs/payload-bus.md) from a
register file, and models:

- a laser driver with a double-buffered pattern RAM: the controller writes the back bank
  and commits it for frame n; at each frame boundary the head swaps it in and emits one
  symbol per slot. It records what it emitted (`emitted`) and the frames it had to emit
  blank because nothing was committed in time (`blank_frames`).
- a QRNG (emulator/head_qrng.py: AES-256-CTR keyed inside the head stands in for the
  physics; `qrng_key` from a test's fixture, else 32 bytes from os.urandom) that feeds the
  QRNG FIFO and, with emulator/pattern_generator.py attached, the head's own generator;
- a pattern-memory port (`HeadServer.pattern_address`): the payload processor's link to
  the head's pattern memory, serving OP_PATTERN_READ and OP_PATTERN_READ_RUNS only
  (docs/payload-bus.md);
- a TDC whose FIFO holds events (u8 channel, u64 time_ps on the local TDC clock): PPS,
  sync, beacon pulse, uplink detectors 0-3. Everything generated is kept in `tdc_truth`;
  events that found the FIFO full are counted (REG_TDC_OVERFLOW) and kept in `tdc_lost`.
- housekeeping sensors (laser power, temperatures).

Time is virtual (integer picoseconds), so a "100 MHz" source runs on any host. Two pacings:
- lockstep (`time_scale=None`, REG_TIME_SCALE_PPM = 0): the clock waits for the controller.
  It advances to the next frame boundary when the controller polls REG_FRAME_COUNT with the
  back bank full, or polls REG_LASER_ACTIVE while the laser is stopping. Deterministic:
  TDC overflow or underrun then depend only on the controller's work per frame.
- scaled real time (`time_scale=s`): virtual time = s * wall time since start, checked at
  every request; a controller that is too slow sees blank frames, as on hardware.

The local TDC clock runs as `local_ps = clock_offset_ps + true_ps * (1 + drift_ppb/1e9)`;
PPS events mark true multiples of `pps_period_ps` (1 s on the real thing; shorter in tests
so a few milliseconds of virtual time hold many PPS edges).
"""

from __future__ import annotations

import collections
import copy
import math
import struct
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from emulator.endpoint import FrameEndpoint
from emulator.head_qrng import HeadQrng
from host.protocol import payload_bus as pb

MAX_FRAME_SLOTS = 4096
PS_PER_S = 10**12
CH_PPS, CH_SYNC, CH_BEACON, CH_UPLINK0 = 0, 1, 2, 3
REG_LASER_ACTIVE = pb.REG_LASER_ACTIVE


class RegisterDevice:
    """A function block behind the head's register map (tracking plants: issue 6).

    Registers are addressed by their offset in the block (0..0xFF); values are u32.
    `read_reg` raises KeyError for an address it does not have."""

    def read_reg(self, offset: int) -> int:
        raise KeyError(offset)

    def write_reg(self, offset: int, value: int) -> int:
        return pb.E_BAD_ADDRESS

    def advance_to(self, t_ps: int) -> None:
        """The head's clock moved to t_ps (called before each request is served)."""

    def checkpoint(self):
        """The block's state, for `restore` (a failed TRACK at the tracking block has no
        effect). A whole copy by default; a block with a large state saves less."""
        return copy.deepcopy(self.__dict__)

    def restore(self, saved) -> None:
        self.__dict__.clear()
        self.__dict__.update(saved)


@dataclass
class EmittedFrame:
    frame_number: int
    first_slot: int
    slot_count: int
    nibbles: bytes  # slot 2k in the low nibble of byte k (docs/formats.md)


@dataclass
class TdcSources:
    """Event rates on the TDC channels (per second of true time)."""

    sync_rate_hz: float = 0.0
    beacon_rate_hz: float = 0.0
    uplink_rate_hz: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    # events simulated elsewhere (the two-way pass's uplink detections): (head true time
    # ps, channel, TDC time ps) arrays sorted by true time; the TDC time is given because
    # it is the pass's satellite clock (noise, relativity), not the head's simple model
    scheduled: tuple | None = None


@dataclass
class OpticalHead:
    seed: int = 1
    time_scale: float | None = None  # None: lockstep
    fifo_depth: int = 4096
    sources: TdcSources = field(default_factory=TdcSources)
    pps_period_ps: int = PS_PER_S
    clock_offset_ps: int = 0
    clock_drift_ppb: int = 0
    laser_power_uw: int = 1500
    # the QRNG stand-in's key: a test fixture, or None for os.urandom; taken by the QRNG
    # and cleared here at once, so no repr, log or copy of the head shows it
    qrng_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._rng = np.random.default_rng(self.seed)  # TDC physics: not secret
        self.qrng = HeadQrng(self.qrng_key)
        self.qrng_key = None
        self.pattern_memory = None  # emulator.pattern_generator.attach sets it
        self.pattern_reads = 0  # PATTERN_READ(_RUNS) requests served on the pattern-memory port
        # a read of slots not yet emitted waits up to this long for the head's clock to
        # emit them (0: refused at once). Set while the pass goes by at its pace
        # (host/mission/run.py PassAtItsPace): the emulated clock may lag the wall clock
        # under load, where real hardware emits at the slot clock before any photon of a
        # slot can be detected and asked about
        self.pattern_wait_s = 0.0
        self.now_ps = 0
        self._wall0 = time.monotonic()
        self.regs: dict[int, int] = {
            pb.REG_ID: pb.HEAD_ID,
            pb.REG_VERSION: pb.HEAD_VERSION,
            pb.REG_TIME_SCALE_PPM: 0 if self.time_scale is None else round(self.time_scale * 1e6),
            pb.REG_LASER_CTRL: 0,
            pb.REG_FRAME_SLOTS: 1024,
            pb.REG_SLOT_RATE_HZ: 100_000_000,
            pb.REG_QRNG_CTRL: 0,
            pb.REG_TDC_CTRL: 0,
        }
        self.frame_count = 0  # boundaries processed = the frame the back bank may hold
        self.back = bytearray(MAX_FRAME_SLOTS // 2)
        self.back_committed: int | None = None
        self.last_commit = 0xFFFFFFFF
        self.tdc_delivered = 0
        self.current: EmittedFrame | None = None
        self.laser_active = False
        self.emitted: list[EmittedFrame] = []
        self.blank_frames: list[int] = []
        self.fifo: collections.deque[tuple[int, int]] = collections.deque()
        self.tdc_truth: list[tuple[int, int]] = []
        self.tdc_lost: list[tuple[int, int]] = []
        self.tdc_lost_index: set[int] = set()  # positions in tdc_truth
        self.tdc_overflow = 0
        self.qrng_bytes = 0
        self.qrng_log = bytearray()  # every QRNG byte handed out, for checks
        self.bad_requests = 0
        self.requests = 0
        self.retransmissions = 0  # repeated requests answered from the reply cache
        self.drop_reply_every = 0  # tests: withhold every n-th reply (a lossy bus)
        self._last_body = b""
        self._last_reply = b""
        self.reader = None  # the endpoint's FrameReader, for REG_BUS_ERRORS
        self.devices: dict[int, RegisterDevice] = {}  # block base (0x0500, ...) -> device

    def attach(self, base: int, device: RegisterDevice) -> None:
        """Plug a function block in at `base` (a multiple of 0x100, e.g. tracking at
        0x0500): its registers answer base..base+0xFF, and it sees the head's time."""
        if base % 0x100 or base < 0x0500 or base in self.devices:
            raise ValueError(f"register block {base:#06x} is taken or not a free block")
        self.devices[base] = device

    # ------------------------------------------------------------------ time

    def frame_period_ps(self) -> float:
        return self.regs[pb.REG_FRAME_SLOTS] * PS_PER_S / self.regs[pb.REG_SLOT_RATE_HZ]

    def boundary_ps(self, k: int) -> int:
        return k * self.regs[pb.REG_FRAME_SLOTS] * PS_PER_S // self.regs[pb.REG_SLOT_RATE_HZ]

    def local_ps(self, true_ps: int) -> int:
        return self.clock_offset_ps + true_ps + true_ps * self.clock_drift_ppb // 10**9

    def advance_to(self, t_ps: int) -> None:
        """Run the hardware up to virtual time t_ps (boundaries at exactly t_ps included)."""
        while True:
            boundary = self.boundary_ps(self.frame_count)
            if boundary > t_ps:
                break
            self._tdc_until(boundary)
            self._frame_boundary()
        self._tdc_until(t_ps)

    def _frame_boundary(self) -> None:
        # An accepted commit is a promise: that frame is emitted even if LASER_CTRL was
        # cleared since (the controller logged it on acceptance, and may have reset).
        k = self.frame_count
        slots = self.regs[pb.REG_FRAME_SLOTS]
        if self.back_committed == k:
            frame = EmittedFrame(k, k * slots, slots, bytes(self.back[: slots // 2]))
            self.emitted.append(frame)
            self.current = frame
            self.laser_active = True
        elif self.regs[pb.REG_LASER_CTRL] & 1:
            self.blank_frames.append(k)  # the laser stays dark: never a stale pattern
            self.current = None
            self.laser_active = True
        else:
            self.laser_active = False
            self.current = None
        self.back_committed = None
        self.frame_count = k + 1

    def _tdc_until(self, t_ps: int) -> None:
        start = self.now_ps
        if t_ps <= start:
            return
        self.now_ps = t_ps
        if not self.regs[pb.REG_TDC_CTRL] & 1:
            return
        events: list[tuple[int, int]] = []
        # PPS on true multiples of the period, in (start, t_ps]
        period = self.pps_period_ps
        first = start // period + 1
        for m in range(first, t_ps // period + 1):
            events.append((m * period, CH_PPS))
        src = self.sources
        if src.sync_rate_hz:
            step = PS_PER_S / src.sync_rate_hz
            m0 = math.floor(start / step) + 1
            m = m0
            while m * step <= t_ps:
                events.append((round(m * step), CH_SYNC))
                m += 1
        rates = [(CH_BEACON, src.beacon_rate_hz)] + [
            (CH_UPLINK0 + i, r) for i, r in enumerate(src.uplink_rate_hz)
        ]
        span = t_ps - start
        for channel, rate in rates:
            if rate <= 0:
                continue
            n = self._rng.poisson(rate * span / PS_PER_S)
            if n:
                times = start + 1 + self._rng.integers(0, span, size=n)
                events.extend((int(t), channel) for t in times)
        if src.scheduled is not None:
            true_ps, channels, tdc_ps = src.scheduled
            first, last = np.searchsorted(true_ps, [start, t_ps], side="right")
            events.extend(
                (int(true_ps[k]), int(channels[k]), int(tdc_ps[k])) for k in range(first, last)
            )
        events.sort()
        for item in events:
            true_ps, channel = item[0], item[1]
            event = (channel, item[2] if len(item) > 2 else self.local_ps(true_ps))
            self.tdc_truth.append(event)
            if len(self.fifo) >= self.fifo_depth:
                self.tdc_overflow += 1
                self.tdc_lost.append(event)
                self.tdc_lost_index.add(len(self.tdc_truth) - 1)
            else:
                self.fifo.append(event)

    def _wall_advance(self) -> None:
        if self.time_scale is not None:
            elapsed_s = time.monotonic() - self._wall0
            self.advance_to(int(elapsed_s * self.time_scale * PS_PER_S))

    def stall(self, frames: int) -> None:
        """Let `frames` frame periods pass at once, as if the controller had hung: the
        frames it could not fill go out blank (tests of late-controller handling)."""
        with self._lock:
            self.advance_to(self.boundary_ps(self.frame_count + frames - 1))

    def finish(self) -> None:
        """Run to the end of the frame being emitted (end-of-test flush)."""
        with self._lock:
            self.advance_to(self.boundary_ps(self.frame_count) - 1)

    # ------------------------------------------------------------------ registers

    def read_reg(self, addr: int) -> int:
        device = self.devices.get(addr & 0xFF00)
        if device is not None:
            return device.read_reg(addr & 0xFF) & 0xFFFFFFFF
        if addr == pb.REG_BUS_ERRORS:
            drops = self.reader.dropped if self.reader is not None else 0
            return (drops + self.bad_requests) & 0xFFFFFFFF
        if addr == pb.REG_TIME_PS_LO:
            return self.now_ps & 0xFFFFFFFF
        if addr == pb.REG_TIME_PS_HI:
            return (self.now_ps >> 32) & 0xFFFFFFFF
        if addr == pb.REG_FRAME_COUNT:
            return self.frame_count
        if addr == pb.REG_BACK_STATE:
            return 0 if self.back_committed is None else 1
        if addr == pb.REG_FRAMES_EMITTED:
            return len(self.emitted)
        if addr == pb.REG_UNDERRUNS:
            return len(self.blank_frames)
        if addr == pb.REG_LAST_COMMIT:
            return self.last_commit
        if addr == pb.REG_TDC_DELIVERED:
            return self.tdc_delivered & 0xFFFFFFFF
        if addr == REG_LASER_ACTIVE:
            return int(self.laser_active)
        if addr == pb.REG_QRNG_BYTES:
            return self.qrng_bytes & 0xFFFFFFFF
        if addr == pb.REG_TDC_LEVEL:
            return len(self.fifo)
        if addr == pb.REG_TDC_DEPTH:
            return self.fifo_depth
        if addr == pb.REG_TDC_OVERFLOW:
            return self.tdc_overflow & 0xFFFFFFFF
        if addr == pb.REG_TDC_EVENTS:
            return len(self.tdc_truth) & 0xFFFFFFFF
        if pb.REG_HK_LASER_POWER_UW <= addr <= pb.REG_HK_TEMP_BOARD_MC:
            return self._housekeeping(addr)
        if addr in self.regs:
            return self.regs[addr]
        raise KeyError(addr)

    def _housekeeping(self, addr: int) -> int:
        t_s = self.now_ps / PS_PER_S
        if addr == pb.REG_HK_LASER_POWER_UW:
            return self.laser_power_uw if self.laser_active else 0
        base = {
            pb.REG_HK_TEMP_LASER_MC: 25_000,
            pb.REG_HK_TEMP_TDC_MC: 31_000,
            pb.REG_HK_TEMP_BOARD_MC: -5_000,
        }[addr]
        value = base + round(500 * math.sin(2 * math.pi * t_s / 600))
        return value & 0xFFFFFFFF

    def write_reg(self, addr: int, value: int) -> int:
        device = self.devices.get(addr & 0xFF00)
        if device is not None:
            return device.write_reg(addr & 0xFF, value)
        if addr == pb.REG_COMMIT:
            if self.back_committed is not None or value != self.frame_count:
                return pb.E_REFUSED  # too late for that frame, or the bank is full
            self.back_committed = value
            self.last_commit = value
            return pb.OK
        if addr in (pb.REG_FRAME_SLOTS, pb.REG_SLOT_RATE_HZ):
            if self.regs[pb.REG_LASER_CTRL] & 1 or self.laser_active:
                return pb.E_REFUSED  # the slot clock cannot change while emitting
            bad_slots = not (2 <= value <= MAX_FRAME_SLOTS and value % 2 == 0)
            if addr == pb.REG_FRAME_SLOTS and bad_slots:
                return pb.E_REFUSED
            if addr == pb.REG_SLOT_RATE_HZ and value == 0:
                return pb.E_REFUSED
            # keep frame numbering continuous in time: frames restart at the next boundary
            old_boundary = self.boundary_ps(self.frame_count)
            self.regs[addr] = value
            while self.boundary_ps(self.frame_count) < max(old_boundary, self.now_ps):
                self.frame_count += 1
            return pb.OK
        if addr in (pb.REG_LASER_CTRL, pb.REG_QRNG_CTRL, pb.REG_TDC_CTRL):
            self.regs[addr] = value
            return pb.OK
        if addr in self.regs or addr in (pb.REG_FRAME_COUNT, pb.REG_TDC_OVERFLOW):
            return pb.E_READ_ONLY
        return pb.E_BAD_ADDRESS

    # ------------------------------------------------------------------ bus

    def handle(self, body: bytes) -> bytes | None:
        """Serve one request body; malformed ones are counted and answered with a status."""
        with self._lock:
            self.requests += 1
            if body == self._last_body:
                # The controller resends a request (same tag) when a reply was lost: answer
                # from the cache, never execute twice (FIFO data, commits).
                self.retransmissions += 1
                return self._last_reply
            try:
                request = pb.unpack_request(body)
            except pb.BusProtocolError:
                self.bad_requests += 1
                if len(body) >= 2 and not body[0] & pb.REPLY_FLAG:
                    known = body[0] in (
                        pb.OP_READ, pb.OP_WRITE, pb.OP_FIFO_READ, pb.OP_MEM_WRITE,
                        pb.OP_READ_WRITE, pb.OP_TRACK,
                    )  # fmt: skip
                    return pb.error_reply(body, pb.E_BAD_LENGTH if known else pb.E_UNKNOWN_OP)
                return None
            self._wall_advance()
            for device in self.devices.values():
                device.advance_to(self.now_ps)
            reply = self._serve(request).pack()
            self._last_body, self._last_reply = bytes(body), reply
            if self.drop_reply_every and self.requests % self.drop_reply_every == 0:
                return None
            return reply

    def _read_reply(self, req: pb.Request) -> pb.Reply:
        """The registers req.addr.. (req.count of them), for READ and READ_WRITE."""
        addrs = range(req.addr, req.addr + req.count)
        if self.time_scale is None:
            self._lockstep(addrs)
        try:
            words = tuple(self.read_reg(a) for a in addrs)
        except KeyError:
            return pb.Reply(req.op, req.tag, pb.E_BAD_ADDRESS)
        return pb.Reply(req.op, req.tag, pb.OK, req.addr, words)

    def _write_status(self, req: pb.Request, first_addr: int) -> int:
        """req.words into the registers from first_addr on, for WRITE and READ_WRITE:
        the first failing write's status, or OK."""
        for i, value in enumerate(req.words):
            status = self.write_reg(first_addr + i, value)
            if status != pb.OK:
                return status
        return pb.OK

    def _serve(self, req: pb.Request) -> pb.Reply:
        if req.op == pb.OP_READ:
            return self._read_reply(req)
        if req.op == pb.OP_WRITE:
            return pb.Reply(req.op, req.tag, self._write_status(req, req.addr))
        if req.op == pb.OP_READ_WRITE:
            # The tracking loop's period in one transaction: last period's commands out,
            # then this period's sensors in (the write may advance a device a period).
            status = self._write_status(req, req.write_addr)
            if status != pb.OK:
                return pb.Reply(req.op, req.tag, status)
            return self._read_reply(req)
        if req.op == pb.OP_TRACK:
            # A TRACK that fails has no effect: the controller takes the period as not
            # done and sends the same commands with its next one (firmware tracking_duty),
            # so commands kept from a refused exchange would be applied twice (the plant
            # advanced two periods on one set). The tracking block is restored.
            saved = self.track_checkpoint()
            reply = self._track_reply(req)
            if reply.status != pb.OK:
                self.track_restore(saved)
            return reply
        if req.op == pb.OP_FIFO_READ:
            if req.addr == pb.FIFO_QRNG:
                if not self.regs[pb.REG_QRNG_CTRL] & 1:
                    return pb.Reply(req.op, req.tag, pb.E_REFUSED)
                self.qrng_bytes += req.count
                data = self.qrng.fifo_bytes(req.count)
                self.qrng_log += data
                return pb.Reply(req.op, req.tag, pb.OK, req.addr, data=data)
            if req.addr == pb.FIFO_TDC:
                n = min(req.count // pb.TDC_EVENT_BYTES, len(self.fifo))
                out = bytearray()
                for _ in range(n):
                    channel, t = self.fifo.popleft()
                    out += struct.pack("<BQ", channel, t)
                self.tdc_delivered += n
                return pb.Reply(req.op, req.tag, pb.OK, req.addr, data=bytes(out))
            return pb.Reply(req.op, req.tag, pb.E_BAD_ADDRESS)
        if req.op == pb.OP_MEM_WRITE:
            if req.addr != pb.MEM_PATTERN:
                return pb.Reply(req.op, req.tag, pb.E_BAD_ADDRESS)
            if self.back_committed is not None:
                return pb.Reply(req.op, req.tag, pb.E_REFUSED)  # committed banks are frozen
            if req.offset + len(req.data) > len(self.back):
                return pb.Reply(req.op, req.tag, pb.E_BAD_LENGTH)
            self.back[req.offset : req.offset + len(req.data)] = req.data
            return pb.Reply(req.op, req.tag, pb.OK)
        return pb.Reply(req.op, req.tag, pb.E_UNKNOWN_OP)

    def _track_reply(self, req: pb.Request) -> pb.Reply:
        """READ_WRITE of the tracking blocks in TRACK's fixed layout: the commands (when
        the request carries them), then the sensors. A sensor value outside its field (a
        quadrant above the 16-bit ADC's range, CAM_NEW above a byte) is a fault of the
        device behind the block: refused, never truncated."""
        status = self._write_status(req, req.write_addr)
        if status != pb.OK:
            return pb.Reply(req.op, req.tag, status)
        reply = self._read_reply(req)
        words = reply.words
        if reply.status == pb.OK and (max(words[:4]) > 0xFFFF or words[4] > 0xFF):
            return pb.Reply(req.op, req.tag, pb.E_REFUSED)
        return reply

    def track_checkpoint(self):
        """The tracking block's state before a TRACK, for `track_restore` if it fails."""
        device = self.devices.get(pb.REG_TRACKING_BASE)
        return None if device is None else device.checkpoint()

    def track_restore(self, saved) -> None:
        device = self.devices.get(pb.REG_TRACKING_BASE)
        if device is not None:
            device.restore(saved)

    def _lockstep(self, addrs: range) -> None:
        # The controller polls because it is waiting on the head: let the clock run to
        # the next frame boundary (see the module docstring).
        waiting_for_bank = pb.REG_FRAME_COUNT in addrs and self.back_committed is not None
        stopping = (
            REG_LASER_ACTIVE in addrs
            and (self.laser_active or self.back_committed is not None)
            and not self.regs[pb.REG_LASER_CTRL] & 1
        )
        if waiting_for_bank or stopping:
            self.advance_to(self.boundary_ps(self.frame_count))

    def handle_pattern_port(self, body: bytes) -> bytes | None:
        """Serve one request on the pattern-memory port: PATTERN_READ (a slot list) or
        PATTERN_READ_RUNS (runs of consecutive slots), nothing else (no register, no FIFO:
        the port reads symbols and can change nothing)."""
        if len(body) < 2 or body[0] & pb.REPLY_FLAG:
            return None
        unpack = {
            pb.OP_PATTERN_READ: pb.unpack_pattern_read,
            pb.OP_PATTERN_READ_RUNS: pb.unpack_pattern_read_runs,
        }.get(body[0])
        if unpack is None:
            return pb.error_reply(body, pb.E_UNKNOWN_OP)
        try:
            tag, slots = unpack(body)
        except pb.BusProtocolError:
            return pb.error_reply(body, pb.E_BAD_LENGTH)
        deadline = time.monotonic() + self.pattern_wait_s
        while True:
            with self._lock:
                memory = self.pattern_memory
                covered = memory is not None and bool(np.all(memory.covers(slots)))
                if covered or time.monotonic() >= deadline:
                    self.pattern_reads += 1
                    if not covered:
                        return pb.pack_pattern_reply(tag, pb.E_BAD_ADDRESS, op=body[0])
                    return pb.pack_pattern_reply(tag, pb.OK, memory.symbols(slots), op=body[0])
            time.sleep(0.005)

    # ------------------------------------------------------------------ truth

    def emitted_symbols(self) -> bytes:
        """Every emitted symbol, one per byte, in slot order (for checks)."""
        out = bytearray()
        for frame in self.emitted:
            arr = np.frombuffer(frame.nibbles, dtype=np.uint8)
            pair = np.empty(2 * len(arr), dtype=np.uint8)
            pair[0::2] = arr & 0x0F
            pair[1::2] = arr >> 4
            out += pair[: frame.slot_count].tobytes()
        return bytes(out)


class HeadServer:
    """An OpticalHead behind three FrameEndpoints: `address`, the payload bus a target's
    UART1 connects to, `track_address`, the tracking link (the TRACK exchange on a link of
    its own, as the flight head's SPI: a QEMU target's third UART, docs/scheduling.md "The
    loop on a timer interrupt"; the same request handler, serialised by the head's lock),
    and `pattern_address`, the pattern-memory port the payload processor reads
    (host.link.pattern_memory.PatternMemoryClient)."""

    def __init__(self, head: OpticalHead):
        self.head = head
        self.endpoint = FrameEndpoint(head.handle, max_body_bytes=pb.MAX_BODY_BYTES)
        self.track_endpoint = FrameEndpoint(head.handle, max_body_bytes=pb.MAX_BODY_BYTES)
        self.pattern_endpoint = FrameEndpoint(
            head.handle_pattern_port, max_body_bytes=pb.PATTERN_PORT_MAX_BODY_BYTES
        )
        head.reader = self.endpoint.reader
        self.address = self.endpoint.address
        self.track_address = self.track_endpoint.address
        self.pattern_address = self.pattern_endpoint.address

    def __enter__(self):
        self.endpoint.start()
        self.track_endpoint.start()
        self.pattern_endpoint.start()
        return self

    def __exit__(self, *exc):
        self.pattern_endpoint.stop()
        self.track_endpoint.stop()
        self.endpoint.stop()
