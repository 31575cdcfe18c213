# Tracking over the payload bus: the scheduler duty that writes the optical head's command
# block and reads its sensor block, then steps the loop (docs/tracking.md "Payload-bus
# registers"). The register blocks mirror Tracker.io word for word, so one TRACK exchange
# per loop period carries everything: the commands computed last period out, this period's
# sensors in (docs/payload-bus.md "TRACK": READ_WRITE of these blocks in a fixed layout).
# On a board a timer interrupt would do the same with register reads instead of bus frames.
import array

import micropython
from micropython import const

from payload import bus as _bus
from payload import framing as _framing
from payload import storage, tracking
from payload.tracking import step_kernel as _step_kernel

_track_request = _bus.track_request_thumb
_track_reply = _bus.track_reply_thumb

REG_TRK_SENSORS = const(0x0500)  # read, 12 words: QA..QD, CAM_NEW, CAM_X, CAM_Y, CAM_SIGNAL,
#                                  ENC_X, ENC_Y, ARS_X, ARS_Y (Tracker.io words 0..11)
REG_TRK_COMMANDS = const(0x0510)  # write, 7 words: FSM_X, FSM_Y, RATE_X, RATE_Y, PA_X, PA_Y,
#                                   STATE (io words 12..18); writing STATE latches the set
SENSOR_WORDS = const(12)
_COUNTER_WRAP = const(0x3FFFFFFF)  # bus.COUNTER_WRAP
_IDLE = const(0)  # tracking.IDLE (the kernel returns the state it left)
COMMAND_WORDS = const(7)
_TRACK_REQUEST_FRAME_BYTES = const(32)  # bus.TRACK_REQUEST_FRAME_BYTES
# Bus.state's words (bus.B_*: a const is folded only in its own module)
_B_TAG = const(0)
_B_CHUNK_FILL = const(1)
_B_CHUNK_POS = const(2)
_B_TRANSACTIONS = const(3)
_B_ERROR_STATUS = const(4)
_B_TRACK_REPLIES = const(5)
if (_bus.B_TAG, _bus.B_CHUNK_FILL, _bus.B_CHUNK_POS, _bus.B_TRANSACTIONS, _bus.B_ERROR_STATUS,
        _bus.B_TRACK_REPLIES) != (0, 1, 2, 3, 4, 5):  # fmt: skip
    raise ImportError("tracking_duty: bus state words moved")

# TrackingDuty.state: the words every period reads and writes (an array("i"): the viper
# period reaches them without an attribute lookup), and the addresses of the buffers it
# hands to the Thumb pair and the kernel (an int goes through a call for a few
# instructions, a buffer object through the buffer protocol; RAM lies below 2^30 on the
# MCU targets, so they are small ints)
_D_STATE = const(0)  # the state the kernel returned last period
_D_UNSENT = const(1)  # 1: the commands computed last period are not yet on the head
_D_STEPS = const(2)  # periods run (wrap at 2^30 - 1)
_D_BUS_ERRORS = const(3)  # failed TRACK transactions (wrap at 2^30 - 1)
_D_FAST = const(4)  # 1: the port has the Thumb TRACK pair (the whole period in _paced_period)
_D_IO = const(5)  # address of Tracker.io
_D_WORDS = const(6)  # address of Tracker.words
_D_SIN = const(7)  # address of Tracker.sin_table
_D_CTX = const(8)  # address of Bus._track_ctx
_D_CHUNK = const(9)  # address of Bus._chunk
_D_BUS = const(10)  # address of Bus.state
_D_TABLE = const(11)  # address of Tracker.table (replaced only while idle: set on each
#                       general period, which every start of the loop runs first)
_D_COUNT = const(12)

