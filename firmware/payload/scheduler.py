# Cooperative scheduler (docs/scheduling.md): the duties are step functions called in a
# fixed order every pass. Each step does a bounded amount of work and returns whether it
# did any, so the main loop can idle when nothing is pending. On a board the time-critical
# steps (sequencer refill, TDC drain) can move to a hardware timer or FIFO interrupt
# unchanged: they already take no arguments and keep their state in preallocated buffers.
#
# Per duty the scheduler keeps the number of calls and the worst step time in
# microseconds: the measured side of the latency budget in docs/scheduling.md.
import array

import micropython
from micropython import const

# An error's text as telemetry keeps it (a duty's last_error, the main loop's
# last_loop_error, a failing mission status): bounded, so that housekeeping, which carries
# them, still fits one packet however long an exception's message is.
MAX_ERROR_TEXT_CHARS = const(80)

# The pass and call counters wrap to 0 past this, the largest small int of a 32-bit port,
# and a duty's total time is kept as whole seconds plus microseconds under one second: a
# big int would be allocated on every pass from then on (the busiest duty's total_us
# passed 2^30 after 18 minutes of its work, the counters after 2^30 passes), and the
# pass carries the tracking loop's period, which allocates nothing.
COUNTER_WRAP = const(0x3FFFFFFF)
_US_PER_S = const(1_000_000)


# What an error's text becomes when the heap has no room for it: the handlers that keep
# it (a duty's, the paced loop's, the main loop's in app.run) run after the failure, often
# a MemoryError, and a repr that raised there escaped the scheduler and then app.run's
# loop, which ended in the REPL on the ground link.
NO_HEAP_ERROR_TEXT = "(error text: no heap)"


def error_text(error):
    """An exception's repr, at most MAX_ERROR_TEXT_CHARS; never raises (the repr is a
    heap string: NO_HEAP_ERROR_TEXT, a constant, when the heap has no room for it)."""
    try:
        return repr(error)[:MAX_ERROR_TEXT_CHARS]
    except BaseException:  # noqa: BLE001 - MemoryError, or a repr that failed
        return NO_HEAP_ERROR_TEXT


class Duty:
    def __init__(self, name, step, period_us=0):
        self.name = name
        self.step = step
        self.period_us = period_us  # 0: every pass
        self.calls = 0
        self.worst_us = 0
        self.total_s = 0  # the duty's total time: total_s s + total_us us (< 1 s)
        self.total_us = 0
        self.last_us = 0
        self.errors = 0
        self.last_error = None


# The paced loop's state words (Loop.state, an array("i")), read and written by _pace
_DUE = const(0)  # the next period's due time (us, wrapped at 2^30); -1: idle, not paced
_PERIOD = const(1)  # us
_OVERRUNS = const(2)  # periods that started a whole period or more late (wrap at 2^30 - 1)
_PERIODS = const(3)  # periods run (wrap at 2^30 - 1)
_WORST_LATE = const(4)  # the latest a period started after its due time (us): the jitter
_PASSES = const(5)  # the scheduler's passes while it has a loop (wrap at 2^30 - 1)
# 1: the last period failed (the step returned < 0): the loop gets one period a pass, at its
# end, until one runs. A failed exchange may be retries + 1 bus timeouts long (40 s on the
# QEMU boards, 2 s in flight): one before each duty of a pass was ~11 of them a pass, and the
# watchdog, fed once a pass, reset the controller whenever the head fell silent in a pass.
_FAILING = const(6)


# Scheduler._run, the paced loop's call in one list (set_loop), in this order: _pace
# unpacks it in one runtime call (an attribute lookup in native code costs ~100-200)
_R_STEP = const(0)
_R_STEP_ARG = const(1)
_R_TICKS = const(2)
_R_TICKS_ARG = const(3)
_R_STATE = const(4)  # Loop.state
_R_STATE_WORDS = const(5)  # Loop.state's address where it is a small int (MCU), else itself
_W_PASSES = const(0)  # Scheduler.words: passes while there is no loop (wrap at 2^30 - 1)


