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
