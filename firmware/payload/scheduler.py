# Cooperative scheduler (docs/scheduling.md): the duties are step functions called in a
# fixed order every pass. Each step does a bounded amount of work and returns whether it
# did any, so the main loop can idle when nothing is pending. On a board the time-critical
# steps (sequencer refill, TDC drain) can move to a hardware timer or FIFO interrupt
# unchanged: they already take no arguments and keep their state in preallocated buffers.
#
# Per duty the scheduler keeps the number of calls and the worst step time in
# microseconds: the measured side of the latency budget in docs/scheduling.md.
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


def error_text(error):
    """An exception's repr, at most MAX_ERROR_TEXT_CHARS."""
    return repr(error)[:MAX_ERROR_TEXT_CHARS]


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


class Scheduler:
    def __init__(self, clock):
        self.clock = clock
        # the clock's ticks_us in one native call (two reads per duty per pass: through the
        # method it was ~1.65k instructions a read on the M3, this 0.6k)
        self._ticks, self._ticks_arg = clock.ticks_source()
        self.duties = []
        self.passes = 0

    def add(self, name, step, period_us=0):
        duty = Duty(name, step, period_us)
        self.duties.append(duty)
        return duty

    # native: every pass runs this (the tracking loop's period among them); as machine code
    # it costs ~2.4k instructions a pass less than in bytecode on the M3 (docs/tracking.md)
    @micropython.native
    def run_once(self):
        """Call every due duty once; True if any did work."""
        ticks = self._ticks
        ticks_arg = self._ticks_arg
        busy = False
        n = self.passes
        self.passes = n + 1 if n < COUNTER_WRAP else 0
        for duty in self.duties:
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
        return busy

    def telemetry(self):
        out = {}
        for d in self.duties:
            total_us = d.total_s * _US_PER_S + d.total_us  # a big int past 2^30 us: here only
            entry = {"calls": d.calls, "worst_us": d.worst_us, "total_us": total_us}
            if d.errors:
                entry["errors"] = d.errors
                entry["last_error"] = d.last_error
            out[d.name] = entry
        return out
