"""The emulated optical plant against the physics it claims (REFERENCES.md "Acquisition,
pointing and tracking"; docs/tracking.md)."""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import welch
from scipy.special import erf

from emulator.optical_plant import (
    C_M_S,
    EARTH_RADIUS_KM,
    NRAD,
    URAD,
    OpticalPlant,
    PassGeometry,
    PlantParams,
    ars_series,
    prediction_table,
    scintillation_series,
    vibration_series,
)


def test_los_rate_and_point_ahead_at_culmination_match_the_500_km_figures():
    g = PassGeometry(time_from_culmination_s=0.0)
    t = np.array([-1e-3, 0.0, 1e-3])
    x, _, range_km = g.los_rad(t)
    rate = (x[2] - x[0]) / 2e-3
    # Round Earth, nadir-pointing frame: v/h * R/(R+h) = 14.1 mrad/s ("up to ~15 mrad/s").
    expected = 7.6 / 500.0 * EARTH_RADIUS_KM / (EARTH_RADIUS_KM + 500.0)
    assert abs(abs(rate) - expected) < 1e-6, rate
    assert abs(range_km[1] - 500.0) < 1e-9
    assert abs(g.elevation_deg(np.array([0.0]))[0] - 90.0) < 1e-6
    pa_x, pa_y = g.point_ahead_rad(t)
    assert abs(abs(pa_x[1]) - 2 * 7600.0 / C_M_S) < 1e-12  # 2 v/c = 50.7 urad (<= ~51)
    assert np.all(pa_y == 0.0)


def test_pass_from_15_degrees_elevation_has_the_round_earth_range_and_angles():
    g = PassGeometry().at_elevation(15.0)
    x, y, range_km = g.los_rad(np.array([0.0]))
    assert abs(g.elevation_deg(np.array([0.0]))[0] - 15.0) < 1e-6
    # Range at 15 deg from 500 km: sqrt((R+h)^2 - (R cos e)^2) - R sin e = 1407 km.
    assert abs(range_km[0] - 1407.0) < 2.0, range_km
    # Off-nadir angle asin(R cos e / (R+h)) = 63.6 deg: inside the kernel's 85.9 deg.
    assert abs(np.degrees(abs(x[0])) - 63.6) < 0.1 and y[0] == 0.0
    # Central angle 90 - 15 - 63.6 = 11.4 deg, at v / (R+h): 180 s before culmination.
    assert 175 < -g.time_from_culmination_s < 185
    assert g.at_elevation(15.0, rising=False).time_from_culmination_s == -g.time_from_culmination_s


def test_micro_vibration_has_the_wheel_lines_and_the_floor_over_its_low_band():
    rng = np.random.default_rng(7)
    rate = 2000.0
    series = vibration_series(rng, 1 << 16, rate, 9.3, (2.7, 7.1, 17.3), rolloff_order=2,
                              wheel_lines=((95.0, 1.0), (190.0, 0.5)),
                              floor_urad_rthz=0.004)  # fmt: skip
    f, psd = welch(series / URAD, fs=rate, nperseg=8192)
    df = f[1] - f[0]

    def band_rms(lo, hi):
        return math.sqrt(psd[(f >= lo) & (f < hi)].sum() * df)

    assert 8.5 < band_rms(0.0, 40.0) < 10.0  # the 9.3 urad low band
    assert abs(band_rms(93.0, 97.0) - 1.0) < 0.1  # wheel line, 1 urad RMS at 95 Hz
    assert abs(band_rms(188.0, 192.0) - 0.5) < 0.05  # its harmonic
    # Floor: 0.004 urad/sqrt(Hz) one-sided, where nothing else lives (600-1000 Hz).
    floor = math.sqrt(psd[(f > 600.0) & (f < 990.0)].mean())
    assert 0.0035 < floor < 0.0050, floor
    # Above 30 Hz the low band falls as f^-4 (2nd order), not f^-8: at 60 Hz it still
    # carries far more than the floor.
    assert band_rms(50.0, 80.0) > 0.3
    again = vibration_series(np.random.default_rng(7), 1 << 16, rate, 9.3, (2.7, 7.1, 17.3),
                             rolloff_order=2, wheel_lines=((95.0, 1.0), (190.0, 0.5)),
                             floor_urad_rthz=0.004)  # fmt: skip
    assert np.array_equal(series, again)


