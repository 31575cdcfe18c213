"""Downlink budget: diffraction of the beam into the ground aperture, atmosphere versus
elevation, pointing loss from a jitter model (or a tracking log), optics.

Efficiencies are fractions (0..1) of the photons leaving the transmitter that reach the
receiver's detector inputs; detector efficiency is the detector model's (detectors.py).
`link_loss_db` is that channel loss (pass `detector_efficiency=1`), which is how the
published Micius figures are read (Liao et al. 2017: ~29.8 dB at 645 km, ~40 dB at
1200 km): with the detectors' 0.5 counted inside them the pass would give ~6.3 M
detections instead of the published 3.55 M (docs/simulator.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def geometric_efficiency(range_km, aperture_diameter_m: float, divergence_full_urad: float):
    """Fraction of a Gaussian beam (1/e^2 half-angle = divergence/2) collected by a
    circular aperture: 1 - exp(-2 a^2 / w^2), w = range * half-angle."""
    w_m = np.asarray(range_km, dtype=np.float64) * 1e3 * (divergence_full_urad * 0.5e-6)
    a_m = aperture_diameter_m / 2.0
    return -np.expm1(-2.0 * a_m**2 / w_m**2)


def atmosphere_transmittance(elevation_deg, zenith_transmittance: float):
    """T(el) = T_zenith ** (1 / sin el): plane-parallel air mass, fine above ~10 deg."""
    sin_el = np.sin(np.radians(np.asarray(elevation_deg, dtype=np.float64)))
    return zenith_transmittance ** (1.0 / np.maximum(sin_el, 1e-3))


def pointing_efficiency(error_urad, divergence_full_urad: float):
    """exp(-2 theta_e^2 / theta_h^2) for a pointing error theta_e off a Gaussian beam of
    1/e^2 half-angle theta_h."""
    theta_h = divergence_full_urad * 0.5
    return np.exp(-2.0 * np.square(error_urad) / theta_h**2)


class PointingJitter:
    """Pointing error over the pass: a static bias plus a two-axis first-order
    Gauss-Markov (Ornstein-Uhlenbeck) jitter with the given per-axis RMS and correlation
    time, sampled every `step_s`. Micius' micro-vibration energy lies below 30 Hz (Opt.
    Express 28, 8291 (2020)), so a few-ms correlation time is the natural scale. A tracking
    log can replace the model: `from_log(t_s, error_urad)`."""

    def __init__(self, t_s: np.ndarray, error_urad: np.ndarray):
        self.t_s = np.asarray(t_s, dtype=np.float64)
        self.error_urad = np.asarray(error_urad, dtype=np.float64)

    @classmethod
    def from_model(
        cls,
        duration_s: float,
        rms_per_axis_urad: float,
        correlation_s: float,
        bias_urad: float,
        rng: np.random.Generator,
        step_s: float = 1e-3,
    ) -> PointingJitter:
        count = int(math.ceil(duration_s / step_s)) + 2
        t = np.arange(count) * step_s
        if rms_per_axis_urad <= 0:
            return cls(t, np.full(count, abs(bias_urad)))
        a = math.exp(-step_s / correlation_s)
        b = rms_per_axis_urad * math.sqrt(1.0 - a * a)
        axes = np.empty((2, count))
        noise = rng.standard_normal((2, count))
        axes[:, 0] = rms_per_axis_urad * noise[:, 0]
        # The AR(1) recursion as a linear filter: vectorised, exact for the sampled process.
        from scipy.signal import lfilter

        axes[:, 1:] = lfilter([b], [1.0, -a], noise[:, 1:], axis=1, zi=a * axes[:, :1])[0]
        error = np.hypot(axes[0] + bias_urad, axes[1])
        return cls(t, error)

    @classmethod
    def from_log(cls, t_s, error_urad) -> PointingJitter:
        return cls(t_s, error_urad)

    def error_at(self, t_s) -> np.ndarray:
        return np.interp(t_s, self.t_s, self.error_urad)

    def rms_urad(self) -> float:
        return float(np.sqrt(np.mean(np.square(self.error_urad))))


@dataclass(frozen=True)
class LinkBudget:
    aperture_diameter_m: float
    divergence_full_urad: float
    zenith_transmittance: float
    optics_efficiency: float  # transmitter + receiver optics, everything but detectors

    def efficiency_no_pointing(self, range_km, elevation_deg) -> np.ndarray:
        return (
            geometric_efficiency(range_km, self.aperture_diameter_m, self.divergence_full_urad)
            * atmosphere_transmittance(elevation_deg, self.zenith_transmittance)
            * self.optics_efficiency
        )

    def efficiency(self, range_km, elevation_deg, pointing_error_urad) -> np.ndarray:
        return self.efficiency_no_pointing(range_km, elevation_deg) * pointing_efficiency(
            pointing_error_urad, self.divergence_full_urad
        )

    def mean_pointing_efficiency(self, rms_per_axis_urad: float, bias_urad: float = 0.0):
        """E[exp(-2 theta^2/theta_h^2)] for a 2-D Gaussian error (closed form)."""
        theta_h = self.divergence_full_urad * 0.5
        k = 2.0 / theta_h**2
        s2 = rms_per_axis_urad**2
        return math.exp(-k * bias_urad**2 / (1 + 2 * k * s2)) / (1 + 2 * k * s2)

    def link_loss_db(
        self, range_km, elevation_deg, detector_efficiency: float, pointing_factor: float
    ) -> np.ndarray:
        eta = self.efficiency_no_pointing(range_km, elevation_deg) * pointing_factor
        return -10.0 * np.log10(eta * detector_efficiency)
