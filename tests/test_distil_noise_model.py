"""Bob's prior on each key bit's error probability from public detection rates
(host/distil/noise_model.py): the noise shares it computes, and the model's error rates,
entropy and LLRs. Its effect on reconciliation is in tests/test_distil_reconcile.py."""

import math

import numpy as np
import pytest

from host.distil.finite_key import binary_entropy
from host.distil.noise_model import BitErrorModel, DetectionRates, noise_shares

WINDOW = 4_000_000  # slots


def _detections(rng, intensities, probabilities, noise_per_slot, signal_per_photon):
    """Sorted (slots, classes) of a pass of len(signal_per_photon) windows: each slot is
    sent in class k with probabilities[k] and clicks with Y0 + eta_w mu_k, Poisson-thin
    enough that a slot clicks at most once."""
    slots, classes = [], []
    for w, eta in enumerate(signal_per_photon):
        for k, (mu, p) in enumerate(zip(intensities, probabilities, strict=True)):
            clicks = rng.poisson(WINDOW * p * (noise_per_slot + eta * mu))
            slots.append(w * WINDOW + rng.integers(0, WINDOW, clicks))
            classes.append(np.full(clicks, k))
    slots, classes = np.concatenate(slots), np.concatenate(classes)
    order = np.argsort(slots, kind="stable")
    return slots[order], classes[order]


def test_each_detection_gets_its_class_and_windows_share_of_noise_clicks():
    """Micius-like classes (0.8 / 0.1 / vacuum at 0.5 / 0.25 / 0.25) and a link whose
    signal yield falls 10x over the pass: every detection's share is Y0 / (Y0 + eta mu_k)
    of its own window, within the counts' spread, and a vacuum detection is all noise."""
    rng = np.random.default_rng(5)
    mu, p = [0.8, 0.1, 0.0], [0.5, 0.25, 0.25]
    noise, etas = 1e-4, [3e-3, 1e-3, 3e-4]
    slots, classes = _detections(rng, mu, p, noise, etas)
    shares = noise_shares(slots, classes, mu, p, WINDOW)
    window = (slots - slots.min()) // WINDOW
    assert np.all(shares[classes == 2] == 1.0)
    for w, eta in enumerate(etas):
        for k in (0, 1):
            expected = noise / (noise + eta * mu[k])
            got = shares[(window == w) & (classes == k)]
            assert np.ptp(got) == 0  # one share per class and window
            assert got[0] == pytest.approx(expected, rel=0.3), (w, k)
    # each class's share grows as the link weakens; in a window the signal's is smallest
    for k in (0, 1):
        per_window = [shares[(window == w) & (classes == k)][0] for w in range(3)]
        assert per_window[0] < per_window[1] < per_window[2]
    for w in range(3):
        in_window = window == w
        assert shares[in_window & (classes == 0)][0] < shares[in_window & (classes == 1)][0]


def test_without_a_vacuum_class_the_noise_is_extrapolated_from_the_two_weakest():
    """A one-decoy source (Rusca: mu 0.5 and 0.1, no vacuum): Y0 from the line through the
    two classes' rates at mu 0."""
    rng = np.random.default_rng(6)
    mu, p = [0.5, 0.1], [0.7, 0.3]
    noise, eta = 5e-5, 4e-4
    slots, classes = _detections(rng, mu, p, noise, [eta] * 4)
    shares = noise_shares(slots, classes, mu, p, 4 * WINDOW)
    for k in (0, 1):
        assert shares[classes == k][0] == pytest.approx(noise / (noise + eta * mu[k]), rel=0.3)


def test_two_weakest_classes_of_one_intensity_extrapolate_from_the_next_distinct_one():
    """A profile whose two weakest classes share a mean photon number (0.5 / 0.1 / 0.1,
    which rusca2018's check lets through): the line to mu 0 goes through the weakest and
    the next distinct intensity, not 0 / 0 (which gave every window shares of all 0 or all
    1, and a division warning)."""
    rng = np.random.default_rng(3)
    mu, p = [0.5, 0.1, 0.1], [0.5, 0.25, 0.25]
    noise, eta = 5e-5, 4e-4
    slots, classes = _detections(rng, mu, p, noise, [eta] * 4)
    with np.errstate(all="raise"):
        shares = noise_shares(slots, classes, mu, p, 4 * WINDOW)
    for k in range(3):
        expected = noise / (noise + eta * mu[k])
        assert shares[classes == k][0] == pytest.approx(expected, rel=0.3), k


def test_classes_outside_the_intensities_are_refused_and_a_huge_span_is_cheap():
    with pytest.raises(ValueError, match="intensity classes outside"):
        noise_shares(np.arange(3), np.array([0, 1, 2]), [0.5, 0.1], [0.5, 0.5], 10)
    # two detections 2^62 slots apart: two windows, not 2^62 / window_slots of them
    shares = noise_shares(np.array([0, 2**62]), np.array([0, 1]), [0.5, 0.0], [0.5, 0.5], 10)
    assert shares.tolist() == [0.0, 1.0]


