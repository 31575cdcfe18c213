"""Which windows the stream's first anchor tries (host/distil/stream.py first_sync_window,
docs/streaming.md "Keeping up at 10x jinan-1"): a bright pass is synchronised on its
densest 5 ms (Alice's window and the lag FFTs half as long as at 20 ms), a sparse one as
before, from 20 ms up."""

from __future__ import annotations

import numpy as np

from host.distil.stream import first_sync_window

RATE_HZ = 625e6  # jinan-1's slot rate


def _arrivals(per_s: float, seconds: float) -> np.ndarray:
    """Detection times (s) of a steady rate, evenly spread (the counts are then exact)."""
    return np.arange(int(per_s * seconds)) / per_s


def test_a_bright_pass_tries_its_densest_5_ms_first():
    # 10x jinan-1 at culmination, ~578,000 detections a second: ~2,900 in 5 ms
    assert first_sync_window(_arrivals(578_000, 0.2), RATE_HZ, 120) == [0.005, 0.01, 0.02, 0.04]


def test_a_sparse_pass_starts_at_20_ms_as_before():
    # jinan-1 at culmination, ~58,000 a second: ~290 in 5 ms, under the 2,000 asked of it
    assert first_sync_window(_arrivals(58_000, 0.2), RATE_HZ, 120) == [0.02, 0.04]
    # after a miss the detections needed grow: a short window needs at least as many
    assert first_sync_window(_arrivals(578_000, 0.2), RATE_HZ, 4_000) == [0.01, 0.02, 0.04]
    # too few anywhere: no attempt yet
    assert first_sync_window(_arrivals(2_000, 0.2), RATE_HZ, 120) == []
