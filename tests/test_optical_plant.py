"""The emulated optical plant against the physics it claims (REFERENCES.md "Acquisition,
pointing and tracking"; docs/tracking.md)."""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import welch
from scipy.special import erf

from emulator.optical_plant import (
    C_M_S,
    NRAD,
    URAD,
    OpticalPlant,
    PassGeometry,
    PlantParams,
    prediction_table,
    vibration_series,
)


def test_los_rate_and_point_ahead_at_culmination_match_the_500_km_figures():
    g = PassGeometry(time_from_culmination_s=0.0)
    t = np.array([-1e-3, 0.0, 1e-3])
    x, _, range_km = g.los_rad(t)
    rate = (x[2] - x[0]) / 2e-3
    assert abs(abs(rate) - 7.6 / 500.0) < 1e-5  # v/h = 15.2 mrad/s, "up to ~15 mrad/s"
    assert abs(range_km[1] - 500.0) < 1e-9
    pa_x, pa_y = g.point_ahead_rad(t)
    assert abs(abs(pa_x[1]) - 2 * 7600.0 / C_M_S) < 1e-12  # 2 v/c = 50.7 urad (<= ~51)
    assert np.all(pa_y == 0.0)


def test_micro_vibration_is_9_3_urad_rms_below_30_hz_and_seeded():
    rng = np.random.default_rng(7)
    series = vibration_series(rng, 1 << 15, 2000.0, 9.3, (2.7, 7.1, 17.3))
    assert abs(np.std(series) / URAD - 9.3) < 1e-6
    f, psd = welch(series / URAD, fs=2000.0, nperseg=4096)
    above = psd[f > 40.0].sum() / psd.sum()
    assert above < 0.01, above  # the default spectrum lives below 30 Hz
    again = vibration_series(np.random.default_rng(7), 1 << 15, 2000.0, 9.3, (2.7, 7.1, 17.3))
    assert np.array_equal(series, again)


def _plant(**changes):
    return OpticalPlant(PlantParams(vibration_rms_urad=1e-9, **changes), 0.05)


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


def test_mirror_settles_within_a_period_and_stops_at_its_range():
    plant = _plant()
    plant.measure()
    plant.apply((100_000, -5_000_000), (0, 0), (0, 0), 4)  # 100 urad; -5 mrad beyond range
    assert abs(plant.fsm[0, 0] - 100 * URAD) < 2 * URAD  # 2 kHz, damping 0.7, 0.5 ms
    assert plant.fsm[1, 0] == -plant.p.fsm_range_urad * URAD


def test_coarse_axis_obeys_its_rate_and_acceleration_limits():
    plant = _plant()
    accel = plant.p.coarse_accel_max_urad_s2 * URAD
    rates = []
    for _ in range(60):
        plant.measure()
        plant.apply((0, 0), (200_000, 0), (0, 0), 1)  # ask 200 mrad/s
        rates.append(plant.coarse_rate[0])
    steps = np.diff([0.0] + rates)
    assert np.all(steps <= accel * plant.dt * (1 + 1e-9))
    plant2 = _plant(coarse_accel_max_urad_s2=1e9)
    plant2.measure()
    plant2.apply((0, 0), (200_000, 0), (0, 0), 1)
    assert plant2.coarse_rate[0] == plant2.p.coarse_rate_max_urad_s * URAD


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
