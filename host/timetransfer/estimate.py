"""Joint estimate of the satellite clock offset and the range from asynchronous up and down
timing events (docs/time-transfer.md has the derivation).

With Delta(t) = satellite clock - ground clock at ground time t, each up event (ground
tags its emission G1, the satellite tags the reception S2) and each down event (the
satellite tags its emission S3, the ground tags the reception G4) gives

    up:   S2 - G1 - (t2' - t1) = Delta(t2') + e        t2' = satellite tag instant
    down: S3 - G4 + (t4' - t3) = Delta(t3)  - e        t3  = satellite emission instant

where (t2' - t1) and (t4' - t3) are the predicted flights: equipment delays + the
light-time solution on the predicted orbit (satellite motion, Sagnac, Shapiro) + the
troposphere at each wavelength, and e is whatever the prediction misses on a one-way path
(orbit error, a symmetric delay, *or an asymmetric delay attack's half*). Inside each bin
of `bin_s` the offset is a line and e a constant. Each endpoint fits the line of the
direction it receives (the satellite the uplink, `uplink_samples`; the ground the
downlink, `downlink_samples`) with `fit_direction`, so the satellite's detection tags
never leave it: only its per-bin intercepts cross the link, one-time-pad encrypted
(host/timetransfer/endpoints.py). `combine` turns the two intercepts at each bin centre,
a_up = Delta + e and a_down = Delta - e, into the offset and e; up and down events are
never paired. Noise counts (uniform in the detection gate) are clipped at 4 sigma.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom

from emulator.pass_model.clocks import PS_PER_S
from emulator.pass_model.geometry import SPEED_OF_LIGHT_KM_S
from emulator.pass_model.two_way import InertialPass, troposphere_delay_s
from host.errors import ProtocolAborted

QBER_MAX = 0.03  # above this the timing photons are not vouched for (intercept-resend)
# What a vouch promises whatever the sample's size: an intercept-resend that raises the
# timing QBER to QBER_ATTACK (~15 % of the photons resent on a 1.2 % channel) is vouched
# for with probability at most ATTACK_VOUCH_PROBABILITY. The limit alone did not: a sample
# of 256 let 5 % through 5.5 % of the time (docs/time-transfer.md, the QBER decision)
QBER_ATTACK = 0.05
ATTACK_VOUCH_PROBABILITY = 1e-3
MIN_EVENTS_PER_DIRECTION = 200
MIN_BINS = 5
CLIP_SIGMA = 4.0
RANGE_CHECK_SIGMA = 4.0
# the range check per second of the pass: a delay confined to a second of a long pass
# stays under the mean's threshold (its mean is diluted by the pass) and has no slope,
# yet moves that second's offsets by half of it. 5 sigma: ~300 seconds a full pass, each
# past 5 sigma with p = 5.7e-7 on a clean pass (a false flag ~2e-4 of passes)
SEGMENT_S = 1.0
SEGMENT_CHECK_SIGMA = 5.0
MM_PER_PS = SPEED_OF_LIGHT_KM_S * 1e6 / PS_PER_S  # 0.2998 mm of one-way path per ps


def predicted_orbit(scenario: dict) -> InertialPass:
    orbit, station = scenario["orbit"], scenario["station"]
    return InertialPass(
        orbit["altitude_km"], orbit["inclination_deg"], station["lat_deg"],
        station["height_km"], orbit["cross_track_deg"], orbit["t_reference_s"],
    )  # fmt: skip


def uplink_samples(scenario: dict, orbit: InertialPass, tx_tag, rx_tag, base: int):
    """Up events as (t2 ground time in s from the ground clock epoch, Delta - base in ps):
    the satellite computes them from its own reception tags and the ground's emission
    epochs (public after sifting)."""
    t1, t2 = uplink_flight(scenario, orbit, tx_tag)
    y = (rx_tag - tx_tag - np.int64(base)).astype(np.float64) - (t2 - t1) * PS_PER_S
    return t2, y


def uplink_flight(scenario: dict, orbit: InertialPass, tx_tag):
    """(t1, t2): an up photon's emission and its predicted reception tag instant, s of
    ground time from the ground clock epoch (delays, light time on the predicted orbit,
    troposphere)."""
    delays = scenario["delays_ps"]
    epoch = np.int64(scenario["ground_clock_epoch_ps"])
    t1 = (np.asarray(tx_tag, dtype=np.int64) - epoch).astype(np.float64) / PS_PER_S
    leave = t1 + delays["ground_tx"] / PS_PER_S
    flight = orbit.up_light_time_s(leave) + troposphere_delay_s(
        orbit.elevation_deg(leave),
        scenario["wavelengths_nm"]["uplink"],
        scenario["station"]["height_km"],
    )
    return t1, leave + flight + delays["satellite_rx"] / PS_PER_S


def downlink_samples(scenario: dict, orbit: InertialPass, tx_tag, rx_tag, base: int):
    """Down events as (t3 ground time in s, Delta - base in ps): the ground computes them
    from its own reception tags and the satellite's emission epochs."""
    delays = scenario["delays_ps"]
    epoch = np.int64(scenario["ground_clock_epoch_ps"])
    t4_tag = (rx_tag - epoch).astype(np.float64) / PS_PER_S
    t4 = t4_tag - delays["ground_rx"] / PS_PER_S
    flight = orbit.down_light_time_by_reception_s(t4)
    flight = flight + troposphere_delay_s(
        orbit.elevation_deg(t4 - flight),
        scenario["wavelengths_nm"]["downlink"],
        scenario["station"]["height_km"],
    )
    t3 = t4 - flight - delays["satellite_tx"] / PS_PER_S
    y = (tx_tag - rx_tag - np.int64(base)).astype(np.float64) + (t4_tag - t3) * PS_PER_S
    return t3, y


