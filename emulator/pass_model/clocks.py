"""Clocks of the two sides. True time T is seconds after the pass's `utc_start` (GPS time,
which both PPS signals mark). A clock reads

    clock_ps(T) = offset_ps + T * 1e12 * (1 + drift) + T^2 * 1e12 * aging_per_s / 2

and is stored as int64 picoseconds. float64 carries T * 1e12 (<= ~1e15 for a pass) to
0.1 ps, below any jitter modelled here; offsets stay integers so large values stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PS_PER_S = 1e12


def stored_reading_ps(offset_ps: int, reading_ps, jitter_ps=None) -> np.ndarray:
    """A clock's reading as stored: int64 ps, offset_ps plus the float64 reading relative
    to it (with the tagger's jitter, when given) rounded; every clock model's to_clock_ps."""
    if jitter_ps is not None:
        reading_ps = reading_ps + jitter_ps
    return offset_ps + np.rint(reading_ps).astype(np.int64)


@dataclass(frozen=True)
class Clock:
    name: str
    offset_ps: int  # reading at T = 0
    drift: float  # fractional frequency offset (dimensionless)
    aging_per_s: float = 0.0  # fractional frequency change per second

    def reading_ps(self, true_s) -> np.ndarray:
        """Exact (noise-free) reading, float64 picoseconds relative to offset_ps."""
        t = np.asarray(true_s, dtype=np.float64)
        return t * PS_PER_S * (1.0 + self.drift + 0.5 * self.aging_per_s * t)

    def to_clock_ps(self, true_s, jitter_ps=None) -> np.ndarray:
        return stored_reading_ps(self.offset_ps, self.reading_ps(true_s), jitter_ps)

    def true_time_s(self, clock_ps) -> np.ndarray:
        """Inverse of the noise-free reading (Newton step for the aging term)."""
        elapsed = (np.asarray(clock_ps, dtype=np.int64) - self.offset_ps).astype(np.float64)
        t = elapsed / PS_PER_S / (1.0 + self.drift)
        for _ in range(3):
            if self.aging_per_s == 0.0:
                break
            rate = PS_PER_S * (1.0 + self.drift + self.aging_per_s * t)
            t = t - (self.reading_ps(t) - elapsed) / rate
        return t

    def to_json(self) -> dict:
        return {
            "offset_ps": int(self.offset_ps),
            "drift": self.drift,
            "aging_per_s": self.aging_per_s,
        }


def pps_true_times_s(utc_start_fraction_s: float, t_end_s: float, margin_s: float = 2.0):
    """True times (s after utc_start) of the UTC second marks from -margin to end+margin.
    `utc_start_fraction_s` is the fractional second of utc_start."""
    first = np.ceil(-margin_s + utc_start_fraction_s)
    marks = np.arange(first, t_end_s + margin_s + utc_start_fraction_s)
    return marks - utc_start_fraction_s