# TrackingDuty.paced_args: the objects _paced_period needs, in one list that it unpacks into
# its locals in one runtime call (_PACED_ARGS_ORDER; indexing it costs ~85 instructions on
# the M3 an item, an attribute lookup more)
_A_DUTY = const(0)  # TrackingDuty.state (its address on the MCU targets)
_A_TRACKER = const(1)
_A_FRAME = const(2)  # the request frame's fixed view (Bus._track_frame)
_A_WRITE = const(3)  # link.write, bound once
_A_CHUNK = const(4)
_A_READINTO = const(5)  # link.readinto, bound once
_A_GENERAL = const(6)  # Bus._track_general: a reply in pieces, late, damaged, foreign
_A_SLOW = const(7)  # TrackingDuty._period_general: idle, starting, no Thumb pair
_A_FLUSH = const(8)  # TrackingDuty.flush
_A_IO = const(9)  # Tracker.io (for the general path)
# the Thumb pair and the kernel: reached by index, not as globals, so the period's cost
# does not depend on where their names fall in the runtime's map-lookup cache
_A_REQUEST = const(10)
_A_REPLY = const(11)
_A_KERNEL = const(12)
_ARGS = const(13)
# the order _paced_period unpacks paced_args in: its _A_* index order
_PACED_ARGS_ORDER = (_A_DUTY, _A_TRACKER, _A_FRAME, _A_WRITE, _A_CHUNK, _A_READINTO, _A_GENERAL,
                     _A_SLOW, _A_FLUSH, _A_IO, _A_REQUEST, _A_REPLY, _A_KERNEL)  # fmt: skip
if _PACED_ARGS_ORDER != tuple(range(_ARGS)):
    raise ImportError("tracking_duty: _paced_period's unpacking order is not _A_* order")