@micropython.viper
def _pace(run, last: int) -> int:
    """Wait for the loop's due time, run one period (`step(step_arg)`), schedule the next;
    returns 1 if the loop spent a period (ran it, or failed it: a negative return), 0 if it
    is idle. `last`: the pass's last call, which counts the pass and calls an idle loop
    once (unpaced); the calls before each other duty (`last` 0) do nothing while the loop
    is idle or failing (_FAILING: then only the pass's last call runs a period). Viper:
    its arithmetic costs a few instructions, where the same in native code goes through
    the runtime (~100 each)."""
    # the loop's call in one unpacking (one runtime call, where indexing the list cost ~85
    # instructions an item); the order of the _R_* indices
    step, step_arg, ticks, ticks_arg, state_array, state_words = run
    state = ptr32(state_words)
    due = state[_DUE]
    if last:
        n = state[_PASSES]
        state[_PASSES] = n + 1 if n < 0x3FFFFFFF else 0
    elif due == -1 or state[_FAILING] != 0:
        return 0
    now = int(ticks(ticks_arg))
    # idle is -1, which a 64-bit build's ptr32 load zero-extends: a due time (wrapped at
    # 2^30) has no bit from 30 up, -1 has them on 32 and 64 bits (a literal 2^30 is not a
    # small int on a 32-bit port: viper refuses it there)
    if (due >> 30) == 0:
        late = (now - due) & 0x3FFFFFFF
        while late >= 0x20000000:  # early (less than half the wrap before due): wait
            now = int(ticks(ticks_arg))
            late = (now - due) & 0x3FFFFFFF
        if late > state[_WORST_LATE]:
            state[_WORST_LATE] = late
        if late >= state[_PERIOD]:  # a whole period or more late: counted, paced from now
            n = state[_OVERRUNS]
            state[_OVERRUNS] = n + 1 if n < 0x3FFFFFFF else 0
            due = now
    else:
        due = now
    state[_DUE] = -1  # idle unless the step runs a period (and if it raises)
    ran = int(step(step_arg))
    if ran == 0:
        return 0
    state[_DUE] = (due + state[_PERIOD]) & 0x3FFFFFFF
    n = state[_PERIODS]
    state[_PERIODS] = n + 1 if n < 0x3FFFFFFF else 0
    state[_FAILING] = 1 if ran < 0 else 0
    return 1


@micropython.viper
def _address(buf: ptr8) -> uint:
    return uint(buf)


def _call(step):
    return int(step() or 0)  # (True 1, False or None 0, a failed period's -1 kept)


class Loop:
    """The paced real-time duty (the tracking loop in pass mode, docs/scheduling.md "The
    paced loop"). While it runs, the scheduler calls `step()` once every `period_us`,
    before each other duty of a pass, so the other duties share the time its periods
    leave; a call that comes a whole period or more late is counted in `overruns` and the
    pacing starts again from it. While `step()` returns False (the loop is idle) it is
    called once a pass, unpaced, until it returns true. A period that fails must return
    true too, a negative int (TrackingDuty: -1 for a failed TRACK exchange): it is a spent
    period, paced and counted in `periods` as any, so that a stall after it is still
    counted late; until a period runs again the loop gets one period a pass, at the pass's
    end, not one before each duty (a failed exchange can be several bus timeouts long)."""

    def __init__(self, name, step, period_us, step_arg=None):
        self.name = name
        if step_arg is None:  # a step without an argument: called through _call
            step, step_arg = _call, step
        self.step = step
        self.step_arg = step_arg
        self.state = array.array("i", (-1, period_us, 0, 0, 0, 0, 0))
        self.errors = 0
        self.last_error = None

    @property
    def period_us(self):
        return self.state[_PERIOD]

    @period_us.setter
    def period_us(self, value):
        self.state[_PERIOD] = value

    @property
    def pacing(self):
        return self.state[_DUE] >= 0

    @property
    def overruns(self):
        return self.state[_OVERRUNS]

    @property
    def periods(self):
        """Periods spent (run, or failed: the step's true return), wrapping at 2^30 - 1."""
        return self.state[_PERIODS]

    @property
    def worst_us(self):
        """The latest a period started after its due time (us)."""
        return self.state[_WORST_LATE]


