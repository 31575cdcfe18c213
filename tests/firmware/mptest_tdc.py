# Timestamp buffering: the interrupt-path ring kernels allocate nothing (heap_lock) and keep
# 64-bit times as bytes, overflow is counted event by event, PPS times are captured, and
# the clock discipline recovers a known offset and drift.
import array

import board
import micropython
from payload import storage, tdc


def _event(buf, index, channel, time_ps):
    j = 9 * index
    buf[j] = channel
    buf[j + 1 : j + 9] = time_ps.to_bytes(8, "little")


def _time(buf, index):
    j = 9 * index
    return buf[j], int.from_bytes(buf[j + 1 : j + 9], "little")


def test_ring_push_and_pop_allocate_nothing_and_keep_64_bit_times():
    capacity = 8
    state = array.array("I", bytes(32))
    ring = bytearray(9 * capacity)
    pps = bytearray(8 * tdc.PPS_SLOTS)
    src = bytearray(9 * 5)
    times = [(1 << 63) + 5, 10**12, (1 << 40) + 3, 7, (1 << 64) - 1]
    for i, t in enumerate(times):
        _event(src, i, i % 3, t)
    dst = bytearray(9 * 8)
    micropython.heap_lock()
    try:
        tdc.ring_push(state, ring, capacity, src, 5, pps)
        tdc.ring_push(state, ring, capacity, src, 5, pps)  # 10 into 8: 2 overflow
        popped = tdc.ring_pop(state, ring, capacity, dst, 8)
    finally:
        micropython.heap_unlock()
    assert popped == 8
    assert state[3] == 2  # overflow counted per event
    assert state[4] == 8  # accepted
    got = [_time(dst, i) for i in range(8)]
    want = [(i % 3, t) for i, t in enumerate(times)] + [(i % 3, t) for i, t in enumerate(times)]
    assert got == want[:8]
    # PPS (channel 0) events: indices 0 and 3 of each push, overflowed ones included
    assert state[6] == 4
    assert int.from_bytes(pps[0:8], "little") == times[0]
    assert int.from_bytes(pps[8:16], "little") == times[3]


def test_ring_wraps_around():
    capacity = 4
    state = array.array("I", bytes(32))
    ring = bytearray(9 * capacity)
    pps = bytearray(8 * tdc.PPS_SLOTS)
    src = bytearray(9 * 3)
    dst = bytearray(9 * 3)
    seen = []
    for round_ in range(5):
        for i in range(3):
            _event(src, i, 3, round_ * 10 + i)
        tdc.ring_push(state, ring, capacity, src, 3, pps)
        n = tdc.ring_pop(state, ring, capacity, dst, 3)
        seen += [_time(dst, i)[1] for i in range(n)]
    assert seen == [r * 10 + i for r in range(5) for i in range(3)]
    assert state[3] == 0


def test_clock_discipline_recovers_offset_and_drift():
    store = storage.Storage(board.mount_storage() + "/t_tdc")
    drain = tdc.TdcDrain(None, store, ring_events=64)
    period = 10**12
    offset_ps = 123_456
    drift_ppb = 2_500  # 2.5 ppm fast
    discipline = tdc.ClockDiscipline(drain, store, period)
    src = bytearray(9)
    for k in range(3, 9):
        true_ps = k * period
        _event(src, 0, 0, offset_ps + true_ps + true_ps * drift_ppb // 10**9)
        tdc.ring_push(drain.state, drain.ring, drain.capacity, src, 1, drain.pps)
        discipline.step()
    assert discipline.pps_index == 8
    assert discipline.drift_ppt == drift_ppb * 1000
    assert abs(discipline.offset_ps - offset_ps) <= 1
    assert discipline.records == 6


def test_memcopy_copies_exactly_at_any_offset_without_allocating():
    from payload import memcopy

    src = bytearray((i * 37 + 11) & 0xFF for i in range(64))
    for impl in (memcopy.copy, memcopy.copy_viper):
        for length in (0, 1, 2, 3, 8, 9, 17, 40):
            for offset in (0, 1, 3):
                dst = bytearray(64)
                micropython.heap_lock()
                try:
                    impl(memcopy.address(dst) + offset, memcopy.address(src) + 5, length)
                finally:
                    micropython.heap_unlock()
                assert dst[offset : offset + length] == src[5 : 5 + length]
                assert dst[:offset] == bytearray(offset)
                assert dst[offset + length :] == bytearray(64 - offset - length)