_ADDRESS_LIMIT = const(0x3FFFFFFF)  # a small int on a 32-bit port
# The rate the general period sustains on the MCU targets (~16k instructions a period on
# the MPS2 against 21,250 at 1 kHz; docs/scheduling.md "The paced loop")
_GENERAL_PATH_RATE_HZ = const(1000)


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
        self.state = array.array("i", bytes(4 * _D_COUNT))
        self.overruns = 0
        self._last_us = -1
        self._ticks, self._ticks_arg = bus.clock.ticks_source()
        self.pacer = None  # the scheduler's Loop when it paces period() (mission.py)
        self.timer_loop = None  # TimerLoop when the board's timer interrupt runs it
        link = bus.link
        self.paced_args = [None] * _ARGS
        args = self.paced_args
        # the state words by address where that is a small int (the MCU targets' RAM):
        # ptr32 of an int costs less than of an array (the buffer protocol)
        address = _bus._address(self.state)
        args[_A_DUTY] = address if address <= _ADDRESS_LIMIT else self.state
        args[_A_FRAME] = bus._track_frame
        args[_A_WRITE] = link.write
        args[_A_CHUNK] = bus._chunk
        args[_A_READINTO] = link.readinto
        args[_A_GENERAL] = bus._track_general
        args[_A_SLOW] = self._period_general
        args[_A_FLUSH] = self.flush
        args[_A_REQUEST] = _track_request
        args[_A_REPLY] = _track_reply
        args[_A_KERNEL] = _step_kernel
        self.attach(tracker)

    # (static methods, not module functions: the module's globals stay as they were;
    # _paced_period looks up none of them)
    @staticmethod
    def _fast_path_fault(bus, tracker, d):
        """None if the paced period can take the fast path with this bus and tracker
        (their buffers' addresses written into d), else the reason it cannot."""
        if bus._track_ctx is None:
            return "no Thumb TRACK pair on this port"
        for i, buf in ((_D_IO, tracker.io), (_D_WORDS, tracker.words),
                       (_D_SIN, tracker.sin_table), (_D_CTX, bus._track_ctx),
                       (_D_CHUNK, bus._chunk), (_D_BUS, bus.state),
                       (_D_TABLE, tracker.table)):  # fmt: skip
            address = _bus._address(buf)
            if address > _ADDRESS_LIMIT:
                return "a loop buffer at 0x%x, above 2^30 - 1" % address
            d[i] = address
        return None

    @staticmethod
    def check_loop_rate(bus, tracker, rate_limit_hz):
        """Refuse (tracking.ConfigError) a tracker whose loop rate needs the fast path on
        a board whose pass-mode rate (board.TRACKING_LOOP_RATE_HZ) assumes it, when the
        fast path is off: the general period does not fit a period above 1 kHz, and the
        loop would lag silently (docs/scheduling.md "Without the fast path")."""
        rate_hz = 1_000_000 // tracker.cfg[0]
        if rate_limit_hz <= _GENERAL_PATH_RATE_HZ or rate_hz <= _GENERAL_PATH_RATE_HZ:
            return
        d = array.array("i", bytes(4 * _D_COUNT))
        error = TrackingDuty._fast_path_fault(bus, tracker, d)
        if error is not None:
            raise tracking.ConfigError(
                "tracking.parameters.loop_rate_hz: %d Hz needs the loop's fast path, off "
                "on this controller (%s); at most %d Hz" % (rate_hz, error, _GENERAL_PATH_RATE_HZ)
            )

    def attach(self, tracker):
        self.tracker = tracker
        self._commands = memoryview(tracker.io)[tracking.IO_FSM_X : tracking.IO_FSM_X + 7]
        # what every period reads, as attributes of the duty (one load each)
        self._words = tracker.words
        self._io = tracker.io
        self._sin_table = tracker.sin_table  # (the prediction window is replaced on upload)
        args = self.paced_args
        args[_A_TRACKER] = tracker
        args[_A_IO] = tracker.io
        # the whole period in one viper call where the Thumb pair is (and the buffers'
        # addresses are small ints, true of the MCU targets' RAM); elsewhere the general
        # period, with the same calls in native code (reported: telemetry's "fast")
        fast = 1 if self._fast_path_fault(self.bus, tracker, self.state) is None else 0
        self.state[_D_FAST] = fast
        self._unsent = 0
        self._state = tracker.state
        if getattr(self, "timer_loop", None) is not None:
            self.timer_loop.attach(tracker)

    # the state words by name (not on the period's fast path)
    @property
    def _state(self):
        return self.state[_D_STATE]

    @_state.setter
    def _state(self, value):
        self.state[_D_STATE] = value

    @property
    def _unsent(self):
        return self.state[_D_UNSENT]

    @_unsent.setter
    def _unsent(self, value):
        self.state[_D_UNSENT] = value

    @property
    def steps(self):
        return self.state[_D_STEPS]

    @steps.setter
    def steps(self, value):
        self.state[_D_STEPS] = value & _COUNTER_WRAP

    @property
    def bus_errors(self):
        return self.state[_D_BUS_ERRORS]

    @bus_errors.setter
    def bus_errors(self, value):
        self.state[_D_BUS_ERRORS] = value & _COUNTER_WRAP

    def paced_step(self):
        """(function, argument) for Scheduler.set_loop: function(argument) is period()
        in one viper call."""
        return _paced_period, self.paced_args

    def telemetry(self):
        t = self.tracker
        out = {
            "state": tracking.STATE_NAMES[t.state],
            "steps": self.steps,
            "bus_errors": self.bus_errors,
            "transitions": t.transition_count(),
            "telemetry_lost": t.telemetry_lost(),
            "overruns": self.late_periods(),
            "fast": self.path(),  # 0: the general period (check_loop_rate); 2: the timer's
            # the uploaded prediction's window (Tracker.page): steps whose pass time waited
            # for it, and reads of the stored prediction that failed or were refused
            "window_late": t.window_late(),
            "page_faults": t.page_faults,
        }
        if self.timer_loop is not None:
            out["irq"] = self.timer_loop.telemetry()
        return out

    def path(self):
        """0: the general period; 1: the one-call period, paced by the scheduler; 2: the
        one-call period from the board's timer interrupt (TimerLoop)."""
        if self.timer_loop is not None:
            return 2
        return self.state[_D_FAST]

    def status(self):
        """Compact: [state, steps, bus errors, transitions, telemetry samples lost,
        overruns (periods that came late), path (1: the paced period's fast path; 2: from
        the timer interrupt; 0: the general period)]."""
        t = self.tracker
        return [tracking.STATE_NAMES[t.state], self.steps, self.bus_errors,
                t.transition_count(), t.telemetry_lost(), self.late_periods(),
                self.path()]  # fmt: skip

    def late_periods(self):
        """Periods that came late: counted by the scheduler's pacing when it paces the
        loop, by the TimerLoop when the timer interrupt runs it, by step() when called
        unpaced (wrapping at 2^30 - 1)."""
        if self.timer_loop is not None:
            return (self.overruns + self.timer_loop.late_periods()) & _COUNTER_WRAP
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

    def period(self):
        """The loop's period, as the scheduler's paced loop calls it (the scheduler keeps
        the time and counts late periods: Loop.overruns): one TRACK exchange and the
        kernel. Returns False when the loop is idle (nothing to run) or the exchange
        failed (the commands are still owed: sent with the next period)."""
        return _paced_period(self.paced_args) == 1

    def _fast_table(self, table):
        address = _bus._address(table)
        if address > _ADDRESS_LIMIT:  # (the loop then stays on the general path)
            self.state[_D_FAST] = 0
        else:
            self.state[_D_TABLE] = address

    # native: the periods _paced_period does not take (idle, starting, no Thumb pair);
    # returns as _paced_period does (1 ran, 0 idle, -1 failed)
    @micropython.native
    def _period_general(self):
        words = self._words
        # idle only if the kernel left IDLE last period (or never ran) and no start is
        # pending: while it runs, its returned state says so without a call
        if self._state == _IDLE and tracking.words_idle(words):
            if self._unsent:
                self.flush()  # owed only if the stop's WRITE failed: retried here
            return 0  # no loop to run
        # one TRACK: last period's commands (if owed) out, this period's sensors into io
        if self.bus.track(self._io, self._unsent) != 0:
            self.bus_errors += 1
            return -1
        table = self.tracker.table
        if self.state[_D_FAST]:  # the fast path's table: the one uploaded while idle
            self._fast_table(table)
        state = _step_kernel(words, table, self._sin_table)
        self._state = state
        self._unsent = 1
        self.steps += 1
        if state == _IDLE:  # stopped: no next period to carry the IDLE commands
            self.flush()
        return 1


