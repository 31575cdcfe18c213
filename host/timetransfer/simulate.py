"""Simulate a two-way pass for time transfer and write it into a pass directory.

    python -m host.timetransfer.simulate --profile micius-qstt --out PASS_DIR
        [--duration-s 20] [--seed 1] [--one-way-delay-ps 200] [--intercept-resend 0.5]

Every detection of each direction (both bases: sifting is the endpoints' job,
host/timetransfer/endpoints.py) is drawn as a Poisson process whose rate follows the
link budget over the pass; each event's emission and reception are exact
light-time solutions (emulator/pass_model/two_way.py) on clocks with power-law noise
(emulator/pass_model/clock_noise.py) and the satellite clock's relativistic rate.
Attacks for the tests: an extra one-way delay on the uplink, intercept-resend on a
fraction of the photons of both directions.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emulator.pass_model import geometry as geo
from emulator.pass_model.clock_noise import NoisyClock, PassClock
from emulator.pass_model.clocks import PS_PER_S, Clock
from emulator.pass_model.geometry import EARTH_RADIUS_KM
from emulator.pass_model.two_way import (
    InertialPass,
    InertialPassGeometry,
    inertial_pass_geometry,
    pass_window,
    troposphere_delay_s,
)
from host.errors import BadInput
from host.timetransfer import files

PROFILE_DIR = Path(__file__).parent / "profiles"
CHUNK_S = 0.01
# The two-way profile that goes with a QKD profile of `qkdsat simulate` / `mission`
TWO_WAY_PROFILE = {"micius-2017": "micius-qstt", "jinan-1": "qstt-best"}
TWO_WAY_ORBIT_KIND = "two-way-inertial"  # pass.json orbit kind of a --two-way pass
TWO_WAY_STREAM = 2  # SeedSequence([seed, 2]): the two-way components beside a QKD pass


def profile_for(qkd_profile_name: str) -> str:
    if qkd_profile_name not in TWO_WAY_PROFILE:
        raise BadInput(
            f"profile {qkd_profile_name}: no two-way time-transfer profile goes with it "
            f"(known: {', '.join(TWO_WAY_PROFILE)})"
        )
    return TWO_WAY_PROFILE[qkd_profile_name]


def load_profile(name: str) -> dict:
    path = PROFILE_DIR / f"{name}.json"
    if not path.is_file():
        names = sorted(p.stem for p in PROFILE_DIR.glob("*.json"))
        raise BadInput(f"--profile {name}: unknown (known: {', '.join(names)})")
    return json.loads(path.read_text())


def values(section):
    """Strip {value, status, reason} down to the values, recursively."""
    if isinstance(section, dict):
        if "value" in section and "status" in section:
            return section["value"]
        return {key: values(item) for key, item in section.items()}
    return section


def orbits(profile: dict, duration_s: float | None):
    """(true orbit, orbit as the estimator predicts it, window duration)."""
    o = values(profile["orbit"])
    station = profile["station"]
    base = InertialPass(
        o["altitude_km"], o["inclination_deg"], station["lat_deg"], station["height_km"],
        o["cross_track_deg"],
    )  # fmt: skip
    window = pass_window(base, o["elevation_mask_deg"])
    if window is None:
        raise BadInput(f"profile {profile['name']}: the station never sees the satellite")
    start, end = window
    if duration_s is not None:  # a slice of the pass centred on culmination
        middle = 0.5 * (start + end)
        start, end = max(start, middle - duration_s / 2), min(end, middle + duration_s / 2)
    kwargs = dict(
        altitude_km=o["altitude_km"], inclination_deg=o["inclination_deg"],
        station_lat_deg=station["lat_deg"], station_height_km=station["height_km"],
        cross_track_deg=o["cross_track_deg"], t_reference_s=start,
    )  # fmt: skip
    truth = InertialPass(**kwargs)
    predicted = InertialPass(
        **kwargs,
        altitude_error_km=o["predicted_altitude_error_km"],
        along_track_error_s=o["predicted_along_track_error_s"],
    )
    return truth, predicted, end - start


def loss_db(link: dict, orbit: InertialPass, t_s: np.ndarray) -> np.ndarray:
    """loss = a + 20 log10(range) + b * airmass through the profile's two published
    (range, loss) points; the airmass at those ranges from the spherical geometry."""

    def airmass_at_range(range_km: float) -> float:
        re = EARTH_RADIUS_KM + orbit.station_height_km
        rs = EARTH_RADIUS_KM + orbit.altitude_km
        sine = (rs**2 - re**2 - range_km**2) / (2.0 * re * range_km)
        return 1.0 / sine

    r1, r2 = 645.0, 1200.0
    l1, l2 = link["loss_db_at_645_km"], link["loss_db_at_1200_km"]
    m1, m2 = airmass_at_range(r1), airmass_at_range(r2)
    b = (l2 - l1 - 20.0 * math.log10(r2 / r1)) / (m2 - m1)
    a = l1 - 20.0 * math.log10(r1) - b * m1
    elevation = np.radians(orbit.elevation_deg(t_s))
    return a + 20.0 * np.log10(orbit.range_km(t_s)) + b / np.sin(elevation)


def draw_events(link: dict, orbit: InertialPass, duration_s: float, rng) -> dict:
    """Emission true times of detected photons (either basis), and which are noise (a
    dark or background count in the gate of a slot whose photon was lost)."""
    chunks = np.arange(0.0, duration_s, CHUNK_S)
    centre = chunks + CHUNK_S / 2
    transmission = 10.0 ** (-loss_db(link, orbit, centre) / 10.0)
    signal_hz = (
        link["slot_rate_hz"] * link["mean_photon_number"] * transmission
    ) * link["detector_efficiency"]  # fmt: skip
    duty = min(1.0, link["gate_ns"] * 1e-9 * link["slot_rate_hz"])
    noise_hz = link["noise_counts_hz"] * duty
    counts = rng.poisson((signal_hz + noise_hz) * CHUNK_S)
    emit = np.repeat(chunks, counts) + rng.uniform(0.0, CHUNK_S, counts.sum())
    # snap to the sender's slot grid (true time; the clock's rate error is ~1e-8 of it)
    emit = np.rint(emit * link["slot_rate_hz"]) / link["slot_rate_hz"]
    noise_share = np.repeat(noise_hz / (signal_hz + noise_hz), counts)
    is_noise = rng.random(emit.size) < noise_share
    order = np.argsort(emit, kind="stable")
    return {"emit_s": emit[order], "is_noise": is_noise[order]}


def make_clock(spec: dict, duration_s: float, rate_hz: float, rng, extra_ps=None) -> PassClock:
    """A clock of the profile's `clocks` section: offset, drift, aging and power-law noise
    from 1 s before the window to 1 s after it (PPS marks lie outside the window too)."""
    clock = Clock(
        spec["name"], int(round(spec["offset_s"] * PS_PER_S)), spec["drift"],
        spec.get("aging_per_s", 0.0),
    )  # fmt: skip
    noisy = NoisyClock.generate(clock, spec["noise_h"], -1.0, duration_s + 1.0, rate_hz, rng)
    return PassClock(noisy, extra_ps)


def relativistic_ps(orbit: InertialPass):
    """The satellite clock's relativistic offset against ground proper time from t = 0."""
    return lambda t_s: orbit.relativistic_offset_s(t_s) * PS_PER_S