def test_angular_rate_sensor_sees_the_jitter_through_its_high_pass_with_its_rate_noise():
    rate, n = 2000.0, 1 << 16
    jitter = vibration_series(np.random.default_rng(3), n, rate, 9.3, (2.7, 7.1, 17.3),
                              rolloff_order=2, wheel_lines=((95.0, 1.0),))  # fmt: skip
    # Noise-free: the jitter itself above the 2 Hz corner (in the 30-85 Hz band the loop
    # cannot reach, within 1 %), nothing of it near DC.
    clean = ars_series(np.random.default_rng(4), jitter, rate, 2.0, 0.0) * NRAD / URAD
    f, p_clean = welch(clean, fs=rate, nperseg=8192)
    _, p_jitter = welch(jitter / URAD, fs=rate, nperseg=8192)
    band = (f >= 30.0) & (f < 85.0)
    assert abs(math.sqrt(p_clean[band].sum() / p_jitter[band].sum()) - 1.0) < 0.01
    low = (f > 0.0) & (f < 0.5)
    assert p_clean[low].sum() < 0.05 * p_jitter[low].sum()
    # Still platform: white rate noise N integrated to angle, PSD N^2 / (2 pi f)^2 above
    # the corner (N = 2 urad/s/rtHz gives 5e-5 urad^2/Hz at 45 Hz; 60 averaged segments).
    quiet = ars_series(np.random.default_rng(4), np.zeros(n), rate, 2.0, 2.0) * NRAD / URAD
    f, p_quiet = welch(quiet, fs=rate, nperseg=4096)
    band = (f >= 30.0) & (f < 60.0)
    expected = (2.0**2 / (2 * math.pi * f[band]) ** 2).mean()
    assert 0.85 < p_quiet[band].mean() / expected < 1.15, p_quiet[band].mean() / expected
    # The plant reports it (nrad) as the last two measurement words, once per step.
    plant = OpticalPlant(PlantParams(seed=2), duration_s=0.01)
    assert plant.measure()[10:] == (plant.ars_x[0], plant.ars_y[0])


def test_beacon_scintillation_has_the_index_and_the_correlation_time():
    rng = np.random.default_rng(3)
    intensity = scintillation_series(rng, 400_000, 2000.0, 0.7, 5.0)
    assert abs(np.mean(intensity) - 1.0) < 0.02
    assert abs(np.var(intensity) - 0.7) < 0.07  # sigma_I^2 = var(I) / mean(I)^2
    log_i = np.log(intensity) - np.mean(np.log(intensity))
    lag = 10  # 5 ms at 2 kHz: the log-amplitude correlation falls to 1/e
    rho = np.mean(log_i[lag:] * log_i[:-lag]) / np.var(log_i)
    assert abs(rho - math.exp(-1.0)) < 0.03, rho


def _plant(duration_s=0.05, **changes):
    # The detector and actuator physics alone: no vibration, no scintillation.
    changes.setdefault("qpd_quadrant_gains", (1.0, 1.0, 1.0, 1.0))
    changes.setdefault("scintillation_index", 0.0)
    changes.setdefault("wheel_lines", ())
    changes.setdefault("vibration_floor_urad_rthz", 0.0)
    return OpticalPlant(PlantParams(vibration_rms_urad=1e-9, **changes), duration_s)


def test_quadrant_detector_follows_the_gaussian_erf_response():
    # X = ((B+D)-(A+C))/S = erf(sqrt(2) x / w) for a Gaussian spot (REFERENCES.md).
    # Bright enough that shot noise is 0.3 %, dim enough that no quadrant clips (16-bit).
    plant = _plant(qpd_signal_e_per_ms=200_000.0, qpd_background_e_per_ms=0.0,
                   qpd_read_noise_e=0.0)  # fmt: skip
    w = plant.p.qpd_spot_radius_urad * URAD
    for x_urad in (-20.0, -5.0, 0.0, 3.0, 12.0):
        plant.coarse[:] = [plant.los_x[0] - x_urad * URAD, plant.los_y[0] + 4.0 * URAD]
        a, b, c, d = plant.measure()[:4]
        s = a + b + c + d
        X, Y = ((b + d) - (a + c)) / s, ((a + b) - (c + d)) / s
        assert abs(X - erf(math.sqrt(2) * x_urad * URAD / w)) < 0.01, (x_urad, X)
        assert abs(Y - erf(math.sqrt(2) * -4.0 * URAD / w)) < 0.01


def test_beacon_power_falls_as_range_squared_and_dropouts_darken_the_detector():
    near = _plant(geometry=PassGeometry(time_from_culmination_s=0.0))
    far = _plant(geometry=PassGeometry(time_from_culmination_s=-60.0), dropouts=((0.0, 0.01),))
    for plant in (near, far):
        plant.coarse[:] = [plant.los_x[0], plant.los_y[0]]
    s_near = sum(near.measure()[:4])
    ratio = (near.range_km[0] / far.range_km[0]) ** 2
    assert 0.4 < ratio < 0.6
    dark = sum(far.measure()[:4])
    assert 50 < dark < 150  # beacon off: 4 x 25 e- background per 0.5 ms sample
    far.k = 30  # after the outage
    expected = s_near * ratio
    assert abs(sum(far.measure()[:4]) - expected) < 5 * math.sqrt(expected) + 50