@micropython.viper
def _paced_period(args) -> int:
    """TrackingDuty.period() in one viper call: one TRACK exchange through the Thumb pair
    (request framed, reply checked and unpacked into io) and the kernel, the counters in
    the duty's and the bus's state words. Anything but a running loop and the whole reply
    as the link's next chunk goes where it went before (TrackingDuty._period_general,
    Bus._track_general), which count and retry as before. Returns 1 if a period ran, 0
    if the loop is idle, -1 if the exchange failed: a spent period, which the scheduler
    paces and counts as any (a true return), the commands still owed going with the next
    one (a 0 left the loop idle: called again unpaced, its timing restarted, a stall after
    it counted neither late nor in overruns).
    Measured on QEMU (docs/scheduling.md "The paced loop"): ~5k instructions less a
    period than the native method with the same calls."""
    # one unpacking in the order of the _A_* indices (checked at import: _PACED_ARGS_ORDER)
    (duty, tracker, frame, write, chunk, readinto, general, slow, flush, io_words, request,
     reply, kernel) = args  # fmt: skip
    d = ptr32(duty)
    if d[_D_STATE] == _IDLE or d[_D_FAST] == 0:
        return int(slow())
    b = ptr32(d[_D_BUS])
    n = b[_B_TRANSACTIONS]
    b[_B_TRANSACTIONS] = n + 1 if n < _COUNTER_WRAP else 0
    tag = (b[_B_TAG] + 1) & 0xFF
    b[_B_TAG] = tag
    io = d[_D_IO]
    ctx = d[_D_CTX]
    request(io, (d[_D_UNSENT] << 8) | tag, ctx)
    sent = int(write(frame))
    status = -1
    if sent == _TRACK_REQUEST_FRAME_BYTES and b[_B_CHUNK_POS] >= b[_B_CHUNK_FILL]:
        count = int(readinto(chunk))
        status = int(reply(d[_D_CHUNK], count | (tag << 16), io, ctx))
        if status >= 0:
            n = b[_B_TRACK_REPLIES]
            b[_B_TRACK_REPLIES] = n + 1 if n < _COUNTER_WRAP else 0
            if status != 0:
                n = b[_B_ERROR_STATUS]
                b[_B_ERROR_STATUS] = n + 1 if n < _COUNTER_WRAP else 0
        else:  # not the fast case: the general path reads the chunk as any other
            b[_B_CHUNK_FILL] = count
            b[_B_CHUNK_POS] = 0
    if status < 0:
        status = int(general(io_words, tag, frame, sent))
    if status != 0:  # the head holds the last commands; the unsent go with the next period
        n = d[_D_BUS_ERRORS]
        d[_D_BUS_ERRORS] = n + 1 if n < _COUNTER_WRAP else 0
        return -1
    state = int(kernel(d[_D_WORDS], d[_D_TABLE], d[_D_SIN]))
    d[_D_STATE] = state
    d[_D_UNSENT] = 1
    n = d[_D_STEPS]
    d[_D_STEPS] = n + 1 if n < _COUNTER_WRAP else 0
    if state == _IDLE:  # stopped: no next period to carry the IDLE commands
        flush()
    return 1


