"""Emulated pass mode on the unix and QEMU targets: configure the real firmware, run it
against the emulated optical head, read the products back over the ground link and check
them against the head's truth (docs/sequencer.md, docs/payload-bus.md)."""

import json
import zlib

import numpy as np
import pytest
from scipy.stats import chisquare

from emulator.optical_head import HeadServer, OpticalHead, TdcSources
from emulator.payload_run import payload_session, run_pass, wait_frames
from host.formats import qrec
from host.link.client import CommandRejected
from host.protocol.symbols import SymbolMapping

PROBS = [0.5, 0.25, 0.25]
P_Z = 0.7
SLOT_RATE_HZ = 100_000_000  # a "100 MHz" source in virtual time (lockstep head)
# per target: frame length, frames to run (QEMU's emulated UART is the slow part) and a
# PPS period short enough for several PPS edges in the run's virtual time. The STM32
# board's store is 16 KiB of littlefs (RAM standing in for its flash, docs/targets.md; a
# frame's logs ~530 B, full at 19-20 frames): 10 frames fit with room for the frames the
# head emits while the stop telecommand is on its way (1 since the ground poll takes it
# whole; 2-11 before, on a loaded host: docs/targets.md); 30 do not.
RUNS = {
    "unix": (1024, 150, 100_000_000),
    "qemu": (512, 30, 25_000_000),
    "netduino2": (512, 10, 8_000_000),
}


def _config(frame_slots, pps_period_ps):
    return {
        "intensity_probabilities": PROBS,
        "basis_probability_z": P_Z,
        "slot_rate_hz": SLOT_RATE_HZ,
        "frame_slots": frame_slots,
        "pps_period_ps": pps_period_ps,
        "tdc": {"bursts_per_step": 1},
    }


def _rated_events_per_s(frame_slots):
    # lockstep: one TDC burst (227 events) per frame, one frame per scheduler pass
    return 227 * SLOT_RATE_HZ / frame_slots


def _run(target, uplink_hz, seed):
    frame_slots, frames, pps_period_ps = RUNS[target]
    head = OpticalHead(
        seed=seed,
        fifo_depth=2048,
        sources=TdcSources(sync_rate_hz=1e6, beacon_rate_hz=1e4, uplink_rate_hz=(uplink_hz,) * 4),
        pps_period_ps=pps_period_ps,
        clock_offset_ps=250_000,
        clock_drift_ppb=3_000,
    )
    run = run_pass(target, head, _config(frame_slots, pps_period_ps), frames, timeout_s=300)
    assert run.configure_reply["ok"], run.configure_reply
    return head, run, frame_slots


def _records(run, name, kind):
    log = qrec.parse_records(run.files[name])
    assert log.complete, log.problem
    # the pattern log also carries its configuration (one record per pass start)
    allowed = {kind}
    if name == "patterns.qrec":
        allowed |= {qrec.Kind.PATTERN_FRAME, qrec.Kind.PATTERN_CONFIG}
    assert all(r.kind in allowed for r in log.records)
    return [r for r in log.records if r.kind == kind]


def _tdc_events(run):
    blocks = _records(run, "tdc.qrec", qrec.Kind.TDC_BLOCK)
    events = [qrec.decode_tdc_block(r.payload) for r in blocks]
    return [(int(e["channel"]), int(e["time_ps"])) for block in events for e in block]


@pytest.fixture(
    scope="module",
    params=[
        "unix",
        pytest.param("qemu", marks=pytest.mark.slow),
        pytest.param("netduino2", marks=pytest.mark.slow),
    ],
)
def below_rate(request):
    return _run(request.param, uplink_hz=1e6, seed=11)


