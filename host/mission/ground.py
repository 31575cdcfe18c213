"""Bob's side of an emulated pass: what the ground station records of the slots the
payload's laser driver really emitted.

The firmware's pattern log (downloaded, CRC-verified, in OUT/satellite/) is the pattern:
the simulator's channel, detector and clock models (docs/simulator.md) turn the slots it
covers into ground detections, PPS and sync tags, with the geometry of the pass segment
the firmware ran for. The payload's own products in satellite/ are never rewritten here.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from emulator.pass_model.clocks import pps_true_times_s
from emulator.pass_model.sampler import PhotonEvents, SlotClock, ground_tags, sample_photon_clicks
from host.formats.passdir import write_pass_json
from host.formats.patterns import PatternLog
from host.simulate import passgen


def covered_runs(log: PatternLog) -> list[tuple[int, int]]:
    """Contiguous [begin, end) slot ranges of the log (frames the head emitted blank, if
    any, are gaps: no light left the payload there)."""
    runs: list[tuple[int, int]] = []
    for first, count in zip(
        log.frame_first_slot.tolist(), log.frame_slot_count.tolist(), strict=True
    ):
        if runs and runs[-1][1] == first:
            runs[-1] = (runs[-1][0], first + count)
        else:
            runs.append((first, first + count))
    return runs


def make_segment_scenario(
    profile: dict, seed: int, slot_count: int, two_way=None
) -> passgen.Scenario:
    """The simulator's scenario cropped to the `slot_count` slots the firmware emitted,
    centred on culmination (where the link is best). `two_way`: the two-way pass
    (host/timetransfer/mission_stage.py) whose orbit and clocks the segment shares."""
    rate = float(profile["source"]["slot_rate_hz"])
    duration_s = slot_count / rate
    scenario = passgen.build_scenario(
        profile,
        seed=seed,
        duration_s=duration_s,
        geometry=two_way.geometry if two_way is not None else None,
        clocks=(two_way.satellite, two_way.ground) if two_way is not None else None,
    )
    # floor(duration * rate) can lose the last slot to rounding; the log is the truth
    scenario.slot_count = slot_count
    scenario.slots = SlotClock(
        scenario.slots.clock, scenario.slots.first_slot_ps, scenario.slot_period_ps, slot_count
    )
    return scenario


def write_ground(out: Path, scenario: passgen.Scenario, log) -> dict:
    """OUT/ground/, OUT/truth/ and OUT/pass.json from the emitted pattern; returns the
    truth summary (counts by kind, link loss, single-photon statistics)."""
    started = time.perf_counter()
    (out / "ground").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    if isinstance(log, PatternLog):
        log.seed = None  # truth_summary records the pattern seed; a log has none
        runs = covered_runs(log)
    else:  # the head generator's pattern source: every slot of the pass
        runs = [(0, scenario.slot_count)]
    scenario.pattern = log
    geometry, slots, profile = scenario.geometry, scenario.slots, scenario.profile
    receiver = scenario.channel.receiver
    bin_slots = max(1, int(scenario.slot_rate_hz * 1e-3))
    parts = []
    for begin, end in runs:
        for chunk in range(begin, end, int(scenario.slot_rate_hz)):
            parts.append(
                sample_photon_clicks(
                    scenario.channel,
                    slots,
                    log,
                    chunk,
                    min(chunk + int(scenario.slot_rate_hz), end),
                    bin_slots,
                    scenario.rngs["photons"],
                )
            )
    photons = PhotonEvents.concatenate(parts)
    t_end_emit = float(slots.true_time_s(scenario.slot_count))
    window = (
        float(geometry.downlink_delay_s(np.array([0.0]))[0]) - 1e-3,
        t_end_emit + float(geometry.downlink_delay_s(np.array([t_end_emit]))[0]) + 1e-3,
    )
    tags = ground_tags(photons, receiver, scenario.ground_clock, window, scenario.rngs["ground"])
    passgen.write_ground_detections(out / "ground", scenario, tags, "qkdsat mission")
    pps_true = pps_true_times_s(geometry.utc_start.microsecond * 1e-6, window[1], margin_s=2.0)
    # The sync laser fires with every slots_per_pulse-th slot the laser emitted.
    slots_per_sync = int(round(scenario.slot_rate_hz / float(profile["sync"]["rate_hz"])))
    sync_slots = np.arange(0, scenario.slot_count, slots_per_sync, dtype=np.int64)
    if isinstance(log, PatternLog):
        sync_slots = sync_slots[log.covers(sync_slots)]
    passgen.write_ground_clock_marks(
        out / "ground", out / "truth", scenario, geometry, slots, pps_true, sync_slots
    )
    truth = passgen.write_truth(
        out / "truth", scenario, photons, tags, window, slots_per_sync, started
    )
    public = passgen.pass_json(scenario, slots_per_sync, "log")
    public["seeds"] = {"mission": scenario.seed}
    # The payload's TDC (satellite/tdc.qrec) is the emulated optical head's clock, which
    # runs in lockstep with the controller: it is not the simulator's satellite clock.
    public["tdc_channels"] = {"0": "PPS", "1": "SYNC", "2": "BEACON", "3-6": "UPLINK"}
    write_pass_json(out / "pass.json", public)
    return truth
