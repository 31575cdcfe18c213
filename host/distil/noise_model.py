"""Bob's prior on each key bit's error probability, from public detection rates.

A sifted detection is either a photon of Alice's pulse, wrong with the rate e_d that the
optics leave (misalignment), or a noise click (background light, dark count, afterpulse),
whose bit is random: wrong half the time. The share of noise clicks differs by orders of
magnitude between Alice's intensity classes (vacuum pulses: all noise; the weak decoy
several times the signal's) and along a pass, as the link loss changes. Alice announces
every detection's intensity class at sifting (the decoy-state bounds need it), so Bob
computes each detection's noise share from the detection rates alone (`noise_shares`) and
decodes with it (`BitErrorModel`): he trusts a signal bit more than a decoy bit, and a
vacuum bit not at all, where a binary symmetric channel at the block's QBER trusts them
all alike. The syndrome a block needs then falls from h(q) per bit toward the mean of the
bits' own h(p_i): measured on simulated passes in docs/distillation.md, "Decoding with
the detections' noise shares". Nothing of it is sent: it only changes Bob's decoder and
the top-up and retry steps he asks for, which are counted in the leak as they are
revealed; a wrong prior costs decoder work or leak, never correctness (the frames are
checked by their tags)."""

from __future__ import annotations

import math

import numpy as np

from host.distil.finite_key import binary_entropy

# Detections are counted per class in windows of this much pass time: long enough for
# ~100 vacuum-class detections at micius-2017's rates (~15 a second sifted), short
# enough to follow the link loss (a few dB a minute away from culmination).
NOISE_WINDOW_S = 10.0


def noise_shares(
    slots: np.ndarray,
    classes: np.ndarray,
    intensities: list[float],
    probabilities: list[float],
    window_slots: int,
) -> np.ndarray:
    """Each detection's probability of being a noise click, from the detections alone.
    slots: the detections' slot numbers; classes: their intensity class (index into
    intensities, the mean photon numbers, and probabilities, each class's share of the
    slots). In a window of `window_slots` slots (from the first detection), class k's
    detections per slot it was sent in are r_k = n_k / p_k = Y0 + (signal of mean mu_k),
    Y0 the noise clicks per slot, the same for every class (they do not depend on what
    Alice sent); Y0 is the rate of a vacuum class (mu 0), else extrapolated linearly to
    mu 0 from the two weakest distinct intensities (the signal's yield is linear in mu at
    satellite losses); classes outside the intensities are a ValueError. A detection's
    share is Y0 / r_k of its class and window, within [0, 1]. Any set of detections whose
    basis choice does not depend on the class (the sifted ones, say) gives the same
    ratios. NoiseCounts gives the same numbers from counts added block by block."""
    slots = np.asarray(slots, dtype=np.int64)
    classes = _checked_classes(classes, len(intensities), slots.size)
    mu = np.asarray(intensities, dtype=np.float64)
    if slots.size == 0 or _weakest_two(mu) is None:
        return np.zeros(slots.size, dtype=np.float64)
    window = (slots - slots.min()) // max(1, int(window_slots))
    if int(window.max()) >= slots.size:  # sparse windows (a huge span): number those used
        window = np.unique(window, return_inverse=True)[1].reshape(-1)
    windows = int(window.max()) + 1
    counts = np.bincount(window * mu.size + classes, minlength=windows * mu.size)
    counts = counts.reshape(windows, mu.size)
    return _shares(counts, window, classes, mu, np.asarray(probabilities, dtype=np.float64))


class NoiseCounts:
    """The detections' counts per intensity class and window of `window_slots` slots from
    the first slot added, added to block by block, and the noise shares they give: the
    stream's, whose sifted slots only grow, so that a chunk's shares cost its own bits and
    the blocks' new detections, not every detection sifted so far (noise_shares over
    those: 0.2-0.5 s and ~250 MB of temporaries a chunk at 10 M). For detections added in
    increasing slot order, shares(slots, classes) of any of them is noise_shares of all
    of them at those detections (of a slot never added, whose window may hold no count:
    1)."""

    def __init__(self, intensities: list[float], probabilities: list[float], window_slots: int):
        self.mu = np.asarray(intensities, dtype=np.float64)
        self.p = np.asarray(probabilities, dtype=np.float64)
        self.window_slots = max(1, int(window_slots))
        self.first = None  # the first slot added: the windows start there
        self.counts = {}  # window -> detections per class

    def _windows(self, slots, classes):
        """(the windows used, each detection's index among them, its class)."""
        slots = np.asarray(slots, dtype=np.int64)
        classes = _checked_classes(classes, self.mu.size, slots.size)
        window = (slots - self.first) // self.window_slots
        used, inverse = np.unique(window, return_inverse=True)
        return used.tolist(), inverse.reshape(-1), classes

    def add(self, slots, classes) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        if slots.size == 0:
            return
        if self.first is None:
            self.first = int(slots.min())
        used, inverse, classes = self._windows(slots, classes)
        k = self.mu.size
        added = np.bincount(inverse * k + classes, minlength=len(used) * k).reshape(-1, k)
        for window, row in zip(used, added, strict=True):
            self.counts[window] = self.counts.get(window, 0) + row

    def shares(self, slots, classes) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64)
        if slots.size == 0 or self.first is None or _weakest_two(self.mu) is None:
            _checked_classes(classes, self.mu.size, slots.size)
            return np.zeros(slots.size, dtype=np.float64)
        used, inverse, classes = self._windows(slots, classes)
        none = np.zeros(self.mu.size, dtype=np.int64)
        counts = np.array([self.counts.get(w, none) for w in used], dtype=np.int64)
        return _shares(counts, inverse, classes, self.mu, self.p)


