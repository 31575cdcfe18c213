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
   number of the slots Alice revealed over the whole lag range.
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

import numpy as np
import scipy.fft
from scipy.interpolate import make_interp_spline

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
    frac = _utc_fraction(pass_json)
    gaps = np.rint(np.diff(pps_ps) * 1e-12).astype(np.int64)
    index = np.concatenate([[0], np.cumsum(gaps)])
    true = (math.ceil(-PPS_LEAD_S + frac) - frac) + index
    t0 = pps_ps[0]
    slope, intercept = np.polyfit((pps_ps - t0).astype(np.float64), true, 1)
    return (np.asarray(time_ps) - t0).astype(np.float64) * slope + intercept


class _Helper:
    """Asks Alice for intensity classes of slots, returns mean photon numbers."""

    def __init__(self, channel, weights: np.ndarray):
        self.channel = channel
        self.weights = weights  # mean photon number by intensity code (code 3: no record)

    def codes(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Alice's intensity codes of the windows (length slots from each start)."""
        starts = np.asarray(starts, dtype=np.int64)
        self.channel.send("sync_request", done=0, starts=starts, length=int(length))
        packed = self.channel.recv("sync_pattern")["intensity"]
        return unpack_2bit(packed, starts.size * length)

    def window(self, starts: np.ndarray, length: int) -> np.ndarray:
        starts = np.asarray(starts, dtype=np.int64)
        return self.weights[self.codes(starts, length)].reshape(starts.size, length)


def _phase(u: np.ndarray) -> tuple[float, float]:
    """Circular mean of the fractional slot position and its concentration (0..1)."""
    angle = 2 * np.pi * u
    c, s = np.cos(angle).mean(), np.sin(angle).mean()
    return float(np.arctan2(s, c) / (2 * np.pi)), float(math.hypot(c, s))


DRIFT_CHUNK = 128  # drifts per running product (each chunk restarts from an exact exp)


def _densest_drift(u: np.ndarray, drifts: np.ndarray, step: float) -> int:
    """Index of the drift d (evenly spaced by step) at which the phases of u (1 + d) cluster
    most tightly (largest mean resultant length, as _phase). The phasors of consecutive
    drifts differ by the factor exp(2 pi i u step): a running product along the grid, each
    chunk of DRIFT_CHUNK drifts started from an exact exp, replaces a cos and a sin per
    detection and drift (6,250 drifts x ~12,000 detections of a jinan-1-stress10x window:
    7.3 s of 25 s of its first anchor, profiled in docs/streaming.md)."""
    ratio = np.exp(2j * np.pi * step * u)
    conc = np.empty(drifts.size)
    for k0 in range(0, drifts.size, DRIFT_CHUNK):
        rows = min(DRIFT_CHUNK, drifts.size - k0)
        start = np.exp(2j * np.pi * u * (1 + drifts[k0]))
        conc[k0 : k0 + rows] = _running_concentration(start, ratio, rows)
    return int(np.argmax(conc))


def _running_concentration(start: np.ndarray, ratio: np.ndarray, steps: int) -> np.ndarray:
    """|mean(start * ratio**k)| for k = 0..steps-1, one vector kept and multiplied in place
    (it stays in cache): the same products as np.cumprod over a (steps, n) matrix, whose
    cumprod along axis 0 measured 6x slower (625 x 2000 phasors: 23 ms against 3.5 ms)."""
    phasor = start.copy()
    conc = np.empty(steps)
    for k in range(steps):
        conc[k] = abs(phasor.mean())
        phasor *= ratio
    return conc


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


def synchronise(time_ps, channels, pps_ps, pass_json, channel) -> SyncResult:
    """The whole pass at once (post-pass mode)."""
    sync = Synchroniser(pass_json, channel)
    det = np.isin(channels, (0, 1, 2, 3))
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
        names = list(pass_json["intensities"])
        weights = np.zeros(4)
        weights[: len(names)] = [float(pass_json["intensities"][n]) for n in names]
        self.helper = _Helper(channel, weights)
        self.anchors_t: list[float] = []
        self.anchors_off: list[float] = []
        self.anchors_slope: list[float] = []
        self.first_slope = 0.0
        self.first_z, self.first_detections = 0.0, 0  # the last first_anchor's peak

    def first_anchor(self, t: np.ndarray, window_s: float = FIRST_WINDOW_S) -> float:
        """The first anchor, at the densest window_s of t (true seconds of the detections,
        in time order); returns its time. Post-pass uses FIRST_WINDOW_S; the stream a
        longer window while the detections are sparse (stream.first_sync_window)."""
        rate, helper = self.rate, self.helper
        edges = np.arange(t[0], t[-1] + window_s, window_s)
        hist, _ = np.histogram(t, edges)
        k = int(np.argmax(hist))
        tc = edges[k] + window_s / 2
        sel = (t >= edges[k]) & (t < edges[k + 1])
        tw = t[sel] - tc
        step = 0.1 / (window_s * rate)
        drifts = np.arange(-MAX_DRIFT, MAX_DRIFT + step, step)
        drift = float(drifts[_densest_drift(tw * rate, drifts, step)])
        phi, conc = _phase(tw * rate * (1 + drift))
        # slot(T) = tc_slot + (T - tc) rate (1 + drift); tc_slot = (tc - delay) rate + phi
        u_rel = tw * rate * (1 + drift) - phi
        k_rel = np.rint(u_rel).astype(np.int64)
        span = int(k_rel.max() - k_rel.min()) + 1
        lag_range = int(MAX_DELAY_S * rate)
        base = int(math.floor(tc * rate)) + int(k_rel.min()) - lag_range
        length = span + lag_range
        # a circular correlation of this size holds lags 0..lag_range unwrapped: the comb
        # spans `span` slots and Alice's window span + lag_range (length + span, as before,
        # made every FFT 60 % longer for no lag more)
        size = scipy.fft.next_fast_len(length, real=True)
        # Alice's mean photon numbers straight into the FFT's zero-padded float32 input:
        # no float64 window (8 bytes a slot, 160 MB at 625 MHz), no cast, no padding copy
        alice = np.zeros(size, np.float32)
        alice[:length] = helper.weights.astype(np.float32)[helper.codes(np.array([base]), length)]
        # float32 halves the FFT time of this (at 625 MHz ~3e7-point) correlation; its peak
        # is a few hundred counts over a background of tens, far above float32 rounding
        comb = np.zeros(size, np.float32)
        np.add.at(comb, k_rel - k_rel.min(), np.float32(1.0))
        spectrum = scipy.fft.rfft(comb, size, workers=-1)
        np.conj(spectrum, out=spectrum)
        spectrum *= scipy.fft.rfft(alice, size, workers=-1)
        del alice
        corr = scipy.fft.irfft(spectrum, size, workers=-1)[: lag_range + 1].astype(np.float64)
        del spectrum, comb
        lag, z = _zscore(corr)
        self.first_z, self.first_detections = z, int(sel.sum())  # the stream's retry rule
        if z < FIRST_Z:
            raise ProtocolAborted(
                f"time synchronisation failed: no correlation peak (z={z:.1f}, "
                f"{int(sel.sum())} detections in the densest {window_s * 1e3:.0f} ms)"
            )
        # offset(T) = slot position - T * rate; at tc the detections sit on slot centres - phi
        self.anchors_t = [tc]
        self.anchors_off = [base + lag - int(k_rel.min()) - phi - tc * rate]
        self.first_slope = drift * rate
        self.anchors_slope = [self.first_slope]
        return tc

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
        t_sorted = bool(np.all(np.diff(t) >= 0))
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

    def assign(self, t_all: np.ndarray, det: np.ndarray) -> SyncResult:
        """Every detection's slot from a smoothing spline through the anchors (linear
        beyond them, with the end slopes); assigned only inside the timing gate."""
        rate, pass_json = self.rate, self.pass_json
        order = np.argsort(self.anchors_t)
        ts = np.array(self.anchors_t)[order]
        os_ = np.array(self.anchors_off)[order]
        if ts.size >= 4:
            spline = make_interp_spline(ts, os_, k=3)
            model = spline(np.clip(t_all, ts[0], ts[-1]))
            # outside the anchors: extrapolate linearly with the end slopes
            d = spline.derivative()
            model = np.where(t_all < ts[0], os_[0] + d(ts[0]) * (t_all - ts[0]), model)
            model = np.where(t_all > ts[-1], os_[-1] + d(ts[-1]) * (t_all - ts[-1]), model)
        elif ts.size >= 2:
            coef = np.polyfit(ts, os_, ts.size - 1)
            model = np.polyval(coef, t_all)
        else:
            model = os_[0] + self.first_slope * (t_all - ts[0])
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