BURST_FRACTION = 0.1  # of the window: the `delay_burst_ps` attack's span, at its middle


def direction_events(
    direction: str, link: dict, orbit: InertialPass, duration_s: float, delays: dict,
    satellite: PassClock, ground: PassClock, rng, attack: dict,
) -> tuple[tuple, tuple]:  # fmt: skip
    """((tx_tag, basis, bit), (rx_tag, basis, bit)) of every detection of one direction
    (both bases), index for index. `attack`: `one_way_delay_ps`, `delay_ramp_ps` and
    `delay_burst_ps` on the up photons, `intercept_resend` on both directions."""
    drawn = draw_events(link, orbit, duration_s, rng)
    emit, is_noise = drawn["emit_s"], drawn["is_noise"]
    n = emit.size
    basis = rng.integers(0, 2, n, dtype=np.uint8)
    received_basis = rng.integers(0, 2, n, dtype=np.uint8)  # the receiver's own choice
    sent_bit = rng.integers(0, 2, n, dtype=np.uint8)
    error = np.where(is_noise, rng.random(n) < 0.5, rng.random(n) < link["misalignment_error"])
    attacked = rng.random(n) < attack.get("intercept_resend", 0.0)  # 25 % errors
    error = np.where(attacked, rng.random(n) < 0.25, error)
    received_bit = np.where(
        basis == received_basis,
        sent_bit ^ error.astype(np.uint8),
        rng.integers(0, 2, n, dtype=np.uint8),  # the other basis: a coin
    ).astype(np.uint8)
    timing_ps = np.where(
        is_noise,
        rng.uniform(-0.5, 0.5, n) * link["gate_ns"] * 1e3,
        rng.normal(0.0, link["jitter_ps_rms"], n),
    )
    if direction == "uplink":
        leave = emit + delays["ground_tx"] / PS_PER_S
        flight = orbit.up_light_time_s(leave) + troposphere_delay_s(
            orbit.elevation_deg(leave), link["wavelength_nm"], orbit.station_height_km
        )
        attack_ps = attack.get("one_way_delay_ps", 0.0)
        attack_ps = attack_ps + attack.get("delay_ramp_ps", 0.0) * emit / duration_s
        burst = np.abs(emit / duration_s - 0.5) < BURST_FRACTION / 2  # middle of the window
        attack_ps = attack_ps + attack.get("delay_burst_ps", 0.0) * burst
        satellite_rx_ps = delays["satellite_rx"] + delays["calibration_residual_ps"]
        arrive = leave + flight + (satellite_rx_ps + attack_ps) / PS_PER_S
        tx_tag = ground.to_clock_ps(emit)
        rx_tag = satellite.to_clock_ps(arrive, timing_ps)
    else:
        leave = emit + delays["satellite_tx"] / PS_PER_S
        flight = orbit.down_light_time_s(leave) + troposphere_delay_s(
            orbit.elevation_deg(leave), link["wavelength_nm"], orbit.station_height_km
        )
        arrive = leave + flight + delays["ground_rx"] / PS_PER_S
        tx_tag = satellite.to_clock_ps(emit)
        rx_tag = ground.to_clock_ps(arrive, timing_ps)
    return (tx_tag, basis, sent_bit), (rx_tag, received_basis, received_bit)


