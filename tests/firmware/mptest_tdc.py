# Timestamp buffering: the interrupt-path ring kernels allocate nothing (heap_lock) and keep
# 64-bit times as bytes, overflow is counted event by event, PPS times are captured, and
# the clock discipline recovers a known offset and drift.
import array
import struct

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
    state = array.array("I", bytes(4 * tdc.STATE_WORDS))
    ring = bytearray(9 * capacity)
    pps = bytearray(8 * tdc.PPS_SLOTS)
    epochs = bytearray(8 * tdc.EPOCH_SLOTS)
    src = bytearray(9 * 5)
    times = [(1 << 63) + 5, 10**12, (1 << 40) + 3, 7, (1 << 64) - 1]
    for i, t in enumerate(times):
        _event(src, i, i % 3, t)
    dst = bytearray(9 * 8)
    micropython.heap_lock()
    try:
        tdc.ring_push(state, ring, capacity, src, 5, pps, epochs)
        tdc.ring_push(state, ring, capacity, src, 5, pps, epochs)  # 10 into 8: 2 overflow
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
    state = array.array("I", bytes(4 * tdc.STATE_WORDS))
    ring = bytearray(9 * capacity)
    pps = bytearray(8 * tdc.PPS_SLOTS)
    epochs = bytearray(8 * tdc.EPOCH_SLOTS)
    src = bytearray(9 * 3)
    dst = bytearray(9 * 3)
    seen = []
    for round_ in range(5):
        for i in range(3):
            _event(src, i, 3, round_ * 10 + i)
        tdc.ring_push(state, ring, capacity, src, 3, pps, epochs)
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
        tdc.ring_push(drain.state, drain.ring, drain.capacity, src, 1, drain.pps, drain.epochs)
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


def test_push_and_pop_each_write_only_their_own_state_words():
    # ring_push runs in an interrupt on a board, ring_pop in the main loop: if both wrote
    # one word (a shared count), a push landing inside a pop would be undone. Each side
    # must write only its own words.
    # _W, _OVERFLOW, _TOTAL, _PPS_W, _PPS_COUNT, _UP_ACCEPTED, _UP_DROPPED, _EPOCH_COUNT
    writer_words = (0, 3, 4, 5, 6, 7, 8, 9)
    reader_words = (1,)  # _R
    state = array.array("I", bytes(4 * tdc.STATE_WORDS))
    ring = bytearray(9 * 8)
    pps = bytearray(8 * tdc.PPS_SLOTS)
    epochs = bytearray(8 * tdc.EPOCH_SLOTS)
    src = bytearray(9 * 5)
    for e in range(5):
        src[9 * e] = 0 if e == 2 else 3
    dst = bytearray(9 * 5)
    for round_ in range(6):  # several times around the ring
        before = list(state)
        tdc.ring_push(state, ring, 8, src, 5, pps, epochs)
        changed = [i for i in range(tdc.STATE_WORDS) if state[i] != before[i]]
        assert all(i in writer_words for i in changed), ("push wrote", changed)
        before = list(state)
        assert tdc.ring_pop(state, ring, 8, dst, 5) == 5
        changed = [i for i in range(tdc.STATE_WORDS) if state[i] != before[i]]
        assert changed == list(reader_words), ("pop wrote", changed)
        assert bytes(dst) == bytes(src), round_
    assert tdc.ring_count(state, 8) == 0
    tdc.ring_push(state, ring, 8, src, 5, pps, epochs)
    tdc.ring_push(state, ring, 8, src, 5, pps, epochs)  # 10 events into 8 places: 2 dropped
    assert tdc.ring_count(state, 8) == 8 and state[3] == 2


def test_a_bad_first_pps_and_a_spike_do_not_bend_the_clock_model():
    # The first pulse is 50 us late (a receiver still settling), one later pulse spikes
    # 30 us: the old discipline trusted the first pulse and drew a two-point slope from
    # it, off by 50 us / elapsed seconds for the rest of the pass.
    store = storage.Storage(board.mount_storage() + "/t_tdc_pps")
    drain = tdc.TdcDrain(None, store, ring_events=64)
    period = 10**12
    offset_ps = 123_456
    drift_ppb = 2_500
    discipline = tdc.ClockDiscipline(drain, store, period)
    src = bytearray(9)
    for k in range(3, 16):
        true_ps = k * period
        local = offset_ps + true_ps + true_ps * drift_ppb // 10**9
        if k == 3:
            local += 50_000_000
        elif k == 11:
            local += 30_000_000
        _event(src, 0, 0, local)
        tdc.ring_push(drain.state, drain.ring, drain.capacity, src, 1, drain.pps, drain.epochs)
        discipline.step()
    assert discipline.pps_index == 15
    assert discipline.drift_ppt == drift_ppb * 1000, discipline.telemetry()
    assert abs(discipline.offset_ps - offset_ps) <= 1, discipline.telemetry()
    report = discipline.telemetry()
    assert report["pps_outliers"] == 4 and report["pps_refits"] == 1, report


def test_pulses_faster_than_the_configured_period_are_outliers_not_a_crash():
    # A head whose PPS comes every 1 ms against a configured 1 s period: every pulse
    # names second 0 again. Three such "outliers" agree with each other, and the refit
    # through three points of one index divided by zero (main: ZeroDivisionError out of
    # the stop telecommand, "storage: internal").
    store = storage.Storage(board.mount_storage() + "/t_tdc_fast_pps")
    drain = tdc.TdcDrain(None, store, ring_events=64)
    discipline = tdc.ClockDiscipline(drain, store, 10**12)
    src = bytearray(9)
    for k in range(1, 9):
        _event(src, 0, 0, k * 10**9)
        tdc.ring_push(drain.state, drain.ring, drain.capacity, src, 1, drain.pps, drain.epochs)
        discipline.step()
    report = discipline.telemetry()
    assert discipline.pps_index == 0, report
    assert report["pps_outliers"] == 7 and "pps_refits" not in report, report


