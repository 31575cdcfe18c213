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


def test_the_paced_loops_pass_and_period_counters_wrap_without_allocating():
    # with a paced loop the pass is counted in the viper pacing (Loop.state), and the
    # loop's periods and overruns there too: they wrap at 2^30 - 1 as the pass counter
    # without a loop does, and the pass count carries over from before the loop was set
    loop = scheduler.Scheduler(board.clock)
    top = 0x3FFFFFFF
    loop.passes = top - 1
    loop.run_once()  # no loop yet: counted in the scheduler's own word
    pacer = loop.set_loop("trk", lambda: True, 1)
    assert loop.passes == top, loop.passes
    pacer.state[3] = top  # periods
    pacer.state[2] = top  # overruns (every period of a 1 us loop comes late)
    micropython.heap_lock()
    try:
        for _ in range(3):
            loop.run_once()
    finally:
        micropython.heap_unlock()
    assert loop.passes == 2, loop.passes
    # (a period within the same microsecond as the last is not late: overruns may stay)
    assert pacer.periods == 2, pacer.periods
    assert pacer.overruns == top or pacer.overruns <= 2, pacer.overruns
    assert loop.telemetry()["trk"]["periods"] == 2
