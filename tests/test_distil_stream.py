"""Streaming distillation during the pass (host/distil/stream.py, docs/streaming.md) on a
30 s simulated micius-2017 pass: the detections are replayed as the tagger would append
them, and Alice and Bob sync, sift and reconcile while they arrive.

- the streamed key is identical on both sides, near the post-pass key's length (9 %: a
  single 30 s run cannot show 2 %, see the test), of the length the report's counts give;
- split over TCP (two processes) gives the key of the in-process run;
- over the emulated optical link, a 20 s outage mid-pass gives the same key, and the link
  lost for good before privacy amplification leaves no key on either side;
- the report carries the timeline (one row per pass second) and the latency figures, and
  the stream's own messages carry Alice's bits only in the disclosed sample.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import finite_key_reference
import numpy as np
import pytest
from key_block_spies import (
    noise_bits_err_half_the_time,
    public_entropy_ratios,
    spy_on_key_blocks,
)

from host.cli import main as qkdsat
from host.distil import codes
from host.distil.bitcodec import rice_decode_sorted, rice_encode_sorted
from host.distil.channel import TAG_BYTES, decode
from host.distil.protocol import BASES, Config
from host.distil.run import key_names, run_local
from host.distil.stream import StreamOptions
from host.formats.qdet import AppendedDetections
from host.mission.timeline import ROW_FIELDS

SEED = 33
PATTERN_SECRET = "5eed" * 8  # a test's pattern: not secret
PASS_S = 30.0
SPEEDUP = 6.0  # pass seconds replayed per wall second: the 30 s pass in 5 s of replay
# One frame per chunk (the default is two): on a 30 s pass (~160 kbit per basis, ~60 kbit
# frames) a chunk is reconciled mid-pass and the rest at loss of signal.
STREAM = StreamOptions(block_s=1.0, speedup=SPEEDUP, chunk_frames=1)
KEY_FILES = {role: name + ".key" for role, name in key_names(True).items()}

# the stream replays passes at a few times real time against the wall clock (Makefile test)
pytestmark = [pytest.mark.slow, pytest.mark.realtime]


@pytest.fixture(scope="module")
def micius_30s(tmp_path_factory):
    out = tmp_path_factory.mktemp("micius") / "pass"
    argv = ["simulate", "--profile", "micius-2017", "--duration-s", str(PASS_S), "--seed", "1"]
    argv += ["--pattern-secret", PATTERN_SECRET]  # the same pass on every run
    assert qkdsat(argv + ["--out", str(out), "--quiet"]) == 0
    return out


class Wire:
    """Records one direction's messages (a tamper hook that changes nothing)."""

    def __init__(self):
        self.messages = []

    def __call__(self, frame: bytes) -> bytes:
        self.messages.append(decode(frame[:-TAG_BYTES]))
        return frame


WIRES = {}  # the streamed run's messages, each direction
# Bob's block cuts in the streamed run (true seconds: the newest anchor when a block's
# detections are assigned) and his clock map (ground ps -> true seconds), read by spies that
# change nothing, with the synchroniser as it ended
CUTS = {"cuts_s": [], "ground_ps": [], "true_s": [], "sync": None}
# the streamed run's chunks as each side reconciled them, and Bob's noise shares
# (key_block_spies.spy_on_key_blocks)
CHUNKS = {}


@pytest.fixture(scope="module")
def streamed(micius_30s, tmp_path_factory):
    from host.distil import timesync

    out = tmp_path_factory.mktemp("stream")
    WIRES["alice"], WIRES["bob"] = Wire(), Wire()
    assign, true_seconds = timesync.Synchroniser.assign, timesync._true_seconds

    def assign_spy(self, t_all, det):
        CUTS["cuts_s"].append(max(self.anchors_t))
        CUTS["sync"] = self
        return assign(self, t_all, det)

    def true_seconds_spy(time_ps, pps_ps, pass_json):
        true = true_seconds(time_ps, pps_ps, pass_json)
        CUTS["ground_ps"].append(np.asarray(time_ps))
        CUTS["true_s"].append(true)
        return true

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(timesync.Synchroniser, "assign", assign_spy)
        patch.setattr(timesync, "_true_seconds", true_seconds_spy)
        CHUNKS["alice"], CHUNKS["bob"] = spy_on_key_blocks(patch)
        report = run_local(
            micius_30s,
            out,
            Config(),
            insecure_deterministic_seed=SEED,
            stream=STREAM,
            tamper=WIRES["alice"],
            tamper_bob=WIRES["bob"],
        )
    return report, out