class Scheduler:
    def __init__(self, clock):
        self.clock = clock
        # the clock's ticks_us in one native call (two reads per duty per pass: through the
        # method it was ~1.65k instructions a read on the M3, this 0.6k)
        self._ticks, self._ticks_arg = clock.ticks_source()
        self.duties = []
        self.words = array.array("i", (0,))  # _W_PASSES
        self.loop = None  # the paced real-time duty (set_loop), or None
        self._run = None  # the loop's call (_R_*), while there is a loop
        # what run_once reads every pass, in one attribute: [self._run, self.duties]
        self._pass = [None, self.duties]
        # run_once(): one pass (a closure: see _runner)
        self.run_once = _runner(self, self._pass)

    @property
    def passes(self):
        """Passes run (wrap at 2^30 - 1): counted by the loop's pacing while there is one."""
        if self.loop is not None:
            return self.loop.state[_PASSES]
        return self.words[_W_PASSES]

    @passes.setter
    def passes(self, value):
        if self.loop is not None:
            self.loop.state[_PASSES] = value & COUNTER_WRAP
        self.words[_W_PASSES] = value & COUNTER_WRAP

    def set_loop(self, name, step, period_us, step_arg=None):
        """Run `step` as the paced loop (one slot: a second call replaces the first);
        with `step_arg`, each period is `step(step_arg)` (a viper period takes its state
        as an argument: TrackingDuty.paced_step())."""
        loop = Loop(name, step, period_us, step_arg)
        loop.state[_PASSES] = self.passes
        ticks_arg = self._ticks_arg
        if isinstance(ticks_arg, array.array) and _address(ticks_arg) <= COUNTER_WRAP:
            # the clock's state words by address: a small int goes through the call for a
            # few instructions, an array through the buffer protocol (the MCU boards)
            ticks_arg = _address(ticks_arg)
        state_words = loop.state
        if _address(state_words) <= COUNTER_WRAP:  # (an int goes to ptr32 cheaper)
            state_words = _address(state_words)
        self._run = [loop.step, loop.step_arg, self._ticks, ticks_arg, loop.state, state_words]
        self._pass[0] = self._run
        self.loop = loop
        return loop

    def add(self, name, step, period_us=0):
        duty = Duty(name, step, period_us)
        self.duties.append(duty)
        return duty

    def _loop_failed(self, error):
        loop = self.loop
        loop.errors += 1
        loop.last_error = error_text(error)

    def telemetry(self):
        out = {}
        loop = self.loop
        if loop is not None:
            out[loop.name] = {"periods": loop.periods, "worst_late_us": loop.worst_us,
                              "overruns": loop.overruns, "period_us": loop.period_us}  # fmt: skip
            if loop.errors:
                out[loop.name]["errors"] = loop.errors
                out[loop.name]["last_error"] = loop.last_error
        for d in self.duties:
            total_us = d.total_s * _US_PER_S + d.total_us  # a big int past 2^30 us: here only
            entry = {"calls": d.calls, "worst_us": d.worst_us, "total_us": total_us}
            if d.errors:
                entry["errors"] = d.errors
                entry["last_error"] = d.last_error
            out[d.name] = entry
        return out


def _runner(sched, pass_list):
    """Scheduler.run_once for `sched`: a native closure over its [run, duties] list, so a
    pass looks nothing up (it read `self._pass`: the one lookup left in the paced period,
    whose cost moved with the image's qstr layout: 5 -> 270 instructions on netduino2 with
    the map-lookup cache cold when other modules gained names;
    mptest_paced_loop_cost.py)."""

    # native: every pass runs this (the tracking loop's period among them); as machine code
    # it costs ~2.4k instructions a pass less than in bytecode on the M3 (docs/tracking.md)
    # (`pace` a default argument: an argument costs nothing to read, where the global
    # `_pace` was a lookup before each duty, its cost depending on the image's qstr layout)
    @micropython.native
    def run_once(pace=_pace):
        """Call every due duty once; True if any did work."""
        busy = False
        run, duties = pass_list  # (a closure's cell: no lookup, whatever the qstr layout)
        if run is None:  # (with a loop, _pace counts the pass)
            words = sched.words
            n = words[_W_PASSES]
            words[_W_PASSES] = n + 1 if n < COUNTER_WRAP else 0
        state = None
        if duties:
            ticks = sched._ticks
            ticks_arg = sched._ticks_arg
            if run is not None:
                state = run[_R_STATE]
        for duty in duties:
            if state is not None and state[_DUE] >= 0:
                # the paced loop's next period first (waiting for it): each other duty
                # runs in the time a period leaves
                try:
                    pace(run, 0)
                except BaseException as error:  # noqa: BLE001 - as any duty's (below)
                    sched._loop_failed(error)
            start = ticks(ticks_arg)
            if duty.period_us and ((start - duty.last_us) & 0x3FFFFFFF) < duty.period_us:
                continue
            duty.last_us = start
            try:
                if duty.step():
                    busy = True
            except BaseException as error:  # noqa: BLE001
                # One failing duty must not stop the others, and nothing a link can make
                # happen (a KeyboardInterrupt on a REPL UART, a MemoryError) may end the
                # loop and leave a REPL behind.
                duty.errors += 1
                duty.last_error = error_text(error)
            elapsed = (ticks(ticks_arg) - start) & 0x3FFFFFFF
            n = duty.calls
            duty.calls = n + 1 if n < COUNTER_WRAP else 0
            if elapsed > duty.worst_us:
                duty.worst_us = elapsed
            # (a big int here only for a step of ~18 minutes, once)
            total = duty.total_us + elapsed
            if total >= _US_PER_S:
                duty.total_s += total // _US_PER_S
                total %= _US_PER_S
            duty.total_us = total
        if run is not None:
            # idle: one unpaced call a pass (it starts the pacing when the loop starts);
            # paced: one more period, and the main loop must not idle (a board idles until
            # the next interrupt, up to a millisecond). The pass is counted there.
            try:
                if pace(run, 1):
                    busy = True
            except BaseException as error:  # noqa: BLE001
                sched._loop_failed(error)
        return busy

    return run_once
