"""`qkdsat timetransfer` on simulated two-way passes: accuracy against truth, attacks
that must be flagged and inputs that must be refused."""

import json
import math
import re
import shutil

import numpy as np
import pytest

from host.cli import main
from host.distil import channel as ch
from host.distil import timesync
from host.distil.bitcodec import pack_bits, unpack_bits
from host.errors import BadInput, ProtocolAborted
from host.timetransfer import command, endpoints, estimate, files, simulate
from tests.network_keys import distilled
from tests.split_timetransfer import run_split
from tests.uplink_faults import (
    check_every_erring_uplink_event_counted_and_dropped,
    flip_uplink_bits,
    lose_and_add_uplink_events,
    recorded_uplink_timing,
)

DURATION_S = 10.0
UPLINK_KEY = bytes(range(32))  # the ground transmitter's pattern key: a fixed draw


def simulated(tmp_path_factory, name, profile="micius-qstt", **attack):
    pass_dir = tmp_path_factory.mktemp(name)
    simulate.simulate(
        simulate.load_profile(profile), pass_dir, 3, DURATION_S, uplink_key=UPLINK_KEY, **attack
    )
    return pass_dir


@pytest.fixture(scope="module")
def clean_pass(tmp_path_factory):
    return simulated(tmp_path_factory, "clean")


@pytest.fixture
def keys(tmp_path_factory):
    """A fresh distilled key pair (alice.key = bob.key, 64 kbit) for one test."""
    directory = tmp_path_factory.mktemp("keys")
    distilled(directory, 64_000, "a pass")
    return directory


def run(pass_dir, out_dir, keys):
    code = main(["timetransfer", str(pass_dir), "--keys", str(keys), "--out", str(out_dir)])
    report_path = out_dir / "report.json"
    return code, json.loads(report_path.read_text()) if report_path.exists() else None


def check_qber_against_the_profile(pass_dir, report):
    """Each direction's QBER, in two steps, both with 5-sigma tolerances from the counts.

    1. The whole sifted set of this fixed-seed pass (both sides' records: truth no endpoint
       sees) against the profile: misalignment e_d, plus the noise clicks' share f (noise
       rate x gate duty over all detections) at 1/2: q = e_d + (1/2 - e_d) f. For micius-qstt
       that is ~0.59 % up (10 Hz of noise in the gates against ~2,600 clicks/s) and ~0.47 %
       down: under QSTT's published "< 1 %" (Dai et al. 2020), the uplink with little room.
    2. The reported QBER is on a CSPRNG sample of the sifted events (every one up;
       down at most DOWNLINK_SAMPLE_MAX, 8,192), so it scatters around the whole set's
       value: +-0.2 % (1 sigma) up, where 20 runs on this pass gave 0.23-0.99 % and CI
       once saw 1.06 %: a bound of 1 % on the sample sits ~2 sigma above its mean, a
       flake and not a test. Checked instead: the sample's error count within 5 sigma of
       its hypergeometric spread.
    A doubled QBER in the simulation fails step 1 in either direction (>9 sigma); a
    doubled count in the report fails step 2 for the downlink (>6 sigma), and only by
    ~3 sigma for the uplink, whose sample is too small to say more."""
    profile = simulate.load_profile("micius-qstt")
    duration_s = files.read_scenario(pass_dir)["duration_s"]
    events = files.read_events(pass_dir)
    for direction in ("uplink", "downlink"):
        link = simulate.values(profile[direction])
        _, sent_basis, sent_bit = events[f"{direction}_tx"]
        _, received_basis, received_bit = events[f"{direction}_rx"]
        sifted = sent_basis == received_basis
        n_sifted = int(sifted.sum())
        errors = int((sent_bit[sifted] != received_bit[sifted]).sum())
        if direction == "downlink":
            assert report["sifted_events"][direction] == n_sifted
        else:  # the uplink's +-1.5 ns gate (4.3 sigma of the jitter) loses ~0.2 of them
            assert n_sifted - 5 <= report["sifted_events"][direction] <= n_sifted
        duty = link["gate_ns"] * 1e-9 * link["slot_rate_hz"]
        noise_share = link["noise_counts_hz"] * duty / (sent_basis.size / duration_s)
        e_d = link["misalignment_error"]
        expected_qber = e_d + (0.5 - e_d) * noise_share
        sigma = math.sqrt(expected_qber * (1 - expected_qber) / n_sifted)
        assert abs(errors / n_sifted - expected_qber) < 5 * sigma, direction
        assert errors / n_sifted < 0.01, direction  # the published "< 1 %", whole pass
        sample = report["qber_sample"][direction]
        n, k = sample["n"], sample["errors"]
        check_sample_size(direction, n, report["sifted_events"][direction])
        assert report["qber"][direction] == k / n
        if direction == "uplink":  # every sifted event: the truth's errors, bar the gate's
            assert errors - (n_sifted - n) <= k <= errors, (k, errors)
            continue
        q = errors / n_sifted  # sampled without replacement from this set: hypergeometric
        sample_sigma = math.sqrt(n * q * (1 - q) * (n_sifted - n) / (n_sifted - 1))
        assert abs(k - n * q) < 5 * sample_sigma, (direction, k, n * q)


def check_sample_size(direction, n, n_sifted):
    """The downlink's sample is every sifted event, at most DOWNLINK_SAMPLE_MAX (its bits
    are sealed: key); the uplink's is every sifted event (the ground transmitter's bits
    are never key: all disclosed)."""
    if direction == "downlink":
        assert n == min(n_sifted, endpoints.DOWNLINK_SAMPLE_MAX)
    else:
        assert n == n_sifted


