# Timestamp buffering (docs/payload-bus.md, "TDC"): the TDC FIFO is drained in bursts into a
# preallocated ring of 9-byte events (u8 channel, u64 time_ps little-endian, exactly the
# TDC_BLOCK layout), full blocks are spooled to products/tdc.qrec, and PPS events feed the
# clock discipline. Loss is counted, never silent: events the head's FIFO dropped
# (REG_TDC_OVERFLOW) and events the ring had no room for (ring_overflow).
#
# `ring_push` is the interrupt-path kernel (on a board a DMA-complete or FIFO-half-full
# interrupt calls it): viper over preallocated buffers, no allocation, and no Python int
# >= 2**30 (times stay bytes; tested under micropython.heap_lock()).
import array
import struct

import micropython
from micropython import const

from payload import bus as busmod
from payload import memcopy, storage

EVENT_BYTES = const(9)
CHANNEL_PPS = const(0)
CHANNEL_SYNC = const(1)
CHANNEL_BEACON = const(2)
CHANNEL_UPLINK0 = const(3)
BURST_EVENTS = const(227)  # 227 * 9 = 2043 bytes, the largest burst under MAX_DATA_BYTES
RING_EVENTS = const(2048)  # 18 kB: the controller has 512 kB of heap for everything
BLOCK_EVENTS = const(227)
PPS_SLOTS = const(16)
PS_PER_S = 1_000_000_000_000  # a big int on 32-bit targets: only used off the hot path

# ring state words
_W = const(0)  # write index (events)
_R = const(1)  # read index
_COUNT = const(2)  # events held
_OVERFLOW = const(3)  # events dropped because the ring was full
_TOTAL = const(4)  # events accepted
_PPS_W = const(5)  # PPS slots written (mod PPS_SLOTS by index)
_PPS_COUNT = const(6)  # PPS events seen


@micropython.viper
def ring_push(state: ptr32, ring: ptr8, capacity: int, src: ptr8, n_events: int, pps: ptr8):
    """Append n_events 9-byte events from src to the ring; copy PPS times into pps.

    Events that find the ring full are counted in state[_OVERFLOW] one by one. The copy
    is bulk (at most two runs around the wrap), not per event."""
    count = state[_COUNT]
    accepted = capacity - count
    if accepted > n_events:
        accepted = n_events
    state[_OVERFLOW] = state[_OVERFLOW] + (n_events - accepted)
    # PPS (channel 0) times for the discipline, from every event including dropped ones
    e = 0
    while e < n_events:
        s = e * 9
        if src[s] == 0:
            slot = (state[_PPS_W] & 15) * 8
            for i in range(8):
                pps[slot + i] = src[s + 1 + i]
            state[_PPS_W] = state[_PPS_W] + 1
            state[_PPS_COUNT] = state[_PPS_COUNT] + 1
        e += 1
    w = state[_W]
    first = capacity - w
    if first > accepted:
        first = accepted
    copy = memcopy.copy
    copy(uint(ring) + w * 9, uint(src), first * 9)
    copy(uint(ring), uint(src) + first * 9, (accepted - first) * 9)
    w += accepted
    if w >= capacity:
        w -= capacity
    state[_W] = w
    state[_COUNT] = count + accepted
    state[_TOTAL] = state[_TOTAL] + accepted


@micropython.viper
def ring_pop(state: ptr32, ring: ptr8, capacity: int, dst: ptr8, n_events: int) -> int:
    """Move up to n_events from the ring to dst; returns how many."""
    r = state[_R]
    count = state[_COUNT]
    n = n_events if n_events < count else count
    first = capacity - r
    if first > n:
        first = n
    copy = memcopy.copy
    copy(uint(dst), uint(ring) + r * 9, first * 9)
    copy(uint(dst) + first * 9, uint(ring), (n - first) * 9)
    r += n
    if r >= capacity:
        r -= capacity
    state[_R] = r
    state[_COUNT] = count - n
    return n


@micropython.viper
def _put_u32(buf: ptr8, offset: int, value: int):
    for i in range(4):
        buf[offset + i] = (value >> (8 * i)) & 0xFF


