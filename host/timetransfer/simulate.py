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
import os
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
from host.formats.patterns import KeyedPatternSource
from host.protocol.symbols import SymbolMapping, decode_symbols
from host.timetransfer import files

PROFILE_DIR = Path(__file__).parent / "profiles"
CHUNK_S = 0.01
# The two-way profile that goes with a QKD profile of `qkdsat simulate` / `mission`
TWO_WAY_PROFILE = {"micius-2017": "micius-qstt", "jinan-1": "qstt-best"}
TWO_WAY_ORBIT_KIND = "two-way-inertial"  # pass.json orbit kind of a --two-way pass
TWO_WAY_STREAM = 2  # SeedSequence([seed, 2]): the two-way components beside a QKD pass
COARSE_TIME_STREAM = 4  # SeedSequence([seed, 4]): the error of the payload's coarse time


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


@dataclass(frozen=True)
class UplinkTransmitter:
    """The ground transmitter as it knows itself: its pattern (symbols of every slot from
    a keyed generator, the source a real station's QRNG bits stand for: the head's
    generator, host.protocol.symbols.keyed_slot_words) and its slot clock on the ground
    clock (slot k leaves when the ground clock reads first_epoch_ps + k period_ps). It
    never knows which of its pulses were detected on board."""

    pattern: KeyedPatternSource
    first_epoch_ps: int
    period_ps: int

    def slot_clock(self) -> dict:
        """Public (timetransfer.json): the slot epochs, not the symbols."""
        return {
            "first_epoch_ps": int(self.first_epoch_ps),
            "period_ps": int(self.period_ps),
            "slot_count": int(self.pattern.slot_count),
        }

    def epochs_ps(self, slots) -> np.ndarray:
        return self.first_epoch_ps + np.asarray(slots, dtype=np.int64) * self.period_ps


def uplink_key_from_secret(secret: bytes) -> bytes:
    """The ground transmitter's pattern key of a simulation given a pattern secret (a
    reproducible run): a keyed hash of it apart from Alice's (person string), as
    passgen.pattern_key_from_secret; without one the key comes from os.urandom."""
    import hashlib

    return hashlib.blake2b(bytes(secret), digest_size=32, person=b"qkdsat-uplink-k").digest()