def test_pattern_log_equals_what_the_laser_emitted_slot_for_slot(below_rate):
    head, run, frame_slots = below_rate
    frames = [
        qrec.PatternFrame.decode(r.payload)
        for r in _records(run, "patterns.qrec", qrec.Kind.PATTERN_FRAME)
    ]
    assert not head.blank_frames  # lockstep: the controller is never late
    assert len(frames) == len(head.emitted) >= RUNS[run.target][1]
    for logged, emitted in zip(frames, head.emitted, strict=True):
        assert logged.frame_number == emitted.frame_number
        assert logged.first_slot == emitted.first_slot == emitted.frame_number * frame_slots
        assert logged.slot_count == emitted.slot_count == frame_slots
        assert logged.packed_symbols == emitted.nibbles
    assert run.telemetry["sequencer"]["frames_sent"] == len(frames)
    assert not run.telemetry["sequencer"]["behind"]


def test_emitted_symbols_are_the_mapping_of_the_qrng_bytes(below_rate):
    head, run, frame_slots = below_rate
    symbols = np.frombuffer(head.emitted_symbols(), dtype=np.uint8)
    words = np.frombuffer(bytes(head.qrng_log), dtype="<u4")
    mapping = SymbolMapping.from_probabilities(P_Z, PROBS)
    assert np.array_equal(mapping.symbols(words[: len(symbols)]), symbols)


def test_symbol_frequencies_match_the_configured_probabilities(below_rate):
    head, run, frame_slots = below_rate
    symbols = np.frombuffer(head.emitted_symbols(), dtype=np.uint8)
    observed = np.bincount(symbols, minlength=16)[:12]
    expected = np.array(
        [
            0.5 * (P_Z if basis == 0 else 1 - P_Z) * PROBS[k]
            for k in range(3)
            for basis in range(2)
            for _bit in range(2)
        ]
    )
    assert observed.sum() == len(symbols)
    result = chisquare(observed, expected * len(symbols))
    # 1e-6, not 1e-3: the QRNG bytes differ from run to run, and 1e-3 failed about one
    # run in a thousand per target (seen once). The mapping itself is checked bit for bit
    # by test_emitted_symbols_are_the_mapping_of_the_qrng_bytes; this catches a skewed
    # source (its rarest symbol a quarter off on MPS2's 15 k slots: p ~ 5e-11).
    assert result.pvalue > 1e-6, (observed, result)


def test_every_tdc_event_is_logged_below_the_rated_rate(below_rate):
    head, run, frame_slots = below_rate
    total_rate = 4e6 + 1e6 + 1e4
    assert total_rate < _rated_events_per_s(frame_slots) / 4
    events = _tdc_events(run)
    assert run.telemetry["storage"].get("full") is not True, run.telemetry["storage"]
    assert events == head.tdc_truth
    assert run.telemetry["tdc"]["lost"] == 0 and head.tdc_overflow == 0
    assert sum(1 for c, _ in events if c == 0) >= 5  # PPS edges seen


def test_pps_discipline_recovers_the_heads_clock(below_rate):
    head, run, frame_slots = below_rate
    clock = run.telemetry["clock"]
    assert clock["drift_ppt"] == pytest.approx(head.clock_drift_ppb * 1000, abs=2)
    assert clock["offset_ps"] == pytest.approx(head.clock_offset_ps, abs=2)
    records = _records(run, "clock.qrec", qrec.Kind.CLOCK_DISCIPLINE)
    assert len(records) == clock["records"] > 0


def test_products_are_listed_with_size_and_crc32(below_rate):
    head, run, frame_slots = below_rate
    names = {name for name, _, _ in run.products}
    assert {"patterns.qrec", "tdc.qrec", "housekeeping.qrec", "clock.qrec"} <= names
    for name, size, crc in run.products:
        assert len(run.files[name]) == size
        # the pattern product is listed without its CRC-32 (sealed, docs/ground-link.md)
        assert zlib.crc32(run.files[name]) == crc or (name == "patterns.qrec" and crc == 0)
    hk = [json.loads(r.payload) for r in _records(run, "housekeeping.qrec", 3)]
    assert hk and all(20_000 < h["temp_laser_mc"] < 30_000 for h in hk)
    assert hk[-1]["laser_power_uw"] in (0, head.laser_power_uw)


