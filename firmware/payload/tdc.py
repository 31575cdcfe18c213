# Timestamp buffering (docs/payload-bus.md, "TDC"): the TDC FIFO is drained in bursts into a
# preallocated ring of 9-byte events (u8 channel, u64 time_ps little-endian, exactly the
# TDC_BLOCK layout), full blocks are spooled to products/tdc.qrec, and PPS events feed the
# clock discipline. Loss is counted, never silent: events the head's FIFO dropped
# (REG_TDC_OVERFLOW) and events the ring had no room for (ring_overflow).
#
# Two-way time transfer (docs/time-transfer.md): the uplink detectors' tags (channels
# UPLINK0..) take the same path, and the ring counts them apart (accepted and dropped), so
# the time-transfer stream's loss is its own figure. The laser's slot-clock sync output
# (channel SYNC) marks the epochs of the satellite's own emissions: ring_push keeps the
# last EPOCH_SLOTS of them, and EmissionEpochs logs one every `record_every` to
# products/epochs.qrec (mark index, local time), so the satellite side knows when it sent
# which slot without reading the whole TDC stream.
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
EPOCH_SLOTS = const(16)
STATE_WORDS = const(12)
KIND_EMISSION_EPOCH = const(9)
PS_PER_S = 1_000_000_000_000  # a big int on 32-bit targets: only used off the hot path

# ring state words. Single writer per word, so ring_push (an interrupt handler on a
# board) and ring_pop (the main loop) never race on a read-modify-write: push writes only
# _W and its counters, pop writes only _R. The indices run over [0, 2 * capacity), so
# W - R (mod 2 * capacity) tells a full ring from an empty one without a shared count;
# each publishes its index after copying.
_W = const(0)  # write index (events, mod 2 * capacity): ring_push only
_R = const(1)  # read index (events, mod 2 * capacity): ring_pop only
_UNUSED = const(2)  # was a shared event count (written by both sides: not ISR-safe)
_OVERFLOW = const(3)  # events dropped because the ring was full: ring_push only
_TOTAL = const(4)  # events accepted: ring_push only
_PPS_W = const(5)  # PPS slots written (mod PPS_SLOTS by index): ring_push only
_PPS_COUNT = const(6)  # PPS events seen: ring_push only
_UP_ACCEPTED = const(7)  # uplink-detector events taken into the ring: ring_push only
_UP_DROPPED = const(8)  # uplink-detector events the full ring dropped: ring_push only
_EPOCH_COUNT = const(9)  # emission epoch marks (SYNC) seen: ring_push only


@micropython.viper
def ring_count(state: ptr32, capacity: int) -> int:
    """Events held (any context may read it: two single-writer words)."""
    count = state[_W] - state[_R]
    if count < 0:
        count += 2 * capacity
    return count


@micropython.viper
def ring_push(
    state: ptr32, ring: ptr8, capacity: int, src: ptr8, n_events: int, pps: ptr8, epochs: ptr8
):
    """Append n_events 9-byte events from src to the ring; copy PPS times into pps and
    emission epoch marks (SYNC) into epochs (state STATE_WORDS long).

    Events that find the ring full are counted in state[_OVERFLOW] one by one, and the
    uplink detectors' among them also in state[_UP_DROPPED]. The copy is bulk (at most
    two runs around the wrap), not per event."""
    w = state[_W]
    count = w - state[_R]
    if count < 0:
        count += 2 * capacity
    accepted = capacity - count
    if accepted > n_events:
        accepted = n_events
    state[_OVERFLOW] = state[_OVERFLOW] + (n_events - accepted)
    # PPS (channel 0) times for the discipline and SYNC (channel 1) marks, from every event
    # including dropped ones; the uplink stream counted apart (the first `accepted` events
    # go into the ring, the rest are dropped)
    up_accepted = 0
    up_dropped = 0
    e = 0
    while e < n_events:
        s = e * 9
        channel = src[s]
        if channel == 0:
            slot = (state[_PPS_W] & 15) * 8
            for i in range(8):
                pps[slot + i] = src[s + 1 + i]
            state[_PPS_W] = state[_PPS_W] + 1
            state[_PPS_COUNT] = state[_PPS_COUNT] + 1
        elif channel == 1:
            slot = (state[_EPOCH_COUNT] & 15) * 8
            for i in range(8):
                epochs[slot + i] = src[s + 1 + i]
            state[_EPOCH_COUNT] = state[_EPOCH_COUNT] + 1
        elif channel >= 3:
            if e < accepted:
                up_accepted += 1
            else:
                up_dropped += 1
        e += 1
    state[_UP_ACCEPTED] = state[_UP_ACCEPTED] + up_accepted
    state[_UP_DROPPED] = state[_UP_DROPPED] + up_dropped
    position = w if w < capacity else w - capacity
    first = capacity - position
    if first > accepted:
        first = accepted
    copy = memcopy.copy
    copy(uint(ring) + position * 9, uint(src), first * 9)
    copy(uint(ring), uint(src) + first * 9, (accepted - first) * 9)
    w += accepted
    if w >= 2 * capacity:
        w -= 2 * capacity
    state[_TOTAL] = state[_TOTAL] + accepted
    state[_W] = w  # published last: the reader sees these events only once copied


