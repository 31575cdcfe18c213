"""`qkdsat simulate --two-way`: the two-way pass is the QKD pass. Its downlink events are
the pass's own detections, its uplink flies the same orbit on the same clocks, and the
time transfer recovers the QKD pass's true range and clock offset."""

import json
import math

import numpy as np
import pytest
from scipy.interpolate import CubicSpline

from host.cli import main
from host.formats.qdet import read_detections
from host.timetransfer import estimate, files
from tests.network_keys import distilled

DURATION_S = 5.0
SEED = 3
PATTERN_SECRET = "000102030405060708090a0b0c0d0e0f"  # fixed: the draw is deterministic


@pytest.fixture(scope="module")
def two_way_pass(tmp_path_factory):
    pass_dir = tmp_path_factory.mktemp("two_way") / "pass"
    argv = ["simulate", "--profile", "micius-2017", "--duration-s", str(DURATION_S)]
    argv += ["--seed", str(SEED), "--pattern-secret", PATTERN_SECRET, "--two-way"]
    assert main(argv + ["--out", str(pass_dir)]) == 0
    return pass_dir


def test_the_downlink_events_are_the_qkd_passs_detections(two_way_pass):
    events = files.read_events(two_way_pass)
    tx_tag, _, tx_bit = events["downlink_tx"]
    rx_tag, rx_basis, rx_bit = events["downlink_rx"]
    time_ps, channel, _ = read_detections(two_way_pass / "ground" / "detections.qdet")
    # every downlink reception is one of the ground's detections, with its detector
    row = np.searchsorted(time_ps, rx_tag)
    assert np.array_equal(time_ps[row], rx_tag)
    assert np.array_equal(channel[row] // 2, rx_basis) and np.array_equal(channel[row] % 2, rx_bit)
    # and its emission is the slot the QKD pass's truth says sent that photon
    truth = np.load(two_way_pass / "truth" / "detections.npz")
    pass_json = json.loads((two_way_pass / "pass.json").read_text())
    clocks = json.loads((two_way_pass / "truth" / "truth.json").read_text())["clocks"]
    slot = (tx_tag - clocks["first_slot_satellite_ps"]) // pass_json["slot_period_ps"]
    photon = truth["slot"][row] >= 0
    assert np.array_equal(slot[photon], truth["slot"][row][photon])
    # the photons inside the coincidence window: all but the jitter's tails (350 ps rms,
    # +-1 ns window: 0.43 % outside), 5 sigma of the binomial count below that
    photons = int(np.count_nonzero(truth["kind"] == 0))
    kept = int(photon.sum())
    outside = 2 * 0.5 * math.erfc(1000 / 350 / math.sqrt(2))
    assert kept >= photons * (1 - outside) - 5 * math.sqrt(photons * outside)
    # the satellite's emitted bits are Alice's: a sifted QBER of the pass's ~1 %
    sifted = photon & (events["downlink_tx"][1] == rx_basis)
    errors = int(np.count_nonzero(tx_bit[sifted] != rx_bit[sifted]))
    assert 0 < errors / sifted.sum() < 0.02
    # the two-way records are the satellite's and the ground's own: not world-readable
    for relative in files.EVENT_FILES.values():
        assert (two_way_pass / relative).stat().st_mode & 0o077 == 0


def test_the_time_transfer_recovers_the_qkd_passs_range_and_offset(two_way_pass, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    distilled(keys, 64_000, "the two-way pass")
    out = tmp_path / "tt"
    argv = ["timetransfer", str(two_way_pass), "--keys", str(keys), "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["aborted"] is False and report["bins"] >= 0.9 * DURATION_S / report["bin_s"]
    rows = np.genfromtxt(out / "offset.csv", delimiter=",", names=True)

    # range: the orbit as predicted plus the measured one-way error is the QKD pass's true
    # range (truth/geometry.npz, what its link budget used), up to half the profile's
    # 15 ps satellite-receiver calibration residual (2.2 mm) that e carries by design
    scenario = files.read_scenario(two_way_pass)
    predicted_km = estimate.predicted_orbit(scenario).range_km(rows["t_s"])
    recovered_km = predicted_km + rows["range_error_mm"] * 1e-6
    geometry = np.load(two_way_pass / "truth" / "geometry.npz")
    true_km = CubicSpline(geometry["t_s"], geometry["range_km"])(rows["t_s"])
    residual_mm = (recovered_km - true_km) * 1e6 - 7.5 * estimate.MM_PER_PS
    # the mean over the bins: 5 of its statistical sigmas (from the per-bin sigmas)
    sigma_mm = report["range_check"]["statistical_sigma_ps"] * estimate.MM_PER_PS
    assert abs(float(np.mean(residual_mm))) < 5 * sigma_mm < 5.0
    # every bin: 6 of its own sigmas (50 bins: a miss by chance ~1e-7)
    assert np.all(np.abs(residual_mm) < 6 * rows["offset_sigma_ps"] * estimate.MM_PER_PS)

    # offset: the truth is the QKD pass's clocks (truth.json: the same offsets and rates)
    qkd_clocks = json.loads((two_way_pass / "truth" / "truth.json").read_text())["clocks"]
    truth = files.read_truth(two_way_pass)
    assert int(truth["offset_base_ps"]) == (
        qkd_clocks["satellite"]["offset_ps"] - qkd_clocks["ground"]["offset_ps"]
    )
    rate = np.polyfit(truth["t_s"], truth["offset_residual_ps"], 1)[0] * 1e-12
    # the pass's rates plus the relativistic -2.7e-10 and the TCXO's noise (< 1e-10)
    drift = qkd_clocks["satellite"]["drift"] - qkd_clocks["ground"]["drift"]
    assert abs(rate - drift + 2.7e-10) < 1e-10
    # bias against that truth: half the calibration residual, within 5 sigma of the mean
    # of the per-bin errors
    bias_sigma = report["truth"]["error_std_per_bin_ps"] / math.sqrt(report["bins"])
    assert abs(report["truth"]["offset_bias_ps"] - 7.5) < 5 * bias_sigma
    assert report["range_check"]["violation"] is False


def test_the_optical_link_of_a_two_way_pass_lasts_from_rise_to_set(two_way_pass):
    """The streaming distillation's link (emulator/optical_link.py) rebuilds the pass
    from rise to set on the two-way orbit: it must not end with the QKD window (it did:
    the link was lost at the window's end, before privacy amplification)."""
    from emulator.optical_link import link_for_pass
    from emulator.pass_model.geometry import SPEED_OF_LIGHT_KM_S

    schedule = link_for_pass(two_way_pass).schedule  # not started: no sockets
    assert schedule.rise_s < -100 and schedule.set_s > DURATION_S + 100
    assert schedule.down_cause(DURATION_S + 10) is None
    geometry = np.load(two_way_pass / "truth" / "geometry.npz")
    for t_s in (0.0, DURATION_S / 2, DURATION_S):
        range_km = schedule.light_time_s(t_s) * SPEED_OF_LIGHT_KM_S
        true_km = float(np.interp(t_s, geometry["t_s"], geometry["range_km"]))
        assert abs(range_km - true_km) < 0.02  # the same orbit (linear interpolation: m)
