"""Time synchronisation (Bob's side): map ground detection times to Alice's slot indices.

Public help from Alice: the intensity class of slots Bob asks about (never bit values;
intensities of detected slots are announced in sifting anyway). Steps:

1. Clock: ground PPS marks UTC seconds, so a linear fit of PPS readings against their UTC
   second gives true time T (s after utc_start) for each detection (if no PPS: the ground
   clock is taken as T).
2. Prior: slot(T) ~ (T - delay) * slot_rate, the delay (light time plus the satellite
   clock's offset) unknown within [0, max_delay_s].
3. First anchor, at the densest window (near culmination, where the range rate and so
   the drift are smallest): the drift is found by maximising how tightly the detection
   times cluster at one phase within the slot (circular mean resultant length); the
   integer lag by FFT cross-correlation of the detections' slot comb with the mean photon
   number of the slots Alice revealed over the lag range. Both are searched first around
   the public orbit prediction (pass.json's predicted_geometry: light time and range
   rate, DelayPrior), then, if that finds no peak, over the whole ranges.
4. Tracking: windows every `step_s` outward in both directions; each predicts the offset
   from the anchors so far (quadratic), re-estimates the phase, and searches a small
   integer lag range with Alice's intensities of the candidate slots only.
5. Every detection gets slot = round(model(T)) from a smoothing spline through the
   anchors; it is assigned only when its timing residual is inside the gate.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numba
import numpy as np
import scipy.fft
import scipy.optimize
import scipy.special
from scipy.interpolate import PPoly, make_interp_spline

import host.distil.numba_cache  # noqa: F401 - numba's cache index locked among processes
from host.distil.bitcodec import unpack_2bit
from host.errors import ProtocolAborted

FIRST_WINDOW_S = 0.02
TRACK_WINDOW_S = 0.05
STEP_S = 0.5
MAX_DELAY_S = 0.012
TRACK_LAG_SLOTS = 12  # once the quadratic predictor has anchors to work from
FIRST_LAG_S = 0.4e-6  # lag search of the first tracking windows
SLOPE_SEARCH = 1e-6  # fractional drift searched around the prediction
PHASE_DETECTIONS = 2000
LAG_DETECTIONS = 400
MIN_DETECTIONS = 60
GATE_SLOTS = 0.35
MAX_DRIFT = 2.5e-5  # range rate up to ~6.8 km/s plus clock frequency offsets
FIRST_Z = 7.0
TRACK_Z = 5.0
# The acceleration is a difference of two anchors' slopes, each quantised by its search
# grid (first anchor 0.1 / FIRST_WINDOW_S = 5 slots/s, tracking 0.1 / TRACK_WINDOW_S =
# 2 slots/s): up to 3.5 slots/s apart with no acceleration at all. Divided by the anchors'
# separation it must stay small: from 0.25 s, at most 14 slots/s^2, i.e. 1.8 slots of
# offset one STEP_S on (TRACK_LAG_SLOTS searches 12). An edge window a few ms from the
# first anchor (first anchor in the data's second or second-to-last FIRST_WINDOW_S) gave
# ~190 slots/s^2 from 5.7 ms: every window on the other side predicted tens of slots off,
# none correlated, and two anchors 6 ms apart set the slots of a whole 2 s segment.
ACCEL_BASELINE_S = STEP_S / 2
# The first anchor's search around the public prediction (DelayPrior). The delay is the
# light time (pass.json's predicted_geometry) plus what the satellite's slot clock has
# drifted since slot 0 left at T ~ 0 (first_slot_ps in host/simulate/passgen.py: the
# first whole period of its clock after T = 0). Bounds, each far beyond the profiles'
# assumptions: the prediction's along-track timing error (profiles: 0.05 s, a day-old
# TLE), the slot clock's fractional frequency offset (profiles: 3e-8 OCXO, 5e-8 TCXO; a
# free-running TCXO is ~1e-6) and a fixed margin for what neither holds (equipment and
# troposphere delays, the PPS fit, the clock's noise: ns to a us).
PRIOR_ALONG_TRACK_S = 1.0
PRIOR_CLOCK_RATE = 1e-6
PRIOR_MARGIN_S = 10e-6
# A search over fewer lags meets fewer noise peaks: the predicted search's threshold gives
# a noise peak the chance FIRST_Z gives it among the whole range's lags (Gaussian tails:
# 6.3 among jinan-1's ~52 k predicted lags against 7.0 among its 7.5 M), never below
# PRIOR_Z_FLOOR (the correlation of a few hundred detections is only nearly Gaussian so
# far out). That rule is the fallback of a pass.json without intensity_probabilities;
# with them, the threshold is the exact one (NullCorrelation, FIRST_FALSE_PEAK). Every
# lock is still verified by the stream's probe.
PRIOR_Z_FLOOR = 6.0
# The first anchor's threshold, from the correlation's exact distribution at a wrong lag
# (NullCorrelation): a search of L lags locks on noise with probability at most
# FIRST_FALSE_PEAK (union bound over its lags: L x P(one wrong lag reaches it)). A false
# lock costs time, never a key (the stream's probe rejects it at >= 5 sigma), but one found
# around the prediction also turns the prediction off for the rest of the pass.
# The Gaussian z the rule above used is far from that distribution at jinan-1's weights
# (mean photon numbers 0.5 / 0.1 / 0 drawn 0.8 / 0.1 / 0.1: a sum of 0.5s with a few
# smaller values, whose upper tail is much lighter than a Gaussian's): on ~41 k predicted
# lags and 360 detections, z 6.23 stood for a chance of 6e-8 of a noise peak (not the
# ~1e-5 it was meant to give), and the true peak (z 7.2 +- 0.55 over realisations) fell
# below it in ~1 realisation of 30; now 5.91.
FIRST_FALSE_PEAK = 1e-6
# Up to this many detected slots the null distribution is enumerated exactly (every count
# of each weight: (n + 1)(n + 2) / 2 sums at 3 weights, 0.5 M at 1,000, ~0.1 s); above it,
# or with more than 3 distinct weights, a Chernoff bound (an upper bound on the chance: a
# slightly higher threshold, ~0.3 z at jinan-1's 700) where the peak is far above either.
NULL_EXACT_DETECTIONS = 1000
# The first anchor's correlation over Alice's whole window is summed lag run by lag run
# (detected slots x (lags + 1) additions) while that is at most this many additions a
# point of the FFT it replaces: an addition ~0.8 ns, a point of the FFT's three transforms
# ~55 ns (jinan-1's 20 ms window around the prediction, 1,426 slots x 33,340 lags against
# a 12.6 M-point FFT: 0.04 s against 0.7-1.8 s; docs/distillation.md, "Outside the decoder").
DIRECT_OPS_PER_FFT_POINT = 16
# The predicted search's lag correlation, computed slot by slot when that asks Alice for
# fewer slots than the FFT's window: each distinct detected slot's run of predicted lags
# (detections x lags) against the window's span plus the lags. At jinan-1's weak start
# (~4,000 detections a second, ~40 k predicted lags at 625 MHz) the densest 80 ms holds
# ~360 detections: 14 M slots, where its FFT window is 50 M. So a sparse start can
# integrate over windows longer than the FFT allows (stream.FIRST_SYNC_PREDICTED_WINDOWS_S).
# The predicted range acceleration bends the slots' phase over a long window (jinan-1:
# ~6 m/s^2 at its start, ~100 m/s^2 at culmination: 0.16 and 2.7 slots at the edges of a
# 320 ms window at 625 MHz). The predicted search takes it into account when its effect at
# the window's edges reaches ACCEL_IGNORED_SLOTS, else not: then the predicted search is the
# full search's subset exactly (the same anchor when both lock).
ACCEL_IGNORED_SLOTS = 0.01


def first_z_needed(lags: int, full_lags: int) -> float:
    """The z a first anchor's peak needs among `lags` lags (of a search of `full_lags`)."""
    if lags >= full_lags:
        return FIRST_Z
    # the normal tail and its inverse from scipy.special, which scipy.stats.norm.sf / isf
    # call (the same numbers): importing scipy.stats was ~0.3-0.6 s of every run's start
    chance = scipy.special.ndtr(-FIRST_Z) * full_lags / max(lags, 1)
    return max(PRIOR_Z_FLOOR, float(-scipy.special.ndtri(chance)))