def test_counts_added_block_by_block_give_the_shares_of_all_the_detections_so_far():
    """DetectionRates fed block by block gives the same numbers as noise_shares over
    every detection added so far, at every point (a window still filling included),
    empty blocks and all."""
    rng = np.random.default_rng(7)
    mu, p = [0.8, 0.1, 0.0], [0.5, 0.25, 0.25]
    slots, classes = _detections(rng, mu, p, 1e-4, [3e-3, 1e-3, 3e-4])
    slots = slots + 123_456_789  # the windows start at the first detection, not slot 0
    counts = DetectionRates(mu, p, WINDOW)
    assert counts.shares(slots[:5], classes[:5]).tolist() == [0.0] * 5  # nothing added yet
    cuts = np.sort(rng.integers(0, slots.size, 12))
    cuts = np.concatenate([[0], cuts, cuts[-1:], [slots.size]])  # an empty block too
    for start, end in zip(cuts[:-1], cuts[1:], strict=True):
        counts.add(slots[start:end], classes[start:end])
        if end == 0:
            continue
        every = noise_shares(slots[:end], classes[:end], mu, p, WINDOW)
        at = np.sort(rng.choice(end, min(end, 5000), replace=False))
        assert np.array_equal(counts.shares(slots[at], classes[at]), every[at])


def test_no_detections_or_a_single_class_give_no_shares():
    assert noise_shares(np.zeros(0, int), np.zeros(0, int), [0.8, 0.0], [0.5, 0.5], 10).size == 0
    shares = noise_shares(np.arange(10), np.zeros(10, int), [0.8], [1.0], 5)
    assert np.all(shares == 0)


def test_the_model_keeps_the_block_qber_and_lowers_the_syndrome_it_needs():
    """The bits' error rates average to the measured QBER; their mean entropy is below
    h(q) (a mixture of channels needs less syndrome than the average one); a vacuum bit
    gets no confidence at all; without shares the model is the binary symmetric channel."""
    share = np.concatenate([np.full(900, 0.01), np.full(80, 0.1), np.full(20, 1.0)])
    model = BitErrorModel(share)
    q = 0.03
    p = model.error_rates(q)
    assert p.mean() == pytest.approx(q)
    assert np.all(p[-20:] == 0.5)
    assert model.llr_magnitudes(q)[-1] == pytest.approx(0.0, abs=1e-6)
    assert model.entropy(q) < 0.9 * binary_entropy(q)
    bsc = BitErrorModel(None)
    assert bsc.error_rates(q) == q
    assert bsc.entropy(q) == binary_entropy(q)
    assert bsc.llr_magnitudes(q) == math.log((1 - q) / q)
    assert BitErrorModel(np.zeros(10)).level is None  # all-zero shares: the same channel


def test_a_block_cleaner_than_its_noise_clicks_allow_keeps_the_shape_and_a_floor():
    """Shares that claim more noise than the QBER holds (a stale window, say): the optics'
    rate is floored at a tenth of q instead of going negative, so every bit keeps an
    error probability in (0, 1/2] and a finite LLR, and the noisier bit the larger one."""
    for share in (np.full(100, 0.5), np.repeat([0.0, 1.0], 50)):
        model = BitErrorModel(share)
        p = model.error_rates(0.01)
        assert np.all((p > 0) & (p <= 0.5))
        assert np.all(np.isfinite(model.llr_magnitudes(0.01)))
    assert p[0] == pytest.approx(0.001) and p[-1] == 0.5


def _stream_bob_state(slots, classes, mu, p, window_slots):
    """What StreamBob._chunk_noise_shares reads: the sifted slots and classes so far."""
    from types import SimpleNamespace

    from host.distil.stream import StreamBob, _Growing

    state = SimpleNamespace(_sifted_slot=_Growing(np.int64), _sifted=SimpleNamespace())
    state._sifted.intensity = _Growing(np.uint8)
    state._sifted_slot.extend(slots)
    state._sifted.intensity.extend(classes)
    state._rates_parameters = lambda: (mu, p, window_slots)
    return lambda idx: StreamBob._chunk_noise_shares(state, idx)


def test_a_stream_chunks_shares_do_not_depend_on_what_was_sifted_after_it():
    """A chunk's bits get the same shares whether Bob reconciles it at once or after
    more blocks were sifted (whose detections share the chunk's last window): the leak
    and the key must not depend on timing. Windows the chunk spans entirely give the
    shares of the whole pass's count."""
    rng = np.random.default_rng(8)
    mu, p = [0.8, 0.1, 0.0], [0.5, 0.25, 0.25]
    slots, classes = _detections(rng, mu, p, 1e-4, [3e-3, 1e-3, 3e-4, 2e-4])
    chunk = np.flatnonzero((slots >= WINDOW // 2) & (slots < 5 * WINDOW // 2))
    upto = chunk[-1] + 1
    early = _stream_bob_state(slots[:upto], classes[:upto], mu, p, WINDOW)(chunk)
    late = _stream_bob_state(slots, classes, mu, p, WINDOW)(chunk)
    assert np.array_equal(early, late)
    # exactly the post-pass shares of what was sifted up to the chunk's last bit: its
    # first window counted from the window's start (slots[0], the origin, a detection),
    # its last one up to and with that bit
    upto_then = noise_shares(slots[:upto], classes[:upto], mu, p, WINDOW, origin=int(slots[0]))
    assert np.array_equal(early, upto_then[chunk])
    whole = noise_shares(slots, classes, mu, p, WINDOW, origin=int(slots[0]))
    full_window = slots[chunk] < 2 * WINDOW  # windows 0 (the chunk starts mid-way) and 1
    assert np.array_equal(early[full_window], whole[chunk][full_window])
    assert not np.array_equal(early, whole[chunk])  # the last window: only up to the chunk