# ------------------------------------------------------------ the loop on a timer interrupt
# (docs/scheduling.md "The loop on a timer interrupt"). Where the board has a tracking link
# of its own (board.tracking_link) and a timer interrupt (the irqtimer C module of both MCU
# images), the period runs in the interrupt, so no duty's call (a littlefs commit, a
# housekeeping record, a TDC burst) delays it. The interrupt must not wait on a link, so
# the TRACK exchange is split over two periods: each period takes the reply to the request
# the period before sent (whole in the link's receive buffer, filled byte by byte by the
# link's RX interrupt), runs the kernel on its sensors, and sends the next request with the
# commands. The commands still reach the head one period after the sensors they answer, as
# over the payload bus (the plant's one sample of latency). A reply not yet whole skips
# the period (counted: `waits`), one missing for _MAX_WAIT_PERIODS gives the request up
# (`lost`, a bus error) and the next period asks again.
_Q_TAG = const(0)
_Q_PENDING = const(1)  # 0x100 | the tag of the request whose reply is awaited; 0: none
_Q_WAITS = const(2)  # periods skipped: the reply was not whole yet (wrap at 2^30 - 1)
_Q_WAITED = const(3)  # consecutive periods the pending reply has been waited for
_Q_LOST = const(4)  # requests given up: no whole reply in _MAX_WAIT_PERIODS
_Q_BAD = const(5)  # replies damaged, foreign or run together (dropped, a bus error)
_Q_REPLIES = const(6)  # replies taken (status 0 or a head-reported error)
_Q_ERRORS = const(7)  # replies with a head-reported error status
_Q_SEND_FAILED = const(8)  # requests the link did not take whole
_Q_RX = const(9)  # address of the receive buffer
_Q_CTX = const(10)  # address of the Thumb pair's context for this link
_Q_RX_BYTES = const(11)  # the receive buffer's size
_Q_WAIT_US = const(12)  # how long into its period a period polls for a reply on its way
_Q_RESTARTS = const(13)  # this pass's restarts after the callback raised (supervise)
_Q_LATE_CARRIED = const(14)  # overruns counted before a restart (irqtimer's restart at 0)
_Q_COUNT = const(15)
_MAX_WAIT_PERIODS = const(200)  # 100 ms at 2 kHz: an emulated head on a loaded host
# A callback that raised stopped the timer (irqtimer, as the stm32 port's Timer): the
# scheduler's check (TimerLoop.supervise) starts it again this many times a pass at most
_MAX_RESTARTS = const(3)
_RX_BYTES = const(128)  # a TRACK reply frame is 45 bytes
_LINK_BUFFER_BYTES = const(64)  # request body, frame, reply decode: 30, 32, 42 bytes
# TimerLoop.args: what _timer_period reads, in one list
_I_DUTY = const(0)  # TrackingDuty.state
_I_LINK = const(1)  # TimerLoop.words
_I_RX = const(2)  # the RX interrupt's words: fill, dropped (past the buffer; on the STM32 also
# lost to a USART overrun), received
_I_FRAME = const(3)  # the request frame (32 bytes of the link's out buffer)
_I_WRITE = const(4)  # tracking_link.write, bound once
_I_TRACKER = const(5)
_I_IDLE = const(6)  # tracking.words_idle
_I_WAIT = const(7)  # irqtimer.read
# the Thumb pair and the kernel, bound once as in paced_args (not looked up as globals in
# the interrupt): _timer_period unpacks the list in _I_* order in one runtime call
_I_REQUEST = const(8)
_I_REPLY = const(9)
_I_KERNEL = const(10)
# the tracker's prediction table, bound at each start (_arm): replaced only by an upload,
# which the tracker refuses while tracking, and the timer runs only from the tracker's
# start to its stop; the list holds the table, so a replaced one is never freed under it
_I_TABLE = const(11)
_I_COUNT = const(12)