# Not on the STM32 board: above the rating every frame spools 2 kB of TDC events, and the
# head keeps emitting in lockstep until the stop telecommand arrives, so its 20 KiB store
# fills before the stop; the refused records (counted as unstored) would then be missing
# beside the FIFO's losses (docs/targets.md).
@pytest.mark.parametrize("target", ["unix", pytest.param("qemu", marks=pytest.mark.slow)])
def test_above_the_rated_rate_the_loss_counter_equals_the_events_lost(target):
    frame_slots = RUNS[target][0]
    uplink_hz = _rated_events_per_s(frame_slots)  # x4 channels: four times the rating
    head, run, _ = _run(target, uplink_hz=uplink_hz, seed=12)
    events = _tdc_events(run)
    tdc = run.telemetry["tdc"]
    lost = len(head.tdc_truth) - len(events)
    assert lost > 1000
    assert tdc["lost"] == lost
    assert tdc["fifo_overflow"] == head.tdc_overflow
    # exactly the events that found the FIFO full are the ones missing
    kept = [e for i, e in enumerate(head.tdc_truth) if i not in head.tdc_lost_index]
    assert events == kept


def test_a_late_controller_says_so_and_never_repeats_or_skips_silently():
    """The head's clock jumps 6 frames while the controller is busy: the frames it had not
    filled (5 or 6, depending on whether the back bank was full at that moment) go out
    blank, the controller flags `behind` and counts them, and its log still equals what
    was emitted (no pattern repeated, none logged that was not sent)."""
    frame_slots, frames, pps_period_ps = RUNS["unix"]
    head = OpticalHead(seed=5, pps_period_ps=pps_period_ps)
    config = _config(frame_slots, pps_period_ps)
    run = run_pass("unix", head, config, 60, midway=lambda h: h.stall(6))
    seq = run.telemetry["sequencer"]
    assert 5 <= len(head.blank_frames) <= 6
    assert seq["behind"] is True
    assert seq["frames_missed"] == len(head.blank_frames)
    frames_logged = [
        qrec.PatternFrame.decode(r.payload)
        for r in _records(run, "patterns.qrec", qrec.Kind.PATTERN_FRAME)
    ]
    assert [f.frame_number for f in frames_logged] == [f.frame_number for f in head.emitted]
    assert [f.packed_symbols for f in frames_logged] == [f.nibbles for f in head.emitted]
    numbers = [f.frame_number for f in frames_logged] + head.blank_frames
    assert sorted(numbers) == list(range(len(numbers)))  # every frame accounted, once


def test_invalid_configurations_are_refused_over_the_ground_link():
    """Through the real firmware and the authenticated ground link: each bad configuration
    is rejected with a reason naming the field, the controller keeps running, and a good
    one is then accepted."""
    head = OpticalHead(seed=1, time_scale=1.0)  # a real-time head: capacity applies
    good = _config(1024, 10**12)
    good["slot_rate_hz"] = 5_000  # within the measured capacity (10 k slots/s)
    bad = [
        ({"intensity_probabilities": [0.5, 0.3, 0.3]}, "sum to"),
        (
            {
                "intensity_probabilities": {"mu": 0.5, "nu": 0.25, "xi": 0.25},
                "intensity_names": ["mu", "nu", "vac"],
            },
            "unknown intensity class 'xi'",
        ),  # fmt: skip
        ({"slot_rate_hz": 100_000_000}, "exceeds capacity"),
        ({"basis_probability_z": 0}, "basis_probability_z"),
        ({"frame_slots": 5000}, "frame_slots"),
        ({"tdc": [1]}, "tdc: need an object"),
        ({"slot_rate": 5}, "unknown key 'slot_rate'"),
    ]
    with HeadServer(head) as server:
        with payload_session("unix", server.address) as (_target, payload):
            for change, reason in bad:
                with pytest.raises(CommandRejected, match="argument") as rejected:
                    payload.configure({**good, **change})
                assert reason in str(rejected.value), (change, str(rejected.value))
            with pytest.raises(CommandRejected, match="state: not configured"):
                payload.start()
            payload.configure(good)
            mission = payload.housekeeping()["mission"]
    assert "duty_errors" not in mission and mission["pass_running"] is False


