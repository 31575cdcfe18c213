# Tracking loop (firmware/payload/tracking.py) on the real targets: configuration refusal,
# allocation-free step through every state, transitions logged with reasons.
import micropython
from payload import tracking

# A straight pass: 15 mrad/s along x, point-ahead -50 urad.
ROWS = [[i * 15000000, 0, 15000, 0, 0, 0, -50000, 0] for i in range(6)]


def _refused(changes, words):
    try:
        tracking.Tracker(changes)
    except tracking.ConfigError as error:
        text = str(error)
        for word in words:
            assert word in text, text
        return text
    raise AssertionError("accepted: %r" % (changes,))


def test_defaults_are_valid_and_fixed_point_words_set():
    t = tracking.Tracker()
    assert t.cfg[0] == 500  # 2 kHz loop period, us
    assert t.state == tracking.IDLE


def test_unstable_fine_gains_refused_with_reason():
    _refused({"fine_ki": 1.9, "fine_kii": 0.4}, ("fine_ki", "unstable"))
    _refused({"fine_kp": 1.5, "fine_ki": 0.8}, ("pole radius",))


def test_gains_fragile_to_qpd_gain_error_refused():
    # Stable at the nominal QPD slope with the mirror's 700 Hz resonance and one sample of
    # latency in the model, but a spot 1.5x sharper than assumed makes it unstable.
    _refused({"fine_kp": 0.2, "fine_ki": 0.3, "fine_kii": 0.1}, ("1.5x", "spot size"))


def test_gains_fragile_to_one_more_sample_of_latency_refused():
    # The plant has 1-2 samples of latency: gains that need exactly one are refused.
    _refused({"fine_kp": 0.134, "fine_ki": 0.285, "fine_kii": 0.16}, ("2 sample(s)",))


def test_wheel_line_resonators_validated():
    _refused({"wheel_lines_hz": (95.0, 1500.0)}, ("wheel_lines_hz", "line 1"))
    _refused({"wheel_line_gains": (0.2, 0.0)}, ("wheel_line_gains", "Q12"))
    _refused({"wheel_lines_hz": (95.0,)}, ("wheel_lines_hz", "2 values"))
    t = tracking.Tracker({"wheel_lines_hz": (0.0, 0.0)})  # off: the words are zero
    assert all(t.cfg[32 + i] == 0 for i in range(8))


def test_gains_that_do_not_fit_fixed_point_refused():
    _refused({"fine_kp": 2.5}, ("fine_kp", "Q12"))
    _refused({"fine_kii": 0.6}, ("fine_kii", "Q12"))


def test_actuator_limits_refused_with_reason():
    _refused({"fsm_limit_urad": 1500.0}, ("fsm_limit_urad", "range"))
    _refused({"scan_speed_urad_s": 40000.0}, ("scan_speed_urad_s", "rate limit"))
    _refused({"scan_speed_urad_s": 11500.0}, ("scan_speed_urad_s", "urad/s^2"))
    _refused({"scan_pitch_urad": 1900.0}, ("scan_pitch_urad", "gaps"))
    _refused({"camera_gain_per_s": 120.0}, ("camera_gain_per_s", "camera loop"))
    _refused({"offload_gain_per_s": 200.0}, ("offload_gain_per_s", "tenth"))
    _refused({"loop_rate_hz": 1500}, ("loop_rate_hz",))
    _refused({"fine_gain": 1.0}, ("fine_gain", "unknown"))


def test_configure_is_atomic_and_refused_while_tracking():
    t = tracking.Tracker()
    before = bytes(t.cfg)
    try:
        t.configure({"fine_ki": 0.3, "fsm_limit_urad": 5000.0})
    except tracking.ConfigError:
        pass
    assert bytes(t.cfg) == before and t.config["fine_ki"] == tracking.DEFAULTS["fine_ki"]
    t.configure({"fine_ki": 0.18})
    assert t.cfg[2] == int(0.18 * 4096 + 0.5)
    t.load_predictions(ROWS)
    t.start()
    t.step()
    try:
        t.configure({"fine_ki": 0.4})
        raise AssertionError("configure accepted while tracking")
    except tracking.ConfigError as error:
        assert "stop first" in str(error)


