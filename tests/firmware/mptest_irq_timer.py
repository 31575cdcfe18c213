# The hardware timer interrupt the tracking loop's period runs from (firmware/cmodules/
# irqtimer, docs/scheduling.md "The loop on a timer interrupt"): its callback comes at the
# programmed period of virtual time while one long call holds the CPU (a littlefs append
# with its sync, a viper loop: what stalled the cooperative loop in a pass), with the heap
# locked, and a callback that raises is stopped and counted. QEMU follows the instruction
# count (1 ns an instruction), so the counts against the board's clock are exact.
import array

import board
import micropython

QEMU_ICOUNT_SHIFT = 0
TARGETS = ("qemu", "netduino2")
TARGETS_REASON = (
    "the unix port has no timer interrupt: the loop keeps the scheduler's cooperative pacing "
    "there (mptest_paced_loop.py)"
)
PERIOD_US = 200
LITTLEFS_PERIOD_US = 40
MIN_PERIODS_IN_CALL = 20  # the long call must span this many periods, or it proves nothing

_ticks = board.clock.ticks_us


def _wrapped_us(a, b):
    return (b - a) & 0x3FFFFFFF


@micropython.viper
def _count(counter):
    c = ptr32(counter)
    c[0] = c[0] + 1


@micropython.viper
def _spin(iterations: int) -> int:
    x = 0
    for i in range(iterations):
        x = (x + i) & 0xFFFF
    return x


def _callbacks_during(call, period_us=PERIOD_US):
    """(callbacks counted, virtual us elapsed) over one call, the timer running."""
    import irqtimer

    counter = array.array("i", [0])
    irqtimer.start(period_us, _count, counter)
    try:
        before = counter[0]
        t0 = _ticks()
        call()
        elapsed_us = _wrapped_us(t0, _ticks())
        during = counter[0] - before
        fired, errors, overruns, _latency_us, _busy_us = irqtimer.counters()
    finally:
        irqtimer.stop()
    assert errors == 0 and irqtimer.last_error() is None, irqtimer.last_error()
    assert overruns == 0, overruns
    assert fired >= during
    return during, elapsed_us


def _assert_at_the_period(during, elapsed_us, period_us=PERIOD_US):
    assert elapsed_us >= MIN_PERIODS_IN_CALL * period_us, "call too short: %d us" % elapsed_us
    expected = elapsed_us // period_us
    # one period's phase at each end of the call, nothing else: QEMU's clock is the
    # instruction count (no host noise)
    assert abs(during - expected) <= 1, (during, expected, elapsed_us)


def test_the_timer_interrupts_a_long_viper_loop_at_its_period():
    during, elapsed_us = _callbacks_during(lambda: _spin(400_000))
    _assert_at_the_period(during, elapsed_us)


def test_the_timer_interrupts_a_littlefs_append_and_sync_at_its_period():
    import os

    root = board.mount_storage()
    path = root + "/irqtimer.bin"
    block = bytes(range(256)) * 8  # 2 KB

    def append_and_sync():
        with open(path, "ab") as f:
            for _ in range(4):
                f.write(block)
            f.flush()

    # (the STM32 board's littlefs has 16 KiB: 8 KB appended with its sync takes ~1.5 ms of
    # virtual time, so a shorter period than the loop's 500 us gives the count its span)
    try:
        during, elapsed_us = _callbacks_during(append_and_sync, LITTLEFS_PERIOD_US)
    finally:
        try:
            os.remove(path)
        except OSError:
            pass
    _assert_at_the_period(during, elapsed_us, LITTLEFS_PERIOD_US)


def test_the_callback_runs_with_the_heap_locked_and_a_raising_one_is_stopped_and_counted():
    import irqtimer

    def allocates(_arg):
        return [0] * 8  # a heap allocation in the interrupt: MemoryError

    irqtimer.start(PERIOD_US, allocates, None)
    _spin(100_000)
    fired, errors, _, _, _ = irqtimer.counters()
    error = irqtimer.last_error()
    running = irqtimer.running()
    irqtimer.stop()
    assert isinstance(error, MemoryError), error
    assert (fired, errors, running) == (1, 1, False), (fired, errors, running)
    # started again with a callback that allocates nothing, it runs
    during, elapsed_us = _callbacks_during(lambda: _spin(100_000))
    assert during >= 5, (during, elapsed_us)


def test_a_callback_longer_than_its_period_is_counted_as_an_overrun():
    import irqtimer

    state = array.array("i", [0])

    def slow(arg):
        arg[0] += 1
        if arg[0] == 3:
            _spin(60_000)  # ~several periods of virtual time, in the interrupt

    irqtimer.start(PERIOD_US, slow, state)
    _spin(200_000)
    fired, errors, overruns, _, busy_us = irqtimer.counters()
    irqtimer.stop()
    assert errors == 0, irqtimer.last_error()
    assert overruns == 1, overruns
    assert busy_us > PERIOD_US, busy_us
    assert fired > 3, fired


def test_stop_stops_the_callbacks_and_the_period_is_checked():
    import irqtimer

    counter = array.array("i", [0])
    irqtimer.start(PERIOD_US, _count, counter)
    _spin(50_000)
    irqtimer.stop()
    stopped_at = counter[0]
    _spin(50_000)
    assert stopped_at > 0 and counter[0] == stopped_at, (stopped_at, counter[0])
    for bad in (0, 5, 10_000_000_000):
        try:
            irqtimer.start(bad, _count, counter)
        except (ValueError, OverflowError):
            continue
        irqtimer.stop()
        raise AssertionError("period %d accepted" % bad)