class NullCorrelation:
    """The lag correlation at a wrong lag: the sum over n distinct detected slots of
    Alice's mean photon number of an unrelated pattern slot, each an independent draw of
    the intensity classes with pass.json's probabilities (as the symbol mapping's integer
    thresholds realise them). threshold(n, chance) is the sum that such a sum reaches
    with probability at most `chance`; z_needed puts it in the units of _zscore."""

    def __init__(self, weights, probabilities):
        merged: dict = {}
        for w, p in zip(weights, probabilities, strict=True):
            if p > 0:
                merged[float(w)] = merged.get(float(w), 0.0) + float(p)
        self.weights = np.array(sorted(merged, reverse=True))
        self.probabilities = np.array([merged[w] for w in self.weights])
        self.probabilities /= self.probabilities.sum()
        self.mean = float(self.probabilities @ self.weights)
        self.sd = float(np.sqrt(self.probabilities @ (self.weights - self.mean) ** 2))
        self._cache: dict = {}

    @classmethod
    def of(cls, pass_json: dict):
        """The pass's null distribution, or None without intensity_probabilities (then the
        Gaussian rule, first_z_needed)."""
        from host.protocol.symbols import SymbolMapping

        probabilities = pass_json.get("intensity_probabilities")
        names = list(pass_json.get("intensities") or {})
        if not isinstance(probabilities, dict) or set(probabilities) != set(names):
            return None
        try:
            mapping = SymbolMapping.from_probabilities(
                float(pass_json.get("basis_probability_z", 0.5)),
                [float(probabilities[n]) for n in names],
            )
        except (ValueError, TypeError):
            return None
        realised = mapping.realised_probabilities()[1]
        return cls(intensity_weights(pass_json)[: len(names)], realised)

    def threshold(self, n: int, chance: float) -> float:
        """The smallest sum of n slots that a wrong lag reaches with probability at most
        `chance` (inf: none, e.g. n slots too few to stand out at all)."""
        key = (int(n), float(chance))
        if key not in self._cache:
            exact = n <= NULL_EXACT_DETECTIONS and self.weights.size <= 3
            self._cache[key] = self._exact(n, chance) if exact else self._chernoff(n, chance)
        return self._cache[key]

    def z_needed(self, n: int, lags: int, chance: float = FIRST_FALSE_PEAK) -> float:
        """The z (_zscore's units) a peak among `lags` lags of n slots needs: no wrong lag
        of the search reaches it with probability above `chance` (union bound)."""
        if n < 1 or self.sd <= 0:
            return math.inf
        x = self.threshold(n, chance / max(lags, 1))
        return (x - n * self.mean) / (math.sqrt(n) * self.sd)

    def _exact(self, n: int, chance: float) -> float:
        w, p = self.weights, self.probabilities
        if w.size == 1:
            return math.inf
        counts = np.arange(n + 1)
        if w.size == 2:
            a, b = counts, n - counts
            c = np.zeros_like(a)
        else:
            a, b = (m.reshape(-1) for m in np.meshgrid(counts, counts, indexing="ij"))
            keep = a + b <= n
            a, b = a[keep], b[keep]
            c = n - a - b
        log_p = scipy.special.gammaln(n + 1) - scipy.special.gammaln(a + 1)
        log_p -= scipy.special.gammaln(b + 1) + scipy.special.gammaln(c + 1)
        log_p += a * math.log(p[0]) + b * math.log(p[1])
        if w.size == 3:
            log_p += c * math.log(p[2])
            total = a * w[0] + b * w[1] + c * w[2]
        else:
            total = a * w[0] + b * w[1]
        # counts far less likely than `chance` cannot move a tail near it: left out, their
        # whole mass (at most e^-40 chance x their number) is added to every tail (so it
        # stays an upper bound), and the sort below is over a few thousand sums
        small = log_p < math.log(chance) - 40.0
        dropped = float(np.exp(log_p[small]).sum())
        total, log_p = total[~small], log_p[~small]
        # equal sums from different counts (5 x 0.1 = 0.5) are one value of the sum
        values, group = np.unique(np.round(total, 9), return_inverse=True)
        mass = np.bincount(group, weights=np.exp(log_p), minlength=values.size)
        tail = np.cumsum(mass[::-1])[::-1] + dropped  # P(sum >= values[i]), at most
        rare = np.nonzero(tail <= chance)[0]
        if rare.size == 0:
            return math.inf
        first = int(rare[0])
        # halfway down to the next lower value: a peak's float32 sums at either value
        # stay on their side
        below = values[first - 1] if first > 0 else values[first] - 1.0
        return float((values[first] + below) / 2)

    def _chernoff(self, n: int, chance: float) -> float:
        """x with exp(-n I(x / n)) = chance, I the rate function of one slot's weight: an
        upper bound on P(sum >= x) (Chernoff), so the chance is at most `chance`."""
        w, p = self.weights, self.probabilities
        need = math.log(1.0 / chance) / n
        top = float(w[0])
        if need >= -math.log(p[0]):  # even every slot at the top weight is not that rare
            return math.inf

        def rate(a: float) -> float:  # sup over theta >= 0 of theta a - log E exp(theta w)
            def slope(theta: float) -> float:
                e = p * np.exp(theta * (w - top))
                return float((e * w).sum() / e.sum()) - a

            hi = 1.0
            while slope(hi) < 0 and hi < 1e6:
                hi *= 2
            theta = scipy.optimize.brentq(slope, 0.0, hi)
            e = p * np.exp(theta * (w - top))
            return theta * a - (theta * top + math.log(float(e.sum())))

        lo, hi = self.mean, top
        for _ in range(60):  # the rate grows with a from 0 at the mean to -log p[0] at top
            mid = (lo + hi) / 2
            if rate(mid) < need:
                lo = mid
            else:
                hi = mid
        return float(hi * n)


@dataclass
class SyncResult:
    slots: np.ndarray  # int64 per detection (meaningful where assigned)
    assigned: np.ndarray  # bool per detection
    residual_ps: float  # RMS timing residual of assigned detections
    anchors: int
    period_ps: float

    def summary(self) -> dict:
        total = int(self.assigned.size)
        return {
            "anchors": self.anchors,
            "detections": total,
            "assigned_fraction": float(self.assigned.mean()) if total else 0.0,
            "residual_rms_ps": self.residual_ps,
        }


PPS_LEAD_S = 2  # docs/formats.md: PPS marks whole UTC seconds from 2 s before utc_start


def _utc_fraction(pass_json: dict) -> float:
    start = str(pass_json.get("utc_start", ""))
    if "." not in start:
        return 0.0
    digits = start.split(".", 1)[1].rstrip("Z").split("+")[0]
    return float("0." + digits) if digits else 0.0


def _true_seconds(time_ps: np.ndarray, pps_ps: np.ndarray | None, pass_json: dict) -> np.ndarray:
    """Ground clock -> true time T (s after utc_start) from the ground PPS: the k-th mark
    is the k-th whole UTC second from PPS_LEAD_S before utc_start (missing marks show as
    gaps of two seconds or more)."""
    if pps_ps is None or pps_ps.size < 2:
        return time_ps.astype(np.float64) * 1e-12
    t0, slope, intercept = _pps_fit(pps_ps, pass_json)
    return (np.asarray(time_ps) - t0).astype(np.float64) * slope + intercept