def _checked_classes(classes, count: int, size: int) -> np.ndarray:
    classes = np.asarray(classes, dtype=np.int64)
    if classes.size != size:
        raise ValueError(f"noise shares: {classes.size} classes for {size} slots")
    if size and (classes.min() < 0 or classes.max() >= count):
        raise ValueError(f"noise shares: intensity classes outside [0, {count})")
    return classes


def _weakest_two(mu: np.ndarray):
    """The weakest class and the weakest of those above it (two classes of one mean photon
    number give no line to extrapolate), or None: all of one mean photon number."""
    if mu.size < 2:
        return None
    order = np.argsort(mu, kind="stable")
    distinct = order[mu[order] > mu[order[0]]]
    return None if distinct.size == 0 else (int(order[0]), int(distinct[0]))


def _shares(counts, window, classes, mu, p) -> np.ndarray:
    """Each detection's share from the counts (windows x classes) of its window."""
    weakest, next_weakest = _weakest_two(mu)
    rate = counts.astype(np.float64) / p[None, :]
    if mu[weakest] == 0.0:
        noise = rate[:, weakest]
    else:
        slope = (rate[:, next_weakest] - rate[:, weakest]) / (mu[next_weakest] - mu[weakest])
        noise = rate[:, weakest] - slope * mu[weakest]
    noise = np.maximum(noise, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_class = np.where(rate > 0, noise[:, None] / rate, 1.0)
    return np.clip(per_class[window, classes], 0.0, 1.0)


class BitErrorModel:
    """Bob's prior on each key bit's error probability. Without `noise_share` every bit
    errs with the block's QBER q (a binary symmetric channel). With it, bit i's detection
    was a noise click (background, dark count: a random bit) with probability
    noise_share[i], public from the detection rates of its intensity class around its time
    (see noise_shares), and otherwise a photon that errs with the rate e_d left to the
    optics: p_i = e_d + (1/2 - e_d) noise_share[i], e_d such that the mean of p_i is q.
    Bob's decoder then trusts a signal-pulse bit more than a weak-decoy one and a
    vacuum-pulse bit not at all, and the syndrome a block needs falls from h(q) per bit
    toward the mean of h(p_i). Bob's alone: nothing of it is sent, and a wrong prior costs
    only decoder work or leak, which is counted as it is revealed."""

    def __init__(self, noise_share: np.ndarray | None):
        self.share = None
        if noise_share is not None:
            share = np.clip(np.asarray(noise_share, dtype=np.float64), 0.0, 1.0)
            if share.size and share.max() > 0:
                self.share = share

    def error_rates(self, q: float):
        if self.share is None:
            return q
        mean_share = float(self.share.mean())
        e_d = (q - 0.5 * mean_share) / max(1e-9, 1.0 - mean_share)
        # a block cleaner than its noise clicks allow: noise overestimated; keep its shape
        e_d = min(max(e_d, 0.1 * q), 0.5)
        return e_d + (0.5 - e_d) * self.share

    def entropy(self, q: float) -> float:
        """Bits of syndrome per key bit at the Shannon limit: h(q), or the mean of h(p_i)."""
        p = self.error_rates(q)
        if np.ndim(p) == 0:
            return binary_entropy(float(p))
        p = np.clip(p, 1e-12, 0.5)
        return float(np.mean(-p * np.log2(p) - (1 - p) * np.log2(1 - p)))

    def llr_magnitudes(self, q: float):
        p = self.error_rates(q)
        if np.ndim(p) == 0:
            return math.log((1 - p) / p)
        p = np.clip(p, 1e-9, 0.5)
        return np.log((1 - p) / p).astype(np.float32)