def test_mirror_acts_one_period_late_rings_at_its_resonance_and_stops_at_its_range():
    plant = _plant()
    angles, stopped = [], []
    for _ in range(40):
        plant.measure()
        plant.apply((100_000, -5_000_000), (0, 0), (0, 0), 4)  # 100 urad; -5 mrad: stop
        angles.append(plant.fsm[0, 0] / URAD)
        stopped.append(plant.fsm[1, 0] / URAD)
    # One sample of sensor-to-actuator latency: the first period still holds 0.
    assert angles[0] == 0.0 and angles[1] > 10.0
    # 700 Hz, damping 0.1: the step rings (overshoot 73 % between samples); a damping of
    # 0.7 would neither pass 130 urad nor swing back below 60.
    assert max(angles) > 130.0 and min(angles[2:10]) < 60.0, angles[:10]
    assert abs(angles[-1] - 100.0) < 2.0  # settled after 20 ms (time constant 2.3 ms)
    # Driven 5 mrad beyond its range it sits on the stop and never passes it.
    assert min(stopped) > -1000.0 - 1e-9 and max(np.abs(np.array(stopped[1:]) + 1000.0)) < 1e-6


def test_coarse_axis_has_finite_bandwidth_stiction_limits_and_a_quantised_encoder():
    plant = _plant(0.2)
    accel = plant.p.coarse_accel_max_urad_s2 * URAD
    rates = []
    for _ in range(200):
        plant.measure()
        plant.apply((0, 0), (200_000, 10), (0, 0), 1)  # 200 mrad/s x; 10 urad/s y
        rates.append(plant.coarse_rate[0])
    steps = np.diff([0.0] + rates)
    assert np.all(steps <= accel * plant.dt * (1 + 1e-9))
    assert plant.coarse_rate[1] == 0.0  # below the 20 urad/s breakaway: stuck
    # A small step is followed with the servo's 5 Hz first-order lag: 63 % after 32 ms.
    plant = _plant()
    for _ in range(64):
        plant.measure()
        plant.apply((0, 0), (1000, 0), (0, 0), 1)
    assert 0.58 < plant.coarse_rate[0] / (1000 * URAD) < 0.68, plant.coarse_rate[0]
    enc_x = plant.measure()[8]
    q = plant.p.encoder_resolution_nrad
    assert abs(enc_x / q - round(enc_x / q)) < 0.01 / q * 1000  # a whole number of counts
    assert abs(enc_x - plant.coarse[0] / NRAD) <= q / 2 + 1
    ideal = _plant(coarse_accel_max_urad_s2=1e9, coarse_bandwidth_hz=0.0, latency_samples=0)
    ideal.measure()
    ideal.apply((0, 0), (200_000, 0), (0, 0), 1)
    assert ideal.coarse_rate[0] == ideal.p.coarse_rate_max_urad_s * URAD


def test_quadrant_gain_mismatch_offsets_the_measured_error():
    # On axis, mismatched quadrants (A..D gains 1.02, 1.0, 0.99, 0.99) read an error the
    # loop then nulls: X = ((gB+gD)-(gA+gC))/sum g = -0.005, Y = +0.01.
    plant = _plant(qpd_quadrant_gains=(1.02, 1.0, 0.99, 0.99), qpd_signal_e_per_ms=200_000.0,
                   qpd_background_e_per_ms=0.0, qpd_read_noise_e=0.0)  # fmt: skip
    xs, ys = [], []
    for k in range(20):  # 20 samples on axis: shot noise 0.003 each, 0.0007 averaged
        plant.k = k
        plant.coarse[:] = [plant.los_x[k], plant.los_y[k]]
        a, b, c, d = plant.measure()[:4]
        xs.append(((b + d) - (a + c)) / (a + b + c + d))
        ys.append(((a + b) - (c + d)) / (a + b + c + d))
    assert abs(np.mean(xs) + 0.005) < 0.002 and abs(np.mean(ys) - 0.01) < 0.002


def test_prediction_table_matches_the_geometry_within_its_interpolation():
    params = PlantParams(initial_error_urad=(0.0, 0.0), prediction_timing_error_s=0.0)
    rows = prediction_table(params, 3.0)
    t = np.array([1.0, 1.5])
    x, _, _ = params.geometry.los_rad(t)
    row = rows[1]
    tm = 500.0  # ms after the node: x + v t + a t^2 / 2 (units as the firmware stores them)
    predicted = row[0] + row[2] * tm + row[4] / 65536 * tm * tm / 2
    assert abs(row[0] * NRAD - x[0]) < 1e-9
    assert abs(predicted * NRAD - x[1]) < 2 * URAD