class TdcDrain:
    """Drains the head's TDC FIFO; `step()` is the scheduler's duty."""

    def __init__(self, bus, store, ring_events=RING_EVENTS, bursts_per_step=1):
        self.bus = bus
        self.store = store
        self.capacity = ring_events
        self.bursts_per_step = bursts_per_step
        self.state = array.array("I", bytes(4 * 8))
        self.ring = bytearray(EVENT_BYTES * ring_events)
        self.burst = bytearray(EVENT_BYTES * BURST_EVENTS)
        self.pps = bytearray(8 * PPS_SLOTS)
        self.log = store.open_log("tdc", storage.KIND_TDC_BLOCK, 4 + EVENT_BYTES * BLOCK_EVENTS)
        self._events = self.log.payload[4:]  # a view, made once
        self.blocks = 0
        self.events_spooled = 0
        self.events_unstored = 0  # popped for storage that refused them: lost, counted
        self.fifo_overflow = 0  # as last read from the head
        self.events_received = 0  # over the bus
        self.events_delivered = 0  # as the head counted them (REG_TDC_DELIVERED)
        self.bus_failures = 0
        self.running = False

    def start(self):
        """Enable time-tagging; returns the bus status (0 = OK)."""
        status = self.bus.write1(busmod.REG_TDC_CTRL, 1)
        self.running = status == busmod.OK
        return status

    def drain_once(self):
        """One FIFO burst into the ring; returns the number of events read (-1 on error)."""
        n = self.bus.fifo_read(busmod.FIFO_TDC, self.burst, 0, EVENT_BYTES * BURST_EVENTS)
        if n < 0:
            self.bus_failures += 1
            return -1
        events = n // EVENT_BYTES
        self.events_received += events
        ring_push(self.state, self.ring, self.capacity, self.burst, events, self.pps)
        return events

    def spool(self, flush=False):
        """Write full blocks (and with flush, the partial last one) to tdc.qrec."""
        wrote = False
        log = self.log
        while self.state[_COUNT] >= BLOCK_EVENTS or (flush and self.state[_COUNT] > 0):
            payload = log.payload
            n = ring_pop(self.state, self.ring, self.capacity, self._events, BLOCK_EVENTS)
            _put_u32(payload, 0, n)
            wrote = True
            if log.commit(4 + EVENT_BYTES * n) < 0:
                self.events_unstored += n  # storage full or failing (docs/storage.md)
                continue
            self.blocks += 1
            self.events_spooled += n
        return wrote

    def step(self):
        if not self.running:
            return False
        busy = False
        for _ in range(self.bursts_per_step):
            got = self.drain_once()
            if got > 0:
                busy = True
            if got < BURST_EVENTS:
                break
        return self.spool() or busy

    def stop(self, max_bursts=100_000):
        """Stop time-tagging, drain the FIFO to empty, spool everything and read the head's
        loss counters (disabling first, so a busy channel cannot keep the drain going)."""
        self.bus.write1(busmod.REG_TDC_CTRL, 0)
        for _ in range(max_bursts):
            if self.drain_once() <= 0:
                break
            self.spool()  # keep the ring from overflowing during a long drain
        self.spool(flush=True)
        self.read_overflow()
        self.running = False

    def read_overflow(self):
        """Update the head's loss counters: FIFO overflow, and events it handed out whose
        reply never arrived (a bus timeout), so no loss anywhere goes uncounted."""
        if self.bus.read(busmod.REG_TDC_OVERFLOW, 3) == busmod.OK:
            self.fifo_overflow = self.bus.words[0]
            self.events_delivered = self.bus.words[2]
        return self.fifo_overflow

    def transit_lost(self):
        lost = self.events_delivered - self.events_received
        return lost if lost > 0 else 0

    def pps_count(self):
        return self.state[_PPS_COUNT]

    def pps_time_ps(self, index):
        """Local time of PPS number index (of the last PPS_SLOTS) as a Python int."""
        slot = (index % PPS_SLOTS) * 8
        return int.from_bytes(self.pps[slot : slot + 8], "little")

    def telemetry(self):
        return {
            "events_accepted": self.state[_TOTAL],
            "events_spooled": self.events_spooled,
            "blocks": self.blocks,
            "ring_overflow": self.state[_OVERFLOW],
            "fifo_overflow": self.fifo_overflow,
            "transit_lost": self.transit_lost(),
            "unstored": self.events_unstored,
            "lost": self.state[_OVERFLOW]
            + self.fifo_overflow
            + self.transit_lost()
            + self.events_unstored,
            "bus_failures": self.bus_failures,
        }


class ClockDiscipline:
    """Local (TDC) clock against PPS: offset and drift, logged as CLOCK_DISCIPLINE records.

    PPS k (true time k * pps_period_ps) is stamped at local time L_k. With L = offset +
    (1 + drift) * true, the drift is the slope between the first and the latest PPS and
    the offset the latest stamp minus its ideal time. Integer arithmetic (big ints, at the
    PPS rate only): the 32-bit targets have no double-precision floats.

    Record payload (docs/payload-bus.md): u32 pps_index, u64 local_ps, i64 offset_ps,
    i64 drift_ppt (parts per 10**12)."""

    RECORD = "<IQqq"

    def __init__(self, tdc, store, pps_period_ps=PS_PER_S):
        self.tdc = tdc
        self.pps_period_ps = pps_period_ps
        self.log = store.open_log("clock", storage.KIND_CLOCK_DISCIPLINE, 28)
        self._seen = 0
        self._first = None  # (index, local_ps)
        self.offset_ps = None
        self.drift_ppt = None
        self.pps_index = None
        self.records = 0

    def step(self):
        count = self.tdc.pps_count()
        if count == self._seen:
            return False
        if count - self._seen > PPS_SLOTS:
            self._seen = count - PPS_SLOTS  # older stamps were overwritten
        while self._seen < count:
            self._update(self.tdc.pps_time_ps(self._seen))
            self._seen += 1
        return True

    def _update(self, local_ps):
        period = self.pps_period_ps
        if self._first is None:
            # Assumes |offset| < half a period: the first PPS names its own second.
            index = (local_ps + period // 2) // period
            self._first = (index, local_ps)
            self.drift_ppt = 0
        else:
            index0, local0 = self._first
            # the whole number of periods elapsed, with the current drift estimate
            elapsed = local_ps - local0
            seconds = (elapsed * 10**12 // (10**12 + self.drift_ppt) + period // 2) // period
            index = index0 + seconds
            if seconds > 0:
                ideal = seconds * period
                self.drift_ppt = (elapsed - ideal) * 10**12 // ideal
        self.pps_index = index
        self.offset_ps = local_ps - index * period * (10**12 + self.drift_ppt) // 10**12
        record = struct.pack(self.RECORD, index, local_ps, self.offset_ps, self.drift_ppt)
        self.log.append(record)
        self.records += 1

    def telemetry(self):
        return {
            "pps_index": self.pps_index,
            "offset_ps": self.offset_ps,
            "drift_ppt": self.drift_ppt,
            "records": self.records,
        }
