"""Which first-anchor attempts the stream makes (host/distil/stream.py
first_sync_attempts, docs/streaming.md "Keeping up at 10x jinan-1" and "A weak start
locks in its first second"): a bright pass is synchronised on its densest 5 ms (Alice's
window and the lag FFTs half as long as at 20 ms); a sparse one from 20 ms up, around the
orbit prediction first, over windows as long as Alice's slots asked allow, and over the
whole ranges only on the windows the FFT allows."""

from __future__ import annotations

import numpy as np

from host.distil import timesync
from host.distil.stream import (
    FIRST_SYNC_MAX_SLOTS,
    FIRST_SYNC_MAX_SPARSE_SLOTS,
    first_sync_attempts,
)

RATE_HZ = 625e6  # jinan-1's slot rate
BOTH, PREDICTED, FULL = ("predicted", "full"), ("predicted",), ("full",)


def _sync(prior: bool = True) -> timesync.Synchroniser:
    """A synchroniser of a 625 MHz pass; its orbit prediction is jinan-1's at its start
    (1,400 km, closing at 6.7 km/s: ~41,000 predicted lags)."""
    pass_json = {"slot_rate_hz": RATE_HZ, "intensities": {"mu": 0.8, "nu": 0.1, "omega": 0.0}}
    if prior:
        pass_json["predicted_geometry"] = {
            "t_s": [0.0, 1.0, 2.0, 3.0],
            "range_km": [1400.0, 1393.3, 1386.6, 1379.9],
            "range_rate_km_s": [-6.69, -6.68, -6.67, -6.66],
        }
    return timesync.Synchroniser(pass_json, channel=None)


def _arrivals(per_s: float, seconds: float) -> np.ndarray:
    """Detection times (s) of a steady rate, evenly spread (the counts are then exact)."""
    return 0.5 + np.arange(int(per_s * seconds)) / per_s


def _needed(predicted: int, full: int | None = None) -> dict:
    return {"predicted": predicted, "full": predicted if full is None else full}


def test_a_bright_pass_tries_its_densest_5_ms_first():
    # 10x jinan-1 at culmination, ~578,000 detections a second: ~2,900 in 5 ms
    attempts = first_sync_attempts(_sync(), _arrivals(578_000, 0.2), _needed(120), False)
    assert attempts[:2] == [(0.005, BOTH), (0.01, BOTH)], attempts


def test_a_weak_start_is_searched_around_the_prediction_over_longer_windows():
    # jinan-1's start, ~4,000 detections a second: 80 / 160 / 320 in 20 / 40 / 80 ms
    sync, t = _sync(), _arrivals(4_000, 1.0)
    attempts = first_sync_attempts(sync, t, _needed(120), False)
    # around the prediction, shortest first, up to the slots Alice may be asked for (her
    # sums over each detected slot's lags: at 160 ms 640 detections x ~41,000 lags, 26 M,
    # within FIRST_SYNC_MAX_SPARSE_SLOTS; at 320 ms 52 M, beyond it); then the whole
    # ranges on the windows whose FFT is allowed (at most 25 M slots of span: 40 ms)
    assert attempts == [(0.04, PREDICTED), (0.08, PREDICTED), (0.16, PREDICTED), (0.04, FULL)]
    assert sync.first_cost(t, 0.16, "predicted") == (sync.first_slots(t, 0.16, "predicted"), True)
    assert FIRST_SYNC_MAX_SLOTS < sync.first_slots(t, 0.16, "predicted")
    assert sync.first_slots(t, 0.16, "predicted") <= FIRST_SYNC_MAX_SPARSE_SLOTS
    assert sync.first_slots(t, 0.32, "predicted") > FIRST_SYNC_MAX_SPARSE_SLOTS
    # each search's own count after its misses
    assert first_sync_attempts(sync, t, _needed(300, 10_000), False) == [
        (0.08, PREDICTED),
        (0.16, PREDICTED),
    ]
    # no usable prediction: the whole ranges, as before
    assert first_sync_attempts(_sync(False), t, _needed(120), False) == [(0.04, FULL)]


def test_too_few_detections_make_no_attempt_until_loss_of_signal():
    t = _arrivals(500, 0.2)  # 100 detections in all
    assert first_sync_attempts(_sync(), t, _needed(120), False) == []
    # the last chance: the longest window of each search
    last = first_sync_attempts(_sync(), t, _needed(120), True)
    assert last[-1] == (0.04, FULL) and last[0][1] == PREDICTED, last
