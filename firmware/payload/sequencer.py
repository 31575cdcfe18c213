# Decoy-state pulse sequencer (docs/sequencer.md): QRNG bytes -> (basis, bit, intensity) per
# slot -> 4-bit symbols packed two per byte -> the laser driver's back pattern bank, frame
# by frame in step with the head's frame counter; every accepted frame is logged to
# products/patterns.qrec (PATTERN_FRAME records: Alice's raw data).
#
# Mapping, per slot, from 4 QRNG bytes read as a little-endian u32 r:
#   bit       = r & 1
#   basis     = Z (0) if ((r >> 1) & 0x7FFF) < round(p_Z * 2**15) else X (1)
#   intensity = smallest k with (r >> 16) < round(cumulative_p_k * 2**16)
#   symbol    = bit | basis << 1 | intensity << 2     (slot 2k in the low nibble of byte k)
# Probabilities are thus realised to within 2**-16 (intensity) and 2**-15 (basis); the
# CPython twin is host/protocol/symbols.py, golden vectors tests/vectors/symbols.json.
import array

import micropython
from micropython import const

from payload import bus as busmod
from payload import storage
from payload.waits import LASER_STOP_TIMEOUT_US

MAX_FRAME_SLOTS = const(4096)
QRNG_BYTES_PER_SLOT = const(4)
QRNG_BURST_SLOTS = const(512)  # 2048 QRNG bytes: one payload-bus burst (even)
PATTERN_HEADER_BYTES = const(16)  # u32 frame_number, u64 first_slot, u32 slot_count
# Record kind of the pass configuration written into patterns.qrec at each start (JSON;
# host/formats/qrec.py Kind.PATTERN_CONFIG, docs/formats.md).
KIND_PATTERN_CONFIG = const(8)
# Slots the controller sustains per second of real time: the whole frame path (bus replies
# decoded, health tests, mapping, pattern written, record committed) measured with -icount
# on the Cortex-M3 (benchmarks/bench_firmware.py, docs/sequencer.md): 7.7 M instructions
# per 4096-slot frame, 13 k slots/s at 25 MHz and one instruction per cycle; 10 k leaves
# room for flash wait states and the other duties. (It said 100 k, never measured so.)
DEFAULT_CAPACITY_HZ = const(10_000)


@micropython.viper
def map_symbols(qrng: ptr16, slots: int, out: ptr8, thresholds: ptr32):
    """QRNG bytes (4 per slot, slots even) -> packed symbol nibbles, two slots per byte.

    thresholds = [round(p_Z * 2**15), c_0, c_1] with c_k = round(cumulative p_k * 2**16)
    (two classes: c_1 = 65536). The QRNG buffer is read as little-endian 16-bit halves of
    r (r & 0xFFFF, r >> 16; every target is little-endian): no int beyond 16 bits, few
    live variables (Thumb-2 viper keeps only a handful in registers), two slots per
    iteration so each output byte is stored once. 80 instructions/slot on Cortex-M3."""
    z_threshold = thresholds[0]
    c0 = thresholds[1]
    c1 = thresholds[2]
    end = slots * 2
    j = 0
    o = 0
    while j < end:
        low = qrng[j]
        high = qrng[j + 1]
        a = low & 1
        if (low >> 1) >= z_threshold:
            a |= 2
        if high >= c0:
            a |= 4
            if high >= c1:
                a ^= 12  # class 2: 4 -> 8
        low = qrng[j + 2]
        high = qrng[j + 3]
        a |= (low & 1) << 4
        if (low >> 1) >= z_threshold:
            a |= 32
        if high >= c0:
            a |= 64
            if high >= c1:
                a ^= 192
        out[o] = a
        o += 1
        j += 4


def map_symbols_bytecode(qrng, slots, out, thresholds):
    """The same mapping as plain bytecode (benchmark reference, never on the hot path)."""
    z_threshold = thresholds[0]
    c0 = thresholds[1]
    c1 = thresholds[2]
    for s in range(slots):
        j = 4 * s
        low = qrng[j] | (qrng[j + 1] << 8)
        high = qrng[j + 2] | (qrng[j + 3] << 8)
        symbol = low & 1
        if (low >> 1) >= z_threshold:
            symbol |= 2
        if high >= c0:
            symbol |= 8 if high >= c1 else 4
        if s & 1:
            out[s >> 1] |= symbol << 4
        else:
            out[s >> 1] = symbol