def _pps_fit(pps_ps: np.ndarray, pass_json: dict) -> tuple[int, float, float]:
    """(t0, slope, intercept): T = (ground ps - t0) * slope + intercept (_true_seconds)."""
    frac = _utc_fraction(pass_json)
    gaps = np.rint(np.diff(pps_ps) * 1e-12).astype(np.int64)
    index = np.concatenate([[0], np.cumsum(gaps)])
    true = (math.ceil(-PPS_LEAD_S + frac) - frac) + index
    t0 = pps_ps[0]
    slope, intercept = np.polyfit((pps_ps - t0).astype(np.float64), true, 1)
    return int(t0), float(slope), float(intercept)


def ground_ps_of_true_s(true_s: float, pps_ps: np.ndarray | None, pass_json: dict) -> int:
    """The ground clock's reading at true time true_s (s after utc_start): _true_seconds
    inverted (a live tagger's end of the pass by the pass geometry, stream.py)."""
    if pps_ps is None or pps_ps.size < 2:
        return int(round(true_s * 1e12))
    t0, slope, intercept = _pps_fit(pps_ps, pass_json)
    return t0 + int(round((true_s - intercept) / slope))


def intensity_weights(pass_json: dict) -> np.ndarray:
    """Mean photon number by intensity code (pass.json's order; code 3, no record: 0)."""
    names = list(pass_json["intensities"])
    weights = np.zeros(4)
    weights[: len(names)] = [float(pass_json["intensities"][n]) for n in names]
    return weights