def truth_series(duration_s: float, satellite: PassClock, ground: PassClock, attack: dict):
    """The true offset (satellite minus ground clock) on a 1 ms grid of ground time."""
    grid = np.arange(0.0, duration_s, 1e-3)
    return {
        "t_s": grid,
        "offset_base_ps": np.int64(satellite.offset_ps - ground.offset_ps),
        "offset_residual_ps": satellite.reading_ps(grid) - ground.reading_ps(grid),
        "relativistic_ps": satellite.extra_ps(grid),
        "one_way_delay_ps": np.float64(attack.get("one_way_delay_ps", 0.0)),
        "delay_ramp_ps": np.float64(attack.get("delay_ramp_ps", 0.0)),
        "delay_burst_ps": np.float64(attack.get("delay_burst_ps", 0.0)),
        "intercept_resend": np.float64(attack.get("intercept_resend", 0.0)),
    }


def scenario_json(profile: dict, predicted: InertialPass, duration_s: float, seed: int,
                  ground: PassClock, wavelengths_nm: dict, **more) -> dict:  # fmt: skip
    """timetransfer.json: what both endpoints know (the orbit as predicted, the calibrated
    delays, the ground clock's epoch)."""
    o = values(profile["orbit"])
    delays = values(profile["delays_ps"])
    return {
        "profile": profile["name"],
        "seed": seed,
        "duration_s": duration_s,
        "orbit": {
            "altitude_km": o["altitude_km"] + o["predicted_altitude_error_km"],
            "inclination_deg": o["inclination_deg"],
            "cross_track_deg": o["cross_track_deg"],
            "t_reference_s": predicted.t_reference_s + o["predicted_along_track_error_s"],
            "range_sigma_mm": o["range_sigma_mm"],
            "range_rate_sigma_mm_s": o["range_rate_sigma_mm_s"],
        },
        "station": profile["station"],
        "delays_ps": {k: delays[k] for k in ("ground_tx", "ground_rx", "satellite_tx")}
        | {"satellite_rx": delays["satellite_rx"]},
        "ground_clock_epoch_ps": int(ground.offset_ps),
        "wavelengths_nm": wavelengths_nm,
        "bin_s": values(profile["estimator"])["bin_s"],
        "sifting": "by the endpoints: bases exchanged, a CSPRNG sample of bits disclosed",
        **more,
    }


