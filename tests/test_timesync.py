"""Bob's time synchronisation (host/distil/timesync.py): the clock model's extrapolation
between anchors, and a head-generated segment whose first anchor falls next to its end
(the pass of tests/test_payload_processor.py that failed about one run in 75: its QRNG
key was os.urandom, and one key in ~75 puts the densest 20 ms in that place)."""

from __future__ import annotations

import numpy as np
import pytest

from host.distil import timesync

RATE_HZ = 1e8
INTENSITIES = {"mu": 0.5, "nu": 0.1, "vac": 0.0}
# A key under which the densest FIRST_WINDOW_S of the 2 s head segment is the second-to-last
# one: found by sweeping 150 os.urandom keys (2 such), fixed here so the draw is the same
# in every run. A test fixture, never a key of anything.
EDGE_KEY = bytes.fromhex("f13cc9ea8895babdd042627cede0fec874b3cd20b32d5dffda784e495caf5a66")


def _synchroniser() -> timesync.Synchroniser:
    pass_json = {"slot_rate_hz": RATE_HZ, "intensities": INTENSITIES}
    return timesync.Synchroniser(pass_json, channel=None)  # offset_model never asks Alice


def _anchor(sync, t_s: float, offset_slots: float, slope_slots_per_s: float) -> None:
    sync.anchors_t.append(t_s)
    sync.anchors_off.append(offset_slots)
    sync.anchors_slope.append(slope_slots_per_s)


def test_two_anchors_a_few_ms_apart_give_no_acceleration():
    """The first anchor at 1.972 s and the forward edge window 5.7 ms later, their slopes
    2 slots/s apart from their search grids alone (5 and 2 slots/s): the window 0.5 s back
    must be predicted within the lag search. Before: 2 / 0.0057 = 350 slots/s^2 put it
    ~42 slots off, outside the 40 searched, and the whole segment lost its sync."""
    accel = 26.0  # slots/s^2: the micius-2017 segment's, from its anchors' slopes
    t_first, t_edge, t_back = 1.972157, 1.977866, 1.472157

    def true_offset(t):
        return -215156.8 - 23.0 * (t - t_first) + 0.5 * accel * (t - t_first) ** 2

    sync = _synchroniser()
    _anchor(sync, t_first, true_offset(t_first), -25.0)  # 5 slots/s grid: 2 off
    _anchor(sync, t_edge, true_offset(t_edge), -23.0)
    predicted, _ = sync.offset_model(t_back)
    assert abs(predicted - true_offset(t_back)) < timesync.TRACK_LAG_SLOTS, predicted


def test_anchors_half_a_second_apart_still_give_the_acceleration():
    """Tracking windows STEP_S apart: the acceleration between them is used, so the next
    window out is predicted within a slot (without it: 0.5 * 26 * 0.25 = 3.2 slots off)."""
    accel = 26.0

    def true_offset(t):
        return 100.0 + 30.0 * t + 0.5 * accel * t * t

    sync = _synchroniser()
    for t in (1.0, 1.5):
        _anchor(sync, t, true_offset(t), 30.0 + accel * t)
    predicted, slope = sync.offset_model(2.0)
    assert abs(predicted - true_offset(2.0)) < 0.1, predicted
    assert abs(slope - (30.0 + accel * 2.0)) < 0.1, slope


@pytest.mark.slow
def test_a_segment_whose_first_anchor_is_next_to_its_end_is_synchronised_throughout(tmp_path):
    """The payload-processor test's pass with the QRNG key that made it fail: Bob's slots
    against truth/ (tests may read it; distillation never), with Alice's sync answers from
    her own symbol lookup over the head's pattern memory (its truth interface)."""
    from emulator import pattern_generator
    from emulator.optical_head import OpticalHead
    from host.distil.bitcodec import pack_2bit
    from host.distil.protocol import Alice, Config
    from host.formats.passdir import read_pass_json
    from host.formats.qdet import read_detections
    from host.mission import ground
    from host.protocol import payload_bus as pb
    from host.simulate import profiles

    head = OpticalHead(seed=3, qrng_key=EDGE_KEY)
    generator = pattern_generator.attach(head)
    for offset, value in ((5, 16384), (6, 32768), (7, 49152)):
        assert head.write_reg(0x0600 + offset, value) == pb.OK
    assert head.write_reg(pb.REG_FRAME_SLOTS, 4096) == pb.OK
    assert head.write_reg(0x0600, 1) == pb.OK
    frames = int(2.0 * 1e8) // 4096
    pattern_generator.fast_forward(head, head.boundary_ps(frames - 1))
    assert head.write_reg(0x0600, 0) == pb.OK
    truth = generator.truth()
    pass_dir = tmp_path / "pass"
    profile = profiles.load("micius-2017", {})
    scenario = ground.make_segment_scenario(profile, 1, truth.slot_count)
    ground.write_ground(pass_dir, scenario, truth)
    alice = Alice(pass_dir, Config(), patterns=truth)

    class AliceAnswers:  # Alice._serve_sync's answer to one sync_request
        def send(self, kind, **fields):
            self.request = fields

        def recv(self, kind):
            starts, length = self.request["starts"], self.request["length"]
            slots = (starts[:, None] + np.arange(length)[None, :]).reshape(-1)
            return {"intensity": pack_2bit(alice._symbols(slots)[2])}

    t, c, _ = read_detections(pass_dir / "ground" / "detections.qdet")
    pps = read_detections(pass_dir / "ground" / "pps.qdet")[0]
    result = timesync.synchronise(t, c, pps, read_pass_json(pass_dir), AliceAnswers())
    anchors = np.sort(result.anchor_times)
    # the case this test is about: the first anchor and the edge window ~6 ms apart
    assert anchors[-1] - anchors[-2] < 0.01, anchors
    # before: 2 anchors (those two), 23 % of detections assigned, 20 % of them right
    assert anchors.size >= 5 and anchors[0] < 0.1, anchors
    truth_slots = np.load(pass_dir / "truth" / "detections.npz")["slot"]
    right = np.mean(result.slots[result.assigned] == truth_slots[result.assigned])
    # deterministic draw (fixed key and seeds): measured 0.969 assigned, 0.994 right (the
    # rest dark counts and background, which have no true slot to match)
    assert result.assigned.mean() > 0.95 and right > 0.98, (result.summary(), right)