class _Helper:
    """Asks Alice for intensity classes of slots, returns mean photon numbers."""

    def __init__(self, channel, weights: np.ndarray):
        self.channel = channel
        self.weights = weights  # mean photon number by intensity code (code 3: no record)

    def _packed(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Alice's intensity codes of the windows (length slots from each start), 2 bits a
        slot as she sends them."""
        self.channel.send("sync_request", done=0, starts=starts, length=int(length))
        packed = np.asarray(self.channel.recv("sync_pattern")["intensity"], dtype=np.uint8)
        if packed.size * 4 < starts.size * length:
            raise ProtocolAborted(
                f"sync_pattern: {packed.size * 4} codes, {starts.size * length} asked"
            )
        return packed

    def codes(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Alice's intensity codes of the windows (length slots from each start)."""
        starts = np.asarray(starts, dtype=np.int64)
        return unpack_2bit(self._packed(starts, length), starts.size * length)

    def window_weights32(self, start: int, length: int) -> np.ndarray:
        """The mean photon numbers (float32) of the `length` slots from `start`: each byte
        of Alice's answer looked up whole (its 4 slots' weights, 16 bytes) in a 256-row
        table, where unpacking to codes and indexing the weights by them took ~8x as long
        (12.5 M slots: ~15 ms against ~100 ms)."""
        packed = self._packed(np.array([start], dtype=np.int64), length)
        codes = (np.arange(256)[:, None] >> (2 * np.arange(4))[None, :]) & 3
        table = np.ascontiguousarray(self.weights.astype(np.float32)[codes])
        return np.take(table, packed, axis=0).reshape(-1)[:length]

    def sums(self, starts: np.ndarray, length: int, counts: np.ndarray) -> np.ndarray:
        """Alice's sums over the windows of counts x mean photon number at each offset."""
        starts = np.asarray(starts, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.int32)
        self.channel.send("sync_request", done=0, starts=starts, length=int(length), counts=counts)
        sums = np.asarray(self.channel.recv("sync_correlation")["sums"], dtype=np.float64)
        if sums.shape != (length,):
            raise ProtocolAborted(f"sync_correlation: {sums.size} sums, {length} asked")
        return sums

    def window(self, starts: np.ndarray, length: int) -> np.ndarray:
        starts = np.asarray(starts, dtype=np.int64)
        return self.weights[self.codes(starts, length)].reshape(starts.size, length)


def _phase(u: np.ndarray) -> tuple[float, float]:
    """Circular mean of the fractional slot position and its concentration (0..1)."""
    angle = 2 * np.pi * u
    c, s = np.cos(angle).mean(), np.sin(angle).mean()
    return float(np.arctan2(s, c) / (2 * np.pi)), float(math.hypot(c, s))


DRIFT_CHUNK = 128  # drifts per running product (each chunk restarts from an exact exp)


def _densest_drift(u: np.ndarray, drifts: np.ndarray, step: float, bend=None) -> int:
    """Index of the drift d (evenly spaced by step) at which the phases of u (1 + d) cluster
    most tightly (largest mean resultant length, as _phase). The phasors of consecutive
    drifts differ by the factor exp(2 pi i u step): a running product along the grid, each
    chunk of DRIFT_CHUNK drifts started from an exact exp, replaces a cos and a sin per
    detection and drift (6,250 drifts x ~12,000 detections of a jinan-1-stress10x window:
    7.3 s of 25 s of its first anchor, profiled in docs/streaming.md). bend: slots added
    to u at every drift (the predicted acceleration's), or None."""
    ratio = np.exp(2j * np.pi * step * u)
    conc = np.empty(drifts.size)
    for k0 in range(0, drifts.size, DRIFT_CHUNK):
        rows = min(DRIFT_CHUNK, drifts.size - k0)
        start = np.exp(2j * np.pi * (u * (1 + drifts[k0]) + (0.0 if bend is None else bend)))
        conc[k0 : k0 + rows] = _running_concentration(start, ratio, rows)
    return int(np.argmax(conc))


def _running_concentration(start: np.ndarray, ratio: np.ndarray, steps: int) -> np.ndarray:
    """|mean(start * ratio**k)| for k = 0..steps-1: one vector of phasors kept and
    multiplied in place (it stays in cache), the same products as np.cumprod over a
    (steps, n) matrix, whose cumprod along axis 0 measured 6x slower (625 x 2000 phasors:
    23 ms against 3.5 ms)."""
    start = np.ascontiguousarray(start, dtype=np.complex128)
    ratio = np.ascontiguousarray(ratio, dtype=np.complex128)
    return _running_concentration_kernel(
        start.real.copy(), start.imag.copy(), ratio.real.copy(), ratio.imag.copy(), steps
    )


@numba.njit(cache=True, error_model="numpy")  # 0 / 0: nan, as np.mean of nothing
def _running_concentration_kernel(re, im, ratio_re, ratio_im, steps):
    """_running_concentration on split real and imaginary parts (re, im: the phasors,
    multiplied in place). Compiled without fastmath, so every sum and product rounds as
    written, in the order written, however LLVM vectorises it: the same numbers freshly
    compiled or loaded from numba's cache, on any CPU (the slope's argmax, so every
    anchor, cannot depend on the build; docs/distillation.md, "Keys depend on the
    process"). The sum runs in 4 interleaved partial sums (j mod 4), which LLVM can keep
    in one vector register without reordering anything; with np.add.reduce, np.multiply
    and their Python calls per step it was 2.4-3x the CPU time (625 steps x 3,000
    phasors, 64 calls: ~0.2 s against ~0.08 s), and np.add.reduce's pairwise order gives
    sums a few ulps away from these."""
    n = re.size
    whole = n - n % 4
    conc = np.empty(steps)
    for k in range(steps):
        r0 = r1 = r2 = r3 = 0.0
        i0 = i1 = i2 = i3 = 0.0
        for j in range(0, whole, 4):
            r0 += re[j]
            r1 += re[j + 1]
            r2 += re[j + 2]
            r3 += re[j + 3]
            i0 += im[j]
            i1 += im[j + 1]
            i2 += im[j + 2]
            i3 += im[j + 3]
        total_re = (r0 + r1) + (r2 + r3)
        total_im = (i0 + i1) + (i2 + i3)
        for j in range(whole, n):
            total_re += re[j]
            total_im += im[j]
        for j in range(n):
            a, b = re[j], im[j]
            re[j] = a * ratio_re[j] - b * ratio_im[j]
            im[j] = a * ratio_im[j] + b * ratio_re[j]
        mean_re, mean_im = total_re / n, total_im / n
        # sqrt is correctly rounded everywhere; hypot is libm's (and Python's its own)
        conc[k] = math.sqrt(mean_re * mean_re + mean_im * mean_im)
    return conc


def _piecewise_cubic(pieces: PPoly, t: np.ndarray) -> np.ndarray:
    """The cubic spline `pieces` (PPoly.from_spline) at every t: each value by Horner's
    rule in its piece (found by bisection, or kept from the previous t: the tags come in
    time order). scipy's B-spline evaluation over a pass's 1.75 M tags took ~90 ms of a
    30 s jinan-1 pass's ~0.6 s sync, this ~3 ms; the values differ from it by ~1e-15
    relative (another order of the same arithmetic). Compiled without fastmath: the same
    values however numba built it."""
    out = np.empty(t.size)
    _piecewise_cubic_kernel(
        np.ascontiguousarray(pieces.c, dtype=np.float64),
        np.ascontiguousarray(pieces.x, dtype=np.float64),
        np.ascontiguousarray(t, dtype=np.float64),
        out,
    )
    return out


@numba.njit(cache=True)
def _piecewise_cubic_kernel(c, x, t, out):
    pieces = c.shape[1]
    i = 0
    for j in range(t.size):
        v = t[j]
        if not (x[i] <= v < x[i + 1]):
            lo, hi = 0, pieces - 1  # the last piece whose start is at or before v
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if x[mid] <= v:
                    lo = mid
                else:
                    hi = mid - 1
            i = lo
        d = v - x[i]
        out[j] = ((c[0, i] * d + c[1, i]) * d + c[2, i]) * d + c[3, i]


def warm_up() -> None:
    """Run the compiled kernels once on throw-away values, so that their machine code is
    loaded (numba's cache) or compiled before a pass, not in its first sync (~1 s with
    the cache empty)."""
    ones = np.ones(8, np.complex128)
    _running_concentration(ones, ones, 2)
    _piecewise_cubic(PPoly(np.ones((4, 1)), np.array([0.0, 1.0])), np.linspace(0.0, 1.0, 4))


def densest_count(t: np.ndarray, window_s: float) -> int:
    """Detections in the densest window_s of t (the windows first_anchor chooses among)."""
    if t.size == 0:
        return 0
    edges = np.arange(t[0], t[-1] + window_s, window_s)
    return int(np.histogram(t, edges)[0].max())


def _zscore(score: np.ndarray) -> tuple[int, float]:
    best = int(np.argmax(score))
    others = np.delete(score, best)
    sd = others.std() or 1.0
    return best, float((score[best] - others.mean()) / sd)


def _direct_correlation(window: np.ndarray, at: np.ndarray, counts, lags: int) -> np.ndarray:
    """corr[lag] = sum over the detected slots i of counts[i] x window[at[i] + lag], lag in
    0..lags, one run of lags + 1 additions a detected slot (the FFT's circular correlation
    holds the same lags). Exact: the float32 weights (0.5, 0.1f, 0: multiples of 2^-27)
    summed in float64 over up to millions of slots need fewer than 53 bits, so the sums do
    not depend on their order; the FFT's float32 ones were off by ~1e-4."""
    corr = np.zeros(lags + 1)
    counts = np.asarray(counts)
    ones = bool(np.all(counts == 1))
    for a, c in zip(at.tolist(), counts.tolist(), strict=True):
        run = window[a : a + lags + 1]
        if ones:
            np.add(corr, run, out=corr)
        else:
            corr += c * run.astype(np.float64)
    return corr


class DelayPrior:
    """The first anchor's search ranges from public timing only (pass.json's predicted
    geometry and the PRIOR_* bounds; nothing of the pattern): at true time T the delay is
    within half_width_s(T) of the predicted light time, and the drift within
    drift_half_width(T) of minus the predicted range rate over c."""

    LIGHT_KM_S = 299_792.458

    def __init__(self, table: dict):
        self.t_s = np.asarray(table["t_s"], np.float64)
        self.range_km = np.asarray(table["range_km"], np.float64)
        self.range_rate_km_s = np.asarray(table["range_rate_km_s"], np.float64)
        if self.t_s.size < 2 or np.any(np.diff(self.t_s) <= 0):
            raise ValueError("predicted_geometry.t_s: fewer than 2 times, or not increasing")

    @classmethod
    def of(cls, pass_json: dict):
        """The prior of a pass, or None when pass.json has no usable predicted_geometry
        (then the first anchor searches the whole ranges, as before)."""
        table = pass_json.get("predicted_geometry")
        try:
            return cls(table) if table else None
        except (KeyError, TypeError, ValueError):
            return None

    def _at(self, values: np.ndarray, t: float) -> float:
        return float(np.interp(t, self.t_s, values))

    def _spread(self, values: np.ndarray, t: float) -> float:
        """How far the value can move if the prediction is PRIOR_ALONG_TRACK_S early or
        late (the largest difference over that span, on the table's samples too)."""
        lo, hi = t - PRIOR_ALONG_TRACK_S, t + PRIOR_ALONG_TRACK_S
        inside = (self.t_s > lo) & (self.t_s < hi)
        near = np.concatenate([[self._at(values, lo), self._at(values, hi)], values[inside]])
        return float(np.abs(near - self._at(values, t)).max())

    def delay_s(self, t: float) -> float:
        return self._at(self.range_km, t) / self.LIGHT_KM_S

    def half_width_s(self, t: float) -> float:
        # at least the range rate over the whole error (a table clamped at its ends, e.g.
        # a short segment's two rows, shows no change beyond them)
        moved_km = abs(self._at(self.range_rate_km_s, t)) * PRIOR_ALONG_TRACK_S
        spread = max(self._spread(self.range_km, t), moved_km) / self.LIGHT_KM_S
        return spread + PRIOR_CLOCK_RATE * abs(t) + PRIOR_MARGIN_S

    def drift(self, t: float) -> float:
        # slot(T) ~ (T - delay(T)) rate: the slot's rate falls as the range grows
        return -self._at(self.range_rate_km_s, t) / self.LIGHT_KM_S

    def drift_half_width(self, t: float) -> float:
        return self._spread(self.range_rate_km_s, t) / self.LIGHT_KM_S + PRIOR_CLOCK_RATE

    def drift_rate(self, t: float) -> float:
        """d drift / dT (1/s): minus the predicted range acceleration over c."""
        i = int(np.clip(np.searchsorted(self.t_s, t), 1, self.t_s.size - 1))
        dv = self.range_rate_km_s[i] - self.range_rate_km_s[i - 1]
        return -float(dv / (self.t_s[i] - self.t_s[i - 1])) / self.LIGHT_KM_S


def detector_tags(channels: np.ndarray) -> np.ndarray:
    """Which tags are photon detections (channels 0-3; the others are the ground's PPS
    and sync laser): np.isin(channels, (0, 1, 2, 3)) by two comparisons, the same mask
    (np.isin sorted its way through 1.76 M tags in ~44 ms, this ~1 ms)."""
    channels = np.asarray(channels)
    return (channels >= 0) & (channels <= 3)


def synchronise(time_ps, channels, pps_ps, pass_json, channel) -> SyncResult:
    """The whole pass at once (post-pass mode)."""
    sync = Synchroniser(pass_json, channel)
    det = detector_tags(channels)
    t_all = _true_seconds(np.asarray(time_ps), pps_ps, pass_json)
    t = t_all[det]
    if t.size < MIN_DETECTIONS:
        raise ProtocolAborted(f"too few detections to synchronise ({t.size})")
    tc = sync.first_anchor(t)
    sync.track(t, tc, +1, t[-1] - TRACK_WINDOW_S / 2, to_edge=True)
    sync.track(t, tc, -1, t[0] + TRACK_WINDOW_S / 2, to_edge=True)
    return sync.assign(t_all, det)


class Synchroniser:
    """Bob's clock model, built from anchors: the first at the densest window of the
    detections given (first_anchor), more by tracking windows every STEP_S (track), for the
    whole pass at once (synchronise) or as the detections arrive (host/distil/stream.py:
    tracking forward block by block, each detection assigned once anchors lie beyond it)."""

    def __init__(self, pass_json: dict, channel):
        self.pass_json = pass_json
        self.rate = float(pass_json["slot_rate_hz"])
        self.helper = _Helper(channel, intensity_weights(pass_json))
        self.anchors_t: list[float] = []
        self.anchors_off: list[float] = []
        self.anchors_slope: list[float] = []
        self.first_slope = 0.0
        self.first_z, self.first_detections = 0.0, 0  # the last first_anchor's peak
        self.first_z_needed = FIRST_Z  # and the z its (first) search needed
        self.prior = DelayPrior.of(pass_json)
        self.null = NullCorrelation.of(pass_json)  # None: the Gaussian rule (first_z_needed)
        self.use_prior = True  # the stream clears it when a lock found with it fails
        self.first_search = None  # "predicted" or "full": the search that gave the lock
        self.first_tries = {}  # the last first_anchor's searches: (z, z needed, detections)

    def _densest(self, t: np.ndarray, window_s: float) -> tuple[float, np.ndarray]:
        """(centre, mask) of the densest window_s of t."""
        edges = np.arange(t[0], t[-1] + window_s, window_s)
        hist, _ = np.histogram(t, edges)
        k = int(np.argmax(hist))
        return edges[k] + window_s / 2, (t >= edges[k]) & (t < edges[k + 1])

    def _searches(self, tc: float, window_s: float, kinds) -> list[tuple]:
        """(name, drifts, delay_lo, delay_hi, drift rate) of each search of `kinds` at tc:
        the whole ranges ("full") and, with a usable prior, the ranges around the
        prediction ("predicted")."""
        rate = self.rate
        step = 0.1 / (window_s * rate)
        all_drifts = np.arange(-MAX_DRIFT, MAX_DRIFT + step, step)
        lag_range = int(MAX_DELAY_S * rate)
        searches = []
        if "predicted" in kinds and self.prior is not None and self.use_prior:
            # the predicted ranges: a subset of the same drift grid and of the same lags,
            # so a lock found either way is the same anchor (the same slots and keys)
            near = np.abs(all_drifts - self.prior.drift(tc))
            drifts = all_drifts[near <= self.prior.drift_half_width(tc) + step]
            delay, half = self.prior.delay_s(tc), self.prior.half_width_s(tc)
            delay_lo = min(max(0, math.floor((delay - half) * rate)), lag_range)
            delay_hi = min(max(0, math.ceil((delay + half) * rate)), lag_range)
            drift_rate = self.prior.drift_rate(tc)
            if abs(drift_rate) * rate * (window_s / 2) ** 2 / 2 < ACCEL_IGNORED_SLOTS:
                drift_rate = 0.0
            if drifts.size and delay_hi > delay_lo:
                searches.append(("predicted", drifts, delay_lo, delay_hi, drift_rate))
        if "full" in kinds:
            searches.append(("full", all_drifts, 0, lag_range, 0.0))
        return searches

    def first_slots(self, t: np.ndarray, window_s: float, kind: str) -> int | None:
        """Slots of Alice's pattern a first anchor at the densest window_s of t asks for
        with the search `kind` (None: no such search, e.g. no usable prior)."""
        cost = self.first_cost(t, window_s, kind)
        return None if cost is None else cost[0]

    def first_cost(self, t: np.ndarray, window_s: float, kind: str) -> tuple | None:
        """(slots asked, sparse) of first_slots: sparse when Alice sums each detected
        slot's run of lags (her memory stays a piece; her time grows with the slots),
        else her whole window for the FFT (held at once, on both sides)."""
        tc, sel = self._densest(t, window_s)
        searches = self._searches(tc, window_s, (kind,))
        if not searches:
            return None
        lags = searches[0][3] - searches[0][2]
        span = int(window_s * self.rate) + 1
        sparse = int(sel.sum()) * (lags + 1)
        return min(span + lags, sparse), sparse < span + lags

    def first_anchor(
        self, t: np.ndarray, window_s: float = FIRST_WINDOW_S, kinds=("predicted", "full")
    ) -> float:
        """The first anchor, at the densest window_s of t (true seconds of the detections,
        in time order); returns its time. Post-pass uses FIRST_WINDOW_S; the stream a
        longer window while the detections are sparse (stream.first_sync_window). The
        searches of `kinds` are tried in that order until one has a peak."""
        rate = self.rate
        tc, sel = self._densest(t, window_s)
        tw = t[sel] - tc
        step = 0.1 / (window_s * rate)
        lag_range = int(MAX_DELAY_S * rate)
        searches = self._searches(tc, window_s, kinds)
        self.first_detections = int(sel.sum())  # the stream's retry rule
        self.first_tries = {}  # per search: (z, z needed, detections), the retry rule's
        if not searches:
            raise ProtocolAborted("time synchronisation failed: no search to make")
        for i, search in enumerate(searches):
            z, offset, slope, slots = self._correlate(tw, tc, *search[1:], step=step)
            needed = self.z_needed(slots, search[3] - search[2] + 1, lag_range + 1)
            self.first_tries[search[0]] = (z, needed, self.first_detections)
            if i == 0:  # the stream's retry rule aims at the first search's threshold
                self.first_z, self.first_z_needed = z, needed
            if z >= needed:
                break
        else:
            raise ProtocolAborted(
                f"time synchronisation failed: no correlation peak (z={z:.1f}, "
                f"{int(sel.sum())} detections in the densest {window_s * 1e3:.0f} ms)"
            )
        self.first_search = search[0]
        self.anchors_t = [tc]
        self.anchors_off = [offset]
        self.first_slope = slope
        self.anchors_slope = [self.first_slope]
        return tc

    def z_needed(self, slots: int, lags: int, full_lags: int) -> float:
        """The z a first anchor's peak over `slots` distinct detected slots needs among
        `lags` lags (of the whole range's `full_lags`): exact, at FIRST_FALSE_PEAK, when
        pass.json gives the intensity probabilities; else the Gaussian rule."""
        if self.null is None:
            return first_z_needed(lags, full_lags)
        return self.null.z_needed(slots, lags)

    def _correlate(self, tw, tc, drifts, delay_lo, delay_hi, drift_rate, step):
        """(z, offset, slope, distinct detected slots) of the first anchor at tc (tw: the
        window's detection times from tc) over the drifts given (evenly spaced by step)
        and the delays of [delay_lo, delay_hi] slots: the drift of the tightest phase
        clustering, then the lag of the strongest correlation with Alice's mean photon
        numbers. drift_rate (1/s): the drift's predicted change over the window (0:
        none)."""
        rate = self.rate
        bend = 0.5 * drift_rate * tw * tw * rate if drift_rate else None
        drift = float(drifts[_densest_drift(tw * rate, drifts, step, bend)])
        u = tw * rate * (1 + drift) + (0.0 if bend is None else bend)
        phi, conc = _phase(u)
        # slot(T) = tc_slot + (T - tc) rate (1 + drift); tc_slot = (tc - delay) rate + phi
        u_rel = u - phi
        k_rel = np.rint(u_rel).astype(np.int64)
        span = int(k_rel.max() - k_rel.min()) + 1
        lags = delay_hi - delay_lo
        base = int(math.floor(tc * rate)) + int(k_rel.min()) - delay_hi
        length = span + lags
        # each detected slot once: at a wrong lag the sum is then over independent slots
        # of the pattern, whose exact distribution sets the threshold (NullCorrelation; a
        # slot clicked twice would add its weight twice)
        at = np.unique(k_rel - k_rel.min())
        counts = np.ones(at.size, np.int32)
        if at.size * (lags + 1) < length:
            corr = self._sparse_correlation(base, at, counts, lags)
        else:
            corr = self._fft_correlation(base, at, counts, span, lags)
        lag, z = _zscore(corr)
        # offset(T) = slot position - T * rate; at tc the detections sit on slot centres - phi
        return z, base + lag - int(k_rel.min()) - phi - tc * rate, drift * rate, int(at.size)

    def _sparse_correlation(self, base, at, counts, lags) -> np.ndarray:
        """corr[lag] = sum over the detected slots (offsets `at` from base, `counts`
        detections each) of Alice's mean photon number at base + at + lag, lag in
        0..lags: the FFT's correlation over each slot's run of lags only. Alice sums it
        (sync_correlation: lags + 1 float32 sums cross the link, not 2 bits of each of
        the detections x lags slots: 14.8 M slots, 3.7 MB, ~3 s of jinan-1's assumed 10
        Mbit/s downlink for the 80 ms window of its start)."""
        return self.helper.sums(base + at, lags + 1, counts)

    def _fft_correlation(self, base, at, counts, span, lags) -> np.ndarray:
        """The same correlation over Alice's whole window (span + lags slots): summed lag
        run by lag run when that is at most DIRECT_OPS_PER_FFT_POINT additions a point of
        the FFT (_direct_correlation: exact), else by FFT."""
        helper = self.helper
        length = span + lags
        size = scipy.fft.next_fast_len(length, real=True)
        if at.size * (lags + 1) <= DIRECT_OPS_PER_FFT_POINT * size:
            return _direct_correlation(helper.window_weights32(base, length), at, counts, lags)
        # a circular correlation of this size holds lags 0..lags unwrapped: the comb
        # spans `span` slots and Alice's window span + lags (length + span, as before,
        # made every FFT 60 % longer for no lag more)
        # Alice's mean photon numbers straight into the FFT's zero-padded float32 input:
        # no float64 window (8 bytes a slot, 160 MB at 625 MHz), no cast, no padding copy
        alice = np.zeros(size, np.float32)
        alice[:length] = helper.window_weights32(base, length)
        # float32 halves the FFT time of this (at 625 MHz ~3e7-point) correlation; its peak
        # is a few hundred counts over a background of tens, far above float32 rounding
        comb = np.zeros(size, np.float32)
        comb[at] = counts
        spectrum = scipy.fft.rfft(comb, size, workers=-1)
        np.conj(spectrum, out=spectrum)
        spectrum *= scipy.fft.rfft(alice, size, workers=-1)
        del alice
        corr = scipy.fft.irfft(spectrum, size, workers=-1)[: lags + 1].astype(np.float64)
        return corr

    def offset_model(self, tq: float) -> tuple[float, float]:
        """Offset and slope (slots/s) at tq, extrapolated from the nearest anchor with the
        acceleration seen between it and the anchor nearest tq among those at least
        ACCEL_BASELINE_S from it (none: no acceleration; the delay is smooth)."""
        anchors_off, anchors_slope = self.anchors_off, self.anchors_slope
        ts = np.array(self.anchors_t)
        near = np.argsort(np.abs(ts - tq))
        a = near[0]
        apart = near[np.abs(ts[near] - ts[a]) >= ACCEL_BASELINE_S]
        acc = 0.0
        if apart.size:
            b = apart[0]
            acc = (anchors_slope[a] - anchors_slope[b]) / (ts[a] - ts[b])
        dt = tq - ts[a]
        off = anchors_off[a] + anchors_slope[a] * dt + 0.5 * acc * dt * dt
        return float(off), float(anchors_slope[a] + acc * dt)

    def track(self, t: np.ndarray, start: float, direction: int, edge: float, to_edge: bool):
        """Tracking windows every STEP_S from start (exclusive) towards edge; with to_edge,
        one more window at the edge itself (the data's end: no extrapolation beyond half a
        window). Returns the centre of the last window tried (start if none)."""
        rate, helper = self.rate, self.helper
        anchors_t, anchors_off = self.anchors_t, self.anchors_off
        anchors_slope = self.anchors_slope
        t_sorted = bool(np.all(t[1:] >= t[:-1]))  # np.diff's answer without its array
        centres = list(np.arange(start + direction * STEP_S, edge, direction * STEP_S))
        if to_edge and (edge - start) * direction > 0:
            centres.append(edge)
        last = start
        for tq in centres:
            last = float(tq)
            lo, hi = tq - TRACK_WINDOW_S / 2, tq + TRACK_WINDOW_S / 2
            # detections are in time order: a window is a slice (a mask over the whole
            # pass per window cost ~6 s on a 9e6-detection jinan-1 pass)
            i0, i1 = np.searchsorted(t, (lo, hi)) if t_sorted else (0, 0)
            sel = slice(i0, i1) if t_sorted else (t >= lo) & (t < hi)
            if (i1 - i0 if t_sorted else int(sel.sum())) >= MIN_DETECTIONS:
                off, slope = self.offset_model(tq)
                tw = t[sel] - tq
                # refine the slope (the drift changes with the range acceleration)
                fit = tw[:: max(1, tw.size // PHASE_DETECTIONS)]
                width = SLOPE_SEARCH * rate
                d_slope = 0.1 / TRACK_WINDOW_S
                grid = slope + np.arange(-width, width, d_slope)
                # phasors exp(2 pi i (fit rate + g fit)) for every g of the grid, by a
                # running product along the grid instead of one complex exp per entry: at
                # 625 MHz the grid has 625 slopes x 2000 detections per window and the
                # exps dominated sync time
                conc = _running_concentration(
                    np.exp(2j * np.pi * (fit * rate + grid[0] * fit)),
                    np.exp(2j * np.pi * d_slope * fit),
                    grid.size,
                )
                slope = float(grid[int(np.argmax(conc))])
                u = tw * rate + tq * rate + off + slope * tw
                phi_q, _ = _phase(u)
                kq = np.rint(u - phi_q).astype(np.int64)
                kq = kq[:: max(1, kq.size // LAG_DETECTIONS)]
                lag_slots = TRACK_LAG_SLOTS if len(anchors_t) > 3 else int(FIRST_LAG_S * rate)
                win = helper.window(kq - lag_slots, 2 * lag_slots + 1)
                j, zq = _zscore(win.sum(axis=0))
                if os.environ.get("QKDSAT_SYNC_DEBUG"):
                    print("track", tq, off, slope, phi_q, j - lag_slots, zq)
                if zq >= TRACK_Z:
                    anchors_t.append(tq)
                    anchors_off.append(off + (j - lag_slots) - phi_q)
                    anchors_slope.append(slope)
        return last

    def _predicted_bend(self, t: float) -> float:
        """Half the offset's second derivative (slots/s^2) the orbit prediction gives at
        t: rate x the drift's rate (range acceleration / c), 0 without a usable prior.
        What a line through one or two anchors, or a spline's linear extrapolation,
        misses: jinan-1's start (~12 slots/s^2) put detections 0.4 s before a first anchor
        and its tracked neighbour 1.7 slots off, beyond the gate (the tracking window
        there, ~200 detections, gave z 4.9 < TRACK_Z)."""
        if self.prior is None or not self.use_prior:
            return 0.0
        return 0.5 * self.rate * self.prior.drift_rate(t)

    def assign(self, t_all: np.ndarray, det: np.ndarray) -> SyncResult:
        """Every detection's slot from a smoothing spline through the anchors (linear
        beyond them, with the end slopes); assigned only inside the timing gate."""
        rate, pass_json = self.rate, self.pass_json
        order = np.argsort(self.anchors_t)
        ts = np.array(self.anchors_t)[order]
        os_ = np.array(self.anchors_off)[order]
        bend = self._predicted_bend
        if ts.size >= 4:
            spline = make_interp_spline(ts, os_, k=3)
            model = _piecewise_cubic(PPoly.from_spline(spline), np.clip(t_all, ts[0], ts[-1]))
            # outside the anchors: extrapolate with the end slopes (and the predicted bend)
            d = spline.derivative()
            for end, beyond in ((0, t_all < ts[0]), (-1, t_all > ts[-1])):
                dt = t_all[beyond] - ts[end]
                model[beyond] = os_[end] + d(ts[end]) * dt + bend(ts[end]) * dt * dt
        elif ts.size == 3:
            model = np.polyval(np.polyfit(ts, os_, 2), t_all)
        elif ts.size == 2:
            # the line through both, bent as predicted between and beyond them
            line = os_[0] + (os_[1] - os_[0]) / (ts[1] - ts[0]) * (t_all - ts[0])
            model = line + bend(ts.mean()) * (t_all - ts[0]) * (t_all - ts[1])
        else:
            dt = t_all - ts[0]
            model = os_[0] + self.first_slope * dt + bend(ts[0]) * dt * dt
        u_all = t_all * rate + model
        slots = np.rint(u_all).astype(np.int64)
        resid = u_all - slots
        # the receiver's coincidence window (pass.json) gates out most dark and background
        # counts; without one, a fixed fraction of the slot
        window_ps = (pass_json.get("receiver") or {}).get("coincidence_window_ps")
        gate = GATE_SLOTS if not window_ps else min(GATE_SLOTS, 0.5 * window_ps * rate * 1e-12)
        assigned = det & (np.abs(resid) <= gate) & (slots >= 0)
        period_ps = 1e12 / rate
        rms = float(np.sqrt(np.mean(resid[assigned] ** 2)) * period_ps) if assigned.any() else 0.0
        result = SyncResult(slots, assigned, rms, int(ts.size), period_ps)
        result.anchor_times, result.anchor_offsets = ts, os_
        return result


# ------------------------------------------------- the uplink: the ground's slot pattern

# The uplink's time synchronisation against the ground transmitter's own record, its
# slot clock (public: slot k leaves at first_epoch + k period on the ground clock) and
# its pattern, of which the ground announces the intensity classes of the slots the
# satellite asks about (never bits), as Alice does for Bob on the downlink (Synchroniser
# above). The satellite knows its detection tags, each one's predicted flight (predicted
# orbit, calibrated delays, troposphere) and its clock coarsely (GNSS: ~100 ns). The lag,
# detection - (epoch + flight), is the clock offset plus what the prediction misses; its
# fraction of a slot shows in how tightly the detections' slot phases cluster, its whole
# slots in the correlation of the detections with the ground's mean photon numbers.
# Steps: (1) at the densest window, the phase, then the whole-slot lag within the coarse
# time's +-half width, by one request of the ground's classes around each of up to
# SLOT_FIRST_DETECTIONS detections; (2) anchors window by window outward, each from the
# phase around the lag predicted by the anchors so far (a slot is 10 ns; the prediction
# misses by tens of ps); (3) every detection takes the slot its lag points to, inside
# +-SLOT_GATE_PS, the nearer of two detections keeping a slot.
SLOT_WINDOW_S = 0.25  # of detections per anchor (~330 Micius uplink events near culmination)
SLOT_FIRST_DETECTIONS = 400  # asked about at the first anchor (z ~ 0.9 sqrt(n) at 0.8/0.1/0)
# The first anchor's window grows (x2) from SLOT_WINDOW_S while its densest holds fewer
# than SLOT_FIRST_DETECTIONS, up to this: at a pass's 20 deg edge the uplink gives ~190
# detections/s (47 in 0.25 s: z ~ 6, under SLOT_FIRST_Z), and over 2 s the coarse rate's
# error (5e-10) smears the slot phase by 1 ns of the 10 ns slot
SLOT_FIRST_MAX_WINDOW_S = 2.0
SLOT_REQUEST_MIN = 250  # streamed: detections a request waits for (z ~ 14 expected)
SLOT_MIN_DETECTIONS = 10  # in a window, to make an anchor
SLOT_RAYLEIGH = 16.0  # n R^2 of a window's phases to make an anchor (chance ~ e^-16)
SLOT_FIRST_Z = 7.0  # the first anchor's correlation peak (a few hundred lags)
SLOT_FIT_ANCHORS = 8  # the last anchors the prediction's line goes through
SLOT_GATE_PS = 1_500  # +-1.5 ns: 4.3 sigma of a 350 ps jitter (2e-5 lost); a dark count: 30 %
SLOT_MAX_REQUEST = 1 << 22  # classes the ground answers at most (1 MiB of 2-bit codes)


def _lag_line(ts: np.ndarray, lags: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The lag through the anchors: linear between them, and beyond the first and last
    along the end segments (a clock's rate offset keeps the lag moving: held flat, the
    last half window of a 10 s pass drifted 15 ns)."""
    inside = np.interp(t, ts, lags)
    if ts.size < 2:
        return inside
    head = lags[0] + (lags[1] - lags[0]) / max(ts[1] - ts[0], 1e-9) * (t - ts[0])
    tail = lags[-1] + (lags[-1] - lags[-2]) / max(ts[-1] - ts[-2], 1e-9) * (t - ts[-1])
    return np.where(t < ts[0], head, np.where(t > ts[-1], tail, inside))


class UplinkSlotSync:
    """The satellite's side of the uplink's synchronisation. `detection_ps`: its tags
    (int64, its clock, time order); `flight_ps`: each one's predicted flight (float, the
    ground epoch it left at is detection - lag - flight); `slot_clock`: the ground's
    (first_epoch_ps, period_ps, slot_count); `coarse`: its coarse time (offset_ps at
    satellite_reference_ps, rate, half_width_ps). request() -> the windows of slots to
    ask the ground about; lock(classes' mean photon numbers) -> the whole-slot lag and
    the anchors; slots() -> each detection's slot, -1 if none. During the pass, extend()
    adds the detections of a block (later in time) and tracks the windows it completes."""

    def __init__(self, detection_ps, flight_ps, slot_clock: dict, coarse: dict):
        self.det = np.asarray(detection_ps, dtype=np.int64)
        self.flight = np.asarray(flight_ps, dtype=np.float64)
        self.first_epoch = int(slot_clock["first_epoch_ps"])
        self.period = int(slot_clock["period_ps"])
        self.slot_count = int(slot_clock["slot_count"])
        self.coarse = coarse
        self.t0 = int(self.det[0]) if self.det.size else None
        self.t_s = self._seconds(self.det)
        self.half = int(math.ceil(float(coarse["half_width_ps"]) / self.period))
        self.forward: list = []  # (t, lag) anchors from the first on, in time order
        self.backward: list = []  # before the first, outward
        self.forward_edge = 0.0  # where the next forward window starts
        self.asked = np.zeros(0, dtype=np.int64)
        self.asked_slot = np.zeros(0, dtype=np.int64)
        self.phase = 0.0
        self.first_z = 0.0
        self.locked = False

    def _seconds(self, det: np.ndarray) -> np.ndarray:
        if self.t0 is None:
            return np.zeros(0)
        return (det - self.t0).astype(np.float64) * 1e-12

    def extend(self, detection_ps, flight_ps, final: bool = False) -> None:
        det = np.asarray(detection_ps, dtype=np.int64)
        if self.t0 is None and det.size:
            self.t0 = int(det[0])
        self.det = np.concatenate([self.det, det])
        self.flight = np.concatenate([self.flight, np.asarray(flight_ps, dtype=np.float64)])
        self.t_s = self._seconds(self.det)
        if self.locked:
            self._track_forward(final)

    def coarse_lag(self, t_s: np.ndarray) -> np.ndarray:
        c = self.coarse
        since = (self.t0 - int(c["satellite_reference_ps"])) * 1e-12 + t_s
        return float(c["offset_ps"]) + float(c["rate"]) * since * 1e12

    def _u(self, lag_ps: np.ndarray, index) -> np.ndarray:
        """Slot position (slot units) of the detections `index` for lags `lag_ps`."""
        start = (self.det[index] - self.first_epoch).astype(np.float64)
        return (start - lag_ps - self.flight[index]) / self.period

    def first_window(self) -> tuple[int, int]:
        """Index range of the densest window of the detections so far: SLOT_WINDOW_S long,
        longer (x2, up to SLOT_FIRST_MAX_WINDOW_S) while it holds fewer than
        SLOT_FIRST_DETECTIONS."""
        window_s = SLOT_WINDOW_S
        while True:
            edges = np.arange(0.0, self.t_s.max() + window_s, window_s)
            counts, _ = np.histogram(self.t_s, edges)
            w = int(np.argmax(counts))
            if counts[w] >= SLOT_FIRST_DETECTIONS or window_s * 2 > SLOT_FIRST_MAX_WINDOW_S:
                i0, i1 = np.searchsorted(self.t_s, (edges[w], edges[w + 1]))
                return int(i0), int(i1)
            window_s *= 2

    def request(self) -> tuple[np.ndarray, int]:
        """(first slot of each window, window length): the ground's classes of the slots
        within the coarse time's half width of up to SLOT_FIRST_DETECTIONS detections of
        the densest window. Raises ProtocolAborted when the detections cannot say."""
        if self.det.size < SLOT_MIN_DETECTIONS:
            raise ProtocolAborted(
                f"uplink time synchronisation failed: {self.det.size} detections are too few"
            )
        i0, i1 = self.first_window()
        index = np.arange(i0, i1)
        lag = self.coarse_lag(self.t_s[index])
        u = self._u(lag, index)
        phase, concentration = _phase(u)
        if index.size < SLOT_MIN_DETECTIONS or index.size * concentration**2 < SLOT_RAYLEIGH:
            raise ProtocolAborted(
                "uplink time synchronisation failed: the detections of the densest "
                f"{SLOT_WINDOW_S} s ({index.size}) show no slot phase (n R^2 = "
                f"{index.size * concentration**2:.1f})"
            )
        self.phase = phase
        pick = np.arange(0, index.size, max(1, -(-index.size // SLOT_FIRST_DETECTIONS)))
        slot = np.rint(u[pick] - phase).astype(np.int64)
        length = 2 * self.half + 1
        inside = (slot - self.half >= 0) & (slot + self.half < self.slot_count)
        self.asked, self.asked_slot = index[pick][inside], slot[inside]
        keep = max(1, SLOT_MAX_REQUEST // length)
        self.asked, self.asked_slot = self.asked[:keep], self.asked_slot[:keep]
        if self.asked.size < SLOT_MIN_DETECTIONS:
            raise ProtocolAborted(
                "uplink time synchronisation failed: the densest window's detections lie "
                "outside the ground's slots"
            )
        return self.asked_slot - self.half, length

    def lock(self, mean_photon_number: np.ndarray) -> None:
        """The whole-slot lag from the ground's mean photon numbers of the windows asked
        (one row a detection): the shift whose slots' sum is the correlation peak; then
        the anchors, tracked outward over the detections so far."""
        length = 2 * self.half + 1
        rows = np.asarray(mean_photon_number, dtype=np.float64).reshape(self.asked.size, length)
        # the lag m slots more puts a detection's pulse at s - m: column half - m
        score = rows.sum(axis=0)[::-1]
        best, z = _zscore(score)
        self.first_z = z
        if z < SLOT_FIRST_Z:
            raise ProtocolAborted(
                f"uplink time synchronisation failed: no correlation peak with the ground's "
                f"pattern (z={z:.1f}, {self.asked.size} detections)"
            )
        shift = best - self.half
        t = float(np.mean(self.t_s[self.asked]))
        lag = float(self.coarse_lag(np.array([t]))[0]) + (self.phase + shift) * self.period
        self.forward = [(t, lag)]
        self.forward_edge = t + SLOT_WINDOW_S / 2
        self.locked = True
        self._track_forward(final=False)
        self.backward = self._track_side([(t, lag)], t - SLOT_WINDOW_S / 2, -1, 0.0)[1:]

    def _predict(self, side: list, t: np.ndarray) -> np.ndarray:
        ts = np.array([a for a, _ in side[-SLOT_FIT_ANCHORS:]])
        lags = np.array([b for _, b in side[-SLOT_FIT_ANCHORS:]])
        if ts.size >= 2 and np.ptp(ts) > 0:
            slope, intercept = np.polyfit(ts - ts[-1], lags, 1)
            return intercept + slope * (t - ts[-1])
        return lags[-1] + float(self.coarse["rate"]) * 1e12 * (t - ts[-1])

    def _window_anchor(self, side: list, lo: float, hi: float):
        """(t, lag) of the window [lo, hi) from its detections' slot phase about the lag
        the side's anchors predict, or None (too few, no phase)."""
        i0, i1 = np.searchsorted(self.t_s, (lo, hi))
        if i1 - i0 < SLOT_MIN_DETECTIONS:
            return None
        index = np.arange(i0, i1)
        t = self.t_s[index]
        phase, concentration = _phase(self._u(self._predict(side, t), index))
        if index.size * concentration**2 < SLOT_RAYLEIGH:
            return None
        t_mean = float(np.mean(t))
        return t_mean, float(self._predict(side, np.array([t_mean]))[0]) + phase * self.period

    def _track_side(self, side: list, edge: float, direction: int, stop: float) -> list:
        """Windows from edge outward (direction -1: towards stop)."""
        while edge > stop:
            anchor = self._window_anchor(side, edge - SLOT_WINDOW_S, edge)
            edge -= SLOT_WINDOW_S
            if anchor is not None:
                side.append(anchor)
        return side

    def _track_forward(self, final: bool) -> None:
        """Forward windows the detections so far complete (with `final`, the last partial
        one too: the record's end)."""
        end = float(self.t_s.max()) if self.t_s.size else 0.0
        while self.forward_edge + (0.0 if final else SLOT_WINDOW_S) <= end or (
            final and self.forward_edge < end
        ):
            lo = self.forward_edge
            self.forward_edge += SLOT_WINDOW_S
            anchor = self._window_anchor(self.forward, lo, lo + SLOT_WINDOW_S)
            if anchor is not None:
                self.forward.append(anchor)

    def finish(self) -> None:
        """The record is whole: its last (partial) window tracked too."""
        self._track_forward(final=True)

    def slots(self, start: int = 0) -> np.ndarray:
        """The slot of each detection from index `start` on (-1: none inside the gate,
        or its slot kept by a nearer detection, or outside the ground's slots)."""
        anchors = sorted(self.backward + self.forward)
        ts = np.array([a for a, _ in anchors])
        lags = np.array([b for _, b in anchors])
        index = np.arange(start, self.det.size)
        u = self._u(_lag_line(ts, lags, self.t_s[index]), index)
        slot = np.rint(u).astype(np.int64)
        residual = np.abs(u - slot) * self.period
        ok = (residual <= SLOT_GATE_PS) & (slot >= 0) & (slot < self.slot_count)
        slot = np.where(ok, slot, -1)
        # one pulse, two detections (two photons of one pulse, or a dark count beside it):
        # the nearer keeps it
        order = np.lexsort((residual, slot))
        ordered = slot[order]
        repeat = np.zeros(order.size, dtype=bool)
        repeat[1:] = (ordered[1:] == ordered[:-1]) & (ordered[1:] >= 0)
        slot[order[repeat]] = -1
        return slot

    def summary(self) -> dict:
        return {
            "anchors": len(self.forward) + len(self.backward),
            "first_z": self.first_z,
            "asked_detections": int(self.asked.size),
            "window_slots": 2 * self.half + 1,
        }