def bin_grid(scenario: dict) -> tuple[float, int]:
    """(bin length, number of bins) both endpoints use: bins of `bin_s` from the ground
    clock's epoch over the pass, so the two sides' per-bin fits line up without talking."""
    bin_s = float(scenario.get("bin_s", 0.1))
    return bin_s, int(math.ceil(float(scenario["duration_s"]) / bin_s)) + 1


def fit_direction(times: np.ndarray, values: np.ndarray, bin_s: float, n_bins: int) -> dict:
    """One direction's per-bin line y = a + b (t - centre), unweighted least squares with
    three rounds of clipping at CLIP_SIGMA times the direction's robust (MAD) scatter,
    which drops the noise counts spread over the detection gate. Returns per bin the
    intercept at the bin centre `a_ps`, its variance `var_ps2` (NaN where fewer than 3
    events, or events spanning less than half the bin), the events kept `n`, and the
    scatter `sigma_ps`."""
    bin_index = np.clip((times / bin_s).astype(np.int64), 0, n_bins - 1)
    dt = times - (bin_index + 0.5) * bin_s
    keep = np.isfinite(values)
    sigma = math.nan
    # the intercept is the line at the bin's centre: events spanning less than half the
    # bin (a pass's last sliver of flight time, a few ms) put the centre far outside them,
    # where the slope's error dominates (34 ns seen on a 2 s segment's last bin)
    first_dt = np.full(n_bins, np.inf)
    last_dt = np.full(n_bins, -np.inf)
    np.minimum.at(first_dt, bin_index[keep], dt[keep])
    np.maximum.at(last_dt, bin_index[keep], dt[keep])
    spanned = last_dt - first_dt >= bin_s / 2

    def fit(mask):
        w = mask.astype(np.float64)
        n = np.bincount(bin_index, w, n_bins)
        s_t = np.bincount(bin_index, w * dt, n_bins)
        s_tt = np.bincount(bin_index, w * dt * dt, n_bins)
        s_y = np.bincount(bin_index, np.where(mask, values, 0.0), n_bins)
        s_ty = np.bincount(bin_index, np.where(mask, dt * values, 0.0), n_bins)
        det = n * s_tt - s_t**2
        ok = spanned & (n >= 3) & (det > 1e-12 * np.maximum(n * s_tt, 1e-300))
        safe = np.where(ok, det, 1.0)
        a = np.where(ok, (s_tt * s_y - s_t * s_ty) / safe, np.nan)
        b = np.where(ok, (n * s_ty - s_t * s_y) / safe, np.nan)
        return a, b, np.where(ok, s_tt / safe, np.nan), n

    for _ in range(3):
        a, b, unit_var, n = fit(keep)
        residual = values - a[bin_index] - b[bin_index] * dt
        usable = keep & np.isfinite(residual)
        if not usable.any():
            break
        sigma = max(1.4826 * float(np.median(np.abs(residual[usable]))), 0.1)
        keep = np.isfinite(residual) & (np.abs(residual) < CLIP_SIGMA * sigma)
    a, b, unit_var, n = fit(keep)
    return {"a_ps": a, "var_ps2": unit_var * sigma**2, "n": n.astype(np.int64), "sigma_ps": sigma}


