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


DENSE_WINDOWS = 1 << 16  # spans of more windows number only those they use (a sort)


class DetectionRates:
    """Detections counted per intensity class in windows of `window_slots` slots, as they
    arrive (`add`), and each detection's noise share from those counts (`shares`). The
    windows are numbered from `origin` (default the first detection added); only windows
    that hold detections are kept (a dict), so a huge slot span costs nothing.

    In a window, class k's detections per slot it was sent in are r_k = n_k / p_k = Y0 +
    (signal of mean mu_k), Y0 the noise clicks per slot, the same for every class (they
    do not depend on what Alice sent); Y0 is the rate of a vacuum class (mu 0), else
    extrapolated linearly to mu 0 from the weakest and the next distinct intensity (the
    signal's yield is linear in mu at satellite losses). A detection's share is Y0 / r_k
    of its class and window, within [0, 1]. Any set of detections whose basis choice does
    not depend on the class (the sifted ones, say) gives the same ratios."""

    def __init__(
        self,
        intensities: list[float],
        probabilities: list[float],
        window_slots: int,
        origin: int | None = None,
    ):
        self.mu = np.asarray(intensities, dtype=np.float64)
        self.p = np.asarray(probabilities, dtype=np.float64)
        self.window_slots = max(1, int(window_slots))
        self.origin = origin  # the first window's first slot (default: the first added)
        self.rows: dict[int, int] = {}  # window number -> row of counts
        self.counts = np.zeros((0, self.mu.size), dtype=np.int64)
        # the weakest class and the weakest of those above it (two classes of one mean
        # photon number give no line to extrapolate); all of one mean photon number, or a
        # single class: no shares
        order = np.argsort(self.mu, kind="stable")
        distinct = order[self.mu[order] > self.mu[order[0]]] if self.mu.size else order
        self.pair = (int(order[0]), int(distinct[0])) if distinct.size else None

    def _windows(self, slots: np.ndarray, classes: np.ndarray):
        """(unique windows, index of each detection's window among them)."""
        if classes.size and (classes.min() < 0 or classes.max() >= self.mu.size):
            raise ValueError(f"noise_shares: intensity classes outside [0, {self.mu.size})")
        window = (slots - self.origin) // self.window_slots
        first, last = int(window.min()), int(window.max())
        if last - first < DENSE_WINDOWS:  # a pass: every window in its span, no sort
            return np.arange(first, last + 1), window - first
        return np.unique(window, return_inverse=True)

    def add(self, slots, classes) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        classes = np.asarray(classes)
        if slots.size == 0 or self.pair is None:
            return
        if self.origin is None:
            self.origin = int(slots.min())
        windows, inverse = self._windows(slots, classes)
        for w in windows.tolist():
            self.rows.setdefault(w, len(self.rows))
        if len(self.rows) > self.counts.shape[0]:
            grown = np.zeros((len(self.rows), self.mu.size), dtype=np.int64)
            grown[: self.counts.shape[0]] = self.counts
            self.counts = grown
        row = np.array([self.rows[w] for w in windows.tolist()], dtype=np.int64)[inverse]
        k = self.mu.size
        self.counts += np.bincount(
            row.reshape(-1) * k + classes, minlength=self.counts.size
        ).reshape(self.counts.shape)

    def shares(self, slots, classes) -> np.ndarray:
        """The noise share of each of these detections (added before); 0 for one whose
        window holds no detection, or when the classes give no shares."""
        slots = np.asarray(slots, dtype=np.int64)
        classes = np.asarray(classes)
        if slots.size == 0 or self.pair is None or self.origin is None:
            return np.zeros(slots.size, dtype=np.float64)
        windows, inverse = self._windows(slots, classes)
        row = np.array([self.rows.get(w, -1) for w in windows.tolist()], dtype=np.int64)
        row = row[inverse.reshape(-1)]
        rate = self.counts / self.p[None, :]
        weakest, next_weakest = self.pair
        if self.mu[weakest] == 0.0:
            noise = rate[:, weakest]
        else:
            rise = rate[:, next_weakest] - rate[:, weakest]
            noise = (
                rate[:, weakest]
                - rise / (self.mu[next_weakest] - self.mu[weakest]) * (self.mu[weakest])
            )
        noise = np.maximum(noise, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            per_class = np.clip(np.where(rate > 0, noise[:, None] / rate, 1.0), 0.0, 1.0)
        # a window never added gets the row past the last, all 0 (no shares)
        row[row < 0] = per_class.shape[0]
        table = np.concatenate([per_class, np.zeros((1, self.mu.size))]).ravel()
        return table[row * self.mu.size + classes]


def noise_shares(
    slots: np.ndarray,
    classes: np.ndarray,
    intensities: list[float],
    probabilities: list[float],
    window_slots: int,
    origin: int | None = None,
) -> np.ndarray:
    """Each detection's probability of being a noise click, from the detections alone
    (DetectionRates over all of them, windows from `origin`, default the first slot).
    slots: the detections' slot numbers; classes: their intensity class (index into
    intensities, the mean photon numbers, and probabilities, each class's share of the
    slots); classes outside the intensities are a ValueError."""
    rates = DetectionRates(intensities, probabilities, window_slots, origin)
    rates.add(slots, classes)
    return rates.shares(slots, classes)


# Bob's model evaluates its error rates on this many levels of the noise share (the
# shares take a few hundred values: classes x windows), so that its entropy and LLRs
# cost one pass over the levels and one gather, not logarithms of every bit of a block
# (0.66 s a call on a 5.8 M-bit jinan-1 block, several calls a block). The levels are
# 1.5e-5 apart: a bit's error rate moves by at most 8e-6.
SHARE_LEVELS = 1 << 16


class BitErrorModel:
    """Bob's prior on each key bit's error probability. Without `noise_share` every bit
    errs with the block's QBER q (a binary symmetric channel). With it, bit i's detection
    was a noise click (background, dark count: a random bit) with probability
    noise_share[i], public from the detection rates of its intensity class around its time
    (see DetectionRates), and otherwise a photon that errs with the rate e_d left to the
    optics: p_i = e_d + (1/2 - e_d) noise_share[i], e_d such that the mean of p_i is q.
    Bob's decoder then trusts a signal-pulse bit more than a weak-decoy one and a
    vacuum-pulse bit not at all, and the syndrome a block needs falls from h(q) per bit
    toward the mean of h(p_i). Bob's alone: nothing of it is sent, and a wrong prior costs
    only decoder work or leak, which is counted as it is revealed. The shares are taken
    on SHARE_LEVELS levels."""

    def __init__(self, noise_share: np.ndarray | None):
        self.level = None  # each bit's share level, or None: a binary symmetric channel
        if noise_share is not None:
            share = np.clip(np.asarray(noise_share, dtype=np.float64), 0.0, 1.0)
            if share.size and share.max() > 0:
                self.level = np.rint(share * (SHARE_LEVELS - 1)).astype(np.uint16)
                self.bits_at_level = np.bincount(self.level, minlength=SHARE_LEVELS)
                self.shares = np.arange(SHARE_LEVELS) / (SHARE_LEVELS - 1)

    def _level_rates(self, q: float) -> np.ndarray:
        """The error probability of a bit at each share level."""
        mean_share = float(self.bits_at_level @ self.shares) / self.level.size
        e_d = (q - 0.5 * mean_share) / max(1e-9, 1.0 - mean_share)
        # a block cleaner than its noise clicks allow: noise overestimated; keep its shape
        e_d = min(max(e_d, 0.1 * q), 0.5)
        return e_d + (0.5 - e_d) * self.shares

    def error_rates(self, q: float):
        """q, or each bit's error probability."""
        if self.level is None:
            return q
        return self._level_rates(q)[self.level]

    def entropy(self, q: float) -> float:
        """Bits of syndrome per key bit at the Shannon limit: h(q), or the mean of h(p_i)."""
        if self.level is None:
            return binary_entropy(q)
        p = np.clip(self._level_rates(q), 1e-12, 0.5)
        h = -p * np.log2(p) - (1 - p) * np.log2(1 - p)
        return float(self.bits_at_level @ h) / self.level.size

    def llr_magnitudes(self, q: float):
        """Each bit's |LLR|: log((1 - p) / p), a number for the binary symmetric channel."""
        if self.level is None:
            return math.log((1 - q) / q)
        p = np.clip(self._level_rates(q), 1e-9, 0.5)
        return np.log((1 - p) / p).astype(np.float32)[self.level]