def test_a_refused_configuration_leaves_the_previous_pass_startable():
    """A configuration refused for a bad field leaves the previous one in force
    (Mission.configure). A refused head-generation configuration had already freed the
    controller's pattern buffers: the configured controller pass then refused to start
    ('its buffers were freed for head generation') until configured again."""
    head = OpticalHead(seed=1, time_scale=1.0)  # a real-time head: capacity applies
    good = _config(1024, 10**12)
    good["slot_rate_hz"] = 5_000  # within the measured capacity (10 k slots/s)
    bad_head = {**good, "pattern_generation": "head", "basis_probability_z": 0}
    with HeadServer(head) as server:
        with payload_session("unix", server.address) as (_target, payload):
            payload.configure(good)
            with pytest.raises(CommandRejected, match="basis_probability_z"):
                payload.configure(bad_head)
            payload.start()
            payload.stop()
            mission = payload.housekeeping()["mission"]
    assert mission["pass_running"] is False and "duty_errors" not in mission, mission


def test_no_code_session_opens_or_writes_while_a_pass_runs():
    """Maintenance is done between passes (docs/ground-link.md): the session's import, its
    file writes and the commit's hash over the whole file came out of a running pass's
    heap and main loop (the STM32 board's tracking pass has ~2 kB above its 15 % margin;
    an open session kept 1.6 kB). Opening it, and a put into one opened before the pass,
    or an activation, are refused while the pass runs; after its stop the session works."""
    head = OpticalHead(seed=1, time_scale=1.0)  # a real-time head: capacity applies
    good = _config(1024, 10**12)
    good["slot_rate_hz"] = 5_000  # within the measured capacity (10 k slots/s)
    code = b'FIRMWARE_NOTE = "between passes"\n'
    with HeadServer(head) as server:
        with payload_session("unix", server.address) as (_target, payload):
            payload.configure(good)
            payload.start()
            with pytest.raises(CommandRejected, match="a pass is running"):
                payload.open_code_session()
            payload.stop()
            payload.open_code_session()
            payload.start()
            with pytest.raises(CommandRejected, match="a pass is running"):
                payload.upload_code("payload/note.py", code)
            payload.stop()
            payload.upload_code("payload/note.py", code)
            payload.start()  # the activation's renames are refused during a pass too
            with pytest.raises(CommandRejected, match="a pass is running"):
                payload.activate_code(["payload/note.py"])
            payload.stop()
            payload.activate_code(["payload/note.py"])


def test_lost_bus_replies_are_retried_without_losing_data():
    """Every 17th reply of the head is withheld: the controller times out, resends the
    same request, the head answers from its cache; nothing is lost or duplicated."""
    frame_slots, frames, pps_period_ps = RUNS["unix"]
    head = OpticalHead(
        seed=9, sources=TdcSources(uplink_rate_hz=(1e6,) * 4), pps_period_ps=pps_period_ps
    )
    head.drop_reply_every = 17
    run = run_pass(
        "unix", head, _config(frame_slots, pps_period_ps), 8,
        unix_env={"QKDSAT_BUS_TIMEOUT_US": "500000"},  # the flight value: retries are quick
    )  # fmt: skip
    bus = run.telemetry["bus"]
    assert bus["retransmissions"] >= 3 and bus["timeouts"] == 0
    assert head.retransmissions == bus["retransmissions"]
    frames_logged = [
        qrec.PatternFrame.decode(r.payload)
        for r in _records(run, "patterns.qrec", qrec.Kind.PATTERN_FRAME)
    ]
    assert [f.packed_symbols for f in frames_logged] == [f.nibbles for f in head.emitted]
    assert _tdc_events(run) == head.tdc_truth
    assert run.telemetry["tdc"]["lost"] == 0