def simulate(
    profile: dict,
    out_dir: Path,
    seed: int = 1,
    duration_s: float | None = None,
    one_way_delay_ps: float = 0.0,
    intercept_resend: float = 0.0,
    delay_ramp_ps: float = 0.0,
    delay_burst_ps: float = 0.0,
) -> dict:
    """A two-way pass of its own (the profile's link budgets both ways).
    `one_way_delay_ps`: an extra delay on every up photon; `delay_ramp_ps`: an extra
    up delay growing linearly from 0 at the start to this at the end of the window (an
    attacker hiding below the mean range check); `delay_burst_ps`: an extra up delay
    during the middle BURST_FRACTION of the window only (its mean over the pass under the
    range check, no slope: an attacker moving a second's offsets by half of it);
    `intercept_resend`: fraction of photons of both directions measured and resent in a
    random basis."""
    rng = np.random.default_rng(seed)
    truth_orbit, predicted_orbit, duration = orbits(profile, duration_s)
    up, down = values(profile["uplink"]), values(profile["downlink"])
    delays = values(profile["delays_ps"])
    clocks = values(profile["clocks"])
    rate_hz = clocks["noise_sample_rate_hz"]
    satellite = make_clock(
        {"name": "satellite", **clocks["satellite"]}, duration, rate_hz, rng,
        relativistic_ps(truth_orbit),
    )  # fmt: skip
    ground = make_clock({"name": "ground", **clocks["ground"]}, duration, rate_hz, rng)
    attack = {
        "one_way_delay_ps": one_way_delay_ps,
        "delay_ramp_ps": delay_ramp_ps,
        "delay_burst_ps": delay_burst_ps,
        "intercept_resend": intercept_resend,
    }
    events = {}
    for direction, link in (("uplink", up), ("downlink", down)):
        tx, rx = direction_events(
            direction, link, truth_orbit, duration, delays, satellite, ground, rng, attack
        )
        events[f"{direction}_tx"], events[f"{direction}_rx"] = tx, rx
    truth = truth_series(duration, satellite, ground, attack)
    wavelengths = {"uplink": up["wavelength_nm"], "downlink": down["wavelength_nm"]}
    scenario = scenario_json(profile, predicted_orbit, duration, seed, ground, wavelengths)
    files.write_pass(Path(out_dir), scenario, events, truth)
    return {"events": {k: int(v[0].size) for k, v in events.items()}, "duration_s": duration}


# ---------------------------------------------------------------- beside a QKD pass