# SP 800-90B 4.4 continuous health tests on the QRNG bytes (one sample = one byte),
# claimed min-entropy H = 7 bits a byte (a conditioned physical source; conservative for
# the emulated head's AES-CTR stream), false-alarm probability alpha = 2**-40 per sample
# (at 400 kB/s: one false alarm in ~90 days):
#   repetition count: a run of RCT_CUTOFF = 1 + ceil(40 / 7) = 7 equal bytes fails;
#   adaptive proportion: the first byte of each 512-byte window seen APT_CUTOFF = 27
#   times in that window fails (1 + the binomial(511, 2**-7) critical value, computed
#   with scipy; docs/sequencer.md).
RCT_CUTOFF = const(7)
APT_CUTOFF = const(27)
APT_WINDOW = const(512)


@micropython.viper
def qrng_health(state: ptr32, buf: ptr8, n: int) -> int:
    """Run both tests over buf[:n], state carried across calls (no allocation); returns
    0, or 1 (repetition count) | 2 (adaptive proportion) if a test failed."""
    last = state[0]
    run = state[1]
    ref = state[2]
    count = state[3]
    pos = state[4]
    rct_cutoff = state[5]
    apt_cutoff = state[6]
    failed = 0
    for i in range(n):
        b = buf[i]
        if b == last:
            run += 1
            if run >= rct_cutoff:
                failed |= 1
        else:
            last = b
            run = 1
        if pos == 0:
            ref = b
            count = 1
        elif b == ref:
            count += 1
            if count >= apt_cutoff:
                failed |= 2
        pos += 1
        if pos == APT_WINDOW:
            pos = 0
    state[0] = last
    state[1] = run
    state[2] = ref
    state[3] = count
    state[4] = pos
    return failed


@micropython.viper
def _put_frame_header(buf: ptr8, frame_number: int, frame_slots: int):
    # first_slot = frame_number * frame_slots as a u64, built from 16-bit halves so no
    # intermediate reaches 2**30 (frame numbers and slot counts are each < 2**30).
    fn_lo = frame_number & 0xFFFF
    fn_hi = frame_number >> 16
    a = fn_lo * frame_slots  # < 2**16 * 2**13
    b = fn_hi * frame_slots  # < 2**14 * 2**13; contributes b << 16
    low = (a & 0xFFFF) | (((a >> 16) + b) << 16)
    carry = ((a >> 16) + b) >> 16
    for i in range(4):
        buf[i] = (frame_number >> (8 * i)) & 0xFF
        buf[4 + i] = (low >> (8 * i)) & 0xFF
        buf[8 + i] = (carry >> (8 * i)) & 0xFF
        buf[12 + i] = (frame_slots >> (8 * i)) & 0xFF


class ConfigError(ValueError):
    pass


def _elapsed_us(clock, start):
    return (clock.ticks_us() - start) & 0x3FFFFFFF


def wait_laser_idle(bus, max_polls=10_000, start=None):
    """Poll LASER_ACTIVE until 0. Bounded three ways: a failed read (a dead head answers
    nothing: the bus has already retried) returns -1 at once, and at most max_polls reads
    or LASER_STOP_TIMEOUT_US from `start` (ticks_us; None: now); returns 0 when idle, 1
    when still active."""
    if start is None:
        start = bus.clock.ticks_us()
    for _ in range(max_polls):
        active = bus.read1(busmod.REG_LASER_ACTIVE)
        if active <= 0:
            return active
        if _elapsed_us(bus.clock, start) > LASER_STOP_TIMEOUT_US:
            break
    return 1


def _require(status, what):
    if status != busmod.OK:
        raise ConfigError("optical head: %s failed (bus status %d)" % (what, status))