def test_clean_pass_matches_truth_and_raises_no_flag(clean_pass, tmp_path, keys):
    code, report = run(clean_pass, tmp_path, keys)
    assert code == 0 and report["aborted"] is False
    check_qber_against_the_profile(clean_pass, report)
    # bias: half the profile's 15 ps delay-calibration residual, nothing more
    assert abs(report["truth"]["offset_bias_ps"] - 7.5) < 5.0
    assert report["truth"]["precision_1s_ps"] <= 30.0
    assert report["range_check"]["violation"] is False
    assert report["range_rate_check"]["violation"] is False
    assert report["range_segment_check"]["violation"] is False
    # each correction the estimator applies is far larger than the result's error
    corrections = report["corrections_ps"]
    assert abs(corrections["sagnac"][1]) > 500
    assert max(map(abs, corrections["light_time_same_emission_pairing"])) > 1000
    lines = (tmp_path / "offset.csv").read_text().splitlines()
    assert lines[0].startswith("t_s,offset_ps,offset_sigma_ps")
    assert len(lines) - 1 == report["bins"] >= 0.9 * DURATION_S / report["bin_s"]
    assert (tmp_path / "timetransfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["time_data_security"].startswith("one-time pad")


def test_json_prints_the_report_alone(clean_pass, tmp_path, capsys, keys):
    argv = ["timetransfer", str(clean_pass), "--keys", str(keys), "--out", str(tmp_path)]
    code = main(argv + ["--json"])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and printed == json.loads((tmp_path / "report.json").read_text())


def test_one_way_delay_of_200_ps_is_flagged_by_the_range_check(tmp_path_factory, tmp_path, keys):
    pass_dir = simulated(tmp_path_factory, "delay", one_way_delay_ps=200.0)
    code, report = run(pass_dir, tmp_path, keys)
    assert code == 3 and report["aborted"] is True
    assert "asymmetric delay" in report["abort_reason"]
    assert report["range_check"]["mean_one_way_error_ps"] == pytest.approx(100.0, abs=25.0)


def test_an_attack_flagged_leaves_no_offset_csv_to_take_the_time_from(
    clean_pass, tmp_path_factory, tmp_path
):
    # a good run, then a delay attack flagged by the range check into the same --out: the
    # attacked offsets go to offset.rejected.csv (for diagnosis), and no offset.csv, this
    # run's or the earlier one's, is left where a user takes the time from (main wrote
    # the attacked series as offset.csv)
    keys = tmp_path_factory.mktemp("keys")
    distilled(keys, 200_000, "a pass")  # three runs of ~40 kbit each
    code, _ = run(clean_pass, tmp_path, keys)
    assert code == 0 and (tmp_path / "offset.csv").exists()
    pass_dir = simulated(tmp_path_factory, "delay-out", one_way_delay_ps=200.0)
    code, report = run(pass_dir, tmp_path, keys)
    assert code == 3 and "asymmetric delay" in report["abort_reason"]
    assert not (tmp_path / "offset.csv").exists()
    rejected = np.genfromtxt(tmp_path / "offset.rejected.csv", delimiter=",", names=True)
    assert rejected.size == report["bins"]
    # and a good run after it takes offset.csv back, the rejected series gone
    code, _ = run(clean_pass, tmp_path, keys)
    assert code == 0 and (tmp_path / "offset.csv").exists()
    assert not (tmp_path / "offset.rejected.csv").exists()


def test_a_delay_burst_under_the_mean_and_rate_checks_is_flagged_per_second(
    tmp_path_factory, tmp_path, keys
):
    # 1 ns on the up photons during the middle second of the 10 s pass only: its mean
    # over the pass (~50 ps one-way range error) is under the range check's ~67 ps and it
    # has no slope, yet it moves that second's offsets by ~500 ps (main: exit 0, the
    # offsets of t = 4.5..5.5 s ~500 ps off, no flag)
    pass_dir = simulated(tmp_path_factory, "burst", delay_burst_ps=1000.0)
    code, report = run(pass_dir, tmp_path, keys)
    assert code == 3 and "asymmetric delay burst" in report["abort_reason"]
    assert report["range_check"]["violation"] is False
    assert report["range_rate_check"]["violation"] is False
    worst = report["range_segment_check"]["worst"]
    # the burst (4.5..5.5 s) lies half in each of the seconds 4 and 5: ~250 ps in each
    assert 4.0 <= worst["t_s"] <= 5.0 and worst["one_way_error_ps"] > 200.0


def test_a_drifting_delay_under_the_mean_check_is_flagged_by_the_range_rate(
    tmp_path_factory, tmp_path, keys
):
    # 0 -> 200 ps over the window: the mean one-way error (~50 ps) stays under the range
    # check's threshold; its drift of ~10 ps/s does not pass the range-rate check
    pass_dir = simulated(tmp_path_factory, "ramp", delay_ramp_ps=200.0)
    code, report = run(pass_dir, tmp_path, keys)
    assert code == 3 and "drifting asymmetric delay" in report["abort_reason"]
    assert report["range_check"]["violation"] is False
    assert report["range_rate_check"]["one_way_error_rate_ps_s"] == pytest.approx(10.0, abs=3.0)


def test_intercept_resend_is_flagged_by_the_timing_qber(tmp_path_factory, tmp_path, keys):
    pass_dir = simulated(tmp_path_factory, "eve", intercept_resend=0.5)
    code, report = run(pass_dir, tmp_path, keys)
    assert code == 3 and "QBER" in report["abort_reason"]
    assert report["qber"]["downlink"] > 0.1


def test_missing_uplink_data_is_bad_input(clean_pass, tmp_path, capsys, keys):
    broken = tmp_path / "pass"
    shutil.copytree(clean_pass, broken)
    (broken / "satellite" / "tt_uplink_rx.npz").unlink()
    argv = ["timetransfer", str(broken), "--keys", str(keys), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "tt_uplink_rx.npz: missing" in capsys.readouterr().err


def _keep(pass_dir, direction, keep):
    for side in ("tx", "rx"):
        relative = simulate.files.EVENT_FILES[f"{direction}_{side}"]
        with np.load(pass_dir / relative) as data:
            arrays = {name: data[name][keep(data["tag_ps"].size)] for name in data.files}
        np.savez(pass_dir / relative, **arrays)


def test_uplink_events_lost_or_added_on_board_still_give_the_offset(clean_pass, tmp_path, keys):
    # the satellite's record loses 10 % of its uplink detections at random and a run of
    # 300 in a row (a ring overflow), and gains 5 % of detections no ground emission
    # made (dark counts): the uplink's time synchronisation matches the rest, and the
    # offset is what the clean pass gives (before: "the two records do not belong
    # together", exit 3)
    broken = tmp_path / "pass"
    shutil.copytree(clean_pass, broken)
    n, kept, added = lose_and_add_uplink_events(
        broken, 0.1, lambda tags: slice(tags.size // 2, tags.size // 2 + 300), 20
    )
    code, report = run(broken, tmp_path / "out", keys)
    assert code == 0 and report["aborted"] is False
    sync = report["uplink_sync"]
    assert sync["detections"] == kept + added
    # every ground pulse is a candidate (the ground does not know which were detected):
    # a dark count, uniform in time, falls inside the +-1.5 ns gate of some 10 ns slot
    # with p = 0.3, a kept detection outside it with p ~ 2e-5 (at most 5 of them)
    p = 2 * timesync.SLOT_GATE_PS / 10_000
    spread = 5 * math.sqrt(added * p * (1 - p))  # 5 sigma of the dark counts matched
    assert kept - 5 + added * p - spread <= sync["matched"] <= kept + added * p + spread
    # and each kept detection matched has its own pulse (the truth, which no endpoint reads)
    clean = files.read_events(clean_pass)
    satellite_tags = files.read_events(broken, ("uplink_rx",))["uplink_rx"][0]
    scenario = files.read_scenario(broken)
    sat = endpoints.UplinkSync(scenario, satellite_tags)
    ground = endpoints.UplinkTransmitterRecord(files.read_uplink_transmitter(broken, scenario))
    sat.name_slots(ground.classes({"uplink_count": endpoints.UPLINK_BY_SLOT, **sat.request()}))
    real = np.isin(satellite_tags, clean["uplink_rx"][0])
    truth_index = np.searchsorted(clean["uplink_rx"][0], satellite_tags[real])
    clock = scenario["uplink_slot_clock"]
    epochs = clock["first_epoch_ps"] + sat.slot[real] * clock["period_ps"]
    named = sat.slot[real] >= 0
    assert named.sum() >= real.sum() - 5
    assert np.array_equal(epochs[named], clean["uplink_tx"][0][truth_index][named])
    # the offset within the clean pass's stated figures (test_clean_pass_matches_truth...)
    assert abs(report["truth"]["offset_bias_ps"] - 7.5) < 5.0
    assert report["truth"]["precision_1s_ps"] <= 30.0
    assert report["range_check"]["violation"] is False


def test_directions_that_never_overlap_give_no_time_transfer(clean_pass, tmp_path, keys):
    broken = tmp_path / "pass"
    shutil.copytree(clean_pass, broken)
    _keep(broken, "uplink", lambda n: slice(0, n // 3))  # first third of the pass only
    _keep(broken, "downlink", lambda n: slice(2 * n // 3, n))  # last third only
    code, report = run(broken, tmp_path / "out", keys)
    assert code == 3 and "do not overlap" in report["abort_reason"]


def test_too_few_events_give_no_time_transfer(clean_pass, tmp_path, keys):
    broken = tmp_path / "pass"
    shutil.copytree(clean_pass, broken)
    _keep(broken, "uplink", lambda n: slice(0, 100))
    code, report = run(broken, tmp_path / "out", keys)
    assert code == 3 and "too few uplink timing events" in report["abort_reason"]


def test_best_profile_reaches_10_ps_tdev_and_bias(tmp_path_factory, tmp_path):
    pass_dir = simulated(tmp_path_factory, "best", profile="qstt-best")
    # a larger key than the other tests' (the budget is ~21.5 kbit on any 10 s pass)
    keys = tmp_path_factory.mktemp("keys")
    distilled(keys, 200_000, "a pass")
    code, report = run(pass_dir, tmp_path, keys)
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


# ---------------------------------------------------------------- the endpoints and the key


def test_sifting_is_the_endpoints_basis_exchange(clean_pass, tmp_path, keys):
    # the pass holds every detection in both bases; the endpoints keep the half whose bases
    # agree (as the truth says) and measure the QBER on the disclosed bits: all the
    # uplink's (the uplink QBER is then the truth's exactly), a sample of the downlink's
    code, report = run(clean_pass, tmp_path, keys)
    events = simulate.files.read_events(clean_pass)
    for direction in ("uplink", "downlink"):
        tx, rx = events[f"{direction}_tx"], events[f"{direction}_rx"]
        agree = tx[1] == rx[1]
        assert 0.45 < agree.mean() < 0.55
        assert report["sifted_events"][direction] == int(agree.sum())
        sample = report["qber_sample"][direction]
        check_sample_size(direction, sample["n"], int(agree.sum()))
        assert report["qber"][direction] == sample["errors"] / sample["n"]
        true_qber = float(np.mean(tx[2][agree] != rx[2][agree]))
        # a sample without replacement of the sifted events: 5 sigma of its hypergeometric
        # spread (0 when all are disclosed)
        n, n_sifted = sample["n"], int(agree.sum())
        sigma = math.sqrt(true_qber * (1 - true_qber) * (n_sifted - n) / (n * (n_sifted - 1)))
        assert report["qber"][direction] == pytest.approx(true_qber, abs=5 * sigma)
        assert report["timing_events_used"][direction] > 0.9 * agree.sum()


def test_every_sifted_uplink_events_error_is_counted_and_dropped_from_the_timing(
    clean_pass, tmp_path, keys, monkeypatch
):
    # the ground discloses its bit of every named uplink slot: the satellite counts the
    # error of every sifted event and fits its uplink on the others. 1.5 % of its bits
    # flipped: 257 of the 12,859 sifted err (2.0 %, under the 3 % abort); a satellite
    # that kept erring events, or counted and dropped only a sample of them, fails here
    broken = tmp_path / "pass"
    shutil.copytree(clean_pass, broken)
    tags, sifted, erring = flip_uplink_bits(broken, 0.015)
    fitted = recorded_uplink_timing(monkeypatch)
    code, report = run(broken, tmp_path / "out", keys)
    assert code == 0 and report["aborted"] is False
    check_every_erring_uplink_event_counted_and_dropped(report, fitted, tags, sifted, erring)


def test_a_satellite_counting_the_uplink_qber_on_a_sample_is_refused(
    clean_pass, tmp_path, keys, monkeypatch
):
    # the ground sent its bit of every named slot and reports the uplink QBER as every
    # sifted event's: a satellite that counts it on a tenth of them (as the earlier
    # sample) is refused, not reported (main took any count up to the slots named)
    sift = endpoints.UplinkSync.sift

    def a_tenth_counted(self, basis, bit, fields):
        uplink = sift(self, basis, bit, fields)
        sampled = uplink["sampled"] // 10
        return {
            **uplink,
            "sampled": sampled,
            "sample_errors": uplink["sample_errors"] // 10,
        }

    monkeypatch.setattr(endpoints.UplinkSync, "sift", a_tenth_counted)
    code, report = run(clean_pass, tmp_path, keys)
    assert code == 3 and report["aborted"] is True
    assert report["abort_reason"].endswith("uplink sample counts: not every sifted")


def test_no_raw_time_tag_crosses_the_link_in_the_clear(clean_pass, tmp_path, keys):
    # the satellite's uplink detection tags and the ground's downlink detection tags (the
    # measured times) stay with their endpoint: not one of them is on the wire as int64
    wire = []

    def record(data):
        wire.append(data)
        return data

    scenario = simulate.files.read_scenario(clean_pass)
    report = command.run_endpoints(scenario, clean_pass, keys, tamper=record)
    # the pool start (hello, tagged position), the bases and sync request, the uplink's
    # named slots, the uplink fit
    assert report["aborted"] is False and len(wire) == 5
    stream = b"".join(wire)
    on_wire = {stream[i : i + 8] for i in range(len(stream) - 7)}  # as int64
    numbers_on_wire = set(re.findall(rb"\d{6,}", stream))  # as JSON text
    events = simulate.files.read_events(clean_pass)
    for key in ("uplink_rx", "downlink_rx"):
        tags = events[key][0].astype("<i8")
        assert not any(tag.tobytes() in on_wire for tag in tags)
        assert not numbers_on_wire & {str(int(tag)).encode() for tag in tags}
    # while the emission epochs of the sifted events, public slot epochs, are (Rice-coded
    # after the first, which is in the message's header)
    sifted = events["downlink_tx"][1] == events["downlink_rx"][1]
    assert str(int(events["downlink_tx"][0][sifted][0])).encode() in numbers_on_wire


def wire_messages(frames):
    """What an eavesdropper decodes from authenticated frames: (kind, clear fields); the
    pool announcement that opens a session is not a protocol message."""
    for frame in frames:
        try:
            yield ch.decode(frame[: -ch.TAG_BYTES])
        except ProtocolAborted:
            continue


def test_alices_downlink_sample_bits_never_cross_the_link_in_the_clear(
    clean_pass, keys, monkeypatch
):
    # the downlink events are the QKD pass's detections: the satellite's emitted bits are
    # Alice's raw key, which the distillation's privacy amplification counted as secret.
    # An eavesdropper reads the ground's sifting and sample positions in tt_sift; the
    # satellite's bits of those events must not follow in the clear (main sent them as
    # downlink_sample_bits: ~1,700 raw key bits of this 10 s pass, a leak no
    # distillation accounted for)
    frames = {"satellite": [], "ground": []}
    queue_pair = ch.queue_pair

    def recording_pair(timeout_s=600.0):
        to_ground, to_satellite = queue_pair(timeout_s)
        to_satellite.tamper = lambda data: frames["ground"].append(data) or data
        return to_ground, to_satellite

    monkeypatch.setattr(ch, "queue_pair", recording_pair)
    scenario = files.read_scenario(clean_pass)
    report = command.run_endpoints(
        scenario, clean_pass, keys, tamper=lambda data: frames["satellite"].append(data) or data
    )
    assert report["aborted"] is False
    sift = dict(wire_messages(frames["ground"]))["tt_sift"]
    _, sent_basis, sent_bit = files.read_events(clean_pass)["downlink_tx"]
    sifted = unpack_bits(sift["downlink_sifted"], sent_basis.size).astype(bool)
    sample = np.asarray(sift["downlink_sample"])
    assert sample.size == min(int(sifted.sum()), endpoints.DOWNLINK_SAMPLE_MAX)
    alices_sample_bits = pack_bits(sent_bit[sifted][sample]).tobytes()
    assert alices_sample_bits not in b"".join(frames["satellite"])
    # and the ground still counts the sample's errors (it opened the sealed bits)
    assert report["qber_sample"]["downlink"]["n"] == sample.size
    assert report["qber"]["downlink"] < 0.03


def test_a_tampered_time_message_aborts_the_time_transfer(clean_pass, tmp_path, keys):
    sent = []

    def flip_one_bit_of_the_uplink_fit(data):
        sent.append(data)
        if len(sent) == 4:  # pool start (two frames), bases, then the sealed uplink fit
            data = bytearray(data)
            data[len(data) // 2] ^= 0x01
            data = bytes(data)
        return data

    with pytest.raises(ProtocolAborted, match="time message authentication failed"):
        command.time_transfer(clean_pass, tmp_path, keys, tamper=flip_one_bit_of_the_uplink_fit)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["aborted"] is True
    assert report["abort_reason"].startswith("time message authentication failed")
    assert "offset_reference_ps" not in report and not (tmp_path / "offset.csv").exists()


def test_keys_that_are_not_a_distillation_output_are_bad_input(clean_pass, tmp_path, capsys):
    argv = ["timetransfer", str(clean_pass), "--out", str(tmp_path / "out"), "--keys"]
    assert main(argv + [str(tmp_path / "none")]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(argv + [str(tmp_path / "empty")]) == 2
    assert "report.json" in capsys.readouterr().err


def test_key_consumption_is_exact_and_no_pad_bit_is_used_twice(
    clean_pass, tmp_path_factory, tmp_path, monkeypatch
):
    keys = tmp_path_factory.mktemp("keys")
    distilled(keys, 200_000, "a pass")
    taken = {}  # (key file, run) -> bytes of the key taken, absolute offsets
    take = ch.KeyPool.take

    def spy(pool, offset_byte, count):
        bytes_ = taken.setdefault((pool.path, run_number), set())
        bytes_.update(range(pool.start_byte + offset_byte, pool.start_byte + offset_byte + count))
        return take(pool, offset_byte, count)

    monkeypatch.setattr(ch.KeyPool, "take", spy)
    reports = []
    for run_number in (1, 2):
        code, report = run(clean_pass, tmp_path / f"out{run_number}", keys)
        assert code == 0
        reports.append(report)
    _, n_bins = estimate.bin_grid(simulate.files.read_scenario(clean_pass))
    for number, report in enumerate(reports, start=1):
        ground, satellite = report["key"], report["satellite"]["key"]
        assert {k: v for k, v in ground.items() if k != "file"} == {
            k: v for k, v in satellite.items() if k != "file"
        }
        # pads: the uplink fit (8 bytes a bin: residual float32, variance float16, count
        # uint16) and the result, each with its small header, and the satellite's bits of
        # the downlink QBER sample (Alice's raw key: one bit an event, whole bytes); tags:
        # hash key + one pad per message each way (three: bases and sync request, named
        # slots, uplink fit; the uplink's pattern, sifting, result)
        sample_bits = 8 * ((report["qber_sample"]["downlink"]["n"] + 7) // 8)
        fit_bits = ground["pad_bits"] - sample_bits
        assert 8 * 8 * n_bins < fit_bits < 8 * 8 * n_bins + 8 * 700
        assert ground["auth_bits"] == 64 + 64 * 6
        assert ground["consumed_bits"] == 8 * endpoints.AUTH_REGION_BYTES + ground["pad_bits"]
        for role in ("alice", "bob"):
            used = taken[(str(keys / f"{role}.key"), number)]
            start = ground["start_bit"] // 8
            # every byte taken lies in the span reported, and every pad byte was taken
            assert min(used) == start
            assert max(used) == start + ground["consumed_bits"] // 8 - 1
            pads = {b for b in used if b >= start + endpoints.AUTH_REGION_BYTES}
            assert len(pads) == ground["pad_bits"] // 8
            # the usage record on disk covers every byte taken, before the next run
            record = json.loads((keys / f"{role}.key.used").read_text())["used_bytes"]
            assert record * 8 >= reports[-1]["key"]["record_bits"] >= ground["record_bits"]
    for role in ("alice", "bob"):
        first = taken[(str(keys / f"{role}.key"), 1)]
        second = taken[(str(keys / f"{role}.key"), 2)]
        assert not first & second
        assert min(second) * 8 >= reports[0]["key"]["record_bits"]


def test_not_enough_key_is_refused_clearly_and_costs_no_key(
    clean_pass, tmp_path_factory, tmp_path
):
    keys = tmp_path_factory.mktemp("small-keys")
    distilled(keys, 9_000, "a pass")  # 1125 bytes: enough to open, not for 100 bins
    for attempt in ("first", "again"):
        code, report = run(clean_pass, tmp_path / attempt, keys)
        assert code == 3 and report["aborted"] is True
        reason = report["abort_reason"]  # whichever side checked first names its key
        assert reason.startswith(("not enough key in alice.key", "not enough key in bob.key"))
        assert "the time data of this pass needs 22144 bits" in reason  # pool start 512
        assert reason.endswith("9000 are left; no bit of it was used")
        assert not (tmp_path / attempt / "offset.csv").exists()
        # refused before the session took a bit: the key is still whole for a shorter use
        for role in ("alice", "bob"):
            record = json.loads((keys / f"{role}.key.used").read_text())["used_bytes"]
            assert record == 0


def test_a_key_short_only_of_the_sealed_downlink_sample_is_refused_before_the_session(
    clean_pass, tmp_path_factory, tmp_path
):
    # 15,000 bits: enough for the pool start, the tags, the uplink fit (8 bytes a bin) and
    # the headers (13,696 bits), not for the satellite's sealed bits of the downlink QBER
    # sample.
    # The budget counts that sample (at most DOWNLINK_SAMPLE_MAX bits), so the run is
    # refused before either side takes a bit, names every part of the need, and reports
    # it (before: the check left the sample out, the session started, reserved key ahead
    # and stopped in the middle with the record moved: bits lost to no use)
    keys = tmp_path_factory.mktemp("short-keys")
    distilled(keys, 15_000, "a pass")
    code, report = run(clean_pass, tmp_path, keys)
    assert code == 3 and report["aborted"] is True
    budget = report["key_budget"]
    assert budget["downlink_sample_bits"] == endpoints.DOWNLINK_SAMPLE_MAX
    assert budget["need_bits"] == sum(
        budget[part]
        for part in (
            "pool_start_bits",
            "auth_bits",
            "fit_bits",
            "header_bits",
            "downlink_sample_bits",
        )
    )
    assert budget["need_bits"] > budget["left_bits"] == 15_000
    assert budget["enough"] is False
    assert f"needs {budget['need_bits']} bits" in report["abort_reason"]
    assert "downlink QBER sample" in report["abort_reason"]
    assert not (tmp_path / "offset.csv").exists()
    for role in ("alice", "bob"):
        record = json.loads((keys / f"{role}.key.used").read_text())["used_bytes"]
        assert record == 0


def test_a_key_serves_the_time_transfer_or_the_network_pools_never_both(
    clean_pass, tmp_path_factory, tmp_path, capsys
):
    from host.network.pool import SATELLITE, fill_pair, pool_path

    keys = tmp_path_factory.mktemp("keys")
    key = distilled(keys, 64_000, "a pass")
    code, report = run(clean_pass, tmp_path / "tt", keys)
    assert code == 0
    # the pools get only what the time transfer left: from its usage record on
    record_bytes = report["key"]["record_bits"] // 8
    fill_pair(tmp_path / "net", "Jinan", keys)
    for holder, peer in ((SATELLITE, "Jinan"), ("Jinan", SATELLITE)):
        assert pool_path(tmp_path / "net", holder, peer).read_bytes() == key[record_bytes:]
    # and once filled, the key is used up for any later time transfer
    argv = ["timetransfer", str(clean_pass), "--keys", str(keys), "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "only 0 bytes left" in capsys.readouterr().err


def test_a_new_distilled_key_starts_without_the_old_keys_usage_record(tmp_path):
    distilled(tmp_path, 64_000, "pass 1")
    pool, _ = endpoints.open_time_key(tmp_path, "satellite")
    pool.take(0, 8)  # the record is written (reserved ahead) before the bytes are used
    pool.close()
    assert (tmp_path / "alice.key.used").exists()
    distilled(tmp_path, 64_000, "pass 2")  # the distillation replaces the key
    assert not (tmp_path / "alice.key.used").exists()
    pool, _ = endpoints.open_time_key(tmp_path, "satellite")
    assert pool.start_byte == 0
    pool.close()


# ---------------------------------------------------------------- simulate and mission


def test_simulate_two_way_writes_the_uplink_products_beside_the_pass(tmp_path, keys):
    pass_dir = tmp_path / "pass"
    # a fixed pattern secret (it keys the uplink too): the same pass every run. Fresh 5 s
    # two-way passes (micius-qstt, uplink key from os.urandom) put the range-rate check's
    # statistic at sd 0.77 of its sigma over 440, but once at -3.44 (the abort is at 4.0):
    # a tail this test is not about. This draw (the first tried): -0.24 sigma, 0.06 of
    # the range-rate threshold, 0.06 of the worst second's
    argv = ["simulate", "--profile", "micius-2017", "--duration-s", "5", "--seed", "3"]
    argv += ["--pattern-secret", "000102030405060708090a0b0c0d0e0f", "--two-way"]
    assert main(argv + ["--out", str(pass_dir)]) == 0
    assert (pass_dir / "pass.json").exists()  # the QKD pass, and beside it the two-way one
    scenario = simulate.files.read_scenario(pass_dir)
    assert scenario["profile"] == "micius-qstt" and scenario["duration_s"] == 5.0
    code, report = run(pass_dir, tmp_path / "tt", keys)
    assert code == 0 and report["bins"] >= 45
    # a pass without --two-way replacing it leaves no two-way scenario of the old one
    assert main(argv[:-1] + ["--out", str(pass_dir), "--force"]) == 0
    assert not (pass_dir / "timetransfer.json").exists()


def test_simulate_two_way_refuses_a_profile_without_a_two_way_profile(tmp_path, capsys):
    profile = tmp_path / "custom.json"
    original = simulate.PROFILE_DIR.parents[1] / "simulate" / "profiles" / "jinan-1.json"
    profile.write_text(original.read_text().replace('"jinan-1"', '"custom"', 1))
    argv = ["simulate", "--profile", str(profile), "--two-way", "--out", str(tmp_path / "p")]
    assert main(argv) == 2
    assert "no two-way time-transfer profile" in capsys.readouterr().err


def test_the_mission_stage_seals_with_the_missions_key_or_says_why_not(tmp_path):
    from host.timetransfer.mission_stage import run_stage

    stage = run_stage(tmp_path, "micius-2017", 3, 5.0, key_made=False)
    assert stage == {
        "aborted": True,
        "abort_reason": "no key from the distillation: nothing to seal the time data with",
    }
    # what a distillation over the optical link leaves: Bob's key in OUT, Alice's in the
    # on-board key store's pass directory
    distilled(tmp_path, 64_000, "the mission's pass")
    onboard = tmp_path / "onboard" / "Xinglong" / "passes" / "p1"
    onboard.mkdir(parents=True)
    for name in ("alice.key", "report.json"):
        shutil.copy2(tmp_path / name, onboard / name)
    (tmp_path / "alice.key").unlink()
    # the ground transmitter's key fixed (fresh from os.urandom by default): the same
    # two-way pass every run, off the range-rate check's tail (above). This draw (the
    # first tried): -0.5 sigma, 0.12 of the range-rate threshold, 0.12 of the worst second's
    stage = run_stage(
        tmp_path, "micius-2017", 3, 5.0, key_made=True, satellite_keys=onboard,
        uplink_key=UPLINK_KEY,
    )  # fmt: skip
    assert stage["aborted"] is False and stage["profile"] == "micius-qstt"
    assert stage["qber"]["downlink"] < 0.02 and stage["tdev_ps"]["0.1"] > 0
    report = json.loads((tmp_path / "timetransfer" / "report.json").read_text())
    assert stage["key_bits_used"]["pad"] == report["key"]["pad_bits"] > 0
    assert report["satellite"]["key"]["file"] == "alice.key"
    assert (onboard / "alice.key.used").exists() and (tmp_path / "bob.key.used").exists()


def test_a_key_file_others_can_read_is_refused(clean_pass, tmp_path, keys, capsys):
    (keys / "bob.key").chmod(0o644)
    code, report = run(clean_pass, tmp_path / "out", keys)
    assert code == 2 and report is None  # refused before any message or output
    assert "readable or writable by group or others" in capsys.readouterr().err
    assert (
        not (keys / "alice.key.used").exists()
        or json.loads((keys / "alice.key.used").read_text())["used_bytes"] == 0
    )


def test_split_mode_runs_the_satellite_in_its_own_process_over_tcp(clean_pass, tmp_path, keys):
    ground, sat = run_split(["timetransfer", str(clean_pass), "--keys", str(keys)], tmp_path)
    assert ground["aborted"] is False and sat["aborted"] is False and sat["role"] == "satellite"
    assert (tmp_path / "gnd" / "offset.csv").exists() and not (
        tmp_path / "sat" / "offset.csv"
    ).exists()
    # both ends took the same key bits, and the satellite learnt the offset the ground measured
    assert {k: v for k, v in sat["key"].items() if k != "file"} == {
        k: v for k, v in ground["key"].items() if k != "file"
    }
    assert sat["offset_reference_ps"] == ground["offset_reference_ps"]
    table = np.loadtxt(tmp_path / "gnd" / "offset.csv", delimiter=",", skiprows=1)
    rate_ps_s, at_middle = np.polyfit(table[:, 0] - sat["middle_s"], table[:, 1], 1)
    assert sat["offset_at_middle_ps"] == pytest.approx(at_middle, abs=0.01)
    assert sat["rate"] == pytest.approx(rate_ps_s * 1e-12, rel=1e-6)


def test_satellite_and_ground_keys_of_different_passes_are_bad_input(
    clean_pass, tmp_path_factory, tmp_path, keys, capsys
):
    other = tmp_path_factory.mktemp("other-keys")
    distilled(other, 64_000, "another pass")
    argv = ["timetransfer", str(clean_pass), "--keys", str(keys), "--satellite-keys", str(other)]
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    assert "the two keys come from different passes" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.json").exists()


def test_a_key_replaced_while_a_time_transfer_opens_it_serves_no_used_byte_again(
    tmp_path, monkeypatch
):
    """The time transfer read the distilled key (read_distilled_key), and only then
    locked the file and read its usage record. A distillation finishing into the same
    directory in between (it replaces alice.key and removes alice.key.used) made it take
    the OLD key's bytes from 0, though 4,096 of them had sealed earlier messages. Now the
    file is locked and its record read first, and the key read after must be the locked
    file's: the old key goes on from its record, or the new one is refused/used fresh."""
    from host.network import pool as network_pool

    old = distilled(tmp_path, 8 * 16384, "first pass")
    pool, _ = endpoints.open_time_key(tmp_path, "satellite")
    pool.take(0, 4096)  # a first time transfer sealed with the old key
    used = pool.reserved_byte
    pool.close()
    real = network_pool.read_distilled_key

    landed = []

    def distillation_lands_meanwhile(keys_dir, role):
        data = real(keys_dir, role)
        if not landed:  # run.finish: a new key, its record gone
            landed.append(distilled(tmp_path, 8 * 16384, "second pass"))
        return data

    monkeypatch.setattr(network_pool, "read_distilled_key", distillation_lands_meanwhile)
    try:
        pool, _ = endpoints.open_time_key(tmp_path, "satellite")
    except BadInput:
        return  # refused: nothing served
    try:
        assert pool.data in (old, landed[0])
        if pool.data == old:
            assert pool.start_byte >= used, "the old key's used bytes serve again"
    finally:
        pool.close()


def test_the_grounds_uplink_record_is_its_transmitter_not_what_was_detected(tmp_path):
    # a real ground transmitter knows its pattern (key) and slot clock, never which of its
    # pulses were detected on board: 10 dB more uplink loss (a tenth of the detections)
    # leaves the ground's uplink record byte for byte the same (on main the ground's
    # record, ground/tt_uplink_tx.npz, was the list of the detected pulses)
    profile = simulate.load_profile("micius-qstt")
    lossy = json.loads(json.dumps(profile))
    for field in ("loss_db_at_645_km", "loss_db_at_1200_km"):
        lossy["uplink"][field]["value"] += 10.0
    runs = {}
    for name, chosen in (("clear", profile), ("lossy", lossy)):
        pass_dir = tmp_path / name
        summary = simulate.simulate(chosen, pass_dir, 3, 2.0, uplink_key=UPLINK_KEY)
        scenario = files.read_scenario(pass_dir)
        runs[name] = {
            "detections": summary["events"]["uplink_rx"],
            "ground_files": sorted(p.name for p in (pass_dir / "ground").iterdir()),
            "pattern": (pass_dir / files.UPLINK_PATTERN_FILE).read_bytes(),
            "public": {k: scenario[k] for k in ("uplink_slot_clock", "uplink_intensities")},
        }
    clear, lossy_run = runs["clear"], runs["lossy"]
    assert lossy_run["detections"] < clear["detections"] / 5  # 10 dB: a tenth, +-3 %
    assert clear["ground_files"] == ["tt_downlink_rx.npz", "tt_uplink_pattern.json"]
    assert lossy_run["ground_files"] == clear["ground_files"]
    assert lossy_run["pattern"] == clear["pattern"]
    assert lossy_run["public"] == clear["public"]
    # the slot clock covers every pulse of the window, detected or not (100 MHz x 2 s)
    assert clear["public"]["uplink_slot_clock"]["slot_count"] >= 2.0 * 1e8


def _edit_scenario(pass_dir, edit):
    path = pass_dir / files.SCENARIO_FILE
    scenario = json.loads(path.read_text())
    edit(scenario)
    path.write_text(json.dumps(scenario))


def test_a_coarse_time_off_beyond_its_half_width_gives_no_uplink_sync(clean_pass, tmp_path, keys):
    # the satellite's whole-slot lag comes from correlating its detections with the
    # ground's intensity classes within +-1 us of its coarse (GNSS) time: a coarse time
    # 5 us off holds no peak, and the time transfer stops with the reason (exit 3), never
    # an offset from a wrong slot
    broken = tmp_path / "pass"
    shutil.copytree(clean_pass, broken)

    def off(scenario):
        scenario["satellite_coarse_time"]["offset_ps"] += 5_000_000

    _edit_scenario(broken, off)
    code, report = run(broken, tmp_path / "out", keys)
    assert code == 3 and report["aborted"] is True
    assert "uplink time synchronisation failed: no correlation peak" in report["abort_reason"]
    assert not (tmp_path / "out" / "offset.csv").exists()
    # within the half width it locks (0.6 us off: the correlation finds the slots again)
    shutil.copytree(clean_pass, broken, dirs_exist_ok=True)

    def near(scenario):
        scenario["satellite_coarse_time"]["offset_ps"] += 600_000

    _edit_scenario(broken, near)
    code, report = run(broken, tmp_path / "near", keys)
    assert code == 0 and abs(report["truth"]["offset_bias_ps"] - 7.5) < 5.0


def test_a_scenario_without_the_coarse_satellite_time_is_bad_input(clean_pass, tmp_path, capsys):
    broken = tmp_path / "pass"
    shutil.copytree(clean_pass, broken)
    _edit_scenario(broken, lambda scenario: scenario.pop("satellite_coarse_time"))
    keys = tmp_path / "keys"
    distilled(keys, 64_000, "a pass")
    argv = ["timetransfer", str(broken), "--keys", str(keys), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "field 'satellite_coarse_time' missing" in capsys.readouterr().err


def test_a_ground_pattern_not_starting_at_the_slot_clocks_first_slot_is_bad_input(tmp_path):
    # the ground answers classes and bases of any slot of its slot clock (0 ..
    # slot_count - 1): a pattern source whose range starts later (first_slot edited, or
    # another transmitter's) stopped the session with 'internal error: IndexError' (exit
    # 1) once the satellite named a slot below it, instead of naming the file (exit 2)
    from host.formats.patterns import KeyedPatternSource, write_pattern_source
    from host.protocol.symbols import SymbolMapping

    mapping = SymbolMapping.from_probabilities(0.5, [0.5, 0.25, 0.25])
    intensities = {"signal": 0.8, "decoy": 0.1, "vacuum": 0.0}
    clock = {"first_epoch_ps": 0, "period_ps": 10_000, "slot_count": 1000}
    scenario = {"uplink_slot_clock": clock}
    (tmp_path / "ground").mkdir()
    pattern_path = tmp_path / files.UPLINK_PATTERN_FILE
    write_pattern_source(
        pattern_path, KeyedPatternSource(UPLINK_KEY, mapping, 0, 1000, intensities)
    )
    record = endpoints.UplinkTransmitterRecord(files.read_uplink_transmitter(tmp_path, scenario))
    assert record.named({"uplink_count": 1, "uplink_slot_tag_ps": [3]})[0] == 1
    write_pattern_source(
        pattern_path, KeyedPatternSource(UPLINK_KEY, mapping, 500, 1000, intensities)
    )
    with pytest.raises(BadInput, match="tt_uplink_pattern.json: first_slot 500"):
        files.read_uplink_transmitter(tmp_path, scenario)


def test_the_uplink_bits_of_a_sift_are_all_the_named_slots_or_it_is_refused():
    # every named slot's bit comes (the QBER counts all sifted uplink events): a field
    # short of the count (np.unpackbits would pad it with zeros, each a 50 % error) or
    # the earlier sample's fields (uplink_sample, uplink_sample_bits) abort with the reason
    basis, bits = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1], np.uint8), np.arange(9) % 2
    whole = {"uplink_basis": pack_bits(basis), "uplink_bits": pack_bits(bits.astype(np.uint8))}
    got_basis, got_bits = endpoints.uplink_bases_and_bits(whole, 9)
    assert got_basis.tolist() == basis.tolist() and got_bits.tolist() == bits.tolist()
    with pytest.raises(ProtocolAborted, match="uplink bits: not 17 bits"):
        endpoints.uplink_bases_and_bits({**whole, "uplink_basis": np.zeros(3, np.uint8)}, 17)
    # the channel also carries raw bytes and scalars: of the right size, still refused
    for odd in (b"\x05", 5, "\x05"):
        with pytest.raises(ProtocolAborted, match="uplink bits: not 5 bits"):
            endpoints.uplink_bases_and_bits(
                {"uplink_basis": pack_bits(basis[:5]), "uplink_bits": odd}, 5
            )
    earlier = {"uplink_basis": whole["uplink_basis"], "uplink_sample": np.array([2])}
    earlier["uplink_sample_bits"] = pack_bits(np.ones(1, np.uint8))
    with pytest.raises(ProtocolAborted, match="malformed time message: no uplink_bits"):
        endpoints.uplink_bases_and_bits(earlier, 9)