@dataclass
class TwoWayPass:
    """The orbit and clocks that a QKD pass and its uplink share (`qkdsat simulate
    --two-way`): build the QKD scenario with `geometry` and `clocks`, simulate it, then
    `write_beside(pass_dir, qkd_scenario)` adds the uplink and turns the pass's downlink
    detections into the time transfer's downlink events."""

    profile: dict  # the two-way profile, its station replaced by the QKD pass's
    seed: int
    truth_orbit: InertialPass
    predicted_orbit: InertialPass
    duration_s: float
    satellite: PassClock
    ground: PassClock
    geometry: InertialPassGeometry
    rng: np.random.Generator
    attack: dict


def prepare_beside_qkd(
    profile: dict, qkd_profile: dict, station: dict, seed: int, duration_s: float | None,
    utc_start, **attack,
) -> TwoWayPass:  # fmt: skip
    """The two-way profile's orbit over the QKD pass's station (its latitude and height),
    cut to the window above the two-way profile's elevation mask (`duration_s` around
    culmination); the satellite clock is the QKD profile's (offset, drift, aging, what
    the downlink's time synchronisation expects) with the two-way profile's noise and the
    relativistic rate; the ground clock keeps the QKD tagger's offset and runs on the
    station reference of the two-way profile (drift and noise): a time-transfer station
    locks its tagger to its reference."""
    profile = dict(
        profile,
        station={
            "name": station["name"],
            "lat_deg": float(station["lat_deg"]),
            "height_km": float(station["alt_m"]) / 1000.0,
        },
    )
    # the two-way components draw from their own stream: the QKD pass's are untouched
    rng = np.random.default_rng(np.random.SeedSequence([seed, TWO_WAY_STREAM]))
    truth_orbit, predicted_orbit, duration = orbits(profile, duration_s)
    clocks = values(profile["clocks"])
    rate_hz = clocks["noise_sample_rate_hz"]
    qkd_sat, qkd_ground = qkd_profile["clocks"]["satellite"], qkd_profile["clocks"]["ground"]
    satellite = make_clock(
        {
            "name": "satellite",
            "offset_s": qkd_sat["offset_s"],
            "drift": qkd_sat["drift"],
            "aging_per_s": qkd_sat["aging_per_s"],
            "noise_h": clocks["satellite"]["noise_h"],
        },
        duration, rate_hz, rng, relativistic_ps(truth_orbit),
    )  # fmt: skip
    ground = make_clock(
        {**clocks["ground"], "name": "ground", "offset_s": qkd_ground["offset_s"]},
        duration, rate_hz, rng,
    )  # fmt: skip
    delays = values(profile["delays_ps"])
    source = {
        "kind": TWO_WAY_ORBIT_KIND,
        "profile": profile["name"],
        **{k: v for k, v in values(profile["orbit"]).items() if not k.startswith("predicted")},
        "station_lat_deg": profile["station"]["lat_deg"],
        "station_height_km": profile["station"]["height_km"],
        # the window's start on the orbit's own time: the optical link rebuilds the pass
        # from rise to set around it (emulator/optical_link.py LinkSchedule.for_pass)
        "t_reference_s": truth_orbit.t_reference_s,
    }
    wavelength_nm = float(
        qkd_profile["source"].get("wavelength_nm") or values(profile["downlink"])["wavelength_nm"]
    )
    geometry = inertial_pass_geometry(
        truth_orbit, duration, geo.parse_utc(utc_start, "start"), source, wavelength_nm,
        delays["satellite_tx"] / PS_PER_S, delays["ground_rx"] / PS_PER_S,
    )  # fmt: skip
    return TwoWayPass(
        profile, seed, truth_orbit, predicted_orbit, duration, satellite, ground, geometry,
        rng, attack,
    )  # fmt: skip


