"""Time transfer during the pass (host/timetransfer/stream.py): the endpoints exchange
their time data block by block while the pass goes by, over the pass's emulated optical
link, sealed and authenticated; the ground knows each bin's offset one or two blocks
after the bin, and the result matches the truth as the post-pass one does."""

import functools
import json
import math
import time

import numpy as np
import pytest

from host.cli import main
from host.distil import channel as ch
from host.distil import timesync
from host.distil.bitcodec import pack_bits, unpack_bits
from host.distil.endpoint_random import InsecureDeterministicRandom
from host.errors import ProtocolAborted
from host.timetransfer import files, stream
from host.timetransfer.command import offset_error_ps
from tests.network_keys import distilled
from tests.split_timetransfer import run_split
from tests.uplink_faults import (
    check_every_erring_uplink_event_counted_and_dropped,
    flip_uplink_bits,
    lose_and_add_uplink_events,
    recorded_uplink_timing,
)

DURATION_S = 4.0
BLOCK_S = 1.0


@pytest.fixture(scope="module")
def two_way_pass(tmp_path_factory):
    pass_dir = tmp_path_factory.mktemp("stream") / "pass"
    argv = ["simulate", "--profile", "micius-2017", "--duration-s", str(DURATION_S)]
    argv += ["--seed", "3", "--pattern-secret", "000102030405060708090a0b0c0d0e0f"]
    assert main(argv + ["--two-way", "--out", str(pass_dir)]) == 0
    return pass_dir


@pytest.fixture
def keys(tmp_path_factory):
    """An earlier distillation's key pair: the pass's own key exists only at its end."""
    directory = tmp_path_factory.mktemp("keys")
    distilled(directory, 64_000, "an earlier pass")
    return directory