@micropython.viper
def ring_pop(state: ptr32, ring: ptr8, capacity: int, dst: ptr8, n_events: int) -> int:
    """Move up to n_events from the ring to dst; returns how many."""
    r = state[_R]
    count = state[_W] - r
    if count < 0:
        count += 2 * capacity
    n = n_events if n_events < count else count
    position = r if r < capacity else r - capacity
    first = capacity - position
    if first > n:
        first = n
    copy = memcopy.copy
    copy(uint(dst), uint(ring) + position * 9, first * 9)
    copy(uint(dst) + first * 9, uint(ring), (n - first) * 9)
    r += n
    if r >= 2 * capacity:
        r -= 2 * capacity
    state[_R] = r  # published last: the writer may reuse these slots only now
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
        self.state = array.array("I", bytes(4 * STATE_WORDS))
        self.ring = bytearray(EVENT_BYTES * ring_events)
        self.burst = bytearray(EVENT_BYTES * BURST_EVENTS)
        self.pps = bytearray(8 * PPS_SLOTS)
        self.epochs = bytearray(8 * EPOCH_SLOTS)
        self.log = store.open_log(
            "tdc", storage.KIND_TDC_BLOCK, 4 + EVENT_BYTES * BLOCK_EVENTS, batched=True
        )
        self._events = self.log.payload[4:]  # a view, made once
        self.blocks = 0
        self.events_spooled = 0
        self.events_unstored = 0  # popped for storage that refused them: lost, counted
        # Loss accounting with one origin: everything counts from the pass's start. The
        # head's u32 counters (overflow, delivered) are read as baselines when the pass
        # starts and followed by wrap-safe differences into Python ints (they wrap in
        # ~14 min at 5 M events/s), so a controller reset does not show the head's earlier
        # events as lost. A head counter that goes back (the head restarted) cannot be
        # told from loss: it is counted in head_resets and the accounting restarts there.
        self.fifo_overflow = 0  # events the head's FIFO dropped since the start
        self.events_received = 0  # events received over the bus since the start
        self.events_delivered = 0  # events the head handed out since the start
        self.head_resets = 0
        self._head_last = None  # [overflow, delivered] as last read (u32)
        self.bus_failures = 0
        self.running = False

    def start(self):
        """Enable time-tagging; returns the bus status (0 = OK)."""
        self.fifo_overflow = 0
        self.events_received = 0
        self.events_delivered = 0
        self.events_unstored = 0
        self.head_resets = 0
        self._head_last = None
        self.state[_OVERFLOW] = 0  # the interrupt path is not running yet
        self.state[_TOTAL] = 0
        self.state[_UP_ACCEPTED] = 0
        self.state[_UP_DROPPED] = 0
        if self.bus.read(busmod.REG_TDC_OVERFLOW, 3) == busmod.OK:
            self._head_last = [self.bus.words[0], self.bus.words[2]]
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
        ring_push(self.state, self.ring, self.capacity, self.burst, events, self.pps, self.epochs)
        return events

    def spool(self, flush=False):
        """Write full blocks (and with flush, the partial last one) to tdc.qrec."""
        wrote = False
        log = self.log
        while True:
            held = ring_count(self.state, self.capacity)
            if held < BLOCK_EVENTS and not (flush and held > 0):
                break
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
            self.account(self.bus.words[0], self.bus.words[2])
        return self.fifo_overflow

    def account(self, overflow, delivered):
        """Fold the head's u32 counters (as just read) into the pass's totals."""
        last = self._head_last
        self._head_last = [overflow, delivered]
        if last is None:
            return  # no baseline (the start's read failed): from here on
        d_overflow = (overflow - last[0]) & 0xFFFFFFFF
        d_delivered = (delivered - last[1]) & 0xFFFFFFFF
        if d_overflow >= 0x80000000 or d_delivered >= 0x80000000:
            # a counter went back: the head restarted (2**31 events between two reads
            # would take 7 min at 5 M/s; housekeeping reads every 100 ms). Its counters
            # started again from 0, so what they hold is what happened since: counted.
            # Taken as a new baseline instead, the events it handed out since the restart
            # were missing from `delivered` while every one of them was in `received`,
            # and the transit loss before the restart vanished under them (clamped at 0).
            # What the head did between the last read and its restart is not known: the
            # restart is counted in head_resets.
            self.head_resets += 1
            self.fifo_overflow += overflow
            self.events_delivered += delivered
            return
        self.fifo_overflow += d_overflow
        self.events_delivered += d_delivered

    def transit_lost(self):
        lost = self.events_delivered - self.events_received
        return lost if lost > 0 else 0

    def pps_count(self):
        return self.state[_PPS_COUNT]

    def epoch_count(self):
        return self.state[_EPOCH_COUNT]

    def epoch_time_ps(self, index):
        """Local time of emission epoch mark number index (of the last EPOCH_SLOTS)."""
        slot = (index % EPOCH_SLOTS) * 8
        return int.from_bytes(self.epochs[slot : slot + 8], "little")

    def pps_time_ps(self, index):
        """Local time of PPS number index (of the last PPS_SLOTS) as a Python int."""
        slot = (index % PPS_SLOTS) * 8
        return int.from_bytes(self.pps[slot : slot + 8], "little")

    def telemetry(self):
        out = {
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
            # the time-transfer stream: uplink detections taken and dropped by the ring
            # (the head's FIFO and transit losses are not told by channel: in "lost"),
            # short keys: the status travels in one housekeeping packet
            "up": [self.state[_UP_ACCEPTED], self.state[_UP_DROPPED]],
        }
        if self.head_resets:
            out["head_resets"] = self.head_resets
        return out


