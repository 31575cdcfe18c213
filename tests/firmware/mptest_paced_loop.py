# The tracking loop in pass mode is the scheduler's paced loop (docs/scheduling.md "The
# paced loop"): one period every loop period, counted late when it is, and a pass
# configures the gain set of the rate that loop sustains on the board (docs/tracking.md
# "Loop rate in pass mode"). What a period costs: mptest_paced_loop_cost.py. On QEMU the
# clock follows the instruction count, so the pacing is measured in virtual time.
import board

QEMU_ICOUNT_SHIFT = 0


def _wrapped_us(a, b):
    return (b - a) & 0x3FFFFFFF


def _duty_in_fine_tracking(timeout_us):
    """A tracking duty whose Tracker is in FINE, over a loopback head that answers each TRACK
    request with a reply of its tag, framed on write (one reply framed per request, not one
    per tag made beforehand: the 256 frames found no block on the STM32 board at 85 % of its
    heap). The head's `status` applies to the next request, once (an error status comes
    without the sensor block); a `silent` head answers nothing. Returns the Tracker, the
    link, the bus client and the duty."""
    import struct

    from payload import bus, framing, tracking, tracking_duty

    class Loopback:
        def __init__(self):
            self.pending = None
            self.status = 0  # the head's status for the next request, once (0: OK)
            self.silent = False

        def write(self, data):
            reply[1] = client._tag
            reply[2] = self.status
            length = len(reply) if self.status == 0 else 3
            self.pending = None if self.silent else writer.encode(reply, length)
            self.status = 0
            return len(data)

        def readinto(self, buf):
            p = self.pending
            if p is None:
                return 0
            self.pending = None
            for i in range(len(p)):
                buf[i] = p[i]
            return len(p)

    t = tracking.Tracker()
    t.load_predictions([[0, 0, 0, 0, 0, 0, -50000, 0]] * 4)
    link = Loopback()
    client = bus.Bus(link, board.clock, timeout_us=timeout_us)
    duty = tracking_duty.TrackingDuty(client, t)
    writer = framing.FrameWriter(64)
    sensors = struct.pack("<4HB7I", 3000, 3300, 2900, 3200, 1, 0, 0, 5000, 0, 0, 0, 0)
    reply = bytearray(bytes([0x88, 0, 0]) + sensors)
    t.start()
    for _ in range(40):
        duty.step()
    assert t.state == tracking.FINE, t.state
    return t, link, client, duty


def test_the_paced_loop_keeps_its_period_and_counts_late_periods():
    from payload import scheduler

    loop = scheduler.Scheduler(board.clock)
    calls = []
    period_us = 2000

    def step():
        calls.append(board.clock.ticks_us())
        return True

    slow = [0]

    def other():  # another duty: once it is told to, one step of 2.5 periods
        if slow[0]:
            slow[0] = 0
            begin = board.clock.ticks_us()
            while _wrapped_us(begin, board.clock.ticks_us()) < 5 * period_us // 2:
                pass
        return False

    loop.add("other", other)
    pacer = loop.set_loop("trk", step, period_us)
    for _ in range(20):
        loop.run_once()
    count = len(calls)
    assert pacer.periods == count and count >= 20, (pacer.periods, count)
    # paced: each period starts no sooner than its due time (the first sets the origin;
    # the step reads the clock a few microseconds after the pacing did). On QEMU time is
    # the instruction count; a loaded unix host may hold the process between the pacing's
    # clock read and the step's for milliseconds, so there only the count is checked.
    if board.NAME != "unix":
        span = _wrapped_us(calls[0], calls[-1])
        assert span >= (count - 1) * period_us - 50, (span, count)
        assert pacer.overruns == 0, pacer.overruns
    before = pacer.overruns
    slow[0] = 1
    for _ in range(4):
        loop.run_once()
    assert pacer.overruns >= before + 1, (before, pacer.overruns)  # the stall is counted
    assert loop.telemetry()["trk"]["overruns"] == pacer.overruns


