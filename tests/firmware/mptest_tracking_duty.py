# The tracking duty's period (TrackingDuty.step: Bus.track and the kernel) allocates
# nothing however long the loop has run: its counters wrap at the largest small int of a
# 32-bit port.
import board
import micropython


def test_a_tracking_period_allocates_nothing_once_its_counters_pass_a_small_int():
    # the duty's steps (every period) and overruns (every late one) wrap like the bus's
    # counters: on main steps passed 2^30 after 6 days of tracking at 2 kHz and from then
    # on every period allocated a big int (MemoryError under heap_lock on QEMU)
    import struct

    from payload import bus, framing, tracking, tracking_duty

    class Loopback:  # answers each TRACK request with the reply of its tag
        def __init__(self):
            self.pending = None

        def write(self, data):
            self.pending = replies[client._tag]
            return len(data)

        def readinto(self, buf):
            p = self.pending
            for i in range(len(p)):
                buf[i] = p[i]
            return len(p)

    # The Tracker's 8.6 KiB of words and the bus client's 2 KiB frame buffers first, the
    # 256 reply frames after: the other way round, on the STM32 board's 96 KiB heap the
    # frames left no block for the client (MemoryError building it)
    t = tracking.Tracker()
    t.load_predictions([[0, 0, 0, 0, 0, 0, -50000, 0]] * 4)
    client = bus.Bus(Loopback(), board.clock, timeout_us=1_000_000)
    duty = tracking_duty.TrackingDuty(client, t)
    writer = framing.FrameWriter(64)
    sensors = struct.pack("<4HB7I", 3000, 3300, 2900, 3200, 1, 0, 0, 5000, 0, 0, 0, 0)
    replies = [bytes(writer.encode(bytes([0x88, tag, 0]) + sensors)) for tag in range(256)]
    t.start()
    for _ in range(40):
        duty.step()
    assert t.state == tracking.FINE, t.state
    top = 0x3FFFFFFF
    duty.steps = duty.overruns = top
    late_us = 2 * t.cfg[0]  # each period comes after twice its length: an overrun
    micropython.heap_lock()
    try:
        for _ in range(3):
            start = board.clock.ticks_us()
            while (board.clock.ticks_us() - start) & 0x3FFFFFFF < late_us:
                pass
            duty.step()
    finally:
        micropython.heap_unlock()
    assert duty.steps == 2 and duty.overruns == 2, (duty.steps, duty.overruns)
    assert t.state == tracking.FINE and duty.bus_errors == 0


def test_every_track_reply_of_the_paced_loop_is_in_the_bus_counters():
    # The paced period counts its TRACK replies in the bus's state word B_TRACK_REPLIES,
    # not in rx.frames_ok (the Thumb pair checks the frame itself); the word was in no
    # counters() and no housekeeping, so a pass's TRACK replies appeared in no telemetry.
    # Every reply a period took is in one of the two counters, whichever path took it.
    import struct

    from payload import bus, framing, tracking, tracking_duty

    class Loopback:  # answers each TRACK request with the reply of its tag
        def __init__(self):
            self.pending = None

        def write(self, data):
            reply[1] = client._tag
            self.pending = writer.encode(reply, len(reply))
            return len(data)

        def readinto(self, buf):
            p = self.pending
            for i in range(len(p)):
                buf[i] = p[i]
            return len(p)

    t = tracking.Tracker()
    t.load_predictions([[0, 0, 0, 0, 0, 0, -50000, 0]] * 4)
    client = bus.Bus(Loopback(), board.clock, timeout_us=1_000_000)
    duty = tracking_duty.TrackingDuty(client, t)
    writer = framing.FrameWriter(64)
    sensors = struct.pack("<4HB7I", 3000, 3300, 2900, 3200, 1, 0, 0, 5000, 0, 0, 0, 0)
    reply = bytearray(bytes([0x88, 0, 0]) + sensors)
    t.start()
    period, period_arg = duty.paced_step()
    for _ in range(40):
        assert period(period_arg) == 1
    counters = client.counters()
    assert duty.steps == 40 and duty.bus_errors == 0, (duty.steps, duty.bus_errors)
    assert counters["track_replies"] + client.rx.frames_ok == 40, counters
    if duty.state[4]:  # the fast path took every period after the start's
        assert counters["track_replies"] >= 39, counters


def test_the_loop_reports_its_path_and_a_rate_that_needs_the_fast_path_is_refused_without_it():
    # With a buffer above 2^30 - 1 (a board's external SDRAM) attach turned the fast path
    # off and the loop ran the general period, ~16k instructions on the MPS2 against the
    # 10,625 of a 2 kHz period, silently. Here the address of the tracker's io reads as one
    # above 2^30 (QEMU's and the STM32's RAM lie below it); the unix port has no Thumb pair.
    import gc

    from payload import bus, tracking, tracking_duty

    class Silent:
        def write(self, data):
            return len(data)

        def readinto(self, buf):
            return 0

    rows = [[0, 0, 0, 0, 0, 0, -50000, 0]] * 4
    t = tracking.Tracker()
    t.load_predictions(rows)
    client = bus.Bus(Silent(), board.clock, timeout_us=1000)
    duty = tracking_duty.TrackingDuty(client, t)
    thumb = client._track_ctx is not None
    assert duty.telemetry()["fast"] == (1 if thumb else 0) == duty.status()[6]
    board_rate_hz = getattr(board, "TRACKING_LOOP_RATE_HZ", 0)
    tracking_duty.TrackingDuty.check_loop_rate(
        client, t, board_rate_hz
    )  # the pass as configured today
    address = bus._address
    io = t.io

    def sdram_address(buf):
        return 0x40000000 if buf is io else address(buf)

    bus._address = sdram_address
    try:
        duty.attach(t)
        assert duty.telemetry()["fast"] == 0 == duty.status()[6], duty.telemetry()
        try:
            tracking_duty.TrackingDuty.check_loop_rate(
                client, t, 2000
            )  # a 2 kHz board's pass at 2 kHz
            raise AssertionError("a 2 kHz loop accepted without its fast path")
        except tracking.ConfigError as error:
            text = str(error)
            assert "loop_rate_hz" in text and "fast path" in text and "1000 Hz" in text, text
            assert ("0x40000000" if thumb else "no Thumb") in text, text
        del duty, t, io
        gc.collect()  # (one Tracker at a time: 8.6 KiB each in the STM32 board's heap)
        slow = tracking.Tracker(tracking.parameters_for_rate({}, 1000))
        io = slow.io
        tracking_duty.TrackingDuty.check_loop_rate(
            client, slow, 2000
        )  # 1 kHz: the general path's rate
    finally:
        bus._address = address