def _drive(t, steps, quads, cam_signal, cam_xy=(0, 0)):
    io = t.io
    for _ in range(steps):
        io[0] = quads[0]
        io[1] = quads[1]
        io[2] = quads[2]
        io[3] = quads[3]
        io[4] = 1
        io[5] = cam_xy[0]
        io[6] = cam_xy[1]
        io[7] = cam_signal
        t.step()


def _run_through_states(t):
    """Synthetic sensors take the loop IDLE -> ... -> FINE -> HOLD -> REACQ -> LOST."""
    dark = (25, 25, 25, 25)
    lit = (3000, 3300, 2900, 3200)  # beacon slightly +x
    t.start()
    _drive(t, 3, dark, 0)
    assert t.state == tracking.SCAN, t.state
    _drive(t, 3, dark, 5000, (20000, -10000))
    assert t.state == tracking.COARSE, t.state
    _drive(t, 10, lit, 5000, (20000, -10000))
    assert t.state == tracking.FINE, t.state
    _drive(t, 20, lit, 5000, (20000, -10000))
    _drive(t, 19, dark, 0)  # a scintillation fade shorter than loss_samples: still FINE
    assert t.state == tracking.FINE, t.state
    _drive(t, 1, dark, 0)
    assert t.state == tracking.HOLD, t.state
    _drive(t, 3100, dark, 0)  # hold budget 1.5 s at 2 kHz, then the small spiral
    assert t.state == tracking.REACQ, t.state
    _drive(t, 12000, dark, 0)
    assert t.state == tracking.LOST, t.state


def test_step_never_allocates_in_any_state():
    t = tracking.Tracker()
    t.load_predictions(ROWS)
    micropython.heap_lock()
    try:
        _run_through_states(t)
    finally:
        micropython.heap_unlock()


def test_every_transition_logged_with_reason():
    t = tracking.Tracker()
    t.load_predictions(ROWS)
    _run_through_states(t)
    names = [(tracking.STATE_NAMES[a], tracking.STATE_NAMES[b], tracking.REASON_NAMES[r])
             for (_, a, b, r) in t.transitions()]  # fmt: skip
    assert names == [
        ("IDLE", "OPEN_LOOP", "command start"),
        ("OPEN_LOOP", "SCAN", "on prediction"),
        ("SCAN", "COARSE", "camera signal"),
        ("COARSE", "FINE", "fine signal"),
        ("FINE", "HOLD", "signal lost"),
        ("HOLD", "REACQ", "hold timeout"),
        ("REACQ", "LOST", "scan exhausted"),
    ], names
    steps = [s for (s, _, _, _) in t.transitions()]
    assert steps == sorted(steps)
    t.stop()
    t.step()
    assert t.state == tracking.IDLE and t.transitions()[-1][3] == tracking.R_COMMAND_STOP


def test_fine_error_sign_and_scale_from_quadrants():
    # X = ((B+D)-(A+C))/S = 0.2 -> x = w/sqrt(2) erfinv(0.2) = 25 urad * 0.1259 = 3.15 urad
    t = tracking.Tracker()
    t.load_predictions(ROWS)
    t.start()
    _drive(t, 3, (25, 25, 25, 25), 0)
    _drive(t, 3, (25, 25, 25, 25), 5000, (0, 0))
    s = 10000
    a = c = s * 4 // 10 // 2 + 25
    b = d = s * 6 // 10 // 2 + 25
    _drive(t, 6, (a, b, c, d), 5000, (0, 0))
    assert t.state == tracking.FINE
    err_x = t.io[tracking.IO_ERR_X]
    assert 3050 < err_x < 3250 and t.io[tracking.IO_ERR_Y] == 0, err_x
    assert t.io[tracking.IO_FSM_X] > 0  # mirror moves toward the beacon


