"""`qkdsat timetransfer` on simulated two-way passes: accuracy against truth, attacks
that must be flagged and inputs that must be refused."""

import json
import shutil

import numpy as np
import pytest

from host.cli import main
from host.timetransfer import simulate

DURATION_S = 10.0


def simulated(tmp_path_factory, name, profile="micius-qstt", **attack):
    pass_dir = tmp_path_factory.mktemp(name)
    simulate.simulate(simulate.load_profile(profile), pass_dir, 3, DURATION_S, **attack)
    return pass_dir


@pytest.fixture(scope="module")
def clean_pass(tmp_path_factory):
    return simulated(tmp_path_factory, "clean")


def run(pass_dir, out_dir):
    code = main(["timetransfer", str(pass_dir), "--out", str(out_dir)])
    report_path = out_dir / "report.json"
    return code, json.loads(report_path.read_text()) if report_path.exists() else None


def test_clean_pass_matches_truth_and_raises_no_flag(clean_pass, tmp_path):
    code, report = run(clean_pass, tmp_path)
    assert code == 0 and report["aborted"] is False
    assert report["qber"]["uplink"] < 0.01 and report["qber"]["downlink"] < 0.01
    # bias: half the profile's 15 ps delay-calibration residual, nothing more
    assert abs(report["truth"]["offset_bias_ps"] - 7.5) < 5.0
    assert report["truth"]["precision_1s_ps"] <= 30.0
    assert report["range_check"]["violation"] is False
    assert report["range_rate_check"]["violation"] is False
    # each correction the estimator applies is far larger than the result's error
    corrections = report["corrections_ps"]
    assert abs(corrections["sagnac"][1]) > 500
    assert max(map(abs, corrections["light_time_same_emission_pairing"])) > 1000
    lines = (tmp_path / "offset.csv").read_text().splitlines()
    assert lines[0].startswith("t_s,offset_ps,offset_sigma_ps")
    assert len(lines) - 1 == report["bins"] >= 0.9 * DURATION_S / report["bin_s"]
    assert (tmp_path / "timetransfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["time_data_security"].startswith("none yet")


def test_json_prints_the_report_alone(clean_pass, tmp_path, capsys):
    code = main(["timetransfer", str(clean_pass), "--out", str(tmp_path), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and printed == json.loads((tmp_path / "report.json").read_text())


def test_one_way_delay_of_200_ps_is_flagged_by_the_range_check(tmp_path_factory, tmp_path):
    pass_dir = simulated(tmp_path_factory, "delay", one_way_delay_ps=200.0)
    code, report = run(pass_dir, tmp_path)
    assert code == 3 and report["aborted"] is True
    assert "asymmetric delay" in report["abort_reason"]
    assert report["range_check"]["mean_one_way_error_ps"] == pytest.approx(100.0, abs=25.0)


def test_a_drifting_delay_under_the_mean_check_is_flagged_by_the_range_rate(
    tmp_path_factory, tmp_path
):
    # 0 -> 200 ps over the window: the mean one-way error (~50 ps) stays under the range
    # check's threshold; its drift of ~10 ps/s does not pass the range-rate check
    pass_dir = simulated(tmp_path_factory, "ramp", delay_ramp_ps=200.0)
    code, report = run(pass_dir, tmp_path)
    assert code == 3 and "drifting asymmetric delay" in report["abort_reason"]
    assert report["range_check"]["violation"] is False
    assert report["range_rate_check"]["one_way_error_rate_ps_s"] == pytest.approx(10.0, abs=3.0)


def test_intercept_resend_is_flagged_by_the_timing_qber(tmp_path_factory, tmp_path):
    pass_dir = simulated(tmp_path_factory, "eve", intercept_resend=0.5)
    code, report = run(pass_dir, tmp_path)
    assert code == 3 and "QBER" in report["abort_reason"]
    assert report["qber"]["downlink"] > 0.1


def test_missing_uplink_data_is_bad_input(clean_pass, tmp_path, capsys):
    broken = tmp_path / "pass"
    shutil.copytree(clean_pass, broken)
    (broken / "satellite" / "tt_uplink_rx.npz").unlink()
    assert main(["timetransfer", str(broken), "--out", str(tmp_path / "out")]) == 2
    assert "tt_uplink_rx.npz: missing" in capsys.readouterr().err


def _keep(pass_dir, direction, keep):
    for side in ("tx", "rx"):
        relative = simulate.files.EVENT_FILES[f"{direction}_{side}"]
        with np.load(pass_dir / relative) as data:
            arrays = {name: data[name][keep(data["tag_ps"].size)] for name in data.files}
        np.savez(pass_dir / relative, **arrays)


def test_directions_that_never_overlap_give_no_time_transfer(clean_pass, tmp_path):
    broken = tmp_path / "pass"
    shutil.copytree(clean_pass, broken)
    _keep(broken, "uplink", lambda n: slice(0, n // 3))  # first third of the pass only
    _keep(broken, "downlink", lambda n: slice(2 * n // 3, n))  # last third only
    code, report = run(broken, tmp_path / "out")
    assert code == 3 and "do not overlap" in report["abort_reason"]


def test_too_few_events_give_no_time_transfer(clean_pass, tmp_path):
    broken = tmp_path / "pass"
    shutil.copytree(clean_pass, broken)
    _keep(broken, "uplink", lambda n: slice(0, 100))
    code, report = run(broken, tmp_path / "out")
    assert code == 3 and "too few uplink timing events" in report["abort_reason"]


def test_best_profile_reaches_10_ps_tdev_and_bias(tmp_path_factory, tmp_path):
    pass_dir = simulated(tmp_path_factory, "best", profile="qstt-best")
    code, report = run(pass_dir, tmp_path)
    assert code == 0
    assert report["stability"]["tdev_ps"]["1"] <= 10.0
    assert report["truth"]["tdev_error_ps"]["1"] <= 10.0
    # the bias left is half the profile's 5 ps calibration residual
    assert abs(report["truth"]["offset_bias_ps"] - 2.5) < 2.0
    # the measured rate of the satellite clock is its oscillator's 1e-9 plus relativity:
    # -3.22e-10 velocity dilation + 5.06e-11 gravitational blueshift at 500 km
    table = np.loadtxt(tmp_path / "offset.csv", delimiter=",", skiprows=1)
    rate = np.polyfit(table[:, 0], table[:, 1], 1)[0] * 1e-12
    assert rate - 1.0e-9 == pytest.approx(-3.22e-10 + 5.06e-11, abs=5e-12)