def test_a_controller_reset_mid_pass_leaves_no_logged_frame_unsent(tmp_path):
    """The unix controller is killed during a pass and booted again on the same storage
    and optical head: the pattern log (recovered, continued) holds only frames the head
    emitted, with their exact patterns, and misses at most the one frame per reset that
    was accepted but not yet written, which it then reports (`frames_unlogged`)."""
    frame_slots, _, pps_period_ps = RUNS["unix"]
    head = OpticalHead(seed=21, pps_period_ps=pps_period_ps)
    config = _config(frame_slots, pps_period_ps)
    with HeadServer(head) as server:
        for goal in (20, 40):
            with payload_session("unix", server.address, tmp_path) as (target, payload):
                payload.configure(config)
                payload.start()
                wait_frames(head, goal, 60)
                if goal == 20:
                    target.kill()  # a reset with no warning, mid-pass
                    continue
                payload.stop()
                status = payload.housekeeping()["mission"]
    log = qrec.read_records(tmp_path / "products" / "patterns.qrec")
    assert log.complete, log.problem
    frames = [
        qrec.PatternFrame.decode(r.payload)
        for r in log.records
        if r.kind == qrec.Kind.PATTERN_FRAME  # the PATTERN_CONFIG record of each start
    ]
    logged = {f.frame_number: f for f in frames}
    emitted = {f.frame_number: f for f in head.emitted}
    assert set(logged) <= set(emitted)  # nothing logged that was not sent
    for number, frame in logged.items():
        assert frame.packed_symbols == emitted[number].nibbles
    assert len(emitted) - len(logged) <= 1
    # and if one was lost that way, the controller said so after the reset
    assert status["sequencer"]["frames_unlogged"] == len(emitted) - len(logged)


def test_a_frame_emitted_but_not_logged_before_a_reset_is_reported(tmp_path):
    """The reset window made deterministic: the last pattern record is taken off the
    log (as if power failed between the head's acceptance and the write); on the next
    start the controller compares the head's LAST_COMMIT with its log and reports it."""
    frame_slots, _, pps_period_ps = RUNS["unix"]
    head = OpticalHead(seed=22, pps_period_ps=pps_period_ps)
    config = _config(frame_slots, pps_period_ps)
    path = tmp_path / "products" / "patterns.qrec"
    statuses = []
    with HeadServer(head) as server:
        for boot in range(2):
            with payload_session("unix", server.address, tmp_path) as (_target, payload):
                payload.configure(config)
                payload.start()
                wait_frames(head, len(head.emitted) + 5, 60)
                payload.stop()
                statuses.append(payload.housekeeping()["mission"]["sequencer"])
            if boot == 0:
                last = qrec.read_records(path).records[-1]
                with open(path, "r+b") as handle:
                    handle.truncate(last.offset)
    assert statuses[0]["frames_unlogged"] == 0
    assert statuses[1]["frames_unlogged"] == 1


class _HeadThatDiesMidStart(OpticalHead):
    """Answers until the controller has stopped the laser at the start of a pass, then
    never again: the head lost power while the controller was starting the pass."""

    dead = False

    def handle(self, body):
        if self.dead:
            return None
        reply = super().handle(body)
        # WRITE (0x02) of LASER_CTRL (0x0100): the start's first step on the laser
        if body[:1] == b"\x02" and body[2:4] == (0x0100).to_bytes(2, "little"):
            self.dead = True
        return reply


# (target, bus timeout a try): unix with a short one set by its environment; the STM32
# board with its flight value, the launcher's emulation override off. With the override
# (10 s) the same start is rejected after 160 s (its four dead transactions, 40 s each:
# longer than the part's IWDG, which QEMU does not model; docs/targets.md "Waits against
# the watchdog"), too long for the suite.
@pytest.mark.parametrize(("target", "bus_timeout_us"), [("unix", 200_000), ("netduino2", None)])
def test_a_head_dead_mid_start_is_reported_and_the_link_keeps_serving(target, bus_timeout_us):
    """Every wait in the start is bounded: the controller rejects the start with the
    bus fault within a few bus timeouts (it used to poll LASER_ACTIVE 10 000 times, each
    poll a full set of timed-out retries: hours) and answers telecommands after it."""
    head = _HeadThatDiesMidStart(seed=3)
    if target == "unix":
        options = {"unix_env": {"QKDSAT_BUS_TIMEOUT_US": str(bus_timeout_us)}}
    else:
        options = {"bus_timeout_us": bus_timeout_us}
    # the rejected start's dead transactions (the LASER_ACTIVE poll, then the TDC's stop:
    # its control write, a drain read, the loss counters' read), 4 tries each
    # (waits.BUS_RETRIES 3); the STM32 board's flight value 500 ms
    dead_transactions_s = 4 * 4 * (bus_timeout_us or 500_000) / 1e6
    with HeadServer(head) as server:
        with payload_session(target, server.address, **options) as (_target, payload):
            payload.configure(_config(RUNS[target][0], 10**12))
            payload.timeout_s = 20.0 + dead_transactions_s
            with pytest.raises(CommandRejected, match="state: optical head") as rejected:
                payload.start()
            assert "LASER_ACTIVE" in str(rejected.value)
            assert payload.ping().startswith("qkdsat-fw")
            mission = payload.housekeeping()["mission"]
    assert head.dead
    assert mission["pass_running"] is False
    assert mission["bus"]["timeouts"] >= 1
    assert "duty_errors" not in mission