def combine(scenario: dict, orbit: InertialPass, base: int, up: dict, down: dict,
            report: dict) -> dict:  # fmt: skip
    """Offset and one-way range error per bin from the two directions' fits:
    a_up = Delta + e and a_down = Delta - e at each bin centre. Fills `report` (and its
    `series`); raises ProtocolAborted with the report attached when the result cannot be
    vouched for (QBER, overlap, range and range-rate checks)."""
    bin_s, n_bins = bin_grid(scenario)

    def abort(reason: str):
        report["aborted"], report["abort_reason"] = True, reason
        error = ProtocolAborted(reason)
        error.report = report
        raise error

    for direction, fit in (("uplink", up), ("downlink", down)):
        if int(fit["n"].sum()) < MIN_EVENTS_PER_DIRECTION:
            abort(
                f"too few {direction} timing events: {int(fit['n'].sum())} "
                f"(need {MIN_EVENTS_PER_DIRECTION})"
            )
    centres = (np.arange(n_bins) + 0.5) * bin_s
    good = np.isfinite(up["a_ps"]) & np.isfinite(down["a_ps"])
    good &= np.isfinite(up["var_ps2"]) & np.isfinite(down["var_ps2"])
    if good.sum() < MIN_BINS:
        abort(
            f"only {int(good.sum())} bins of {bin_s} s hold events of both directions "
            f"(need {MIN_BINS}): the up and down data do not overlap in time"
        )
    offset_ps = (up["a_ps"] + down["a_ps"]) / 2
    range_error_ps = (up["a_ps"] - down["a_ps"]) / 2
    offset_sigma_ps = np.sqrt(up["var_ps2"] + down["var_ps2"]) / 2
    range_sigma_ps = offset_sigma_ps  # the same two variances, halved
    t_good = centres[good]

    # range check: mean one-way range error against the orbit's uncertainty
    w = 1.0 / range_sigma_ps[good] ** 2
    mean_e_ps = float(np.sum(w * range_error_ps[good]) / np.sum(w))
    stat_ps = float(1.0 / math.sqrt(np.sum(w)))
    orbit_ps = scenario["orbit"]["range_sigma_mm"] / MM_PER_PS
    threshold_ps = RANGE_CHECK_SIGMA * math.hypot(stat_ps, orbit_ps)

    # range-rate check: the slope of e over the pass against the orbit's range-rate error;
    # catches a delay that drifts while its mean stays under the range check
    t_mid = float(np.sum(w * t_good) / np.sum(w))
    slope_ps_s = float(
        np.sum(w * (t_good - t_mid) * range_error_ps[good]) / np.sum(w * (t_good - t_mid) ** 2)
    )
    slope_stat = float(1.0 / math.sqrt(np.sum(w * (t_good - t_mid) ** 2)))
    rate_orbit = scenario["orbit"]["range_rate_sigma_mm_s"] / MM_PER_PS
    rate_threshold = RANGE_CHECK_SIGMA * math.hypot(slope_stat, rate_orbit)
    segment = segment_check(t_good, range_error_ps[good], w, orbit_ps)
    corrections = correction_sizes(scenario, orbit, t_good)
    used = {"uplink": int(up["n"][good].sum()), "downlink": int(down["n"][good].sum())}
    duration_s = float(n_bins * bin_s)
    report.update(
        {
            "offset_reference_ps": int(base),
            "bin_s": bin_s,
            "bins": int(good.sum()),
            "timing_events_used": used,
            "time_data_rate_hz": (used["uplink"] + used["downlink"]) / duration_s,
            "jitter_ps_rms": {"uplink": up["sigma_ps"], "downlink": down["sigma_ps"]},
            "offset_sigma_ps_median": float(np.median(offset_sigma_ps[good])),
            "range_check": {
                "mean_one_way_error_ps": mean_e_ps,
                "mean_one_way_error_mm": mean_e_ps * MM_PER_PS,
                "statistical_sigma_ps": stat_ps,
                "orbit_sigma_ps": orbit_ps,
                "threshold_ps": threshold_ps,
                "bound": (
                    f"an asymmetric delay below {2 * threshold_ps:.0f} ps one-way can pass "
                    f"unseen and shift the offset by up to {threshold_ps:.0f} ps"
                ),
                "violation": abs(mean_e_ps) > threshold_ps,
            },
            "range_rate_check": {
                "one_way_error_rate_ps_s": slope_ps_s,
                "one_way_error_rate_mm_s": slope_ps_s * MM_PER_PS,
                "statistical_sigma_ps_s": slope_stat,
                "orbit_sigma_ps_s": rate_orbit,
                "threshold_ps_s": rate_threshold,
                "violation": abs(slope_ps_s) > rate_threshold,
            },
            "range_segment_check": segment,
            "corrections_ps": corrections,
        }
    )
    report["series"] = {
        "t_s": t_good,
        "offset_ps": offset_ps[good],
        "offset_sigma_ps": offset_sigma_ps[good],
        "range_error_ps": range_error_ps[good],
        "events_up": up["n"][good],
        "events_down": down["n"][good],
    }
    report["qber_check"] = {
        direction: qber_check(report["qber_sample"][direction]["n"],
                              report["qber_sample"][direction]["errors"])
        for direction in ("uplink", "downlink")
    }  # fmt: skip
    for direction, check in report["qber_check"].items():
        if check["decision"] == "above the limit":
            abort(
                f"{direction} timing QBER {check['qber']:.4f} ({check['errors']} errors in "
                f"{check['n']} events) above {QBER_MAX}: photons intercepted or injected, "
                "time not vouched for"
            )
        if check["decision"] == "undecided":
            abort(
                f"{direction} timing QBER sample too small to vouch: {check['errors']} "
                f"errors in {check['n']} events ({check['qber']:.4f}, under the {QBER_MAX} "
                f"limit), where at most {check['max_errors_vouched']} rule out an "
                f"intercept-resend at {QBER_ATTACK} QBER (p <= {ATTACK_VOUCH_PROBABILITY:g}); "
                "time not vouched for, no interception shown"
            )
    if report["range_check"]["violation"]:
        abort(
            f"two-way range differs from the orbit's by {mean_e_ps:.0f} ps one-way "
            f"({mean_e_ps * MM_PER_PS:.1f} mm), above {threshold_ps:.0f} ps: "
            "asymmetric delay suspected"
        )
    if report["range_rate_check"]["violation"]:
        abort(
            f"two-way range drifts from the orbit's by {slope_ps_s:.2f} ps/s one-way "
            f"({slope_ps_s * MM_PER_PS:.3f} mm/s), above {rate_threshold:.2f} ps/s: "
            "a drifting asymmetric delay suspected"
        )
    if segment["violation"]:
        worst = segment["worst"]
        abort(
            f"two-way range differs from the orbit's by {worst['one_way_error_ps']:.0f} ps "
            f"one-way in the second at t = {worst['t_s']:.1f} s, above "
            f"{worst['threshold_ps']:.0f} ps: an asymmetric delay burst suspected"
        )
    return report