class EmissionEpochs:
    """The satellite's emission epochs: the laser's slot-clock sync marks (TDC channel
    SYNC, captured by ring_push) logged to products/epochs.qrec as EMISSION_EPOCH records,
    one every `record_every` marks (u32 mark index since the pass start, u64 local_ps).
    The slot of any emission follows from a record and the slot rate (mark i is slot
    i * slots-per-mark). Marks overwritten in the slots before this duty read them are
    counted (`marks_missed`); when the mark due for a record is among them, the first
    mark kept after it is logged instead, with its own index (a drain of more than
    EPOCH_SLOTS marks at the pass's start lost mark 0, and a 4 s pass at 10 kHz had no
    record at all); every mark also stays in tdc.qrec."""

    RECORD = "<IQ"

    def __init__(self, tdc, store, record_every=100_000):
        self.tdc = tdc
        self.record_every = record_every
        self.log = store.open_log("epochs", KIND_EMISSION_EPOCH, 12, deferred=True)
        self._seen = tdc.epoch_count()
        self._first = self._seen
        self._due = 0  # index of the next mark to log (or the first kept after it)
        self.records = 0
        self.marks_missed = 0

    def start(self):
        """Count marks from the pass's start."""
        self._seen = self._first = self.tdc.epoch_count()
        self._due = 0

    def step(self):
        count = self.tdc.epoch_count()
        if count == self._seen:
            return False
        if count - self._seen > EPOCH_SLOTS:
            self.marks_missed += count - EPOCH_SLOTS - self._seen
            self._seen = count - EPOCH_SLOTS
        while self._seen < count:
            index = self._seen - self._first
            if index >= self._due:
                local_ps = self.tdc.epoch_time_ps(self._seen)
                self.log.append(struct.pack(self.RECORD, index, local_ps))
                self.records += 1
                self._due = (index // self.record_every + 1) * self.record_every
            self._seen += 1
        return True

    def telemetry(self):
        return {"records": self.records, "marks_missed": self.marks_missed}


class ClockDiscipline:
    """Local (TDC) clock against PPS: offset and drift, logged as CLOCK_DISCIPLINE records.

    PPS k (true time k * pps_period_ps) is stamped at local time L_k, modelled as
    L = offset + (1 + drift) * true. The model is a least-squares line through the last
    PPS_SLOTS accepted pulses (exact integer arithmetic, big ints at the PPS rate only:
    the 32-bit targets have no double-precision floats). A pulse further than
    tolerance_ps from the model's prediction is an outlier: counted, not used. Three
    outliers in a row that agree with each other mean the model was wrong (a bad first
    pulse, or a real clock step): the fit restarts from them (counted in refits).

    Record payload (docs/payload-bus.md): u32 pps_index, u64 local_ps, i64 offset_ps,
    i64 drift_ppt (parts per 10**12)."""

    RECORD = "<IQqq"
    TOLERANCE_PS = 1_000_000  # 1 us: GNSS PPS jitter is tens of ns; drift is in the model
    # Until three pulses fix the drift, a pulse may also be off the model by the largest
    # drift a controller clock has (100 ppm) times the time since the last one.
    MAX_DRIFT_PPB = 100_000

    def __init__(self, tdc, store, pps_period_ps=PS_PER_S):
        self.tdc = tdc
        self.pps_period_ps = pps_period_ps
        self.tolerance_ps = self.TOLERANCE_PS
        self.log = store.open_log("clock", storage.KIND_CLOCK_DISCIPLINE, 28, deferred=True)
        self._seen = 0
        self._points = []  # accepted (index, local_ps)
        self._rejected = []  # consecutive outliers (index, local_ps)
        self.offset_ps = None
        self.drift_ppt = None
        self.pps_index = None
        self.records = 0
        self.outliers = 0
        self.refits = 0

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

    def _predict(self, index):
        return self.offset_ps + index * self.pps_period_ps * (10**12 + self.drift_ppt) // 10**12

    def _index_for(self, local_ps):
        scaled = self.pps_period_ps * (10**12 + self.drift_ppt)
        return ((local_ps - self.offset_ps) * 10**12 + scaled // 2) // scaled

    def _fit(self, points):
        """(offset_ps, drift_ppt) of the least-squares line local = a + b * true."""
        period = self.pps_period_ps
        n = len(points)
        if n == 1:
            index, local = points[0]
            return local - index * period, 0
        sx = sy = sxx = sxy = 0
        for index, local in points:
            x = index * period
            sx += x
            sy += local
            sxx += x * x
            sxy += x * local
        den = n * sxx - sx * sx
        num = n * sxy - sx * sy
        drift_ppt = (num * 10**12 * 2 + den) // (2 * den) - 10**12
        offset_ps = (sy * 10**12 - (10**12 + drift_ppt) * sx + n * 10**12 // 2) // (n * 10**12)
        return offset_ps, drift_ppt

    def _consistent(self, points):
        index = points[0][0]
        if all(p[0] == index for p in points):
            # pulses that all name one second (a PPS faster than the configured period)
            # define no line: never a model
            return False
        offset, drift = self._fit(points)
        period = self.pps_period_ps
        for index, local in points:
            predicted = offset + index * period * (10**12 + drift) // 10**12
            if abs(local - predicted) > self.tolerance_ps:
                return False
        return True

    def _update(self, local_ps):
        period = self.pps_period_ps
        if not self._points:
            # No model yet: assumes |offset| < half a period, the pulse names its second.
            index = (local_ps + period // 2) // period
        else:
            index = self._index_for(local_ps)
            allowed = self.tolerance_ps
            if len(self._points) < 3:
                gap = abs(index - self._points[-1][0]) * period
                allowed += gap * self.MAX_DRIFT_PPB // 10**9
            if abs(local_ps - self._predict(index)) > allowed:
                self.outliers += 1
                self._rejected.append((index, local_ps))
                if len(self._rejected) < 3:
                    return
                if not self._consistent(self._rejected[-3:]):
                    self._rejected = self._rejected[-2:]
                    return
                self._points = self._rejected[-3:]
                self._rejected = []
                self.refits += 1
                index, local_ps = self._points[-1]
                self._apply(index, local_ps)
                return
        self._rejected = []
        self._points.append((index, local_ps))
        if len(self._points) > PPS_SLOTS:
            self._points.pop(0)
        self._apply(index, local_ps)

    def _apply(self, index, local_ps):
        self.offset_ps, self.drift_ppt = self._fit(self._points)
        self.pps_index = index
        record = struct.pack(self.RECORD, index, local_ps, self.offset_ps, self.drift_ppt)
        self.log.append(record)
        self.records += 1

    def telemetry(self):
        out = {
            "pps_index": self.pps_index,
            "offset_ps": self.offset_ps,
            "drift_ppt": self.drift_ppt,
            "records": self.records,
        }
        if self.outliers:
            out["pps_outliers"] = self.outliers
        if self.refits:
            out["pps_refits"] = self.refits
        return out
