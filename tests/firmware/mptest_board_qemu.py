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