def uplink_transmitter(link: dict, ground: PassClock, duration_s: float,
                       key: bytes | None = None) -> UplinkTransmitter:  # fmt: skip
    """The ground transmitter of a window of duration_s: its slot clock from the first
    whole period of the ground clock after the window's start, to 1 ms past its end; its
    pattern keyed by `key` (32 bytes; os.urandom by default, as the emulated head's QRNG
    key: a test fixes it)."""
    key = os.urandom(32) if key is None else bytes(key)
    rate = float(link["slot_rate_hz"])
    period_ps = int(round(1e12 / rate))
    if abs(period_ps * rate - 1e12) > 1e-3 * period_ps:
        raise BadInput(f"uplink slot_rate_hz {rate}: not a whole number of picoseconds")
    mapping = SymbolMapping.from_probabilities(
        link["basis_probability_z"], list(link["intensity_probabilities"])
    )
    intensities = dict(link["intensities"])
    if len(intensities) != len(link["intensity_probabilities"]):
        raise BadInput("uplink intensities and intensity_probabilities differ in length")
    start_ps = int(ground.to_clock_ps(np.array([0.0]))[0])
    first_epoch = -(-start_ps // period_ps) * period_ps
    slot_count = int(math.ceil((duration_s + 1e-3) * rate))
    pattern = KeyedPatternSource(key, mapping, 0, slot_count, intensities)
    return UplinkTransmitter(pattern, first_epoch, period_ps)


def draw_uplink(link: dict, orbit: InertialPass, duration_s: float, rng, ground: PassClock,
                transmitter: UplinkTransmitter) -> dict:  # fmt: skip
    """Detections of the ground's pulses: a Poisson process at the brightest class's rate,
    each candidate put on its slot (the ground clock's slot grid) and kept with the
    probability its slot's intensity over the brightest gives (thinning: each slot's
    detection probability is its own mean photon number's); noise counts (in the gate of
    a slot whose photon was lost) kept whatever the slot sent. Returns each detection's
    slot, true emission time, and whether it is noise."""
    chunks = np.arange(0.0, duration_s, CHUNK_S)
    centre = chunks + CHUNK_S / 2
    transmission = 10.0 ** (-loss_db(link, orbit, centre) / 10.0)
    mu_of_class = np.array(list(transmitter.pattern.intensities.values()), dtype=np.float64)
    mu_max = float(mu_of_class.max())
    signal_hz = link["slot_rate_hz"] * mu_max * transmission * link["detector_efficiency"]
    duty = min(1.0, link["gate_ns"] * 1e-9 * link["slot_rate_hz"])
    noise_hz = link["noise_counts_hz"] * duty
    counts = rng.poisson((signal_hz + noise_hz) * CHUNK_S)
    t = np.repeat(chunks, counts) + rng.uniform(0.0, CHUNK_S, counts.sum())
    is_noise = rng.random(t.size) < np.repeat(noise_hz / (signal_hz + noise_hz), counts)
    reading = ground.to_clock_ps(t)
    slot = np.rint((reading - transmitter.first_epoch_ps) / transmitter.period_ps).astype(np.int64)
    inside = (slot >= 0) & (slot < transmitter.pattern.slot_count)
    t, is_noise, reading, slot = t[inside], is_noise[inside], reading[inside], slot[inside]
    _, _, intensity = decode_symbols(transmitter.pattern.symbols(slot))
    keep = is_noise | (rng.random(t.size) * mu_max < mu_of_class[intensity])
    t, is_noise, reading, slot = t[keep], is_noise[keep], reading[keep], slot[keep]
    # the true time the ground clock read the slot's epoch (its rate is 1 within 1e-8:
    # one step of a few ns is exact to far below a femtosecond)
    emit = t + (transmitter.epochs_ps(slot) - reading).astype(np.float64) / PS_PER_S
    order = np.argsort(emit, kind="stable")
    return {"emit_s": emit[order], "is_noise": is_noise[order], "slot": slot[order]}


def coarse_satellite_time(profile: dict, satellite: PassClock, ground: PassClock,
                          duration_s: float, seed: int) -> dict:  # fmt: skip
    """What the payload knows of its clock before the time transfer (the profile's
    `satellite_coarse_time`: a GNSS receiver's time and rate): the line of satellite
    minus ground clock over the window, off by an error drawn with the profile's sigmas
    (its own random stream). Satellite clock terms: the offset at `satellite_reference_ps`
    and the rate against the satellite reading; +-half_width_ps is where the uplink's
    first anchor searches."""
    spec = values(profile["clocks"])["satellite_coarse_time"]
    rng = np.random.default_rng(np.random.SeedSequence([seed, COARSE_TIME_STREAM]))
    grid = np.linspace(0.0, duration_s, 64)
    difference = satellite.reading_ps(grid) - ground.reading_ps(grid)
    rate, at_start = np.polyfit(grid, difference, 1)
    reference_ps = int(satellite.to_clock_ps(np.array([0.0]))[0])
    return {
        "satellite_reference_ps": reference_ps,
        "offset_ps": int(satellite.offset_ps - ground.offset_ps)
        + int(round(at_start + rng.normal(0.0, spec["time_sigma_ns"] * 1e3))),
        "rate": float(rate / PS_PER_S + rng.normal(0.0, spec["rate_sigma"])),
        "half_width_ps": int(round(spec["half_width_ns"] * 1e3)),
        "source": "the payload's GNSS time and rate (assumed: profile clocks."
        "satellite_coarse_time)",
    }


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
    transmitter: UplinkTransmitter | None = None,
) -> tuple[tuple, tuple]:  # fmt: skip
    """((tx_tag, basis, bit), (rx_tag, basis, bit)) of every detection of one direction
    (both bases), index for index. `attack`: `one_way_delay_ps`, `delay_ramp_ps` and
    `delay_burst_ps` on the up photons, `intercept_resend` on both directions.
    `transmitter` (the uplink): its pulses' symbols and slot epochs; the tx record is
    then the simulation's truth of which pulses were detected (truth/, never the
    ground's record: the ground knows only its transmitter)."""
    if transmitter is not None:
        drawn = draw_uplink(link, orbit, duration_s, rng, ground, transmitter)
        basis, sent_bit, _ = decode_symbols(transmitter.pattern.symbols(drawn["slot"]))
        basis, sent_bit = basis.astype(np.uint8), sent_bit.astype(np.uint8)
    else:
        drawn = draw_events(link, orbit, duration_s, rng)
    emit, is_noise = drawn["emit_s"], drawn["is_noise"]
    n = emit.size
    if transmitter is None:
        basis = rng.integers(0, 2, n, dtype=np.uint8)
    received_basis = rng.integers(0, 2, n, dtype=np.uint8)  # the receiver's own choice
    if transmitter is None:
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
        if transmitter is not None:
            tx_tag = transmitter.epochs_ps(drawn["slot"])
        else:
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
        "sifting": "by the endpoints: bases exchanged, uplink bits disclosed, downlink sampled",
        **more,
    }


