# QEMU board internals: the CMSDK timer behind the 64-bit microsecond clock.
import board
import micropython

TARGETS = ("qemu",)
TARGETS_REASON = "exercises the QEMU board's CMSDK TIMER0 registers and 32-bit word carry"
QEMU_ICOUNT_SHIFT = 5


def _active(state):
    """Index of the published copy in the clock's state (board.Clock)."""
    return 1 + 4 * state[0]


def test_clock_carries_into_the_high_word():
    clock = board.clock
    clock.update()
    state = clock._state
    base = _active(state)
    state[base + 2] = 0xFFFFFFF0  # microseconds low word just below the wrap
    state[base + 3] = 7
    for _ in range(3000):  # long enough for > 16 us of emulated time
        pass
    clock.update()
    base = _active(state)
    assert state[base + 3] == 8, (state[base + 2], state[base + 3])
    assert clock.now_us() == (8 << 32) | state[_active(state) + 2]


def test_clock_survives_a_timer_wrap_between_updates():
    clock = board.clock
    clock.update()
    before = clock.now_us()
    state = clock._state
    base = _active(state)
    # Pretend the last update saw the timer 2**31 + 1000 cycles ago (more than half a wrap).
    state[base] = (state[base] + 0x80000000 + 1000) & 0xFFFFFFFF
    clock.update()
    advanced_us = clock.now_us() - before
    assert 85899345 <= advanced_us <= 85899345 + 1000, advanced_us  # (2**31 + 1000) / 25


def test_watchdog_counts_down_and_a_feed_reloads_it():
    board.watchdog_start()
    try:
        first = board.watchdog_remaining_cycles()
        for _ in range(2000):
            pass
        later = board.watchdog_remaining_cycles()
        board.watchdog_feed()
        fed = board.watchdog_remaining_cycles()
    finally:
        board.watchdog_stop()
    period = board.WATCHDOG_PERIOD_S * board.cpu_hz()
    assert period - 200_000 < first <= period, first
    assert later < first  # running on the emulated silicon's clock
    assert fed > later and period - fed < first - later, (first, later, fed)


def test_a_stamp_in_an_interrupt_never_sees_a_half_done_update():
    # An interrupt can land while the main loop is inside Clock.update(): the copy being
    # written is then half done. stamp_into reads only the published copy and the timer,
    # writes nothing, and allocates nothing.
    clock = board.clock
    stamp = bytearray(16)
    clock.update()
    before = clock.now_us()
    state = clock._state
    inactive = 5 - 4 * state[0]
    for i in range(4):
        state[inactive + i] = 0xDEADBEEF & 0xFFFFFFFF  # the writer's half-written copy
    micropython.heap_lock()
    try:
        clock.stamp_into(stamp, 0)
        for _ in range(500):
            pass
        clock.stamp_into(stamp, 8)
    finally:
        micropython.heap_unlock()
    first = int.from_bytes(stamp[0:8], "little")
    second = int.from_bytes(stamp[8:16], "little")
    assert before <= first < second <= clock.now_us(), (before, first, second)
    assert second - first < 100_000  # a torn copy would be off by hours
