"""Clock noise beyond offset and drift: power-law phase noise (white and flicker phase
noise, white and flicker frequency noise, random-walk frequency noise) added to the
deterministic `Clock` of clocks.py.

The noise is specified as the one-sided power spectral density of fractional frequency,

    S_y(f) = h2 f^2 + h1 f + h0 + h_1 / f + h_2 / f^2      (1/Hz),

the convention of IEEE Std 1139 and Riley's NIST SP 1065, so the Allan deviation of each
term is the textbook one (white FM: sigma_y^2(tau) = h0 / (2 tau); flicker FM:
2 ln2 h_1; random-walk FM: (2 pi^2 / 3) h_2 tau). The phase x(t) (seconds) is made by
shaping complex Gaussian noise in the frequency domain with S_x(f) = S_y(f) / (2 pi f)^2
and one inverse real FFT (the method of Kasdin & Walter 1992 in its FFT form). The series
is generated twice as long as asked and the first half kept, so the FFT's periodic wrap
does not tie the end of a pass to its start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from emulator.pass_model.clocks import PS_PER_S, Clock, stored_reading_ps

# exponents of f in S_y(f), by the names the profiles use
POWER_LAW_EXPONENTS = {
    "white_pm_h2": 2,
    "flicker_pm_h1": 1,
    "white_fm_h0": 0,
    "flicker_fm_h_1": -1,
    "random_walk_fm_h_2": -2,
}


def power_law_phase_s(
    count: int, sample_rate_hz: float, h: dict, rng: np.random.Generator
) -> np.ndarray:
    """`count` samples of phase x (seconds) at `sample_rate_hz` with S_y(f) = sum h_a f^a.
    `h` maps names of POWER_LAW_EXPONENTS to coefficients (1/Hz); missing ones are zero."""
    unknown = set(h) - set(POWER_LAW_EXPONENTS)
    if unknown:
        raise ValueError(f"unknown power-law terms {sorted(unknown)}")
    length = 2 * int(count)
    frequencies_hz = np.fft.rfftfreq(length, d=1.0 / sample_rate_hz)
    s_y = np.zeros_like(frequencies_hz)
    positive = frequencies_hz[1:]
    for name, coefficient in h.items():
        s_y[1:] += coefficient * positive ** POWER_LAW_EXPONENTS[name]
    s_x = np.zeros_like(s_y)
    s_x[1:] = s_y[1:] / (2.0 * np.pi * positive) ** 2
    # E|X_k|^2 = N fs S(f_k) / 2 for a one-sided PSD S, split over real and imaginary parts
    scale = np.sqrt(length * sample_rate_hz * s_x / 4.0)
    spectrum = scale * (
        rng.standard_normal(frequencies_hz.size) + 1j * rng.standard_normal(frequencies_hz.size)
    )
    spectrum[0] = 0.0
    if length % 2 == 0:  # the Nyquist bin of a real series is real
        spectrum[-1] = spectrum[-1].real * np.sqrt(2.0)
    return np.fft.irfft(spectrum, n=length)[:count]


def adev_theory(h: dict, tau_s: float, bandwidth_hz: float) -> float:
    """Allan deviation at `tau_s` from the h coefficients (NIST SP 1065, table 2), with
    `bandwidth_hz` the high-frequency cut-off of the phase-noise terms."""
    variance = (
        h.get("white_pm_h2", 0.0) * 3.0 * bandwidth_hz / (4.0 * np.pi**2 * tau_s**2)
        + h.get("flicker_pm_h1", 0.0)
        * (1.038 + 3.0 * np.log(2.0 * np.pi * bandwidth_hz * tau_s))
        / (4.0 * np.pi**2 * tau_s**2)
        + h.get("white_fm_h0", 0.0) / (2.0 * tau_s)
        + h.get("flicker_fm_h_1", 0.0) * 2.0 * np.log(2.0)
        + h.get("random_walk_fm_h_2", 0.0) * 2.0 * np.pi**2 * tau_s / 3.0
    )
    return float(np.sqrt(variance))


@dataclass
class NoisyClock:
    """A `Clock` (offset, drift, aging) plus a sampled power-law phase-noise realisation,
    linearly interpolated between samples (the sample rate bounds the noise bandwidth;
    faster phase noise is in the per-event jitter of the detectors and the TDC)."""

    clock: Clock
    t0_s: float
    sample_rate_hz: float
    phase_noise_s: np.ndarray = field(repr=False)

    @classmethod
    def generate(
        cls,
        clock: Clock,
        h: dict,
        t_start_s: float,
        t_end_s: float,
        sample_rate_hz: float,
        rng: np.random.Generator,
    ) -> NoisyClock:
        count = int(np.ceil((t_end_s - t_start_s) * sample_rate_hz)) + 2
        phase = power_law_phase_s(count, sample_rate_hz, h, rng)
        return cls(clock, t_start_s, sample_rate_hz, phase - phase[0])

    def noise_ps(self, true_s) -> np.ndarray:
        t = np.asarray(true_s, dtype=np.float64)
        grid = self.t0_s + np.arange(self.phase_noise_s.size) / self.sample_rate_hz
        return np.interp(t, grid, self.phase_noise_s) * PS_PER_S

    def elapsed_ps(self, true_s, extra_rate_ps=None) -> np.ndarray:
        """Reading relative to offset_ps as float64 ps: deterministic part + noise
        (+ `extra_rate_ps`, e.g. the relativistic time offset accumulated to `true_s`)."""
        elapsed = self.clock.reading_ps(true_s) + self.noise_ps(true_s)
        if extra_rate_ps is not None:
            elapsed = elapsed + extra_rate_ps
        return elapsed


class PassClock:
    """A clock of a two-way pass with the interface of `clocks.Clock` (`reading_ps`,
    `to_clock_ps`, `true_time_s`, `to_json`, `offset_ps`, `drift`, `aging_per_s`), so the
    QKD pass generator (host/simulate/passgen.py) draws its slots, detections and PPS
    marks on the same noisy clock the uplink is tagged with: the deterministic `Clock`
    plus the power-law noise of a `NoisyClock` plus `extra_ps(t)` (the satellite clock's
    relativistic offset against ground proper time, accumulated from t = 0)."""

    def __init__(self, noisy: NoisyClock, extra_ps=None):
        self.noisy = noisy
        self.extra_ps = extra_ps

    @property
    def clock(self) -> Clock:
        return self.noisy.clock

    @property
    def name(self) -> str:
        return self.clock.name

    @property
    def offset_ps(self) -> int:
        return self.clock.offset_ps

    @property
    def drift(self) -> float:
        return self.clock.drift

    @property
    def aging_per_s(self) -> float:
        return self.clock.aging_per_s

    def _beyond_ps(self, t: np.ndarray) -> np.ndarray:
        beyond = self.noisy.noise_ps(t)
        if self.extra_ps is not None:
            beyond = beyond + self.extra_ps(t)
        return beyond

    def reading_ps(self, true_s) -> np.ndarray:
        t = np.asarray(true_s, dtype=np.float64)
        return self.clock.reading_ps(t) + self._beyond_ps(t)

    def to_clock_ps(self, true_s, jitter_ps=None) -> np.ndarray:
        return stored_reading_ps(self.offset_ps, self.reading_ps(true_s), jitter_ps)

    def true_time_s(self, clock_ps) -> np.ndarray:
        """Inverse of the reading: the deterministic inverse, then Newton steps for the
        noise and the relativistic offset (both change by < 1e-9 of a second per second,
        so each step gains nine orders: three leave far below a femtosecond)."""
        elapsed = (np.asarray(clock_ps, dtype=np.int64) - self.offset_ps).astype(np.float64)
        t = self.clock.true_time_s(clock_ps)
        for _ in range(3):
            rate_ps = PS_PER_S * (1.0 + self.drift + self.aging_per_s * t)
            t = t - (self.reading_ps(t) - elapsed) / rate_ps
        return t

    def to_json(self) -> dict:
        return self.clock.to_json() | {"noise": "power-law (timetransfer profile)"}
