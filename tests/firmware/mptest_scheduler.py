# The scheduler's pass (it carries the tracking loop's period) allocates nothing however
# long the controller has run: its counters wrap at the largest small int of a 32-bit
# port, and a duty's total time is whole seconds plus microseconds under a second.
import board
import micropython
from payload import scheduler


def test_a_pass_allocates_nothing_once_its_counters_pass_a_small_int():
    # on main the busiest duty's total_us passed 2^30 after 18 minutes of its work, the
    # pass and call counters after 2^30 passes: from then on every pass allocated a big
    # int (MemoryError under heap_lock on QEMU and netduino2)
    loop = scheduler.Scheduler(board.clock)
    top = 0x3FFFFFFF

    def busy():
        start = board.clock.ticks_us()
        while (board.clock.ticks_us() - start) & 0x3FFFFFFF < 200:
            pass
        return True

    duty = loop.add("busy", busy)
    loop.passes = duty.calls = top
    duty.total_s = 1073  # 1073.74 s is 2^30 us
    duty.total_us = 999_999
    micropython.heap_lock()
    try:
        for _ in range(3):
            loop.run_once()
    finally:
        micropython.heap_unlock()
    assert loop.passes == 2 and duty.calls == 2, (loop.passes, duty.calls)
    assert duty.total_s == 1074 and duty.total_us < 1_000_000, (duty.total_s, duty.total_us)
    total = loop.telemetry()["busy"]["total_us"]
    assert total >= 1_073_999_999 + 3 * 200, total
    assert total == 1_074_000_000 + duty.total_us
