# Tracking over the payload bus: the scheduler duty that writes the optical head's command
# block and reads its sensor block, then steps the loop (docs/tracking.md "Payload-bus
# registers"). The register blocks mirror Tracker.io word for word, so one TRACK exchange
# per loop period carries everything: the commands computed last period out, this period's
# sensors in (docs/payload-bus.md "TRACK": READ_WRITE of these blocks in a fixed layout).
# On a board a timer interrupt would do the same with register reads instead of bus frames.
import micropython
from micropython import const

from payload import storage, tracking
from payload.tracking import step_kernel as _step_kernel

REG_TRK_SENSORS = const(0x0500)  # read, 12 words: QA..QD, CAM_NEW, CAM_X, CAM_Y, CAM_SIGNAL,
#                                  ENC_X, ENC_Y, ARS_X, ARS_Y (Tracker.io words 0..11)
REG_TRK_COMMANDS = const(0x0510)  # write, 7 words: FSM_X, FSM_Y, RATE_X, RATE_Y, PA_X, PA_Y,
#                                   STATE (io words 12..18); writing STATE latches the set
SENSOR_WORDS = const(12)
_COUNTER_WRAP = const(0x3FFFFFFF)  # bus.COUNTER_WRAP
_IDLE = const(0)  # tracking.IDLE (the kernel returns the state it left)
COMMAND_WORDS = const(7)


# A READ_WRITE period's copy of bus.words into io (the pass-mode bench's baseline; the
# duty's TRACK unpacks straight into io).
@micropython.viper
def _copy_words(src: ptr32, dst: ptr32, count: int):
    for i in range(count):
        dst[i] = src[i]


class TrackingDuty:
    """`step()` for the scheduler: one loop period, one bus transaction (TRACK: the
    commands of the previous period, then the sensors of this one). A failed transaction
    skips the period (the head holds the last commands; the unsent ones are sent with the
    next period's) and is counted, never raised.

    The commands reach the head at the start of the next period, one loop period after
    the sensors they answer: the plant's one sample of latency (docs/tracking.md). When
    the loop stops, the last commands (IDLE) go out at once in a plain WRITE.

    The kernel advances its pass time by one configured period per call. Over the bus the
    application sustains a few hundred Hz on a 25 MHz Cortex-M3 (docs/tracking.md "Loop
    rate in pass mode"), below any configurable rate: each call that comes later than one
    period after the previous one is counted in `overruns`, so the lag is reported, not
    silent (the loop at its configured rate needs the sensors on the controller's own
    peripherals and a timer, as on a board)."""

    def __init__(self, bus, tracker):
        self.bus = bus
        self.steps = 0
        self.bus_errors = 0
        self.overruns = 0
        self._last_us = -1
        self._ticks, self._ticks_arg = bus.clock.ticks_source()
        self.pacer = None  # the scheduler's Loop when it paces period() (mission.py)
        self.attach(tracker)

    def attach(self, tracker):
        self.tracker = tracker
        self._commands = memoryview(tracker.io)[tracking.IO_FSM_X : tracking.IO_FSM_X + 7]
        # what every period reads, as attributes of the duty (one load each)
        self._words = tracker.words
        self._io = tracker.io
        self._sin_table = tracker.sin_table  # (the prediction table is replaced on upload)
        self._unsent = 0  # 1: the commands computed last period are not yet on the head
        self._state = tracker.state  # the state the kernel returned last period

    def telemetry(self):
        t = self.tracker
        return {
            "state": tracking.STATE_NAMES[t.state],
            "steps": self.steps,
            "bus_errors": self.bus_errors,
            "transitions": t.transition_count(),
            "telemetry_lost": t.telemetry_lost(),
            "overruns": self.late_periods(),
        }

    def status(self):
        """Compact: [state, steps, bus errors, transitions, telemetry samples lost,
        overruns (periods that came late)]."""
        t = self.tracker
        return [tracking.STATE_NAMES[t.state], self.steps, self.bus_errors,
                t.transition_count(), t.telemetry_lost(), self.late_periods()]  # fmt: skip

    def late_periods(self):
        """Periods that came late: counted by the scheduler's pacing when it paces the
        loop, by step() when called unpaced (wrapping at 2^30 - 1)."""
        if self.pacer is None:
            return self.overruns
        return (self.overruns + self.pacer.overruns) & _COUNTER_WRAP

    def flush(self):
        """Send the commands still owed to the head (the loop stopped, or the run ends)."""
        if self._unsent:
            if self.bus.write(REG_TRK_COMMANDS, self._commands, COMMAND_WORDS) != 0:
                self.bus_errors += 1
                return False
            self._unsent = 0
        return True

    def step(self):
        """One period called unpaced (a caller without the scheduler's paced loop, and the
        stop's last period): counts a call that comes more than one period after the
        previous one in `overruns`, then runs `period()`."""
        if self._state == _IDLE and tracking.words_idle(self.tracker.words):
            self._last_us = -1
            return self.period()
        now = self._ticks(self._ticks_arg)  # the clock's ticks_us in one native call
        # the counters wrap at 2^30 - 1 (bus.COUNTER_WRAP): a big int past it would be
        # allocated every period
        if self._last_us >= 0 and ((now - self._last_us) & 0x3FFFFFFF) > self.tracker.cfg[0]:
            n = self.overruns
            self.overruns = n + 1 if n < _COUNTER_WRAP else 0
        self._last_us = now
        return self.period()

    # native: every loop period (with Bus.track, ~3.3k instructions less than in bytecode)
    @micropython.native
    def period(self):
        """The loop's period, as the scheduler's paced loop calls it (the scheduler keeps
        the time and counts late periods: Loop.overruns): one TRACK exchange and the
        kernel. Returns False when the loop is idle (nothing to run)."""
        # The period's work in a few native calls (a method call in bytecode costs ~1.5k
        # instructions on the M3, the kernel ~4k): Bus.track (build, frame, send, receive,
        # check, unpack into io) and the kernel itself.
        words = self._words
        # idle only if the kernel left IDLE last period (or never ran) and no start is
        # pending: while it runs, its returned state says so without a call
        if self._state == _IDLE and tracking.words_idle(words):
            if self._unsent:
                self.flush()  # owed only if the stop's WRITE failed: retried here
            return False  # no loop to run
        # one TRACK: last period's commands (if owed) out, this period's sensors into io
        if self.bus.track(self._io, self._unsent) != 0:
            n = self.bus_errors
            self.bus_errors = n + 1 if n < _COUNTER_WRAP else 0
            return False
        state = _step_kernel(words, self.tracker.table, self._sin_table)
        self._state = state
        self._unsent = 1
        n = self.steps
        self.steps = n + 1 if n < _COUNTER_WRAP else 0
        if state == _IDLE:  # stopped: no next period to carry the IDLE commands
            self.flush()
        return True