def uplink_scenario(profile: dict, transmitter: UplinkTransmitter, satellite: PassClock,
                    ground: PassClock, duration_s: float, seed: int) -> dict:  # fmt: skip
    """timetransfer.json's public uplink fields: the ground transmitter's slot clock and
    intensity classes (as pass.json publishes the downlink's), and the payload's coarse
    time (its GNSS), which the uplink's first anchor searches around."""
    return {
        "uplink_slot_clock": transmitter.slot_clock(),
        "uplink_intensities": dict(transmitter.pattern.intensities),
        "satellite_coarse_time": coarse_satellite_time(
            profile, satellite, ground, duration_s, seed
        ),
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
    uplink_key: bytes | None = None,
) -> dict:
    """A two-way pass of its own (the profile's link budgets both ways).
    `one_way_delay_ps`: an extra delay on every up photon; `delay_ramp_ps`: an extra
    up delay growing linearly from 0 at the start to this at the end of the window (an
    attacker hiding below the mean range check); `delay_burst_ps`: an extra up delay
    during the middle BURST_FRACTION of the window only (its mean over the pass under the
    range check, no slope: an attacker moving a second's offsets by half of it);
    `intercept_resend`: fraction of photons of both directions measured and resent in a
    random basis. `uplink_key`: the ground transmitter's pattern key (32 bytes; fresh from
    os.urandom by default)."""
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
    transmitter = uplink_transmitter(up, ground, duration, uplink_key)
    events = {}
    for direction, link in (("uplink", up), ("downlink", down)):
        tx, rx = direction_events(
            direction, link, truth_orbit, duration, delays, satellite, ground, rng, attack,
            transmitter if direction == "uplink" else None,
        )  # fmt: skip
        events[f"{direction}_tx"], events[f"{direction}_rx"] = tx, rx
    truth = truth_series(duration, satellite, ground, attack)
    wavelengths = {"uplink": up["wavelength_nm"], "downlink": down["wavelength_nm"]}
    scenario = scenario_json(
        profile, predicted_orbit, duration, seed, ground, wavelengths,
        **uplink_scenario(profile, transmitter, satellite, ground, duration, seed),
    )  # fmt: skip
    files.write_pass(Path(out_dir), scenario, events, truth, transmitter.pattern)
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
    transmitter: UplinkTransmitter

    def uplink_events(self) -> tuple[tuple, tuple]:
        """The uplink's detections on the shared orbit and clocks: (the truth's tx record
        of the detected pulses, the satellite's rx record)."""
        profile = self.profile
        return direction_events(
            "uplink", values(profile["uplink"]), self.truth_orbit, self.duration_s,
            values(profile["delays_ps"]), self.satellite, self.ground, self.rng, self.attack,
            self.transmitter,
        )  # fmt: skip

    def uplink_scenario(self) -> dict:
        return uplink_scenario(
            self.profile, self.transmitter, self.satellite, self.ground, self.duration_s,
            self.seed,
        )  # fmt: skip


def prepare_beside_qkd(
    profile: dict, qkd_profile: dict, station: dict, seed: int, duration_s: float | None,
    utc_start, uplink_key: bytes | None = None, **attack,
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
    transmitter = uplink_transmitter(values(profile["uplink"]), ground, duration, uplink_key)
    return TwoWayPass(
        profile, seed, truth_orbit, predicted_orbit, duration, satellite, ground, geometry,
        rng, attack, transmitter,
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
    events["uplink_tx"], events["uplink_rx"] = two_way.uplink_events()
    events["downlink_tx"], events["downlink_rx"] = downlink_from_detections(pass_dir, qkd_scenario)
    truth = truth_series(two_way.duration_s, two_way.satellite, two_way.ground, two_way.attack)
    wavelengths = {"uplink": up["wavelength_nm"], "downlink": two_way.geometry.wavelength_nm}
    scenario = scenario_json(
        profile, two_way.predicted_orbit, two_way.duration_s, two_way.seed, two_way.ground,
        wavelengths,
        downlink="the QKD pass's detections (ground/detections.qdet) inside the coincidence "
        "window, each with the slot its tag points to",
        qkd_profile=qkd_scenario.profile["name"],
        **two_way.uplink_scenario(),
    )  # fmt: skip
    files.write_pass(Path(pass_dir), scenario, events, truth, two_way.transmitter.pattern)
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