def timer_interrupt():
    """The irqtimer module where the image has one (both MCU images), else None (unix)."""
    try:
        import irqtimer
    except ImportError:
        return None
    return irqtimer


class TimerLoop:
    """The tracking loop's period from the board's timer interrupt over the board's
    tracking link (see above). `start(period_us)` when the pass starts (after the
    tracker's start), `stop()` when it stops (after the tracker's stop: waits, bounded,
    for the IDLE commands to reach the head)."""

    def __init__(self, duty, link, irqtimer, reply_wait_us=0):
        self.duty = duty
        self.link = link
        self.irqtimer = irqtimer
        self.words = array.array("i", bytes(4 * _Q_COUNT))
        self.rx_words = array.array("i", bytes(12))
        self._rx = bytearray(_RX_BYTES)
        self._req = bytearray(_LINK_BUFFER_BYTES)
        self._out = bytearray(_LINK_BUFFER_BYTES)
        self._decoded = bytearray(_LINK_BUFFER_BYTES)
        self._scan = array.array("i", bytes(20))  # an idle frame reader's: no partial frame
        self.ctx = array.array("I", bytes(24))  # the Thumb pair's, as Bus._track_ctx
        for i, buf in enumerate((self._req, self._out, _framing.CRC16_TABLE,
                                 self._decoded, None, self._scan)):  # fmt: skip
            self.ctx[i] = len(self._decoded) if buf is None else _bus._address(buf)
        self.words[_Q_RX] = _bus._address(self._rx)
        self.words[_Q_CTX] = _bus._address(self.ctx)
        self.words[_Q_RX_BYTES] = _RX_BYTES
        self.words[_Q_WAIT_US] = reply_wait_us
        self.args = [None] * _I_COUNT
        self.args[_I_DUTY] = duty.state
        self.args[_I_LINK] = self.words
        self.args[_I_RX] = self.rx_words
        self.args[_I_FRAME] = memoryview(self._out)[:_TRACK_REQUEST_FRAME_BYTES]
        self.args[_I_WRITE] = link.write
        self.args[_I_IDLE] = tracking.words_idle
        self.args[_I_WAIT] = irqtimer.read
        self.args[_I_REQUEST] = _track_request
        self.args[_I_REPLY] = _track_reply
        self.args[_I_KERNEL] = _step_kernel
        self.attach(duty.tracker)
        self.running = False
        self.stops_unconfirmed = 0  # stops whose IDLE commands were not confirmed in time
        # the first exception that stopped the timer this pass (text); the restarts and
        # the overruns carried over them are words (_Q_RESTARTS, _Q_LATE_CARRIED): one
        # attribute more grows the instance's map, and the STM32 board's heap has no room
        # for that in a tracking pass (tests/test_tracking_pass_stm32.py)
        self.error = None

    def attach(self, tracker):
        self.args[_I_TRACKER] = tracker
        self.args[_I_TABLE] = tracker.table

    def start(self, period_us):
        """Start the period interrupt (the tracker started: its first period asks for the
        sensors, its second runs the kernel)."""
        self.words[_Q_RESTARTS] = 0
        self.error = None
        self._arm(period_us)

    def supervise(self):
        """Called by the scheduler every pass (mission.py): a callback that raised
        stopped the timer (irqtimer), which left the loop dead for the rest of the pass and
        the head on its last commands. Keep the error (status duty_errors.trk), count it,
        and start the timer again, at most _MAX_RESTARTS times a pass (a callback that
        keeps raising then stays stopped, reported). The tracker's state words are kept:
        the next period asks for the sensors, the one after runs the kernel. True if it
        restarted the timer."""
        irqtimer = self.irqtimer
        if not self.running or irqtimer.running():
            return False
        if self.error is None:
            self.error = repr(irqtimer.last_error())[:80]
        w = self.words
        if w[_Q_RESTARTS] >= _MAX_RESTARTS:
            return False
        w[_Q_RESTARTS] += 1
        w[_Q_LATE_CARRIED] = (w[_Q_LATE_CARRIED] + irqtimer.counters()[2]) & _COUNTER_WRAP
        self._arm(self.duty.tracker.cfg[0])
        return True

    @property
    def restarts(self):
        return self.words[_Q_RESTARTS]

    def error_text(self):
        """The exception that stopped the timer this pass (text), or None."""
        if self.error is not None:
            return self.error
        if self.irqtimer.counters()[1]:
            return repr(self.irqtimer.last_error())[:80]
        return None

    def _arm(self, period_us):
        irqtimer = self.irqtimer
        # A reply that came after the last stop (its request in flight then) waits in the
        # link: taken by the receive interrupt, it was the first period's reply, one `bad`
        # (review). Drained here first, to its frame's delimiter (QEMU hands the UART the
        # rest of a frame at the host's pace: a drain that stopped at the first empty read
        # left a tail, a `bad` in 1 of 3 starts), bounded (a peer that keeps sending) in
        # virtual time, by the wait a period gives a reply (_MAX_WAIT_PERIODS): a bound of
        # 2,000 reads (~4 ms: an empty read returns at once) still left a tail, 3 `bad`,
        # in 1 of 4 starts at load ~10, the host's next byte later than that
        ticks = self.duty.bus.clock.ticks_us
        t0 = ticks()
        limit_us = _MAX_WAIT_PERIODS * period_us
        n = 0  # 1: the bytes drained so far end inside a frame
        while ((ticks() - t0) & 0x3FFFFFFF) <= limit_us:
            count = self.link.readinto(self._rx)
            if count:
                n = 0 if self._rx[count - 1] == 0 else 1
            elif n == 0:
                break
        self.args[_I_TABLE] = self.args[_I_TRACKER].table
        self.rx_words[0] = 0
        self.words[_Q_PENDING] = 0
        self.words[_Q_WAITED] = 0
        irqtimer.open(self._rx, self.rx_words)
        irqtimer.start(period_us, _timer_period, self.args)
        self.running = True

    def idle(self):
        d = self.duty.state
        return (d[_D_STATE] == _IDLE and d[_D_UNSENT] == 0 and self.words[_Q_PENDING] == 0
                and tracking.words_idle(self.duty.tracker.words))  # fmt: skip

    def stop(self, ticks, ticks_arg, timeout_us):
        """Stop the interrupt once the loop is idle (the tracker stopped and its IDLE
        commands confirmed by the head), or after timeout_us (counted)."""
        if not self.running:
            return
        t0 = ticks(ticks_arg)
        while not self.idle() and self.irqtimer.running():
            if ((ticks(ticks_arg) - t0) & 0x3FFFFFFF) > timeout_us:
                self.stops_unconfirmed += 1
                break
        self.irqtimer.stop()
        self.irqtimer.close()
        self.running = False

    def late_periods(self):
        """Periods that did not run on time: the interrupt came late (a period ran over
        the next), or the reply was not whole yet or lost (wrapping at 2^30 - 1)."""
        w = self.words
        overruns = self.irqtimer.counters()[2] + w[_Q_LATE_CARRIED]
        return (overruns + w[_Q_WAITS] + w[_Q_LOST]) & _COUNTER_WRAP

    def telemetry(self):
        fired, errors, overruns, latency_us, busy_us = self.irqtimer.counters()
        w = self.words
        out = {
            "timer": self.irqtimer.TIMER,
            "fired": fired,
            "overruns": overruns,
            "worst_latency_us": latency_us,
            "worst_busy_us": busy_us,
            "waits": w[_Q_WAITS],
            "lost": w[_Q_LOST],
            "bad": w[_Q_BAD],
            "replies": w[_Q_REPLIES],
            "errors": w[_Q_ERRORS],
            "send_failed": w[_Q_SEND_FAILED],
            "rx_dropped": self.rx_words[1],
            "stops_unconfirmed": self.stops_unconfirmed,
            "restarts": w[_Q_RESTARTS],
        }
        error = self.error_text()
        if error is not None:
            out["error"] = error
        return out