def qber_vouch_max_errors(n: int) -> int:
    """The most errors a QBER sample of `n` events may hold and be vouched for: at most
    QBER_MAX of them (the limit's point estimate, as before), and few enough that a true
    QBER of QBER_ATTACK gives that few with probability at most ATTACK_VOUCH_PROBABILITY
    (exact binomial: the sample is drawn without replacement from sifted events whose
    errors are independent draws). -1 for an empty sample: nothing is vouched."""
    if n <= 0:
        return -1
    limit = int(QBER_MAX * n + 1e-9)  # errors / n <= QBER_MAX, without float's 8.99999
    if binom.cdf(limit, n, QBER_ATTACK) <= ATTACK_VOUCH_PROBABILITY:
        return limit  # every sample of >= 1,037 events: the limit decides alone
    most = int(binom.ppf(ATTACK_VOUCH_PROBABILITY, n, QBER_ATTACK))
    while most >= 0 and binom.cdf(most, n, QBER_ATTACK) > ATTACK_VOUCH_PROBABILITY:
        most -= 1
    return most


def qber_check(n: int, errors: int) -> dict:
    """The timing QBER's decision on a sample of `n` events with `errors` errors:
    "vouched" (at most qber_vouch_max_errors(n)), "above the limit" (errors / n above
    QBER_MAX: the interception alarm, as before), or "undecided" (under the limit, yet too
    many errors for a sample this small to rule out QBER_ATTACK: not vouched, no alarm).
    `attack_vouch_probability`: the chance an intercept-resend at QBER_ATTACK shows at most
    this many errors (how strongly this sample rules it out)."""
    n, errors = int(n), int(errors)
    most = qber_vouch_max_errors(n)
    if errors <= most:
        decision = "vouched"
    elif errors > int(QBER_MAX * n + 1e-9):
        decision = "above the limit"
    else:
        decision = "undecided"
    return {
        "n": n,
        "errors": errors,
        "qber": errors / n if n else math.nan,
        "max_errors_vouched": most,
        "attack_qber": QBER_ATTACK,
        "attack_vouch_probability": float(binom.cdf(errors, n, QBER_ATTACK)) if n else 1.0,
        "decision": decision,
    }