def test_a_failed_period_is_paced_and_a_stall_after_it_counted_late():
    # A failed TRACK exchange made the period return False: the loop was left idle, the next
    # call unpaced, its timing restarted from then, so a stall right after the failed period
    # was counted neither in overruns nor in worst_late_us (0 and 0 on QEMU and netduino2,
    # where after a good period it is 1 overrun and ~3 ms). A failed period is a spent one:
    # the pacing goes on, and the stall costs what it costs after a good period. The
    # tracking duty is paced at 2 ms, its TRACK over a loopback link; another duty, once,
    # busy-waits 2.5 periods right after a period whose exchange succeeds, then right after
    # one that fails (the head answers with an error status).
    import gc

    from payload import scheduler, tracking

    t, link, client, duty = _duty_in_fine_tracking(timeout_us=1_000_000)
    period_us = 2000
    stall = [0]
    overruns_before = [0]

    def other():  # once told to, one step of 2.5 periods
        if stall[0]:
            stall[0] = 0
            # counted from here: only the lateness the stall causes (a loaded unix host may
            # hold the process before it, where the failed period itself is paced)
            overruns_before[0] = pacer.overruns
            pacer.state[4] = 0  # worst lateness
            begin = board.clock.ticks_us()
            while _wrapped_us(begin, board.clock.ticks_us()) < 5 * period_us // 2:
                pass
        return False

    loop = scheduler.Scheduler(board.clock)
    loop.add("other", other)
    period, period_arg = duty.paced_step()
    pacer = loop.set_loop("trk", period, period_us, period_arg)

    def stalled_pass(fail):
        """The overruns and the worst lateness (us) from the stall on, and the pass's bus
        errors: the pass is the loop's period (failing if `fail`), the stall, then the
        pass's last period, due 2 ms after the first and 0.5-1.5 periods late."""
        for _ in range(10):
            loop.run_once()
        assert pacer.pacing, pacer.state[0]
        bus_errors_before = duty.bus_errors
        link.status = 1 if fail else 0  # the head's error status for the next request
        stall[0] = 1
        loop.run_once()
        return (
            pacer.overruns - overruns_before[0],
            pacer.worst_us,
            duty.bus_errors - bus_errors_before,
        )

    good = stalled_pass(False)
    failed = stalled_pass(True)
    assert t.state == tracking.FINE and pacer.errors == 0, (t.state, pacer.last_error)
    del t, loop, duty, client, link
    gc.collect()
    assert good[2] == 0 and failed[2] == 1, (good, failed)  # the exchange failed once
    # each period after the stall starts at least 1.5 periods late (the stall is 2.5 of them
    # from after its due time): a lower bound a loaded unix host cannot break
    assert failed[0] >= 1 and failed[1] >= 3000, (good, failed)
    if board.NAME != "unix":
        # on QEMU time is the instruction count (-icount): the same overruns, the lateness
        # within the kernel step the failed period skipped (a few thousand instructions)
        assert failed[0] == good[0] == 1, (good, failed)
        assert abs(failed[1] - good[1]) <= 100, (good, failed)


def test_a_dead_head_costs_one_failed_exchange_a_pass_not_one_a_duty():
    # A failed period is paced (ef6c74e), and the paced loop runs before every other duty
    # of a pass: with the head silent each of those calls was a whole failed exchange
    # (retries + 1 bus timeouts: 40 s on the QEMU boards, 2 s in flight), one a duty, so a
    # pass of the mission's ~11 duties blocked ~11 of them (440 s on QEMU, 22 s in flight)
    # and the watchdog, fed once a pass, reset the controller (60 s, 32 s, flight 8 s). A
    # failing loop gets one period a pass, at the pass's end, paced (counted late), until
    # an exchange succeeds. Here: 5 other duties, a 2 ms bus timeout, the head silent
    # (before the fix: 6 failed exchanges a pass).
    import gc

    import micropython
    from payload import scheduler

    t, link, client, duty = _duty_in_fine_tracking(timeout_us=2000)
    loop = scheduler.Scheduler(board.clock)
    for name in ("a", "b", "c", "d", "e"):
        loop.add(name, lambda: False)
    period, period_arg = duty.paced_step()
    pacer = loop.set_loop("trk", period, 2000, period_arg)
    for _ in range(3):
        loop.run_once()
    assert pacer.pacing and duty.bus_errors == 0, (pacer.pacing, duty.bus_errors)
    link.silent = True
    timeouts = [0, 0, 0, 0]
    micropython.heap_lock()  # a silent head's passes allocate nothing either
    try:
        for i in range(4):
            before = client.timeouts
            loop.run_once()
            timeouts[i] = client.timeouts - before
    finally:
        micropython.heap_unlock()
    failing_errors = duty.bus_errors
    assert pacer.pacing and pacer.errors == 0, (pacer.pacing, pacer.last_error)
    link.silent = False  # the head answers again: the loop is paced before every duty
    for _ in range(3):
        loop.run_once()
    steps = duty.steps
    periods = pacer.periods
    loop.run_once()
    ran = (duty.steps - steps, pacer.periods - periods)
    del t, loop, duty, client, link
    gc.collect()
    # the first silent pass: the period before the first duty and the pass's last one (as
    # before ef6c74e, when a failed period left the loop idle); then one a pass
    assert timeouts == [2, 1, 1, 1] and failing_errors == 5, (timeouts, failing_errors)
    # recovered: a period before each of the 5 duties and one at the pass's end (a duty
    # call comes before its due time and waits for it)
    assert ran == (6, 6), ran


