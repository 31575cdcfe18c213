# QEMU board internals: the CMSDK timer behind the 64-bit microsecond clock.
import board

TARGETS = ("qemu",)
TARGETS_REASON = "exercises the QEMU board's CMSDK TIMER0 registers and 32-bit word carry"
QEMU_ICOUNT_SHIFT = 5


def test_clock_carries_into_the_high_word():
    clock = board.clock
    clock.update()
    state = clock._state
    state[2] = 0xFFFFFFF0  # microseconds low word just below the wrap
    state[3] = 7
    for _ in range(3000):  # long enough for > 16 us of emulated time
        pass
    clock.update()
    assert state[3] == 8, (state[2], state[3])
    assert clock.now_us() == (8 << 32) | state[2]


def test_clock_survives_a_timer_wrap_between_updates():
    clock = board.clock
    clock.update()
    before = clock.now_us()
    state = clock._state
    # Pretend the last update saw the timer 2**31 + 1000 cycles ago (more than half a wrap).
    state[0] = (state[0] + 0x80000000 + 1000) & 0xFFFFFFFF
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