def thresholds_for(intensity_probabilities, basis_probability_z):
    """[z_threshold, c_0, c_1] as array('I') from validated probabilities."""
    cumulative = 0.0
    cut = []
    for p in intensity_probabilities:
        cumulative += p
        cut.append(round(cumulative * 65536))
    cut[-1] = 65536  # the last class takes the rest exactly
    if len(cut) == 2:
        cut.append(65536)
    return array.array("I", (round(basis_probability_z * 32768), cut[0], cut[1]))


def validate(config, capacity_hz, time_scale_ppm):
    """Checks a sequencer configuration; returns the normalised one or raises ConfigError
    naming the field and the reason."""
    probs = config.get("intensity_probabilities")
    names = config.get("intensity_names")
    if isinstance(probs, dict):
        # {class: p} as in pass.json; intensity_names fixes the nibble index of each class
        if not isinstance(names, (list, tuple)):
            raise ConfigError("intensity_names: needed to order intensity_probabilities")
        for name in probs:
            if name not in names:
                raise ConfigError("intensity_probabilities: unknown intensity class %r" % name)
        probs = [probs.get(name, 0) for name in names]
    if not isinstance(probs, (list, tuple)) or len(probs) not in (2, 3):
        raise ConfigError("intensity_probabilities: need a list of 2 or 3 probabilities")
    for i, p in enumerate(probs):
        if not isinstance(p, (int, float)) or p <= 0 or p >= 1:
            raise ConfigError("intensity_probabilities[%d]: %r is not in (0, 1)" % (i, p))
    total = sum(probs)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError("intensity_probabilities: sum to %r, not 1" % total)
    if names is not None and (not isinstance(names, (list, tuple)) or len(names) != len(probs)):
        raise ConfigError("intensity_names: need one name per intensity class")
    p_z = config.get("basis_probability_z", 0.5)
    if not isinstance(p_z, (int, float)) or p_z <= 0 or p_z >= 1:
        raise ConfigError("basis_probability_z: %r is not in (0, 1)" % (p_z,))
    # optional: {class: mean photon number} the laser is set to, logged in PATTERN_CONFIG
    # as Alice's record (the distillation checks pass.json's intensities against it)
    mus = config.get("intensities")
    if mus is not None:
        if not isinstance(mus, dict) or not isinstance(names, (list, tuple)):
            raise ConfigError("intensities: need {class: mu} and intensity_names")
        for name in names:
            mu = mus.get(name)
            if not isinstance(mu, (int, float)) or mu < 0 or mu > 100:
                raise ConfigError("intensities[%r]: %r is not a mean photon number" % (name, mu))
        if len(mus) != len(names):
            raise ConfigError("intensities: one mean photon number per intensity class")
    rate = config.get("slot_rate_hz")
    if not isinstance(rate, int) or rate <= 0 or rate >= 1 << 30:
        raise ConfigError("slot_rate_hz: need an integer in (0, 2**30), got %r" % (rate,))
    frame_slots = config.get("frame_slots", 1024)
    if (
        not isinstance(frame_slots, int)
        or frame_slots < 2
        or frame_slots > MAX_FRAME_SLOTS
        or frame_slots % 2
    ):
        raise ConfigError("frame_slots: need an even integer in [2, %d]" % MAX_FRAME_SLOTS)
    # The head runs in real time (time_scale_ppm = 10**6), dilated (emulator), or in
    # lockstep with the controller (0: the emulator's clock waits for each frame).
    if time_scale_ppm:
        effective = rate * time_scale_ppm // 1_000_000
        if effective > capacity_hz:
            # short: the ground link carries about 60 characters of reason
            raise ConfigError(
                "slot_rate_hz: %d/s exceeds capacity %d/s" % (effective, capacity_hz)
            )
    normalised = {
        "intensity_probabilities": list(probs),
        "intensity_names": list(names) if names else None,
        "basis_probability_z": p_z,
        "slot_rate_hz": rate,
        "frame_slots": frame_slots,
    }
    if mus is not None:
        normalised["intensities"] = dict(mus)
    return normalised