class _HeadThatDies(OpticalHead):
    """Answers until the test sets `dead`, then never again."""

    dead = False

    def handle(self, body):
        return None if self.dead else super().handle(body)


# the STM32 board's IWDG limit (its LSI at 47 kHz) and the share of it a pass may take
# (boards/netduino2 WATCHDOG_LIMIT_US, payload/waits.py)
_STM32_WATCHDOG_LIMIT_S = 22.309
_WAIT_SHARE_OF_WATCHDOG = 0.75


def test_a_head_dead_mid_pass_holds_no_pass_near_the_watchdog():
    """A head that dies during a pass costs one timed-out transaction a scheduler pass
    (the stop's laser-off command gets its own tries), not one per transaction of every
    duty: on main, with the flight bus timeout on the STM32 board, the stop telecommand
    held its duty 16.0 s (eight dead transactions) and the duties' worst calls added up
    to 24.3 s, past the IWDG's 22.3 s; now 4.0 and ~6.3 s. The sum of every duty's worst
    call bounds any one pass, so it must stay within the waits' share of the watchdog."""
    head = _HeadThatDies(seed=3)
    frame_slots, _frames, pps_period_ps = RUNS["netduino2"]
    with HeadServer(head) as server:
        # bus_timeout_us None: the board's flight value (500 ms a try, no emulation override)
        with payload_session("netduino2", server.address, bus_timeout_us=None) as (_t, payload):
            payload.configure(_config(frame_slots, pps_period_ps))
            payload.start()
            wait_frames(head, 3, 60)
            head.dead = True
            payload.timeout_s = 60.0
            assert payload.ping().startswith("qkdsat-fw")
            payload.stop()  # accepted: the laser-off write failed and is counted
            mission = payload.housekeeping()["mission"]
    assert mission["pass_running"] is False
    worst_s = {name: us / 1e6 for name, us in mission["worst_us"].items()}
    assert sum(worst_s.values()) < _WAIT_SHARE_OF_WATCHDOG * _STM32_WATCHDOG_LIMIT_S, worst_s
    # the stop's duty call: its first dead transaction and the laser-off command's, 2 s each
    # (4.0 s measured; 16.0 s before), with room for a loaded host's retries in the start
    assert worst_s["ground"] < 2 * 2.0 + 4.0, worst_s
    assert mission["bus"]["timeouts"] >= 2 and mission["bus"]["skipped"] >= 1, mission["bus"]


def test_the_pattern_log_describes_its_own_configuration(below_rate):
    """Each pass start writes a PATTERN_CONFIG record ahead of the frames: slot rate,
    frame size and probabilities travel with the pattern product."""
    head, run, frame_slots = below_rate
    configs = [
        json.loads(r.payload) for r in _records(run, "patterns.qrec", qrec.Kind.PATTERN_CONFIG)
    ]
    assert len(configs) == 1, configs
    config = configs[0]
    assert config["slot_rate_hz"] == SLOT_RATE_HZ and config["frame_slots"] == frame_slots
    assert config["first_frame"] == head.emitted[0].frame_number
    assert config["intensity_probabilities"] == PROBS
    assert config["qrng_health"] == {"rct": 7, "apt": 27, "window": 512}
