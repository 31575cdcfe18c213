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
of `bin_s` the offset is a line and e a constant; the three unknowns are fitted by
weighted least squares over both directions at once, so up and down events never need
to be paired. Noise counts (uniform in the detection gate) are clipped at 4 sigma.
"""

from __future__ import annotations

import math

import numpy as np

from emulator.pass_model.clocks import PS_PER_S
from emulator.pass_model.geometry import SPEED_OF_LIGHT_KM_S
from emulator.pass_model.two_way import InertialPass, troposphere_delay_s
from host.errors import ProtocolAborted

QBER_MAX = 0.03  # above this the timing photons are not vouched for (intercept-resend)
MIN_EVENTS_PER_DIRECTION = 200
MIN_BINS = 5
CLIP_SIGMA = 4.0
RANGE_CHECK_SIGMA = 4.0
MM_PER_PS = SPEED_OF_LIGHT_KM_S * 1e6 / PS_PER_S  # 0.2998 mm of one-way path per ps


def predicted_orbit(scenario: dict) -> InertialPass:
    orbit, station = scenario["orbit"], scenario["station"]
    return InertialPass(
        orbit["altitude_km"], orbit["inclination_deg"], station["lat_deg"],
        station["height_km"], orbit["cross_track_deg"], orbit["t_reference_s"],
    )  # fmt: skip


def timing_events(events: dict) -> dict:
    """Sifted events whose bits agree are timing events; the others give the QBER."""
    out = {}
    for direction in ("uplink", "downlink"):
        tx_tag, tx_basis, tx_bit = events[f"{direction}_tx"]
        rx_tag, rx_basis, rx_bit = events[f"{direction}_rx"]
        sifted = tx_basis == rx_basis
        agree = sifted & (tx_bit == rx_bit)
        n_sifted = int(sifted.sum())
        out[direction] = {
            "tx": tx_tag[agree],
            "rx": rx_tag[agree],
            "sifted": n_sifted,
            "errors": n_sifted - int(agree.sum()),
            "qber": (n_sifted - int(agree.sum())) / n_sifted if n_sifted else math.nan,
        }
    return out


def residuals(scenario: dict, timing: dict, orbit: InertialPass):
    """Event times (s, ground time) and Delta - base (ps) of up and down events."""
    delays = scenario["delays_ps"]
    epoch = np.int64(scenario["ground_clock_epoch_ps"])
    height = scenario["station"]["height_km"]
    wavelengths = scenario["wavelengths_nm"]
    up, down = timing["uplink"], timing["downlink"]
    base = np.int64(np.median(up["rx"] - up["tx"]))  # coarse offset, keeps floats small

    t1 = (up["tx"] - epoch).astype(np.float64) / PS_PER_S
    leave = t1 + delays["ground_tx"] / PS_PER_S
    flight = orbit.up_light_time_s(leave) + troposphere_delay_s(
        orbit.elevation_deg(leave), wavelengths["uplink"], height
    )
    t2 = leave + flight + delays["satellite_rx"] / PS_PER_S
    up_y = (up["rx"] - up["tx"] - base).astype(np.float64) - (t2 - t1) * PS_PER_S

    t4_tag = (down["rx"] - epoch).astype(np.float64) / PS_PER_S
    t4 = t4_tag - delays["ground_rx"] / PS_PER_S
    flight = orbit.down_light_time_by_reception_s(t4)
    flight = flight + troposphere_delay_s(
        orbit.elevation_deg(t4 - flight), wavelengths["downlink"], height
    )
    t3 = t4 - flight - delays["satellite_tx"] / PS_PER_S
    down_y = (down["tx"] - down["rx"] - base).astype(np.float64) + (t4_tag - t3) * PS_PER_S
    return base, (t2, up_y), (t3, down_y)


def _fit_bins(times, values, signs, weights, bin_index, n_bins, bin_centres):
    """Weighted least squares of y = a + b (t - centre) + sign * e in every bin at once."""
    dt = times - bin_centres[bin_index]
    columns = (np.ones_like(dt), dt, signs)
    normal = np.zeros((n_bins, 3, 3))
    rhs = np.zeros((n_bins, 3))
    for i in range(3):
        rhs[:, i] = np.bincount(bin_index, weights * columns[i] * values, n_bins)
        for j in range(i, 3):
            normal[:, i, j] = normal[:, j, i] = np.bincount(
                bin_index, weights * columns[i] * columns[j], n_bins
            )
    solvable = np.abs(np.linalg.det(normal)) > 1e-300
    params = np.full((n_bins, 3), np.nan)
    covariance = np.full((n_bins, 3, 3), np.nan)
    if solvable.any():
        covariance[solvable] = np.linalg.inv(normal[solvable])
        params[solvable] = np.einsum("nij,nj->ni", covariance[solvable], rhs[solvable])
    return params, covariance, solvable


def estimate(scenario: dict, events: dict) -> dict:
    """The offset series, range check and corrections; raises ProtocolAborted (with the
    partial report as its `report` attribute) when the result cannot be vouched for."""
    orbit = predicted_orbit(scenario)
    timing = timing_events(events)
    report = {
        "aborted": False,
        "abort_reason": None,
        "qber": {d: timing[d]["qber"] for d in timing},
        "sifted_events": {d: timing[d]["sifted"] for d in timing},
        "sifting": scenario.get("sifting"),
    }

    def abort(reason: str):
        report["aborted"], report["abort_reason"] = True, reason
        error = ProtocolAborted(reason)
        error.report = report
        raise error

    for direction in timing:
        if timing[direction]["tx"].size < MIN_EVENTS_PER_DIRECTION:
            abort(
                f"too few {direction} timing events: {timing[direction]['tx'].size} "
                f"(need {MIN_EVENTS_PER_DIRECTION})"
            )
    base, (t_up, y_up), (t_down, y_down) = residuals(scenario, timing, orbit)
    bin_s = float(scenario.get("bin_s", 0.1))
    start = math.floor(min(t_up.min(), t_down.min()) / bin_s) * bin_s
    end = max(t_up.max(), t_down.max())
    n_bins = int(math.ceil((end - start) / bin_s)) + 1
    centres = start + (np.arange(n_bins) + 0.5) * bin_s
    times = np.concatenate([t_up, t_down])
    values = np.concatenate([y_up, y_down])
    signs = np.concatenate([np.ones_like(t_up), -np.ones_like(t_down)])
    bin_index = np.clip(((times - start) / bin_s).astype(np.int64), 0, n_bins - 1)
    is_up = signs > 0
    # per-direction scatter, first from a robust spread around the bin median
    keep = np.ones(times.size, dtype=bool)
    sigma = {True: 1e6, False: 1e6}
    params = covariance = solvable = None
    for _ in range(3):
        weights = np.where(is_up, 1.0 / sigma[True] ** 2, 1.0 / sigma[False] ** 2) * keep
        params, covariance, solvable = _fit_bins(
            times, values, signs, weights, bin_index, n_bins, centres
        )
        model = (
            params[bin_index, 0]
            + params[bin_index, 1] * (times - centres[bin_index])
            + signs * params[bin_index, 2]
        )
        residual = values - model
        for flag in (True, False):
            chosen = (is_up == flag) & np.isfinite(residual)
            mad = np.median(np.abs(residual[chosen & keep])) if chosen.any() else np.nan
            sigma[flag] = max(1.4826 * mad, 0.1) if np.isfinite(mad) else 1e6
        keep = np.isfinite(residual) & (
            np.abs(residual) < CLIP_SIGMA * np.where(is_up, sigma[True], sigma[False])
        )
    counts_up = np.bincount(bin_index[is_up & keep], minlength=n_bins)
    counts_down = np.bincount(bin_index[~is_up & keep], minlength=n_bins)
    good = solvable & (counts_up >= 3) & (counts_down >= 3)
    if good.sum() < MIN_BINS:
        abort(
            f"only {int(good.sum())} bins of {bin_s} s hold events of both directions "
            f"(need {MIN_BINS}): the up and down data do not overlap in time"
        )
    offset_ps = params[:, 0]
    offset_sigma_ps = np.sqrt(covariance[:, 0, 0])
    range_error_ps = params[:, 2]
    range_sigma_ps = np.sqrt(covariance[:, 2, 2])
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
    corrections = correction_sizes(scenario, orbit, t_good)
    used = {"uplink": int(counts_up[good].sum()), "downlink": int(counts_down[good].sum())}
    duration_s = float(n_bins * bin_s)
    report.update(
        {
            "offset_reference_ps": int(base),
            "bin_s": bin_s,
            "bins": int(good.sum()),
            "timing_events_used": used,
            "time_data_rate_hz": (used["uplink"] + used["downlink"]) / duration_s,
            "jitter_ps_rms": {"uplink": sigma[True], "downlink": sigma[False]},
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
            "corrections_ps": corrections,
        }
    )
    report["series"] = {
        "t_s": t_good,
        "offset_ps": offset_ps[good],
        "offset_sigma_ps": offset_sigma_ps[good],
        "range_error_ps": range_error_ps[good],
        "events_up": counts_up[good],
        "events_down": counts_down[good],
    }
    for direction in ("uplink", "downlink"):
        if timing[direction]["qber"] > QBER_MAX:
            abort(
                f"{direction} timing QBER {timing[direction]['qber']:.3f} above "
                f"{QBER_MAX}: photons intercepted or injected, time not vouched for"
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
    return report


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
