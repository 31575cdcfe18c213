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
from pathlib import Path

import numpy as np

from emulator.pass_model.clock_noise import NoisyClock
from emulator.pass_model.clocks import PS_PER_S, Clock
from emulator.pass_model.geometry import EARTH_RADIUS_KM
from emulator.pass_model.two_way import InertialPass, pass_window, troposphere_delay_s
from host.errors import BadInput
from host.timetransfer import files

PROFILE_DIR = Path(__file__).parent / "profiles"
CHUNK_S = 0.01
# The two-way profile that goes with a QKD profile of `qkdsat simulate` / `mission`
TWO_WAY_PROFILE = {"micius-2017": "micius-qstt", "jinan-1": "qstt-best"}


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


def simulate(
    profile: dict,
    out_dir: Path,
    seed: int = 1,
    duration_s: float | None = None,
    one_way_delay_ps: float = 0.0,
    intercept_resend: float = 0.0,
    delay_ramp_ps: float = 0.0,
) -> dict:
    """`one_way_delay_ps`: an extra delay on every up photon; `delay_ramp_ps`: an extra
    up delay growing linearly from 0 at the start to this at the end of the window (an
    attacker hiding below the mean range check); `intercept_resend`: fraction of photons
    of both directions measured and resent in a random basis."""
    rng = np.random.default_rng(seed)
    truth_orbit, predicted_orbit, duration = orbits(profile, duration_s)
    up, down = values(profile["uplink"]), values(profile["downlink"])
    delays = values(profile["delays_ps"])
    clocks = values(profile["clocks"])
    rate_hz = clocks["noise_sample_rate_hz"]

    def make_clock(name: str) -> NoisyClock:
        spec = clocks[name]
        clock = Clock(
            name, int(round(spec["offset_s"] * PS_PER_S)), spec["drift"],
            spec.get("aging_per_s", 0.0),
        )  # fmt: skip
        return NoisyClock.generate(clock, spec["noise_h"], -1.0, duration + 1.0, rate_hz, rng)

    satellite, ground = make_clock("satellite"), make_clock("ground")

    def satellite_elapsed_ps(t_s):
        relativistic_ps = truth_orbit.relativistic_offset_s(t_s) * PS_PER_S
        return satellite.elapsed_ps(t_s, relativistic_ps)

    def tag(noisy: NoisyClock, elapsed_ps):
        return noisy.clock.offset_ps + np.rint(elapsed_ps).astype(np.int64)

    true_satellite_rx_ps = delays["satellite_rx"] + delays["calibration_residual_ps"]
    events = {}
    for direction, link in (("uplink", up), ("downlink", down)):
        drawn = draw_events(link, truth_orbit, duration, rng)
        emit, is_noise = drawn["emit_s"], drawn["is_noise"]
        n = emit.size
        basis = rng.integers(0, 2, n, dtype=np.uint8)
        received_basis = rng.integers(0, 2, n, dtype=np.uint8)  # the receiver's own choice
        sent_bit = rng.integers(0, 2, n, dtype=np.uint8)
        error = np.where(is_noise, rng.random(n) < 0.5, rng.random(n) < link["misalignment_error"])
        attacked = rng.random(n) < intercept_resend  # Eve guesses the basis: 25 % errors
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
            flight = truth_orbit.up_light_time_s(leave) + troposphere_delay_s(
                truth_orbit.elevation_deg(leave),
                link["wavelength_nm"],
                truth_orbit.station_height_km,
            )
            attack_ps = one_way_delay_ps + delay_ramp_ps * emit / duration
            arrive = leave + flight + (true_satellite_rx_ps + attack_ps) / PS_PER_S
            tx_tag = tag(ground, ground.elapsed_ps(emit))
            rx_tag = tag(satellite, satellite_elapsed_ps(arrive) + timing_ps)
        else:
            leave = emit + delays["satellite_tx"] / PS_PER_S
            flight = truth_orbit.down_light_time_s(leave) + troposphere_delay_s(
                truth_orbit.elevation_deg(leave),
                link["wavelength_nm"],
                truth_orbit.station_height_km,
            )
            arrive = leave + flight + delays["ground_rx"] / PS_PER_S
            tx_tag = tag(satellite, satellite_elapsed_ps(emit))
            rx_tag = tag(ground, ground.elapsed_ps(arrive) + timing_ps)
        events[f"{direction}_tx"] = (tx_tag, basis, sent_bit)
        events[f"{direction}_rx"] = (rx_tag, received_basis, received_bit)

    grid = np.arange(0.0, duration, 1e-3)
    offset_base_ps = satellite.clock.offset_ps - ground.clock.offset_ps
    truth = {
        "t_s": grid,
        "offset_base_ps": np.int64(offset_base_ps),
        "offset_residual_ps": satellite_elapsed_ps(grid) - ground.elapsed_ps(grid),
        "relativistic_ps": truth_orbit.relativistic_offset_s(grid) * PS_PER_S,
        "one_way_delay_ps": np.float64(one_way_delay_ps),
        "delay_ramp_ps": np.float64(delay_ramp_ps),
        "intercept_resend": np.float64(intercept_resend),
    }
    o = values(profile["orbit"])
    scenario = {
        "profile": profile["name"],
        "seed": seed,
        "duration_s": duration,
        "orbit": {
            "altitude_km": o["altitude_km"] + o["predicted_altitude_error_km"],
            "inclination_deg": o["inclination_deg"],
            "cross_track_deg": o["cross_track_deg"],
            "t_reference_s": predicted_orbit.t_reference_s + o["predicted_along_track_error_s"],
            "range_sigma_mm": o["range_sigma_mm"],
            "range_rate_sigma_mm_s": o["range_rate_sigma_mm_s"],
        },
        "station": profile["station"],
        "delays_ps": {k: delays[k] for k in ("ground_tx", "ground_rx", "satellite_tx")}
        | {"satellite_rx": delays["satellite_rx"]},
        "ground_clock_epoch_ps": int(ground.clock.offset_ps),
        "wavelengths_nm": {"uplink": up["wavelength_nm"], "downlink": down["wavelength_nm"]},
        "bin_s": values(profile["estimator"])["bin_s"],
        "sifting": "by the endpoints: bases exchanged, a CSPRNG sample of bits disclosed",
    }
    files.write_pass(Path(out_dir), scenario, events, truth)
    return {"events": {k: int(v[0].size) for k, v in events.items()}, "duration_s": duration}


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