@pytest.mark.slow  # a 4 s pass over the optical link in real time
def test_the_offsets_stream_over_the_optical_link_during_the_pass(two_way_pass, keys, tmp_path):
    out = tmp_path / "out"
    argv = ["timetransfer", str(two_way_pass), "--keys", str(keys), "--out", str(out)]
    assert main(argv + ["--during-pass", "--block-s", str(BLOCK_S)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["aborted"] is False and report["mode"] == "stream"
    assert report["bins"] >= 0.9 * DURATION_S / report["bin_s"]
    # the time data crossed the emulated optical link (its time-transfer stream), whole
    link = report["optical_link"]
    assert link["lost_for_good"] is False
    assert link["bytes"]["satellite_to_ground"] >= report["classical_bytes"]["satellite_to_ground"]
    # sealed with the earlier key: pads and one tag per message, as accounted
    n_blocks = math.ceil(DURATION_S / BLOCK_S)
    assert report["key"]["auth_bits"] == 64 + 64 * 2 * (n_blocks + 1)
    assert report["key"]["pad_bits"] == report["satellite"]["key"]["pad_bits"] > 0
    # the result against the truth: half the 15 ps calibration residual, 5 sigma of the
    # mean of the per-bin errors; the per-bin offsets carry the pass time they were known
    bias_sigma = report["truth"]["error_std_per_bin_ps"] / math.sqrt(report["bins"])
    assert abs(report["truth"]["offset_bias_ps"] - 7.5) < 5 * bias_sigma
    assert report["range_check"]["violation"] is False
    rows = np.genfromtxt(out / "offset.csv", delimiter=",", names=True)
    assert np.all(rows["known_at_s"] > rows["t_s"])


def test_each_bins_offset_is_known_one_or_two_blocks_after_it(two_way_pass, keys):
    # in process, replayed fast: which block's message brought each bin is the protocol's
    # doing, not the machine's speed
    report, satellite = stream.run_streaming(two_way_pass, keys, BLOCK_S, speedup=50.0)
    series = report["series"]
    block_of_bin = np.floor(series["t_s"] / BLOCK_S).astype(int)
    assert np.all(series["known_in_block"] >= block_of_bin + 1)
    assert np.all(series["known_in_block"] <= block_of_bin + 2)
    # one block after, but the last bin of a block: it is complete only when an event
    # COMPLETE_MARGIN_S past its end has come, in the next block; and the first block's:
    # its uplink detections are named only once the ground's answer to the sync request
    # of block 0 has locked the lag (one exchange), so they come two blocks after
    inside = series["t_s"] + report["bin_s"] / 2 < (block_of_bin + 1) * BLOCK_S - 0.05
    inside &= block_of_bin >= 1
    assert inside.sum() >= 0.6 * inside.size
    assert np.all(series["known_in_block"][inside] == block_of_bin[inside] + 1)
    assert np.all(series["known_in_block"][block_of_bin == 0] == 2)
    assert satellite["offset_reference_ps"] == report["offset_reference_ps"]
    # the key budget known before the first bit holds what the session took: the sealed
    # downlink sample at most DOWNLINK_SAMPLE_MAX bits over the pass, a share a block
    budget = report["key_budget"]
    assert budget["enough"] is True
    used_pads = report["key"]["pad_bits"]
    assert used_pads <= budget["fit_bits"] + budget["header_bits"] + budget["downlink_sample_bits"]
    n_blocks = math.ceil(DURATION_S / BLOCK_S)
    cap = stream.downlink_sample_cap(n_blocks)
    assert report["qber_sample"]["downlink"]["n"] <= n_blocks * cap
    truth = files.read_truth(two_way_pass)
    assert int(truth["offset_base_ps"]) != 0  # the truth is there to compare in the CLI test


def test_alices_downlink_sample_bits_never_cross_in_the_clear_during_the_pass(two_way_pass, keys):
    # the downlink events are the QKD pass's detections (simulate --two-way): the
    # satellite's bits of each block's QBER sample are Alice's raw key, secret for the
    # distillation that runs beside. An eavesdropper reads each block's sifting and sample
    # positions (tt_block_sift) and the block's size (tt_block); the satellite's bits of
    # those events must not follow in the clear (main sent them as downlink_sample_bits)
    frames = {"satellite": [], "ground": []}
    to_ground, to_satellite = ch.queue_pair(timeout_s=600.0)
    to_ground.tamper = lambda data: frames["satellite"].append(data) or data
    to_satellite.tamper = lambda data: frames["ground"].append(data) or data
    report, _ = stream.run_streaming(
        two_way_pass, keys, BLOCK_S, speedup=50.0, transports=(to_ground, to_satellite)
    )
    assert report["aborted"] is False

    def messages(side, kind):
        for frame in frames[side]:
            try:
                got, fields = ch.decode(frame[: -ch.TAG_BYTES])
            except ProtocolAborted:  # the pool-start exchange
                continue
            if got == kind:
                yield fields

    blocks = [m for m in messages("satellite", "tt_block") if not m["final"]]
    sifts = list(messages("ground", "tt_block_sift"))
    assert len(blocks) == len(sifts) == math.ceil(DURATION_S / BLOCK_S)
    _, _, sent_bit = files.read_events(two_way_pass)["downlink_tx"]
    satellite_wire = b"".join(frames["satellite"])
    first = 0
    checked = 0
    cap = stream.downlink_sample_cap(len(blocks))
    for block, sift in zip(blocks, sifts, strict=True):
        count = int(block["downlink_count"])
        sifted = unpack_bits(sift["downlink_sifted"], count).astype(bool)
        # the block's sample: every sifted event of it up to its share of the pass's
        # DOWNLINK_SAMPLE_MAX (the timing QBER's decision; 10 % a block before session 17,
        # which no test saw), each event once
        sample = np.asarray(sift["downlink_sample"])
        assert sample.size == min(int(sifted.sum()), cap) > 0
        assert np.unique(sample).size == sample.size
        bits = sent_bit[first : first + count][sifted][np.asarray(sift["downlink_sample"])]
        first += count
        alices_sample_bits = pack_bits(bits).tobytes()
        if len(alices_sample_bits) >= 8:  # 64 bits: no chance match in the stream
            checked += 1
            assert alices_sample_bits not in satellite_wire
    assert first == sent_bit.size and checked == len(blocks)
    assert report["qber_sample"]["downlink"]["n"] > 0


def test_a_tampered_block_aborts_the_streamed_time_transfer(two_way_pass, keys):
    sent = []

    def flip_a_bit_of_the_second_sealed_block(data):
        sent.append(data)
        # pool start (two frames), block 0, block 1 (bases + block 0's sealed fit)
        if len(sent) == 5:
            data = bytearray(data)
            data[len(data) // 2] ^= 0x01
            data = bytes(data)
        return data

    with pytest.raises(ProtocolAborted, match="time message authentication failed") as caught:
        stream.run_streaming(
            two_way_pass, keys, BLOCK_S, 50.0, tamper=flip_a_bit_of_the_second_sealed_block
        )
    assert caught.value.report["aborted"] is True and "series" not in caught.value.report


@pytest.mark.slow  # a process started, two streamed runs: ~12 s
def test_split_processes_over_tcp_give_the_in_process_offsets(
    two_way_pass, keys, tmp_path, monkeypatch
):
    # the satellite endpoint in its own process (--role satellite --listen, as on the
    # payload processor), the ground in this one (--role ground --connect), streamed over
    # TCP: the offsets are those of both endpoints in one process. The ground's QBER
    # sample is the only randomness (the satellite has none): drawn from the same seeded
    # generator in both runs here, so the offsets must agree exactly
    monkeypatch.setattr(stream, "SystemRandom", lambda: InsecureDeterministicRandom(11))
    # the ground connects while the satellite's process is still starting: its CLI start
    # took 12 s of wall (0.8 s of CPU) on this machine under load, too near the connector's
    # 30 s of retries; here the ground retries as long as the satellite's wait below
    monkeypatch.setattr(ch, "connect", functools.partial(ch.connect, retry_s=120.0))
    common = ["timetransfer", str(two_way_pass), "--keys", str(keys), "--during-pass"]
    common += ["--block-s", str(BLOCK_S), "--speedup", "50"]
    assert main([*common, "--out", str(tmp_path / "together")]) == 0
    ground, sat = run_split(common, tmp_path)
    together = json.loads((tmp_path / "together" / "report.json").read_text())
    assert ground["aborted"] is False and ground["mode"] == "stream"
    assert sat["aborted"] is False and sat["role"] == "satellite"
    assert ground["offset_reference_ps"] == together["offset_reference_ps"]
    assert sat["offset_reference_ps"] == ground["offset_reference_ps"]
    assert ground["qber_sample"] == together["qber_sample"]

    def offsets(name):
        rows = np.genfromtxt(tmp_path / name / "offset.csv", delimiter=",", names=True)
        return {c: rows[c] for c in ("t_s", "offset_ps", "offset_sigma_ps", "range_error_mm")}

    split, joint = offsets("gnd"), offsets("together")
    assert split["t_s"].size == joint["t_s"].size >= 0.9 * DURATION_S / ground["bin_s"]
    for column in split:
        np.testing.assert_array_equal(split[column], joint[column], err_msg=column)
    # each side sealed with its own key file of the pair: the same pad bits either way
    assert sat["key"]["file"] == "alice.key" and ground["key"]["file"] == "bob.key"
    assert sat["key"]["pad_bits"] == ground["key"]["pad_bits"] > 0


def test_uplink_events_lost_or_added_on_board_still_stream_the_offsets(
    two_way_pass, keys, tmp_path
):
    # streamed, the uplink is matched by its time synchronisation block by block
    # (stream._StreamUplink) too: the satellite's record loses 10 % of its uplink
    # detections and a run of 200 in a row across a block's edge, and gains 5 % dark
    # counts; every kept detection is matched and the offsets are the truth's as on the
    # clean pass (before: "the two records do not belong together", exit 3)
    import shutil

    lossy = tmp_path / "pass"
    shutil.copytree(two_way_pass, lossy)

    def across_a_block_edge(tags):  # 200 in a row around the first 1 s block's end
        edge = int(np.searchsorted(tags, tags[0] + 10**12))
        return slice(edge - 100, edge + 100)

    _, kept, added = lose_and_add_uplink_events(lossy, 0.1, across_a_block_edge, 20)
    report, satellite = stream.run_streaming(lossy, keys, BLOCK_S, speedup=50.0)
    assert report["aborted"] is False and report["range_check"]["violation"] is False
    # every kept detection found its pulse (the +-1.5 ns gate loses ~2e-5 of them, at
    # most 5); a dark count, uniform in time, falls in the gate of some 10 ns slot with
    # p = 0.3: 5 sigma of that binomial
    p = 2 * timesync.SLOT_GATE_PS / 10_000
    spread = 5 * math.sqrt(added * p * (1 - p))
    matched = satellite["uplink_sync"]["matched"]
    assert kept - 5 + added * p - spread <= matched <= kept + added * p + spread
    assert satellite["uplink_sync"]["detections"] == kept + added
    series = report["series"]
    truth = files.read_truth(lossy)
    error = offset_error_ps(report, series, truth)
    # 7.5 ps (half the calibration residual) within 5 sigma of the mean of the errors
    assert abs(np.mean(error) - 7.5) < 5 * np.std(error) / math.sqrt(error.size)
    assert series["t_s"].size >= 0.9 * DURATION_S / report["bin_s"]


def test_every_sifted_uplink_events_error_is_counted_and_dropped_block_by_block(
    two_way_pass, keys, tmp_path, monkeypatch
):
    # streamed, each tt_block_sift carries the ground's bits of every slot the block
    # named: the satellite counts the error of every sifted event and fits its uplink on
    # the others, block by block (stream._StreamUplink.on_sift). 1.5 % of its bits flipped:
    # 98 of the 5,202 sifted err (1.9 %, under the 3 % abort)
    import shutil

    broken = tmp_path / "pass"
    shutil.copytree(two_way_pass, broken)
    tags, sifted, erring = flip_uplink_bits(broken, 0.015)
    fitted = recorded_uplink_timing(monkeypatch)
    report, _ = stream.run_streaming(broken, keys, BLOCK_S, speedup=50.0)
    assert report["aborted"] is False
    check_every_erring_uplink_event_counted_and_dropped(report, fitted, tags, sifted, erring)


def test_a_satellite_counting_a_blocks_uplink_qber_on_a_sample_is_refused(
    two_way_pass, keys, monkeypatch
):
    # each tt_block_sift carries the ground's bit of every slot named: a block whose
    # uplink QBER the satellite counts on a tenth of its sifted events is refused (main
    # took any count up to the slots named so far)
    on_sift = stream._StreamUplink.on_sift

    def a_tenth_counted(self, sift):
        emission, received, timing, (sampled, errors) = on_sift(self, sift)
        return emission, received, timing, (sampled // 10, errors // 10)

    monkeypatch.setattr(stream._StreamUplink, "on_sift", a_tenth_counted)
    with pytest.raises(ProtocolAborted, match="uplink sample counts: not every sifted"):
        stream.run_streaming(two_way_pass, keys, BLOCK_S, speedup=50.0)


def _tdc_log_writer(pass_dir, path, zero_ps, feed, problems):
    """The controller spooling its TDC log during the pass: the uplink detections of
    satellite/tt_uplink_rx.npz on their channels and the laser's sync marks (10 kHz, the
    same clock) in time order, TDC_BLOCK records of the firmware's 227 events, written
    through the log's one writer. Around each block's end it stops 0.3 s of pass time
    short and checks that the satellite has not taken the block, then writes 0.5 s past
    the end and waits for the satellite to take it; at the end, the end of pass."""
    from emulator.optical_head import CH_SYNC, CH_UPLINK0
    from host.formats import qrec

    tags, basis, bit = files.read_events(pass_dir, ("uplink_rx",))["uplink_rx"]
    marks = np.arange(int(tags[0]) - 10**9, int(tags[-1]), 10**8, dtype=np.int64)
    time_ps = np.concatenate([tags, marks])
    channel = np.concatenate([
        CH_UPLINK0 + 2 * basis.astype(np.int64) + bit, np.full(marks.size, CH_SYNC)
    ])  # fmt: skip
    order = np.argsort(time_ps, kind="stable")
    time_ps, channel = time_ps[order], channel[order]
    writer = qrec.RecordWriter(path)
    written = 0

    def write_until(limit_ps):
        nonlocal written
        end = int(np.searchsorted(time_ps, limit_ps))
        for at in range(written, end, 227):
            stop = min(at + 227, end)
            block = qrec.encode_tdc_block(channel[at:stop], time_ps[at:stop])
            writer.append(qrec.Kind.TDC_BLOCK, block)
        written = max(written, end)

    try:
        n_blocks = math.ceil(DURATION_S / BLOCK_S)
        for k in range(n_blocks - 1):
            block_end = zero_ps + (k + 1) * 10**12
            write_until(block_end - 3 * 10**11)
            time.sleep(0.3)
            if len(feed.taken) != k:
                problems.append(f"block {k} taken before its end was in the log")
            write_until(block_end + 5 * 10**11)
            deadline = time.monotonic() + 300.0
            while len(feed.taken) <= k and time.monotonic() < deadline:
                time.sleep(0.01)
        write_until(2**62)
    finally:
        feed.end()


def test_the_satellite_takes_its_uplink_from_the_controllers_tdc_log_as_it_grows(
    two_way_pass, keys, tmp_path, monkeypatch
):
    # the satellite endpoint reads its uplink from the controller's TDC log while the
    # controller writes it (tdc_feed.LiveTdcUplink), block by block, instead of a file
    # downloaded after the pass: each block is taken once the log has passed its end and
    # not before, the last at the controller's end of pass; the offsets are those of the
    # same pass read from the finished files, element for element (the ground's QBER
    # sample, the only randomness, drawn from the same seeded generator in both runs)
    import threading

    from host.timetransfer.tdc_feed import LiveTdcUplink

    monkeypatch.setattr(stream, "SystemRandom", lambda: InsecureDeterministicRandom(11))
    reference, _ = stream.run_streaming(two_way_pass, keys, BLOCK_S, speedup=50.0)

    log = tmp_path / "tdc.qrec"
    feed = LiveTdcUplink(log, idle_s=300.0)
    up = files.read_events(two_way_pass, ("uplink_rx", "downlink_tx"))
    zero_ps = min(int(up["uplink_rx"][0][0]), int(up["downlink_tx"][0][0]))
    problems = []
    writer = threading.Thread(
        target=_tdc_log_writer, args=(two_way_pass, log, zero_ps, feed, problems), daemon=True
    )
    writer.start()
    report, satellite = stream.run_streaming(
        two_way_pass, keys, BLOCK_S, speedup=50.0, satellite={"uplink_feed": feed}
    )
    writer.join(60.0)
    assert problems == []
    assert report["aborted"] is False
    fed = satellite["uplink_feed"]
    assert fed["ended_by"] == "end of pass (controller)"
    assert fed["records_missing"] == 0 and fed["bytes_skipped"] == 0
    total = up["uplink_rx"][0].size
    assert fed["events"] == total == satellite["uplink_sync"]["detections"]
    # each block but the last taken while the log still grew, holding exactly the uplink
    # events before the block's end (the edges of the whole log); the last at its end
    tags = np.maximum.accumulate(up["uplink_rx"][0])
    n_blocks = math.ceil(DURATION_S / BLOCK_S)
    before_end = [int(np.searchsorted(tags, zero_ps + (k + 1) * 10**12)) for k in range(n_blocks)]
    when = fed["events_when_taken"]
    assert len(when) == n_blocks and when[-1] == total
    for k in range(n_blocks - 1):
        assert before_end[k] <= when[k] < total
    assert reference["qber_sample"] == report["qber_sample"]
    assert reference["offset_reference_ps"] == report["offset_reference_ps"]
    for column in ("t_s", "offset_ps", "offset_sigma_ps", "range_error_ps", "events_up"):
        np.testing.assert_array_equal(
            report["series"][column], reference["series"][column], err_msg=column
        )
    assert report["series"]["t_s"].size >= 0.9 * DURATION_S / report["bin_s"]


def test_a_weak_uplink_at_the_start_still_locks_during_the_pass(tmp_path, keys):
    # an uplink 12 dB weaker (as at a pass's 20 deg edge: ~170 detections/s) gives ~45 in
    # the densest 0.25 s of block 0, too few for the correlation with the ground's classes
    # (z ~ 0.9 sqrt(n) ~ 6, under 7): the streamed time transfer stopped, "no correlation
    # peak" (found on the whole micius-2017 pass, whose first block is at its edge). The
    # first window now grows (x2, up to 2 s) to 400 detections and the request waits for
    # 250 (a failed lock asks again later), so the lag locks a block or two later.
    # Its QBER is checked on every sifted uplink event (~500): a 10 % sample (~50 at
    # ~0.7 %) showed 2 errors, above the 3 % abort, in about one run in twelve.
    from host.timetransfer import simulate

    profile = simulate.load_profile("micius-qstt")
    for field in ("loss_db_at_645_km", "loss_db_at_1200_km"):
        profile["uplink"][field]["value"] += 12.0
    profile["uplink"]["noise_counts_hz"]["value"] = 10.0  # the QBER stays the profile's
    pass_dir = tmp_path / "pass"
    simulate.simulate(profile, pass_dir, 3, 6.0, uplink_key=bytes(range(32)))
    report, satellite = stream.run_streaming(pass_dir, keys, BLOCK_S, speedup=50.0)
    assert report["aborted"] is False and report["range_check"]["violation"] is False
    sync = satellite["uplink_sync"]
    assert report["qber_sample"]["uplink"]["n"] == report["sifted_events"]["uplink"] > 400
    assert sync["asked_detections"] >= timesync.SLOT_REQUEST_MIN and sync["first_z"] >= 7
    assert sync["matched"] >= 0.99 * sync["detections"]
    error = offset_error_ps(report, report["series"], files.read_truth(pass_dir))
    # 7.5 ps (half the calibration residual) within 5 sigma of the mean of the errors
    assert abs(np.mean(error) - 7.5) < 5 * np.std(error) / math.sqrt(error.size)
