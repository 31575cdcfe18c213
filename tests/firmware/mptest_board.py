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