def test_a_loop_started_from_idle_is_not_counted_late():
    # idle is the due word -1: a 64-bit build's ptr32 load read it as 2^32 - 1, a due time,
    # and the start counted an overrun (unix, before the fix); a 1 us period makes any due
    # time but the start's own a late one
    from payload import scheduler

    loop = scheduler.Scheduler(board.clock)
    pacer = loop.set_loop("trk", lambda: True, 1)
    loop.run_once()
    assert pacer.periods == 1 and pacer.overruns == 0, (pacer.periods, pacer.overruns)


def test_an_idle_loop_is_called_once_a_pass_and_not_paced():
    from payload import scheduler

    loop = scheduler.Scheduler(board.clock)
    calls = []

    def idle_step():
        calls.append(1)
        return False

    pacer = loop.set_loop("trk", idle_step, 1000)
    loop.add("a", lambda: False)
    loop.add("b", lambda: False)
    busy = [loop.run_once() for _ in range(5)]
    assert len(calls) == 5 and not any(busy) and pacer.periods == 0, (len(calls), busy)


def test_a_pass_configures_the_gain_set_of_its_loops_rate():
    import gc

    from payload import mission, tracking

    rows = [[0, 0, 0, 0, 0, 0, 0, 0]] * 3
    rate_hz = getattr(board, "TRACKING_LOOP_RATE_HZ", 0)
    # a pass's tracking section without a rate runs at the board's, with that rate's set
    tracker = mission._tracker_from({"predictions": rows}, None, rate_hz)
    assert tracker.cfg[0] == 1_000_000 // (rate_hz or 2000), tracker.cfg[0]
    expected = tracking.RATE_SETS[rate_hz or 2000]
    for name in expected:
        assert tracker.config[name] == expected[name], (name, tracker.config[name])
    del tracker
    gc.collect()  # (one Tracker at a time: 8.6 KiB each in the STM32 board's heap)

    def words(changes):  # the configuration words a pass would get (no Tracker built)
        return tracking.validate(dict(tracking.DEFAULTS, **changes))

    # the 1 kHz set is the one validation accepts at 1 kHz: the 2 kHz gains are unstable
    one_khz = tracking.parameters_for_rate({}, 1000)
    assert one_khz["loop_rate_hz"] == 1000 and one_khz["loss_samples"] == 10
    assert words(one_khz)[0] == 1000
    try:
        words({"loop_rate_hz": 1000})
        raise AssertionError("the 2 kHz set accepted at 1 kHz")
    except tracking.ConfigError as error:
        assert "unstable" in str(error), error
    # a rate named gets its own set; a parameter given goes over it
    assert tracking.parameters_for_rate({"loop_rate_hz": 1000}, 0) == one_khz
    tuned = tracking.parameters_for_rate({"hold_ms": 900}, 1000)
    assert tuned["hold_ms"] == 900 and tuned["fine_ki"] == one_khz["fine_ki"]
    assert tracking.parameters_for_rate({}, 0)["loop_rate_hz"] == 2000
    # a rate above the one the controller's loop sustains is refused, naming the field
    try:
        mission._tracker_from(
            {"predictions": rows, "parameters": {"loop_rate_hz": 2000}}, None, 1000
        )
        raise AssertionError("2 kHz accepted on a 1 kHz controller")
    except tracking.ConfigError as error:
        assert "loop_rate_hz" in str(error) and "1000 Hz" in str(error), error
