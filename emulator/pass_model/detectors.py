"""Ground receiver: passive basis choice (beam splitter), polarising beam splitters and four
single-photon detectors H, V, D, A (channels 0..3, docs/formats.md), each with efficiency,
dark counts, background, dead time, afterpulsing and timing jitter.

Photons of a slot that reach the receiver split independently over the detectors (a
Poisson source stays Poisson under thinning), so detector j sees Poisson(mu * eta * q_j)
with q_j from `channel_fractions`. Polarisation misalignment sends a fraction
`misalignment_error` of each basis' photons to the wrong detector: the intrinsic QBER.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHANNEL_NAMES = {0: "H", 1: "V", 2: "D", 3: "A"}
KIND_PHOTON = 0
KIND_NOISE = 1  # dark count or background
KIND_AFTERPULSE = 2


@dataclass(frozen=True)
class Receiver:
    efficiency: tuple[float, float, float, float]
    dark_count_hz: tuple[float, float, float, float]
    background_hz: tuple[float, float, float, float]
    dead_time_ps: int
    afterpulse_probability: float
    afterpulse_time_constant_ps: float
    jitter_ps_rms: float  # detector + tagger + pulse width, Gaussian
    misalignment_error: float
    z_split: float = 0.5  # probability that a photon goes to the Z (H/V) analyser

    def channel_fractions(self, basis_x: np.ndarray, bit: np.ndarray) -> np.ndarray:
        """q[n, j]: probability that one photon sent as (basis, bit) is detected by j."""
        e = self.misalignment_error
        basis_x = np.asarray(basis_x, dtype=bool)
        bit = np.asarray(bit, dtype=bool)
        eff = np.asarray(self.efficiency)
        q = np.empty((basis_x.size, 4))
        # Z analyser (H=0, V=1), X analyser (D=2, A=3). In the matching basis the photon
        # reaches the bit's detector with 1-e; in the other basis it splits 50/50.
        p_h = np.where(basis_x, 0.5, np.where(bit, e, 1 - e))
        p_d = np.where(basis_x, np.where(bit, e, 1 - e), 0.5)
        q[:, 0] = self.z_split * p_h * eff[0]
        q[:, 1] = self.z_split * (1 - p_h) * eff[1]
        q[:, 2] = (1 - self.z_split) * p_d * eff[2]
        q[:, 3] = (1 - self.z_split) * (1 - p_d) * eff[3]
        return q

    @property
    def noise_hz(self) -> np.ndarray:
        return np.asarray(self.dark_count_hz) + np.asarray(self.background_hz)

    @property
    def mean_efficiency(self) -> float:
        return float(np.mean(self.efficiency))


def apply_dead_time(time_ps: np.ndarray, dead_time_ps: int) -> np.ndarray:
    """Keep-mask for one channel's sorted times: an event within the dead time of the
    last *kept* event is lost. Only events closer than the dead time to their predecessor
    can be lost, and those are rare, so they are walked one by one."""
    keep = np.ones(time_ps.size, dtype=bool)
    if time_ps.size < 2 or dead_time_ps <= 0:
        return keep
    close = np.flatnonzero(np.diff(time_ps) < dead_time_ps) + 1
    if close.size == 0:
        return keep
    times = time_ps.tolist()
    last_kept = 0
    for index in close.tolist():
        if keep[index - 1]:  # events not in `close` are always kept; others decided already
            last_kept = times[index - 1]
        if times[index] - last_kept < dead_time_ps:
            keep[index] = False
    return keep


def zero_truncated_poisson(lam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Samples of Poisson(lam) conditioned on >= 1, by inverse CDF (exact)."""
    lam = np.asarray(lam, dtype=np.float64)
    u = rng.random(lam.size) * -np.expm1(-lam)  # uniform on (0, P(N >= 1))
    out = np.zeros(lam.size, dtype=np.int64)
    term = lam * np.exp(-lam)  # P(N = 1)
    cumulative = term.copy()
    k = 1
    pending = np.ones(lam.size, dtype=bool)
    while pending.any() and k < 200:
        hit = pending & (u <= cumulative)
        out[hit] = k
        pending &= ~hit
        k += 1
        term = term * lam / k
        cumulative = cumulative + term
    out[pending] = k  # rounding leftovers: the tail beyond the loop
    return out
