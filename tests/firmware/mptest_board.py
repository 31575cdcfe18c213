# The board interface every target provides: clock, ground link, payload bus, storage.
import board
import micropython


def test_clock_is_monotonic_and_stamps_match_now_us():
    clock = board.clock
    first = clock.now_us()
    for _ in range(2000):
        pass
    second = clock.now_us()
    assert second >= first
    stamp = bytearray(8)
    clock.stamp_into(stamp, 0)
    value = 0
    for i in range(8):
        value |= stamp[i] << (8 * i)
    assert second <= value <= clock.now_us()


def test_clock_update_and_stamp_do_not_allocate():
    # Called from the scheduler and, on a board, from timer interrupts.
    stamp = bytearray(16)
    clock = board.clock
    micropython.heap_lock()
    try:
        clock.update()
        clock.stamp_into(stamp, 8)
        low = clock.ticks_us()
    finally:
        micropython.heap_unlock()
    assert 0 <= low < (1 << 30)


def test_links_are_non_blocking_when_idle():
    buf = bytearray(64)
    assert board.payload_bus.readinto(buf) == 0


def test_storage_root_is_writable():
    import os

    root = board.mount_storage()
    path = root + "/probe.bin"
    with open(path, "wb") as handle:
        handle.write(b"\x00\x01\x02" * 100)
    with open(path, "rb") as handle:
        assert handle.read() == b"\x00\x01\x02" * 100
    os.remove(path)


def test_the_longest_bounded_wait_leaves_the_watchdog_a_quarter_of_its_limit():
    # Issue 15 finding 2: a dead head is reported and the link keeps serving only if every
    # wait between two feeds of the watchdog (one a scheduler pass) ends well before the
    # watchdog fires. The flight values: on the STM32 board a 10 s bus timeout (main's,
    # for an emulated head) made a dead head's transaction 40 s and the laser stop 50 s,
    # against an IWDG that may fire at 22.3 s; 500 ms makes them 2 s and 12 s.
    from payload import waits

    limit_us = board.WATCHDOG_LIMIT_US
    if limit_us is None:  # no watchdog: the unix target's launcher supervises the process
        assert board.NAME == "unix"
        return
    flight_us = getattr(board, "FLIGHT_BUS_TIMEOUT_US", board.BUS_TIMEOUT_US)
    wait_us, name = waits.longest_wait_us(flight_us)
    assert 4 * wait_us <= 3 * limit_us, (name, wait_us, limit_us)
    waits.check(flight_us, limit_us)


def test_waits_that_outlast_the_watchdog_are_refused_naming_the_wait():
    from payload import waits

    stm32_limit_us = 22_309_000  # the IWDG at its LSI's fastest (boards/netduino2)
    assert waits.longest_wait_us(500_000) == (12_000_000, "laser stop")
    assert waits.longest_wait_us(10_000_000) == (80_000_000, "dead head a pass")
    waits.check(500_000, stm32_limit_us)
    try:
        waits.check(10_000_000, stm32_limit_us)  # main's netduino2 value
    except ValueError as error:
        text = str(error)
    else:
        raise AssertionError("a 10 s bus timeout passed against the IWDG")
    assert "dead head a pass 80000000 us" in text and "22309000" in text, text