class Sequencer:
    """Fills the laser driver frame by frame. `step()` is the scheduler's duty."""

    def __init__(self, bus, store, capacity_hz=DEFAULT_CAPACITY_HZ):
        self.bus = bus
        self.store = store
        self.capacity_hz = capacity_hz
        self.config = None
        self.running = False
        self._qrng = bytearray(QRNG_BYTES_PER_SLOT * QRNG_BURST_SLOTS)
        self._thresholds = array.array("I", (0, 0, 0))
        self.log = store.open_log(
            "patterns",
            storage.KIND_PATTERN_FRAME,
            PATTERN_HEADER_BYTES + MAX_FRAME_SLOTS // 2,
            batched=True,  # a group commit: one sync per records_per_sync frames
        )
        self._pattern = self.log.payload[PATTERN_HEADER_BYTES:]  # a view, made once
        recovery = self.log.recovery
        head = recovery.last_payload_head
        # frame number of the last logged frame, from before a reset (-1: none; a
        # PATTERN_CONFIG record last means the pass started and logged no frame yet)
        self.last_logged_frame = -1
        if len(head) >= 4 and recovery.last_kind == storage.KIND_PATTERN_FRAME:
            self.last_logged_frame = int.from_bytes(head[:4], "little")
        self.frames_unlogged = 0  # accepted by the head but lost in a reset before logging
        self.next_frame = 0
        self.frames_sent = 0
        self.frames_missed = 0  # frames the head emitted blank because we were late
        self.refused_commits = 0
        self.bus_failures = 0
        self.behind = False  # telemetry flag: the controller did not keep up
        self._done = 0  # slots of the next frame mapped so far (kept across steps)
        self._got = 0  # QRNG bytes of the current burst read so far
        self.qrng_empty = 0  # FIFO reads that found no byte (normal, counted)
        # health test state: last, run, reference, count, position, RCT and APT cutoffs
        self._health = array.array("i", (-1, 0, 0, 0, 0, RCT_CUTOFF, APT_CUTOFF))
        self.qrng_fault = None  # "rct" / "apt" once a health test failed: generation off

    def configure(self, config, time_scale_ppm):
        self.config = validate(config, self.capacity_hz, time_scale_ppm)
        probs = self.config["intensity_probabilities"]
        self._thresholds = thresholds_for(probs, self.config["basis_probability_z"])
        return self.config

    def _log_config(self):
        """A PATTERN_CONFIG record ahead of the pass's frames: the pattern log describes
        itself (slot rate, frame size, probabilities and the thresholds that realise them,
        the first frame, the QRNG health-test parameters). The head's read-back values
        are the ones logged. The record shares the log's sequence numbers."""
        import json

        cfg = self.config
        thresholds = self._thresholds
        record = {
            "slot_rate_hz": cfg["slot_rate_hz"],
            "frame_slots": cfg["frame_slots"],
            "first_frame": self.next_frame,
            "intensity_probabilities": cfg["intensity_probabilities"],
            "intensity_names": cfg["intensity_names"],
            "basis_probability_z": cfg["basis_probability_z"],
            "thresholds": [thresholds[0], thresholds[1], thresholds[2]],
            "qrng_health": {"rct": RCT_CUTOFF, "apt": APT_CUTOFF, "window": APT_WINDOW},
        }
        if cfg.get("intensities") is not None:
            record["intensities"] = cfg["intensities"]
        text = json.dumps(record).encode()
        log = self.log
        log.kind = KIND_PATTERN_CONFIG  # the payload buffer is free: no frame is pending
        try:
            log.append(text, sync=True)  # durable before the first frame goes out
        finally:
            log.kind = storage.KIND_PATTERN_FRAME

    def _qrng_fault(self, failed):
        """A health test failed: no byte of this burst is used, the laser stops at the
        frame boundary, the sequencer stops and says why (cleared by the next start)."""
        self.qrng_fault = "rct" if failed & 1 else "apt"
        self.running = False
        self._done = 0
        self.bus.write1(busmod.REG_LASER_CTRL, 0)

    def keep_controller_buffers(self, keep):
        """The QRNG burst buffer (2 kB) and the pattern frame's record buffer (2.1 kB) serve
        only the controller's own pattern mapping: a pass whose head generates the pattern
        frees both (the STM32 board's 96 KiB heap, docs/targets.md "A tracking pass on the
        STM32 board"); its few pattern-log records (the run, the configuration, a few
        hundred bytes each, filled and committed in one call) go through the store's shared
        record buffer. A pass that maps here allocates them again (Mission.configure
        collects first)."""
        if not keep:
            self._qrng = None
            self._pattern = None
            self.log.use_record(self.store.shared_record())
        elif self._qrng is None:
            self.log.use_record(None)
            self._pattern = self.log.payload[PATTERN_HEADER_BYTES:]
            self._qrng = bytearray(QRNG_BYTES_PER_SLOT * QRNG_BURST_SLOTS)

    def start(self):
        if self.config is None:
            raise ConfigError("sequencer: not configured")
        if self._qrng is None:
            raise ConfigError("sequencer: its buffers were freed for head generation")
        if not self.log.can_commit(self.log.max_payload_bytes):
            raise ConfigError("storage full: no room to log frames (delete products)")
        self.qrng_fault = None
        self._done = 0
        self._got = 0
        for i in range(5):
            self._health[i] = -1 if i == 0 else 0
        bus = self.bus
        cfg = self.config
        # A laser left running (a controller reset mid-pass) must finish its frame before
        # the slot clock may change.
        _require(bus.write1(busmod.REG_LASER_CTRL, 0), "LASER_CTRL")
        idle = wait_laser_idle(bus)
        if idle < 0:
            raise ConfigError("optical head: no answer to LASER_ACTIVE (bus timeout)")
        if idle:
            raise ConfigError("optical head: laser did not stop (LASER_ACTIVE)")
        _require(bus.write1(busmod.REG_FRAME_SLOTS, cfg["frame_slots"]), "FRAME_SLOTS")
        _require(bus.write1(busmod.REG_SLOT_RATE_HZ, cfg["slot_rate_hz"]), "SLOT_RATE_HZ")
        _require(bus.write1(busmod.REG_QRNG_CTRL, 1), "QRNG_CTRL")
        # Read back: the log must describe the frames the head really emits.
        _require(bus.read(busmod.REG_FRAME_SLOTS, 3), "FRAME_SLOTS read-back")
        words = bus.words
        if words[0] != cfg["frame_slots"] or words[1] != cfg["slot_rate_hz"]:
            raise ConfigError("optical head did not take frame_slots / slot_rate_hz")
        self.next_frame = words[2]  # REG_FRAME_COUNT follows SLOT_RATE_HZ
        # A reset between the head accepting a commit and the record write leaves one
        # emitted frame unlogged: the head's LAST_COMMIT tells, so say so.
        last_commit = bus.read1(busmod.REG_LAST_COMMIT)
        if 0 <= last_commit < 0x3FFFFFFF and last_commit > self.last_logged_frame >= 0:
            self.frames_unlogged += 1
        self._log_config()
        self.running = True
        self.behind = False
        # Fill the first frame before the laser starts, so it is never blank.
        self.step()
        _require(bus.write1(busmod.REG_LASER_CTRL, 1), "LASER_CTRL")

    def stop(self, max_polls=10_000):
        """Let the committed frame go out, then stop the laser at the next frame boundary
        (a frame is logged when the head accepts it, so it must also be emitted). Both
        waits share one LASER_STOP_TIMEOUT_US: each is at most a frame (4.1 s), and with
        a deadline each a laser that never stops held the stop twice as long (payload/
        waits.py: the main loop's waits against the watchdog)."""
        self.running = False
        bus = self.bus
        start = bus.clock.ticks_us()
        for _ in range(max_polls):
            if bus.read(busmod.REG_FRAME_COUNT, 2) != busmod.OK or not bus.words[1]:
                break
            if _elapsed_us(bus.clock, start) > LASER_STOP_TIMEOUT_US:
                break
        bus.try_again()  # the laser-off command gets its tries after a timed-out read
        bus.write1(busmod.REG_LASER_CTRL, 0)
        if wait_laser_idle(bus, max_polls, start) != 0:
            self.bus_failures += 1  # reported in telemetry; stop itself must not hang

    def step(self):
        """Prepare and commit the next frame if the back bank is free; True if work done."""
        if not self.running:
            return False
        bus = self.bus
        if bus.read(busmod.REG_FRAME_COUNT, 2) != busmod.OK:
            self.bus_failures += 1
            return False
        started = bus.words[0]
        if bus.words[1]:  # back bank still holds a committed frame
            return False
        if started > self.next_frame:
            # The head passed frames we never filled: it emitted them blank. Say so.
            self.frames_missed += started - self.next_frame
            self.behind = True
            self.next_frame = started
        slots = self.config["frame_slots"]
        qrng = self._qrng
        payload = self.log.payload
        pattern = self._pattern
        # QRNG bytes come in bus-sized bursts and are mapped burst by burst, so the
        # buffer is one burst (2 kB), not a frame's 16 kB: RAM is the scarce resource.
        # Progress is kept across steps: a QRNG FIFO that momentarily has no bytes is
        # normal (the step returns and goes on next pass), not a bus failure.
        done = self._done
        while done < slots:
            burst_slots = slots - done
            if burst_slots > QRNG_BURST_SLOTS:
                burst_slots = QRNG_BURST_SLOTS
            need = QRNG_BYTES_PER_SLOT * burst_slots
            got = self._got
            while got < need:
                n = bus.fifo_read(busmod.FIFO_QRNG, qrng, got, need - got)
                if n < 0:
                    self.bus_failures += 1
                    self._got = got
                    return False
                if n == 0:
                    self.qrng_empty += 1
                    self._got = got
                    return False
                got += n
            self._got = 0
            # SP 800-90B continuous health tests on every QRNG byte before it is used
            failed = qrng_health(self._health, qrng, need)
            if failed:
                self._qrng_fault(failed)
                return True
            map_symbols(qrng, burst_slots, pattern[done >> 1 :], self._thresholds)
            done += burst_slots
            self._done = done
        self._done = 0
        pattern_bytes = slots // 2
        offset = 0
        while offset < pattern_bytes:
            chunk = pattern_bytes - offset
            if chunk > busmod.MAX_DATA_BYTES:
                chunk = busmod.MAX_DATA_BYTES
            if bus.mem_write(busmod.MEM_PATTERN, offset, pattern, offset, chunk) != busmod.OK:
                self.bus_failures += 1
                return False
            offset += chunk
        status = bus.write1(busmod.REG_COMMIT, self.next_frame)
        if status < 0 and bus.read1(busmod.REG_LAST_COMMIT) == self.next_frame:
            status = busmod.OK  # the reply was lost, the commit was not
        if status == busmod.E_REFUSED:
            # The boundary passed while we wrote: the head emits it blank; the next step
            # sees the frame counter ahead and counts it in frames_missed.
            self.refused_commits += 1
            self.behind = True
            return True
        if status != busmod.OK:
            self.bus_failures += 1
            return False
        # Accepted: the head will emit exactly this pattern as this frame. Log it.
        _put_frame_header(payload, self.next_frame, slots)
        if self.log.commit(PATTERN_HEADER_BYTES + pattern_bytes) < 0:
            self._storage_failed()
            return True
        self.last_logged_frame = self.next_frame
        self.next_frame += 1
        self.frames_sent += 1
        return True

    def _storage_failed(self):
        # Storage could not commit the record of a frame the head accepted (full, I/O
        # error; docs/storage.md): that frame goes out unlogged, so count it and stop the
        # laser rather than emit frames nobody can sift. Counted in storage status too.
        self.frames_unlogged += 1
        self.frames_sent += 1
        self.next_frame += 1
        self.running = False
        self.bus.write1(busmod.REG_LASER_CTRL, 0)

    def telemetry(self):
        out = {
            "running": self.running,
            "frames_sent": self.frames_sent,
            "frames_missed": self.frames_missed,
            "refused_commits": self.refused_commits,
            "frames_unlogged": self.frames_unlogged,
            "bus_failures": self.bus_failures,
            "behind": self.behind,
            "next_frame": self.next_frame,
        }
        if self.qrng_empty:
            out["qrng_empty"] = self.qrng_empty
        if self.qrng_fault:
            out["qrng_fault"] = self.qrng_fault
        return out