@micropython.viper
def _timer_period(args) -> int:
    """One period in the timer interrupt (TimerLoop): the reply to the last request from
    the receive buffer, the kernel on its sensors, the next request with the commands.
    Allocates nothing (the interrupt runs with the heap locked). Returns 1 if the kernel
    ran."""
    # one unpacking in the order of the _I_* indices (an index costs a runtime call each)
    (duty, link, rx_words, frame, write, tracker, idle, wait, request, reply, kernel,
     table) = args  # fmt: skip
    d = ptr32(duty)
    q = ptr32(link)
    rx = ptr32(rx_words)
    io = d[_D_IO]
    ctx = q[_Q_CTX]
    ran = 0
    pending = q[_Q_PENDING]
    if pending != 0:
        fill = rx[0]
        buf = ptr8(q[_Q_RX])
        whole = fill > 0 and buf[fill - 1] == 0
        if not whole and q[_Q_WAIT_US] > 0:  # a reply on its way: polled, bounded
            fill = int(wait(q[_Q_WAIT_US]))
            whole = fill > 0 and buf[fill - 1] == 0
        if not whole:
            waited = q[_Q_WAITED] + 1
            q[_Q_WAITED] = waited
            if waited < _MAX_WAIT_PERIODS and fill < q[_Q_RX_BYTES]:
                n = q[_Q_WAITS]
                q[_Q_WAITS] = n + 1 if n < _COUNTER_WRAP else 0
                return 0
            # (a full buffer without a delimiter, or no reply in time: given up)
            n = q[_Q_LOST]
            q[_Q_LOST] = n + 1 if n < _COUNTER_WRAP else 0
            status = -1
        else:
            status = int(reply(q[_Q_RX], fill | ((pending & 0xFF) << 16), io, ctx))
            if status < 0:
                n = q[_Q_BAD]
                q[_Q_BAD] = n + 1 if n < _COUNTER_WRAP else 0
            else:
                n = q[_Q_REPLIES]
                q[_Q_REPLIES] = n + 1 if n < _COUNTER_WRAP else 0
                if status != 0:
                    n = q[_Q_ERRORS]
                    q[_Q_ERRORS] = n + 1 if n < _COUNTER_WRAP else 0
        rx[0] = 0
        q[_Q_PENDING] = 0
        q[_Q_WAITED] = 0
        if status != 0:  # the head holds the last commands; they go with the next request
            n = d[_D_BUS_ERRORS]
            d[_D_BUS_ERRORS] = n + 1 if n < _COUNTER_WRAP else 0
        elif d[_D_STATE] == _IDLE and int(idle(d[_D_WORDS])):
            d[_D_UNSENT] = 0  # stopped: the IDLE commands that request carried are applied
            return 0
        else:
            state = int(kernel(d[_D_WORDS], table, d[_D_SIN]))
            d[_D_STATE] = state
            d[_D_UNSENT] = 1
            n = d[_D_STEPS]
            d[_D_STEPS] = n + 1 if n < _COUNTER_WRAP else 0
            ran = 1
    elif d[_D_STATE] == _IDLE and d[_D_UNSENT] == 0 and int(idle(d[_D_WORDS])):
        return 0  # idle: nothing to ask for
    tag = (q[_Q_TAG] + 1) & 0xFF
    q[_Q_TAG] = tag
    request(io, (d[_D_UNSENT] << 8) | tag, ctx)
    if int(write(frame)) == _TRACK_REQUEST_FRAME_BYTES:
        q[_Q_PENDING] = 0x100 | tag
    else:
        n = q[_Q_SEND_FAILED]
        q[_Q_SEND_FAILED] = n + 1 if n < _COUNTER_WRAP else 0
        n = d[_D_BUS_ERRORS]
        d[_D_BUS_ERRORS] = n + 1 if n < _COUNTER_WRAP else 0
    return ran


_PER_RECORD = const(40)
_TRANSITIONS_PER_RECORD = const(120)  # 12 + 8 * 120 bytes fit the 12 + 24 * 40 payload


class TrackingProduct:
    """Telemetry into storage: drains the loop's telemetry ring into the product
    "tracking" (record kind 4, docs/tracking.md), 40 samples per record, and appends the
    transitions logged since the last call. A low-priority scheduler duty, never called
    from an interrupt (it packs with struct)."""

    def __init__(self, tracker, store):
        self.tracker = tracker
        # packed into the payload and committed in one call (step): the record buffer is
        # the one housekeeping's log uses too (storage.Storage.open_log's shared)
        self.log = store.open_log(
            "tracking", storage.KIND_TRACKING, 12 + 24 * _PER_RECORD, deferred=True, shared=True
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
            length = tracker.pack_telemetry_into(self.log.payload, _PER_RECORD)[1]
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