def test_angular_rate_sensor_fed_forward_to_the_mirror_in_fine():
    # Two loops on the same sensors, one with the default taps and one with none: in FINE
    # their mirror commands differ by exactly sum(tap_i ARS(k-i)) >> 12 (Q12), with the
    # sensor clamped to +-2**16 nrad and its history kept from before FINE.
    q12 = [int(v * 4096 + (0.5 if v >= 0 else -0.5))
           for v in tracking.DEFAULTS["ars_feedforward_taps"]]  # fmt: skip
    assert q12[0] != 0
    loops = (tracking.Tracker(), tracking.Tracker({"ars_feedforward_taps": (0, 0, 0, 0)}))
    ars = [1000, -2000, 3000, 70000, -90000, 12345, -54321, 0, 777, -1, 40000, -3]
    ars = ars + ars
    dark, lit = (25, 25, 25, 25), (2525, 2525, 2525, 2525)  # lit: centred, no fine error
    for t in loops:
        t.load_predictions(ROWS)
        t.start()
    seen = []
    for k in range(len(ars)):
        quads, cam = (dark, 0) if k < 3 else ((dark, 5000) if k < 6 else (lit, 5000))
        for t in loops:
            io = t.io
            io[0], io[1], io[2], io[3] = quads
            io[4], io[5], io[6], io[7] = 1, 0, 0, cam
            io[tracking.IO_ARS_X] = ars[k]
            io[tracking.IO_ARS_Y] = -ars[k] // 3
            t.step()
        seen.append(max(-65536, min(65536, ars[k])))
        if loops[0].state != tracking.FINE or k < 12:
            continue
        want_x = sum(q12[i] * seen[k - i] for i in range(4)) >> 12
        want_y = sum(q12[i] * max(-65536, min(65536, -ars[k - i] // 3)) for i in range(4)) >> 12
        got_x = loops[0].io[tracking.IO_FSM_X] - loops[1].io[tracking.IO_FSM_X]
        got_y = loops[0].io[tracking.IO_FSM_Y] - loops[1].io[tracking.IO_FSM_Y]
        assert (got_x, got_y) == (want_x, want_y), (k, got_x, want_x, got_y, want_y)
    assert loops[0].state == tracking.FINE


def test_telemetry_ring_counts_what_it_drops():
    t = tracking.Tracker({"telemetry_decimation": 1})
    t.load_predictions(ROWS)
    t.start()
    _drive(t, 300, (25, 25, 25, 25), 0)
    assert t.telemetry_pending() == 256 and t.telemetry_lost() == 300 - 256
    out = tracking.array.array("i", bytes(4 * 7 * 10))
    assert t.drain_telemetry(out, 10) == 10 and out[0] == 1 and out[1] == tracking.SCAN
    payload = tracking.pack_samples(out, 10, 500, 1)
    assert len(payload) == 12 + 24 * 10 and payload[1] == 1


def test_prediction_fields_outside_the_fixed_point_ranges_refused_by_name():
    # The kernel's int32 arithmetic is proven for these bounds (docs/tracking.md
    # "Fixed-point ranges"): a table beyond them is refused, naming row and field.
    t = tracking.Tracker()
    bad = [row[:] for row in ROWS]
    bad[3][2] = 70000  # 70 mrad/s: beyond 65536 nrad/ms
    try:
        t.load_predictions(bad)
        raise AssertionError("accepted a 70 mrad/s node")
    except tracking.ConfigError as error:
        assert "row 3" in str(error) and "vx nrad/ms" in str(error), str(error)
    bad = [row[:] for row in ROWS]
    bad[0][0] = 1600000000  # 91.7 deg
    try:
        t.load_predictions(bad)
        raise AssertionError("accepted a 1.6 rad angle")
    except tracking.ConfigError as error:
        assert "x nrad" in str(error), str(error)
    try:
        t.start(-1)
        raise AssertionError("accepted a negative start time")
    except tracking.ConfigError as error:
        assert "at_ms" in str(error)


def test_start_late_in_the_pass_begins_on_the_right_node():
    t = tracking.Tracker()
    t.load_predictions(ROWS)
    t.start(2500)  # 2.5 s into the pass: node 2, 500 ms after it
    _drive(t, 1, (25, 25, 25, 25), 0)
    assert t.pass_time_ms() == 2500, t.pass_time_ms()
    assert t.io[tracking.IO_PRED_X] == 2 * 15000000 + 500 * 15000
    _drive(t, 2000, (25, 25, 25, 25), 0)  # 1 s later at 2 kHz
    assert t.pass_time_ms() == 3500 and t.io[tracking.IO_PRED_X] == 52500000


def test_a_fade_shorter_than_the_loss_budget_holds_mirror_and_integrators():
    # Scintillation fades the beacon for a few ms: the loop keeps its mirror command and
    # integrators (no jump to the predictor), and resumes where it was.
    t = tracking.Tracker()
    t.load_predictions(ROWS)
    lit = (3000, 3300, 2900, 3200)
    t.start()
    _drive(t, 3, (25, 25, 25, 25), 0)
    _drive(t, 3, (25, 25, 25, 25), 5000, (0, 0))
    _drive(t, 30, lit, 5000, (0, 0))
    assert t.state == tracking.FINE
    held = (t.io[tracking.IO_FSM_X], t.io[tracking.IO_FSM_Y])
    _drive(t, 10, (25, 25, 25, 25), 5000, (0, 0))  # 5 ms dark; camera still integrates
    assert t.state == tracking.FINE
    assert (t.io[tracking.IO_FSM_X], t.io[tracking.IO_FSM_Y]) == held
    _drive(t, 30, (25, 25, 25, 25), 5000, (0, 0))  # longer: HOLD, and the camera near the
    assert t.state == tracking.HOLD, t.state  # centre does not send it back to COARSE
    _drive(t, 6, lit, 5000, (0, 0))
    assert t.state == tracking.FINE
    _drive(t, 30, (25, 25, 25, 25), 5000, (400000, 0))  # camera: beacon 400 urad away
    assert t.state == tracking.COARSE, t.state


def _packed(rows):
    import struct

    return b"".join(struct.pack("<8i", *row) for row in rows)


def _prediction_path(name):
    import board

    return board.mount_storage() + "/" + name


def _uploaded(rows, name="t_prediction.bin", chunk=6):
    up = tracking.PredictionUpload(_prediction_path(name))
    for first in range(0, len(rows), chunk):
        up.add(first, len(rows), _packed(rows[first : first + chunk]))
    return up


def test_full_pass_prediction_upload_in_chunks():
    rows = [[i * 15000000, 0, 15000, 0, 0, 0, -50000, 0] for i in range(20)]
    up = tracking.PredictionUpload(_prediction_path("t_prediction.bin"))
    assert up.add(0, 20, _packed(rows[:6])) == 6
    assert up.add(0 + 6, 20, _packed(rows[6:12])) == 12
    assert up.add(6, 20, _packed(rows[6:12])) == 12  # a retransmission: ignored
    for first, words in ((18, ("expected 12",)), (12, ())):
        try:
            up.add(first, 20, _packed(rows[first : first + 6]))
            assert not words, "out-of-order chunk accepted"
        except tracking.ConfigError as error:
            assert words and words[0] in str(error), str(error)
    bad = [row[:] for row in rows[18:]]
    bad[1][2] = 70000
    try:
        up.add(18, 20, _packed(bad))
        raise AssertionError("accepted 70 mrad/s")
    except tracking.ConfigError as error:
        assert "node 19" in str(error) and "vx" in str(error), str(error)
    assert up.received == 18
    try:
        tracking.Tracker().load_table(up)
        raise AssertionError("incomplete upload loaded")
    except tracking.ConfigError as error:
        assert "18 of 20" in str(error)
    up.add(18, 20, _packed(rows[18:]))
    import binascii

    assert up.crc32() == binascii.crc32(_packed(rows)) & 0xFFFFFFFF
    t = tracking.Tracker()
    t.load_table(up)
    t.start(19500)  # late in the pass: node 18 + 1.5 s
    t.step()
    assert t.io[tracking.IO_PRED_X] == 18 * 15000000 + 1500 * 15000


def test_sine_table_is_the_same_constant_on_every_target():
    # computed at run time in single precision the MCU's table was CRC-32 0xE58D8EE3, the
    # unix build's (double) 0x7F778D94: a scan's outputs differed between the targets
    import binascii

    t = tracking.Tracker()
    assert len(t.sin_table) == 2048
    assert binascii.crc32(t.sin_table) & 0xFFFFFFFF == 0x7F778D94


# A straight pass of 100 s (1 mrad/s along x): the prediction at pass time t ms is
# 1000 * t nrad exactly, wherever the loop's node is (a small int on every target).
LONG_ROWS = [[i * 1000000, 0, 1000, 0, 0, 0, -50000, 0] for i in range(100)]


def test_a_whole_pass_prediction_is_paged_through_a_small_window():
    # 100 nodes uploaded to storage, 8 of them resident (256 bytes, not 3.2 kB); the pager
    # (a main-loop duty) every 0.5 s keeps the loop on the right node across 20 s; the
    # kernel's steps allocate nothing with the paged window
    up = _uploaded(LONG_ROWS)
    t = tracking.Tracker(tracking.parameters_for_rate({"loop_rate_hz": 1000}))
    t.load_table(up, 8)
    assert len(t.table) == 8 * tracking.NODE_BYTES
    t.start(75000)
    checked = 0
    for _block in range(40):
        micropython.heap_lock()
        try:
            for _ in range(500):
                t.step()
                assert t.io[tracking.IO_PRED_X] == 1000 * t.pass_time_ms()
        finally:
            micropython.heap_unlock()
        checked += 500
        t.page()
    assert t.pass_time_ms() == 75000 + checked - 1  # the start's step does not advance
    assert t.window_late() == 0 and t.page_faults == 0, (t.window_late(), t.page_faults)


def test_a_late_pager_extrapolates_then_holds_and_counts():
    # No pager: the window (4 nodes from the start) runs out at node 3; the loop
    # extrapolates the last whole segment (exact for this straight pass) for its 10 s, then
    # holds, counting every step it waited; it never reads a node it does not hold
    up = _uploaded(LONG_ROWS)
    t = tracking.Tracker(tracking.parameters_for_rate({"loop_rate_hz": 1000}))
    t.load_table(up, 4)
    t.start(0)
    for _ in range(5000):  # 5 s
        t.step()
    assert t.io[tracking.IO_PRED_X] == 1000 * 5000 - 1000 * 1  # (the start's step)
    assert t.window_late() > 0
    for _ in range(15000):  # 15 s: held at node 2 + 11 s
        t.step()
    assert t.pass_time_ms() == 13000 and t.io[tracking.IO_PRED_X] == 1000 * 13000
    late = t.window_late()
    # the pager brings the next nodes in: the loop moves on from them
    assert t.page() and t.page_faults == 0
    t.step()
    assert t.pass_time_ms() == 13001 and t.window_late() == late


def test_a_stored_node_out_of_range_is_never_paged_in():
    # flash that changed after the upload (a bit flip): the pager checks every node it
    # reads against the fixed-point ranges, counts the fault and publishes nothing past it
    up = _uploaded(LONG_ROWS)
    t = tracking.Tracker(tracking.parameters_for_rate({"loop_rate_hz": 1000}))
    t.load_table(up, 4)
    t._source.close()  # (littlefs: a handle open across another's write keeps its cache)
    with open(up.path, "r+b") as f:
        f.seek(5 * tracking.NODE_BYTES + 8)  # node 5's vx
        f.write(b"\x70\x11\x01\x00")  # 70000 little-endian
    t._source = open(up.path, "rb")  # the loop's handle, as after configure
    t.start(0)
    for _ in range(3000):  # 3 s: node 2, the window held 0..3
        t.step()
    assert not t.page() and t.page_faults == 1  # node 4 came in, node 5 did not
    assert not t.page() and t.page_faults == 1  # counted once: the pager stopped
    for _ in range(4000):  # 4 s more: node 3 is the last whole segment, extrapolated
        t.step()
        assert t.io[tracking.IO_PRED_X] == 1000 * t.pass_time_ms()
    assert t.window_late() > 0 and t.pass_time_ms() == 6999, t.pass_time_ms()


def test_a_new_upload_withdraws_the_configured_prediction():
    up = _uploaded(LONG_ROWS[:20])
    t = tracking.Tracker()
    t.load_table(up, 8)
    t.release_predictions()  # the mission does this when a new upload begins
    try:
        t.start(0)
        raise AssertionError("started on a prediction that was replaced")
    except tracking.ConfigError as error:
        assert "configure again" in str(error), str(error)
    # and a file that is not what was uploaded is refused when the table is loaded
    with open(up.path, "r+b") as f:
        f.seek(3)
        f.write(b"\x01")
    try:
        tracking.Tracker().load_table(up, 8)
        raise AssertionError("loaded a prediction whose file changed")
    except tracking.ConfigError as error:
        assert "CRC-32" in str(error), str(error)