def downlink_from_detections(pass_dir: Path, qkd_scenario) -> tuple[tuple, tuple]:
    """The QKD pass's ground detections (ground/detections.qdet) as downlink events: each
    is given the slot whose emission, carried down the exact light time, lands nearest its
    tag (what a converged time synchronisation, host/distil/timesync.py, gives) and kept
    when it lands inside the profile's coincidence window, as the distillation keeps it.
    Noise counts inside the window stay: the endpoints cannot tell them apart."""
    from host.formats.qdet import read_detections
    from host.protocol.symbols import decode_symbols

    time_ps, channel, _ = read_detections(Path(pass_dir) / "ground" / "detections.qdet")
    geometry, slots = qkd_scenario.geometry, qkd_scenario.slots
    t_receive = qkd_scenario.ground_clock.true_time_s(time_ps)
    t_emit = t_receive - geometry.downlink_delay_s(t_receive)
    for _ in range(3):  # the delay changes by ~2e-5 s per s: each round gains that
        t_emit = t_receive - geometry.downlink_delay_s(t_emit)
    satellite_ps = slots.clock.reading_ps(t_emit) + float(
        slots.clock.offset_ps - slots.first_slot_ps
    )
    slot = np.rint(satellite_ps / slots.period_ps).astype(np.int64)
    late_ps = satellite_ps - slot * float(slots.period_ps)
    window_ps = float(qkd_scenario.profile["protocol"]["coincidence_window_ps"])
    keep = (np.abs(late_ps) <= window_ps / 2) & (slot >= 0) & (slot < slots.slot_count)
    slot, time_ps, channel = slot[keep], time_ps[keep], channel[keep]
    basis_x, bit, _ = decode_symbols(qkd_scenario.pattern.symbols(slot))
    tx = (slots.sat_time_ps(slot), basis_x.astype(np.uint8), bit.astype(np.uint8))
    rx = (time_ps, (channel // 2).astype(np.uint8), (channel % 2).astype(np.uint8), slot)
    return tx, rx


def write_beside(two_way: TwoWayPass, pass_dir: Path, qkd_scenario) -> dict:
    """The uplink on the shared orbit and clocks, the downlink from the QKD pass's
    detections, the truth and timetransfer.json, into the QKD pass's directory."""
    profile = two_way.profile
    up = values(profile["uplink"])
    events = {}
    tx, rx = direction_events(
        "uplink", up, two_way.truth_orbit, two_way.duration_s, values(profile["delays_ps"]),
        two_way.satellite, two_way.ground, two_way.rng, two_way.attack,
    )  # fmt: skip
    events["uplink_tx"], events["uplink_rx"] = tx, rx
    events["downlink_tx"], events["downlink_rx"] = downlink_from_detections(pass_dir, qkd_scenario)
    truth = truth_series(two_way.duration_s, two_way.satellite, two_way.ground, two_way.attack)
    wavelengths = {"uplink": up["wavelength_nm"], "downlink": two_way.geometry.wavelength_nm}
    scenario = scenario_json(
        profile, two_way.predicted_orbit, two_way.duration_s, two_way.seed, two_way.ground,
        wavelengths,
        downlink="the QKD pass's detections (ground/detections.qdet) inside the coincidence "
        "window, each with the slot its tag points to",
        qkd_profile=qkd_scenario.profile["name"],
    )  # fmt: skip
    files.write_pass(Path(pass_dir), scenario, events, truth)
    return {
        "events": {k: int(v[0].size) for k, v in events.items()},
        "duration_s": two_way.duration_s,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="micius-qstt")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration-s", type=float, default=None)
    parser.add_argument("--one-way-delay-ps", type=float, default=0.0)
    parser.add_argument("--intercept-resend", type=float, default=0.0)
    parser.add_argument("--delay-ramp-ps", type=float, default=0.0)
    args = parser.parse_args(argv)
    summary = simulate(
        load_profile(args.profile), Path(args.out), args.seed, args.duration_s,
        args.one_way_delay_ps, args.intercept_resend, args.delay_ramp_ps,
    )  # fmt: skip
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