PUBLIC = "public"
# every field of the streaming steps' own messages, and what it carries (the sync, EC and
# final messages are the post-pass ones: tests/test_payload_processor.py)
STREAM_FIELDS = {
    "stream_start": {
        "epoch_unix_s": PUBLIC,
        "speedup": PUBLIC,
        "block_s": PUBLIC,
        "link_end_s": PUBLIC,
    },
    "stream_next": {
        "step": PUBLIC,
        "t_end_s": PUBLIC,
        "detections": PUBLIC,
        "count": PUBLIC,
        "rice_k": PUBLIC,
        "slots": PUBLIC,
        "basis": PUBLIC,
        "bits": PUBLIC,
        "qber": PUBLIC,
        "sample_bits": PUBLIC,
        "frame_bits": PUBLIC,
        "sized_from_basis": PUBLIC,
        "sized_from_chunk": PUBLIC,
        "t_handled_s": PUBLIC,
        "last_detection_s": PUBLIC,
        "cut_s": PUBLIC,
        "detections_discarded": PUBLIC,
    },
    # a lock's probe: Alice's bits of its slots, which are never sifted (burned)
    "stream_probe": {"basis": PUBLIC, "bit": "probe, never key", "known": PUBLIC},
    "stream_sift": {
        "basis": PUBLIC,
        "intensity": PUBLIC,
        **{f"pos_{b}": PUBLIC for b in BASES},
        **{f"count_{b}": PUBLIC for b in BASES},
        **{f"bits_{b}": "sample" for b in BASES},
    },
}