def segment_check(t_s: np.ndarray, range_error_ps: np.ndarray, weight: np.ndarray,
                  orbit_ps: float) -> dict:  # fmt: skip
    """The range check of each SEGMENT_S of the pass: the weighted mean one-way range error
    of the segment's bins against SEGMENT_CHECK_SIGMA x (its statistical sigma, the
    orbit's line-of-sight sigma). The worst segment (largest ratio) is reported."""
    index = np.floor(t_s / SEGMENT_S).astype(np.int64)
    worst = None
    thresholds = []
    for segment in np.unique(index):
        inside = index == segment
        w = weight[inside]
        mean_ps = float(np.sum(w * range_error_ps[inside]) / np.sum(w))
        threshold_ps = SEGMENT_CHECK_SIGMA * math.hypot(1.0 / math.sqrt(np.sum(w)), orbit_ps)
        thresholds.append(threshold_ps)
        ratio = abs(mean_ps) / threshold_ps
        if worst is None or ratio > worst["ratio"]:
            worst = {
                "t_s": float(segment * SEGMENT_S),
                "one_way_error_ps": mean_ps,
                "threshold_ps": threshold_ps,
                "ratio": ratio,
            }
    typical_ps = float(np.median(thresholds))
    return {
        "segment_s": SEGMENT_S,
        "segments": len(thresholds),
        "worst": worst,
        "bound": (
            f"an asymmetric delay confined to one {SEGMENT_S:g} s of the pass can shift "
            f"that second's offset by up to ~{typical_ps:.0f} ps unseen"
        ),
        "violation": bool(worst["ratio"] > 1.0),
    }


def correction_sizes(scenario: dict, orbit: InertialPass, t_s: np.ndarray) -> dict:
    """How large each term is that a naive (t2 - t1 - t4 + t3)/2 would get wrong, in ps
    of clock offset, at the bin times: {term: [min, mean, max]}."""
    delays = scenario["delays_ps"]
    height = scenario["station"]["height_km"]
    wavelengths = scenario["wavelengths_nm"]
    elevation = orbit.elevation_deg(t_s)
    # pairing an up and a down photon emitted at the same moment, as if their light
    # times were equal: the satellite's motion during the flight (tens of ns) + Sagnac
    same_time = (orbit.up_light_time_s(t_s) - orbit.down_light_time_s(t_s)) / 2
    # pairing photons that cross at the satellite: only the Sagnac term is left
    range_s = orbit.range_km(t_s) / SPEED_OF_LIGHT_KM_S
    crossing = (orbit.up_light_time_s(t_s - range_s) - orbit.down_light_time_s(t_s)) / 2
    terms = {
        "light_time_same_emission_pairing": same_time * PS_PER_S,
        "light_time_crossing_pairing": crossing * PS_PER_S,
        "sagnac": orbit.sagnac_s(t_s) * PS_PER_S,
        "troposphere_dispersion": (
            troposphere_delay_s(elevation, wavelengths["uplink"], height)
            - troposphere_delay_s(elevation, wavelengths["downlink"], height)
        )
        / 2
        * PS_PER_S,
        "equipment_delay_asymmetry": np.full_like(
            t_s,
            (
                delays["ground_tx"]
                + delays["satellite_rx"]
                - delays["satellite_tx"]
                - delays["ground_rx"]
            )
            / 2,
        ),
        "relativistic_accumulated_over_pass": orbit.relativistic_offset_s(t_s - t_s[0]) * PS_PER_S,
    }
    sizes = {
        name: [float(np.min(v)), float(np.mean(v)), float(np.max(v))] for name, v in terms.items()
    }
    rate = orbit.relativistic_rate(t_s)
    sizes["relativistic_rate"] = {
        "velocity": float(np.mean(rate["velocity"])),
        "gravity": float(np.mean(rate["gravity"])),
    }
    return sizes