class _CounterHead:
    """The TDC's loss registers (OVERFLOW, EVENTS, DELIVERED) behind a bus stand-in."""

    def __init__(self, overflow, delivered):
        self.words = array.array("I", bytes(12))
        self.regs = [overflow, 0, delivered]

    def read(self, addr, count):
        for i in range(3):
            self.words[i] = self.regs[i] & 0xFFFFFFFF
        return 0

    def write1(self, addr, value):
        return 0


def test_tdc_loss_counts_from_the_pass_start_across_wraps_and_head_restarts():
    store = storage.Storage(board.mount_storage() + "/t_tdc_loss")
    # a controller that restarted mid-life: the head has handed out 4 billion events
    head = _CounterHead(overflow=1000, delivered=0xFFFFFF00)
    drain = tdc.TdcDrain(head, store, ring_events=64)
    assert drain.start() == 0
    assert drain.telemetry()["lost"] == 0  # the head's history is not this pass's loss
    head.regs[2] += 0x200  # 512 more delivered, across the u32 wrap
    drain.events_received = 500  # 12 of them never arrived (a bus timeout)
    head.regs[0] += 3  # and the FIFO dropped 3
    drain.read_overflow()
    report = drain.telemetry()
    assert report["transit_lost"] == 12 and report["fifo_overflow"] == 3, report
    assert report["lost"] == 15, report
    # the head restarted: its counters went back to 0 and count again; since the restart
    # it handed out 40 events, all received, and its FIFO dropped 2
    head.regs = [2, 0, 40]
    drain.events_received += 40
    drain.read_overflow()
    report = drain.telemetry()
    assert report["head_resets"] == 1
    # the 12 lost before the restart stay lost (a baseline taken at the restart left the
    # 40 out of `delivered` but in `received`: transit loss 0, the 12 hidden), and the
    # FIFO's 2 since it are loss too
    assert report["transit_lost"] == 12 and report["fifo_overflow"] == 5, report
    assert report["lost"] == 17, report
    head.regs = [2, 0, 60]
    drain.events_received += 20
    drain.read_overflow()
    assert drain.telemetry()["lost"] == 17  # and counts on from there


def test_uplink_tags_are_counted_apart_and_emission_marks_kept_without_allocating():
    # the time-transfer streams take the interrupt path too: uplink detections (channels 3+)
    # counted as taken or dropped, the laser's sync marks (channel 1) kept as emission
    # epochs, all under heap_lock
    capacity = 8
    state = array.array("I", bytes(4 * tdc.STATE_WORDS))
    ring = bytearray(9 * capacity)
    pps = bytearray(8 * tdc.PPS_SLOTS)
    epochs = bytearray(8 * tdc.EPOCH_SLOTS)
    src = bytearray(9 * 6)
    channels = (3, 1, 4, 6, 1, 2)  # 3 uplink, 2 sync marks, 1 beacon
    for i, channel in enumerate(channels):
        _event(src, i, channel, (1 << 62) + 1000 * i)
    micropython.heap_lock()
    try:
        tdc.ring_push(state, ring, capacity, src, 6, pps, epochs)
        tdc.ring_push(state, ring, capacity, src, 6, pps, epochs)  # 12 into 8: last 4 dropped
    finally:
        micropython.heap_unlock()
    # the second push took events 0, 1 (an uplink) and dropped 2..5 (two uplinks)
    assert state[3] == 4
    assert (state[7], state[8]) == (3 + 1, 2), (state[7], state[8])
    assert state[9] == 4  # every sync mark, dropped or not, is an epoch
    assert int.from_bytes(epochs[0:8], "little") == (1 << 62) + 1000
    assert int.from_bytes(epochs[24:32], "little") == (1 << 62) + 4000


def test_emission_epochs_are_logged_every_nth_mark_and_missed_marks_counted():
    store = storage.Storage(board.mount_storage() + "/t_tdc_epochs")
    drain = tdc.TdcDrain(None, store, ring_events=64)
    epochs = tdc.EmissionEpochs(drain, store, record_every=4)
    src = bytearray(9)
    for mark in range(10):
        _event(src, 0, 1, 5_000_000 + 1_000_000 * mark)
        tdc.ring_push(drain.state, drain.ring, drain.capacity, src, 1, drain.pps, drain.epochs)
        epochs.step()
    assert epochs.records == 3  # marks 0, 4, 8
    for mark in range(10, 10 + tdc.EPOCH_SLOTS + 5):  # the duty late: 5 marks overwritten
        _event(src, 0, 1, 5_000_000 + 1_000_000 * mark)
        tdc.ring_push(drain.state, drain.ring, drain.capacity, src, 1, drain.pps, drain.epochs)
    epochs.step()
    # mark 12, due for a record, was overwritten: the first kept after it (15) is logged
    # with its own index (before: none for 12..15, and a pass whose first drain brought
    # more than EPOCH_SLOTS marks had no record at all), then 16, 20, 24, 28
    assert epochs.telemetry() == {"records": 8, "marks_missed": 5}
    records = []
    with open(store.path("epochs"), "rb") as f:
        data = f.read()
    position = 0
    while position < len(data):
        length = int.from_bytes(data[position + 8 : position + 12], "little")
        payload = data[position + 12 : position + 12 + length]
        records.append(struct.unpack("<IQ", payload))
        position += 12 + length + 4
    assert records == [(m, 5_000_000 + 1_000_000 * m) for m in (0, 4, 8, 15, 16, 20, 24, 28)]
    assert drain.epoch_count() == 31