def test_streamed_key_is_near_the_post_pass_length_and_identical_on_both_sides(
    micius_30s, streamed, tmp_path
):
    report, out = streamed
    assert not report["aborted"], report["abort_reason"]
    alice = (out / KEY_FILES["alice"]).read_bytes()
    bob = (out / KEY_FILES["bob"]).read_bytes()
    assert alice == bob and len(alice) == -(-report["key_bits"] // 8)
    reference = run_local(micius_30s, tmp_path, Config(), insecure_deterministic_seed=SEED)
    assert not reference["aborted"], reference["abort_reason"]
    # 9 %, not 2 %: measured on this pass (docs/streaming.md), the post-pass key spread
    # 21,128-21,922 bits over five endpoint seeds and the streamed one 20,081-20,790 over
    # four, 4-5 % lower on average (the key blocks' EC leak, +~650 bits on the first basis).
    # Since session 15 post-pass reconciles each of this pass's small blocks in one 2^18
    # frame (ldpc.SMALL_BLOCK_MIN_FILL): 22,500 bits at SEED; the stream 20,638 (8.3 %
    # under) with its last chunks in 2^16 frames, 20,826 (7.4 %) since session 16 (near
    # loss of signal whole 2^17 frames, the rest in one frame: docs/streaming.md, "The
    # last chunks in one frame"). Over 8 simulation seeds of this pass (endpoint seed 7)
    # the stream is 3.9-14.5 % under post-pass (9.2-17.7 % before): a single run's gap is
    # no sharper than that, so 9 % keeps the ~1.6 points of margin the 10 % had.
    # This asserts the stream keeps the post-pass analysis, not the 2 % target (not met).
    assert abs(report["key_bits"] - reference["key_bits"]) <= 0.09 * reference["key_bits"], (
        report["key_bits"],
        reference["key_bits"],
    )
    # the same detections were synchronised and sifted
    assert abs(report["sifted_bits"] - reference["sifted_bits"]) <= 1e-3 * reference["sifted_bits"]
    # error correction ran during the pass: a chunk before loss of signal
    chunks = [c for block in report["ec"]["blocks"] for c in block["chunk_list"]]
    last = report["timeline"][-1]["t_s"]
    assert any(c["t_handled_s"] < PASS_S - 2 for c in chunks), chunks
    assert last >= PASS_S - 1


def test_bob_decodes_each_chunk_with_its_own_bits_noise_shares(streamed):
    """Each chunk's shares, from the detections sifted up to it (its last window still
    filling), reach Bob's decoder aligned with the chunk's bits: those his prior calls pure
    noise (vacuum-pulse detections) err half the time, the others ~1 %."""
    noise_bits_err_half_the_time(CHUNKS["alice"], CHUNKS["bob"], min_noise_bits=30)


def test_each_chunks_entropy_ratio_is_recomputed_from_public_values(streamed):
    """ec_sizing is not in the leak: each part's ratio is the model's mean entropy over
    h(q) from the chunk's public shares at the low end of the interval its request
    announces (and, for the rest of a two-part chunk, the probe's announced count), as
    anyone recomputes it from the wire and the shares."""
    from host.distil import reconcile

    efficiency = Config().ec_efficiency
    requests, sizing, probes = [], [], []
    for kind, fields in WIRES["bob"].messages:
        if kind == "stream_next" and fields["step"] == "reconcile":
            requests.append(fields)
            sizing.append([])
            probes.append([])
        elif kind == "ec_sizing":
            sizing[-1].append(int(fields["entropy_ratio"]))
        elif kind == "ec_probe_errors":
            probes[-1].append(int(fields["errors"]))
    shares = [share for _, share in CHUNKS["bob"]]
    assert len(requests) == len(shares) > 0
    below_one = 0
    for request, ratios, announced, share in zip(requests, sizing, probes, shares, strict=True):
        assert share.size == int(request["bits"])
        qber, sample_bits = float(request["qber"]), int(request["sample_bits"])
        public = public_entropy_ratios(share, qber, sample_bits, announced, efficiency)
        assert ratios == public
        below_one += sum(r < reconcile.ENTROPY_RATIO_ONE for r in public)
    assert below_one > 0


def test_the_report_carries_the_timeline_and_latency_figures(streamed):
    report, out = streamed
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["key_latency_s"] == report["key_latency_s"] > 0
    rows = on_disk["timeline"]
    assert [r["t_s"] for r in rows] == list(range(len(rows)))
    assert all(set(r) == set(ROW_FIELDS) for r in rows)  # the schema of qkdsat mission
    for name in ("detections", "sifted_bits", "reconciled_bits"):
        values = [r[name] for r in rows]
        assert values == sorted(values), name  # cumulative
    assert rows[-1]["detections"] == report["sync"]["detections"]
    # each side counted at its warm-up the codes the pass may pick that its cache lacked;
    # the pass builds the ones it needed, so at least those still missing now were missing
    grid = codes.default_codes()
    still_missing = len(codes.missing(grid))
    for side in ("alice", "bob"):
        counted = on_disk["ldpc_codes_missing"][side]
        assert counted["of"] == len(grid) and still_missing <= counted["missing"] <= len(grid)
    assert rows[-1]["sifted_bits"] == report["sifted_bits"]
    assert rows[-1]["backlog_bits"] == 0
    # everything reconciled: the key blocks plus the disclosed sample are the key bases
    reconciled = rows[-1]["reconciled_bits"]
    assert reconciled == sum(b["bits"] + b["bits_discarded"] for b in report["ec"]["blocks"])
    assert all(r["link_up"] for r in rows)
    assert 0 <= report["lag_s_median"] <= report["lag_s_max"]
    # what ran after loss of signal, in order, before the key was written; each chunk timed
    after_los = on_disk["after_loss_of_signal_s"]
    steps = ("last_block_sifted", "last_chunks_reconciled", "keys_computed")
    assert set(after_los) == set(steps)
    assert [after_los[step] for step in steps] == sorted(after_los.values())
    assert after_los["keys_computed"] <= on_disk["key_latency_s"]
    assert all(c["seconds"] > 0 for b in on_disk["ec"]["blocks"] for c in b["chunk_list"])
    # the key length is the finite-key analysis of the report's own counts and leaks (the
    # chunks' EC leaks summed per basis)
    assert on_disk["key_bits"] == finite_key_reference.recomputed_key_bits(on_disk)
    for block, bob_block in zip(on_disk["blocks"], on_disk["ec"]["blocks"], strict=True):
        assert (
            block["leak_ec_bits"]
            == bob_block["leak_bits"]
            == sum(c["leak_bits"] for c in bob_block["chunk_list"])
        )
    # the hashing's machine code loaded before the pass clock by both sides (pa.warm_up;
    # the stage's seconds are the slower side's)
    assert on_disk["stage_seconds"]["privacy_amplification_warm_up"] > 0
    assert report["classical_bytes"]["down"] == report["classical_bytes"]["alice_to_bob"] > 0
    assert report["classical_bytes"]["up"] == report["classical_bytes"]["bob_to_alice"] > 0


def test_what_each_reconcile_request_tells_of_an_earlier_chunk_is_counted_on_it(streamed):
    """Recomputed from Bob's requests on the wire, with the rule written out here: a
    request sized from a chunk reveals that chunk's error count (ceil(log2(bits + 1)),
    once per chunk); a basis's first request sized from its sample after a chunk of the
    other basis tells one bit of that chunk's (docs/streaming.md, "Chunk sizing"). The
    report counts exactly that on each chunk, and in the basis's leak."""
    report, _ = streamed
    sizes, expected, announced, last = {}, {}, set(), None
    for kind, fields in WIRES["bob"].messages:
        if kind != "stream_next" or fields["step"] != "reconcile":
            continue
        basis = fields["basis"]
        source = (fields["sized_from_basis"], int(fields["sized_from_chunk"]))
        if source[0] and source not in announced:
            announced.add(source)
            bits = sizes[source[0]][source[1]]
            expected[source] = expected.get(source, 0) + math.ceil(math.log2(bits + 1))
        elif not source[0] and not sizes.get(basis) and last is not None:
            expected[last] = expected.get(last, 0) + 1
        sizes.setdefault(basis, []).append(int(fields["bits"]))
        last = (basis, len(sizes[basis]) - 1)
    counted = {
        (block["basis"], index): chunk["leak_error_count_bits"]
        for block in report["ec"]["blocks"]
        for index, chunk in enumerate(block["chunk_list"])
        if chunk["leak_error_count_bits"]
    }
    assert counted == expected and expected


def test_what_is_left_at_loss_of_signal_is_under_a_frame_and_the_last_blocks(streamed):
    # Near loss of signal no frame is held back (stream.LOS_RELEASE_FRAMES): the chunk
    # reconciled after the last detection, which the key latency waits for, is the rest of
    # the last whole frame and the blocks since, not a held frame and more (before: 102 kbit
    # in two frames here, 1.8 frames; after: 46 kbit, 0.8 of a frame).
    from host.distil.stream import chunk_bits, chunk_frame_bits

    report, _ = streamed
    los_s = report["end_of_pass"]["end_s"]
    # the last blocks' key bits, bounded by two seconds at the pass's mean sifted rate
    # (both bases and the disclosed sample: a basis's key bits are under half of it)
    last_blocks = 2.0 * report["sifted_bits"] / los_s
    for block in report["ec"]["blocks"]:
        *before, last = block["chunk_list"]
        # The chunks before the last: whole frames of the chunks' length, in frames of it.
        # On this pass the backlog never holds a frame and one more (hold), so each went
        # near loss of signal; with whole 2^16 frames released there (before session 16)
        # they were 57.6-57.7 kbit chunks in 2^16 frames at 11.55 and 21.55 s, which the
        # assertions on the last chunk below let pass.
        assert before, block["chunk_list"]
        for chunk in before:
            sized = (chunk["qber_sized_for"], chunk["sample_bits"])
            assert chunk["frame_bits"] == STREAM.frame_bits, chunk
            assert chunk["bits"] % chunk_bits(Config(), STREAM, *sized) == 0, chunk
        assert abs(last["t_handled_s"] - los_s) < STREAM.block_s, block["chunk_list"]
        # a frame of the chunks' length (2^17): near loss of signal every whole one goes at
        # once (stream.next_chunk)
        frame = chunk_bits(Config(), STREAM, last["qber_sized_for"], last["sample_bits"])
        assert last["bits"] < frame + last_blocks, (last, frame, last_blocks)
        # the rest in one frame, of the post-pass rule's length for a block of its size
        # (ldpc.frame_bits_for: one 2^17 frame, shortened, for more than a 2^16 frame holds)
        sized = (last["bits"], last["qber_sized_for"], last["sample_bits"])
        assert last["frame_bits"] == chunk_frame_bits(Config(), STREAM, *sized), last
        assert last["frames"] == 1, last


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_split_over_tcp_gives_the_key_of_the_in_process_run(micius_30s, streamed, tmp_path):
    report, out = streamed
    pool = tmp_path / "pool"
    pool.write_bytes(np.random.default_rng(7).bytes(1 << 20))
    pool.chmod(0o600)
    bob_pool = tmp_path / "pool_bob"
    bob_pool.write_bytes(pool.read_bytes())
    bob_pool.chmod(0o600)
    port = _free_port()
    common = ["--insecure-deterministic-seed", str(SEED), "--new-auth-pool", "--quiet"]
    stream = ["--stream", "--stream-speedup", str(SPEEDUP), "--stream-chunk-frames", "1"]
    root = Path(__file__).parents[1]
    run = [sys.executable, "-m", "host.cli", "distil", str(micius_30s)]
    alice = subprocess.Popen(
        run
        + ["--role", "alice", "--listen", f"127.0.0.1:{port}", "--auth-pool", str(pool)]
        + ["--out", str(tmp_path / "alice")]
        + common
        + stream,
        cwd=root,
    )
    bob = subprocess.Popen(
        run
        + ["--role", "bob", "--connect", f"127.0.0.1:{port}", "--auth-pool", str(bob_pool)]
        + ["--out", str(tmp_path / "bob")]
        + common
        + stream,
        cwd=root,
    )
    assert (alice.wait(600), bob.wait(600)) == (0, 0)
    key = (out / KEY_FILES["alice"]).read_bytes()
    assert (tmp_path / "alice" / KEY_FILES["alice"]).read_bytes() == key
    assert (tmp_path / "bob" / KEY_FILES["bob"]).read_bytes() == key
    for role in ("alice", "bob"):
        side = json.loads((tmp_path / role / "report.json").read_text())
        assert side["role"] == role and side["key_bits"] == report["key_bits"]
        assert side["key_latency_s"] > 0 and side["lag_s_max"] >= side["lag_s_median"] >= 0
        assert {k for r in side["timeline"] for k in r} == set(ROW_FIELDS)
        assert side["timeline"][-1]["reconciled_bits"] > 0


# ---------------------------------------------------------------- over the optical link

STATION = "Xinglong"
OUTAGE_PASS_S = 20.0  # of pass time: at SPEEDUP, OUTAGE_PASS_S / SPEEDUP wall seconds of link
OUTAGE_AT_PASS_S = 8.0
LINK_SPEEDUP = 3.0  # the key does not depend on the speed-up: blocks are cut in pass time


def _over_the_link(pass_dir: Path, tmp: Path, link, speedup: float = LINK_SPEEDUP, extra=()):
    from emulator.link_session import distil_over_link

    options = ["--insecure-deterministic-seed", str(SEED), "--stream"]
    options += ["--stream-speedup", str(speedup), "--stream-chunk-frames", "1", *extra]
    return distil_over_link(pass_dir, tmp, link, station=STATION, distil_options=options)


def test_a_20_s_outage_mid_pass_only_delays_the_stream_and_gives_the_same_key(
    micius_30s, streamed, tmp_path
):
    import threading

    from emulator.optical_link import UP, link_for_pass

    report, out = streamed
    link = link_for_pass(micius_30s, seed=4)
    # clouds over the station 8 s into the pass, for 20 s of the pass: timed from Bob's
    # stream_start (pass time 0); the link's clock is wall time, the replay runs at
    # LINK_SPEEDUP
    timers = []

    def clouds_later(lk):
        timer = threading.Timer(
            OUTAGE_AT_PASS_S / LINK_SPEEDUP,
            lambda: lk.add_outage(lk.now_s(), OUTAGE_PASS_S / LINK_SPEEDUP, "clouds (test)"),
        )
        timers.append(timer)
        timer.start()

    link.on_message(UP, "stream_start", clouds_later)
    try:
        run = _over_the_link(micius_30s, tmp_path, link)
    finally:
        for timer in timers:
            timer.cancel()
    assert run.codes == (0, 0), (run.alice.get("abort_reason"), run.bob.get("abort_reason"))
    assert [o["cause"] for o in run.link["outages"]] == ["clouds (test)"]
    assert not run.link["lost_for_good"]
    key = (out / KEY_FILES["alice"]).read_bytes()
    # Blocks are cut in pass time, so the key is the unbroken run's, unless Bob's decoder
    # fell behind by LAG_FALLBACK_S (a loaded machine: once with three other test runs
    # beside it) and his chunks took 2^16 frames: say so rather than only "differs".
    switches = run.bob.get("stream", {}).get("frame_switches")
    assert (run.alice_dir / KEY_FILES["alice"]).read_bytes() == key, switches
    assert (run.bob_dir / KEY_FILES["bob"]).read_bytes() == key, switches
    for side in (run.alice, run.bob):
        rows = side["timeline"]
        down = [r["t_s"] for r in rows if not r["link_up"]]
        # the link's outage is on the timeline, about where and as long as it was (within
        # a wall second or so of timer jitter on a loaded machine)
        slack = 1 + 1.5 * LINK_SPEEDUP
        assert down and OUTAGE_AT_PASS_S - 1 <= down[0] <= OUTAGE_AT_PASS_S + slack, down
        assert abs(len(down) - OUTAGE_PASS_S) <= slack, down
        # the pipeline fell behind during the outage and caught up after it
        assert max(r["lag_s"] for r in rows if r["t_s"] in down) >= OUTAGE_PASS_S / 2
        assert rows[-1]["backlog_bits"] == 0 and rows[-1]["reconciled_bits"] > 0


def test_link_lost_for_good_before_pa_leaves_no_key_on_either_side_while_streaming(
    micius_30s, tmp_path
):
    from emulator.optical_link import DOWN, link_for_pass

    link = link_for_pass(micius_30s, seed=5)
    link.on_message(DOWN, "pa", lambda lk: lk.lose_for_good())
    run = _over_the_link(micius_30s, tmp_path, link)
    assert run.codes == (3, 3)
    assert run.link["lost_for_good"]
    for side, folder, side_report in (
        ("alice", run.alice_dir, run.alice),
        ("bob", run.bob_dir, run.bob),
    ):
        assert not list(folder.glob("*.key")), side
        assert side_report["aborted"] and "link was lost" in side_report["abort_reason"], side
        assert side_report["key_bits"] == 0 and side_report["key_latency_s"] is None
        # the stream had run: the pass was sifted and reconciled before the link died
        assert side_report["timeline"][-1]["reconciled_bits"] > 0, side


def _link_messages(stream: bytes) -> list[tuple[str, dict]]:
    """The distillation messages in one direction's captured bytes (u32 length, body, tag;
    the untagged pool-position frame skipped)."""
    messages, pos = [], 0
    while pos + 4 <= len(stream):
        length = int.from_bytes(stream[pos : pos + 4], "little")
        try:
            messages.append(decode(stream[pos + 4 : pos + 4 + length - TAG_BYTES]))
        except Exception:  # the pool-position frame is no protocol message
            pass
        pos += 4 + length
    return messages


# A pass long enough that the part before the cut keys on a loaded machine: at load 10-12
# a frame took 3.7-5.7 s of error correction, the reserve was 23-34 s and a 45 s pass was
# cut at 13-22 s (keys of 13-37 kbit). The reserve grows with the load: with two busy loops
# at nice -5 beside load ~8, a frame took 5.9 s, the reserve was 50.9 s and a 60 s pass
# was cut at 12 s (11 kbit; the rest took 14 s of it): a little more load and the part
# before the cut has no key (exit 3, 3). 75 s keeps ~25 s of pass before the cut at a
# 50 s reserve.
CUT_PASS_S = 75.0


@pytest.fixture(scope="module")
def micius_cut_pass(tmp_path_factory):
    out = tmp_path_factory.mktemp("micius_cut") / "pass"
    argv = ["simulate", "--profile", "micius-2017", "--duration-s", str(CUT_PASS_S)]
    argv += ["--seed", "2", "--pattern-secret", PATTERN_SECRET]
    assert qkdsat(argv + ["--out", str(out), "--quiet"]) == 0
    return out


def test_a_link_that_sets_at_loss_of_signal_gives_both_sides_the_key_of_a_pass_cut_early(
    micius_cut_pass, streamed, tmp_path
):
    """Jinan-1's case: the optical link ends as the last detection arrives, with sifted bits
    still to reconcile. Bob closes the pass early enough, from the link's predicted end and
    the pipeline's measured costs, and both sides agree on the cut: the same key on both
    sides, the tail named in both reports, and none of its detections on the link. Before,
    the link closed on the backlog and neither side had a key (exit 3, 3)."""
    from emulator.optical_link import UP, link_for_pass

    # (`streamed` first: its in-process run has compiled the decoders' machine code, which
    # numba caches; compiled in the endpoints instead, their first chunk costs ~10 s more
    # on a loaded machine than the cut could foresee from the pass so far)
    link = link_for_pass(micius_cut_pass, seed=6, capture=True)
    # the satellite sets as the last detection arrives (real time: link and pass clocks
    # run together, both from the first detection)
    link.set_at(link.start_s + CUT_PASS_S)
    # Chernoff tails (jinan-1's choice): with Hoeffding's the part of this pass before
    # the cut is too short for a key on a loaded machine
    run = _over_the_link(
        micius_cut_pass, tmp_path, link, speedup=1.0, extra=["--tail", "chernoff"]
    )
    assert run.codes == (0, 0), (run.alice.get("abort_reason"), run.bob.get("abort_reason"))
    key = (run.alice_dir / KEY_FILES["alice"]).read_bytes()
    assert key and (run.bob_dir / KEY_FILES["bob"]).read_bytes() == key
    cuts = [side["stream_cut"] for side in (run.alice, run.bob)]
    total = AppendedDetections(micius_cut_pass / "ground" / "detections.qdet").records().size
    for cut in cuts:
        assert 0 < cut["cut_s"] < cut["loss_of_signal_s"] < CUT_PASS_S + 1
        assert abs(cut["link_end_s"] - CUT_PASS_S) < 1e-6
        assert 0 < cut["detections_discarded"] < total
    assert {k: cuts[0][k] for k in cuts[0]} == {k: cuts[1][k] for k in cuts[0]}
    # the finite-key analysis covers exactly what was sifted before the cut (Alice's report
    # carries the counts; Bob's key is as long)
    assert run.bob["key_bits"] == run.alice["key_bits"] > 0
    assert run.alice["key_bits"] == finite_key_reference.recomputed_key_bits(run.alice)
    assert run.bob["sifted_bits"] == run.alice["sifted_bits"]
    # the tail never crossed the link: Bob's blocks end at the cut and carry every
    # detection before it, none after
    blocks = [m for k, m in _link_messages(link.captured(UP)) if m.get("step") == "block"]
    assert max(m["t_end_s"] for m in blocks) == cuts[1]["cut_s"]
    assert sum(m["detections"] for m in blocks) + cuts[1]["detections_discarded"] == total


def test_the_streams_messages_carry_alices_bits_only_in_the_counted_sample(streamed):
    """Alice's bit values cross only as the disclosed sample (the EC messages are the
    post-pass ones); the sample is what the report's key blocks leave out of the sifted
    bits."""
    report, _ = streamed
    messages = WIRES["alice"].messages + WIRES["bob"].messages
    sample_bits = dict.fromkeys(BASES, 0)
    for kind, fields in messages:
        if kind not in STREAM_FIELDS:
            continue
        for name in fields:
            assert name in STREAM_FIELDS[kind] or name.startswith("_"), (kind, name)
        if kind == "stream_sift":
            for b in BASES:
                sample_bits[b] += int(fields[f"count_{b}"])
    kinds = {kind for kind, _ in messages}
    assert {"stream_start", "stream_next", "stream_sift", "stream_probe"} <= kinds
    # the lock's probe slots (Alice disclosed their bits) are never sifted
    named = {"probe": [], "block": []}
    for kind, fields in WIRES["bob"].messages:
        if kind == "stream_next" and fields["step"] in named:
            count = int(fields["count"])
            named[fields["step"]].append(
                rice_decode_sorted(int(fields["rice_k"]), fields["slots"], count)
            )
    assert len(named["probe"]) == 1 and named["probe"][0].size > 0
    assert not np.intersect1d(named["probe"][0], np.concatenate(named["block"])).size
    assert "detections" not in kinds and "disclose" not in kinds  # no post-pass sifting
    counts = report["counts"]
    for block in report["blocks"]:
        sifted = sum(v["n"] for v in counts[block["basis"]].values())
        assert sifted - block["n"] == sample_bits[block["basis"]] > 0
    # EC ran in chunks, each announced by a reconcile step
    steps = [f["step"] for kind, f in messages if kind == "stream_next"]
    chunks = sum(b["chunks"] for b in report["ec"]["blocks"])
    assert steps.count("reconcile") == chunks >= 3


def test_alice_refuses_a_slot_sifted_in_an_earlier_block(micius_30s, tmp_path, monkeypatch):
    """A Bob that sends a slot again in a later block (a block boundary through a slot, a
    faulty tagger feed): Alice would sift her bit twice, one copy possibly in the key and
    the other in the disclosed sample, counted twice in the analysis. She aborts; no key."""
    from host.distil.stream import StreamBob

    original = StreamBob._detections_to_slots

    def resending(self, result):
        slots, basis, bit = original(self, result)
        if self._last_slot >= 0 and slots.size:
            # the newest slot already sent, again; Bob's own filter is stepped around
            slots = np.concatenate([[self._last_slot], slots])
            basis, bit = np.concatenate([basis[:1], basis]), np.concatenate([bit[:1], bit])
            self._last_slot -= 1
        return slots, basis, bit

    monkeypatch.setattr(StreamBob, "_detections_to_slots", resending)
    _fast_stream_aborts(micius_30s, tmp_path, "not strictly after the slots already sifted")


def _fast_stream_aborts(pass_dir, out, reason: str) -> None:
    """A fast in-process stream of the pass aborts for `reason`, no key on either side."""
    fast = StreamOptions(block_s=1.0, speedup=30.0, chunk_frames=1)
    report = run_local(pass_dir, out, Config(), insecure_deterministic_seed=SEED, stream=fast)
    assert report["aborted"], f"no abort ({reason})"
    assert reason in report["abort_reason"]
    assert not list(out.glob("*.key"))


def test_alice_refuses_a_probe_of_slots_already_sifted(micius_30s, tmp_path, monkeypatch):
    """A Bob that probes again after a block (a faulty or compromised ground segment)
    naming slots already sifted: Alice's basis and bit of each would cross in the clear
    while they may sit in the key. She aborts without answering; no key on either side."""
    from host.distil.stream import PROBE_DETECTIONS, StreamBob

    sent_slots, original_slots = [], StreamBob._detections_to_slots
    original_block = StreamBob._send_block

    def recording(self, result):
        slots, basis, bit = original_slots(self, result)
        sent_slots.append(slots[slots > self._last_slot])
        return slots, basis, bit

    def probing_after_a_block(self, channel, *args, **kwargs):
        done = original_block(self, channel, *args, **kwargs)
        if sent_slots and sent_slots[-1].size:
            probed = sent_slots[-1][-PROBE_DETECTIONS:]  # within the probe's size
            rice_k, packed = rice_encode_sorted(probed)
            channel.send(
                "stream_next", step="probe", count=int(probed.size), rice_k=rice_k,
                slots=packed,
            )  # fmt: skip
            channel.recv("stream_probe")
        return done

    monkeypatch.setattr(StreamBob, "_detections_to_slots", recording)
    monkeypatch.setattr(StreamBob, "_send_block", probing_after_a_block)
    _fast_stream_aborts(micius_30s, tmp_path, "is not after the slots already sifted")


def test_alice_refuses_bob_detection_counts_that_differ_from_her_own(
    micius_30s, tmp_path, monkeypatch
):
    """A Bob whose per-intensity key-block counts are off (a faulty ground segment, or one
    that inflates the signal class): the decoy bounds would rest on detections that never
    happened and the key come out longer. Alice counts her own sifted bits per intensity and
    aborts; no key on either side."""
    from host.distil import protocol

    original = protocol._counts_table

    def inflated(names, intensity, errors_mask, known_mask):
        table = original(names, intensity, errors_mask, known_mask)
        first = names[0]
        table[first] = [table[first][0] + 1000, table[first][1]]
        return table

    monkeypatch.setattr(protocol, "_counts_table", inflated)
    fast = StreamOptions(block_s=1.0, speedup=30.0, chunk_frames=1)
    report = run_local(
        micius_30s, tmp_path, Config(), insecure_deterministic_seed=SEED, stream=fast
    )
    assert report["aborted"], "Alice took Bob's inflated counts"
    assert "detection count differs from Alice's" in report["abort_reason"]
    assert not list(tmp_path.glob("*.key"))


def test_a_double_click_split_by_a_block_cut_is_squashed_as_one_slot(
    micius_30s, streamed, tmp_path
):
    """A cross-basis double click (H and D in one slot) whose two clicks fall either side
    of the time where Bob cuts a block: both clicks must reach the squashing together (a
    uniformly random basis and bit), as post-pass. Split, the first block took the H click
    alone as a clean Z outcome and the next dropped the D click as a slot already sent: a
    two-photon pulse could pass as error-free single-basis clicks at every cut.

    The cuts and the clock map are those of the streamed run (spies); the same pass with a
    pair added across each cut that lies inside a slot's timing gate is streamed again:
    its squashed cross-basis slots are the first run's plus one per pair."""
    import shutil

    from host.formats.qdet import read_detections, write_detections

    report, _ = streamed
    sync = CUTS["sync"]
    ground_ps = np.concatenate(CUTS["ground_ps"])
    true_s = np.concatenate(CUTS["true_s"])
    half_ps = 20  # each click 20 ps from the cut: one slot (10,000 ps), inside its gate
    pairs = []
    for cut_s in CUTS["cuts_s"][:-1]:  # the last assignment is loss of signal, no cut
        if cut_s < 5.0 or (pairs and cut_s - pairs[-1] < 1.0):
            continue  # after the first synchronisation, one pair per block at most
        around = np.array([cut_s - half_ps * 1e-12, cut_s + half_ps * 1e-12])
        result = sync.assign(around, np.ones(2, bool))
        if result.assigned.all() and result.slots[0] == result.slots[1]:
            pairs.append(cut_s)
    assert len(pairs) >= 3, "too few block cuts inside a slot's gate on this pass"
    crafted = tmp_path / "pass"
    shutil.copytree(micius_30s, crafted)
    detections = crafted / "ground" / "detections.qdet"
    time_ps, channels, header = read_detections(detections)
    centre_ps = np.rint(np.interp(pairs, true_s, ground_ps)).astype(np.int64)
    added_ps = np.concatenate([centre_ps - half_ps, centre_ps + half_ps])
    added_ch = np.concatenate([np.zeros(len(pairs)), np.full(len(pairs), 2)])  # H, then D
    order = np.argsort(np.concatenate([time_ps, added_ps]), kind="stable")
    header.pop("count", None)
    write_detections(
        detections,
        np.concatenate([time_ps, added_ps])[order],
        np.concatenate([channels, added_ch.astype(np.int16)])[order],
        header,
    )
    fast = StreamOptions(block_s=1.0, speedup=30.0, chunk_frames=1)
    again = run_local(
        crafted, tmp_path / "out", Config(), insecure_deterministic_seed=SEED, stream=fast
    )
    before = report["sync"]["multi_click_slots"]["both_bases"]
    assert again["sync"]["multi_click_slots"]["both_bases"] == before + len(pairs), pairs


def test_a_false_first_lock_is_caught_by_its_probe_and_synchronised_again(
    micius_30s, tmp_path, monkeypatch
):
    """The first anchor locks 1,000 slots off (a false correlation peak: every detection
    then gets a wrong slot and a random bit of Alice's). Before any block is sifted, the
    lock's probe compares Alice's bits of its first detections (~50 % errors), drops the
    lock, and the first synchronisation is made again with more detections: the pass
    still gives a key, identical on both sides. (Before: the wrong lock was sifted and the
    run aborted on the QBER.)"""
    from host.distil import timesync

    original = timesync.Synchroniser.first_anchor
    locks = []

    def first_lock_false(self, t, *args, **kwargs):
        tc = original(self, t, *args, **kwargs)
        if not locks:
            self.anchors_off[0] += 1000
        locks.append(tc)
        return tc

    monkeypatch.setattr(timesync.Synchroniser, "first_anchor", first_lock_false)
    fast = StreamOptions(block_s=1.0, speedup=30.0, chunk_frames=1)
    report = run_local(
        micius_30s, tmp_path, Config(), insecure_deterministic_seed=SEED, stream=fast
    )
    assert not report["aborted"], report["abort_reason"]
    assert len(locks) == 2 and report["sync"]["false_locks"] == 1, report["sync"]
    # the true lock's probe: the channel's QBER on its ~300 compared bits, far below 25 %
    assert report["sync"]["probe"]["compared_bits"] >= 100
    alice = (tmp_path / KEY_FILES["alice"]).read_bytes()
    assert alice == (tmp_path / KEY_FILES["bob"]).read_bytes()
    assert len(alice) == -(-report["key_bits"] // 8) > 0