_PER_RECORD = const(40)
_TRANSITIONS_PER_RECORD = const(120)  # 12 + 8 * 120 bytes fit the 12 + 24 * 40 payload


class TrackingProduct:
    """Telemetry into storage: drains the loop's telemetry ring into the product
    "tracking" (record kind 4, docs/tracking.md), 40 samples per record, and appends the
    transitions logged since the last call. A low-priority scheduler duty, never called
    from an interrupt (it packs with struct)."""

    def __init__(self, tracker, store):
        self.tracker = tracker
        self.log = store.open_log("tracking", storage.KIND_TRACKING, 12 + 24 * _PER_RECORD)
        self._samples = tracking.array.array(
            "i", bytes(4 * tracking.TM_SAMPLE_WORDS * _PER_RECORD)
        )
        self.transitions_written = 0
        self.transitions_lost = 0
        self.records = 0

    def attach(self, tracker):
        self.tracker = tracker
        self.transitions_written = 0

    def step(self, force=False):
        tracker = self.tracker
        pending = tracker.telemetry_pending()
        if pending >= _PER_RECORD or (force and pending):
            count = tracker.drain_telemetry(self._samples, _PER_RECORD)
            length = tracking.pack_samples_into(
                self.log.payload, self._samples, count, tracker.cfg[0],
                tracker.config["telemetry_decimation"],
            )  # fmt: skip
            self.log.commit(length)
            self.records += 1
            return True
        total = tracker.transition_count()
        if total > self.transitions_written:
            logged = tracker.transitions()  # oldest first, at most the ring's 64
            missing = total - self.transitions_written
            if missing > len(logged):  # the ring wrapped before we got here: count it
                self.transitions_lost += missing - len(logged)
                self.transitions_written += missing - len(logged)
                missing = len(logged)
            batch = logged[len(logged) - missing :][:_TRANSITIONS_PER_RECORD]
            self.log.append(tracking.pack_transitions(batch, tracker.cfg[0]))
            self.transitions_written += len(batch)
            self.records += 1
            return True
        return False

    def flush(self):
        """Write everything pending (end of pass)."""
        while self.step(force=True):
            pass
