"""When the streaming pipeline reconciles a key basis, and how much (host/distil/stream.py
due_chunk_bits, docs/streaming.md "Keeping up"): a backlog of many frames (a bright pass,
the catch-up after the first lock or an outage) goes as one chunk of every whole frame but
the held one, so the decoder works on its frames together instead of chunk after chunk."""

from __future__ import annotations

import numpy as np
import pytest

from host.distil import reconcile
from host.distil.protocol import Config
from host.distil.stream import (
    MAX_CHUNK_FRAMES,
    StreamBob,
    StreamOptions,
    _Growing,
    _Sifted,
    chunk_frame_bits,
    chunk_short_frames,
    due_chunk_bits,
    frame_key_bits,
    next_chunk,
    request_reveals,
)
from host.errors import BadInput

FRAME = 39_334  # key bits of a frame at 1.2 % QBER (jinan-1-stress10x)


def test_nothing_is_due_until_the_chunk_and_the_held_frame_are_there():
    assert due_chunk_bits(0, FRAME, 2, final=False) == 0
    assert due_chunk_bits(3 * FRAME - 1, FRAME, 2, final=False) == 0
    assert due_chunk_bits(3 * FRAME, FRAME, 2, final=False) == 2 * FRAME
    assert due_chunk_bits(2 * FRAME, FRAME, 1, final=False) == FRAME


def test_a_backlog_of_many_frames_is_one_chunk_of_every_frame_but_the_held_one():
    # 7.5 frames: 6 frames now (one held back, the half frame waits), not three chunks of 2
    assert due_chunk_bits(7 * FRAME + FRAME // 2, FRAME, 2, final=False) == 6 * FRAME
    # up to the cap (Bob's decoder memory), the rest in the next chunk
    assert due_chunk_bits(40 * FRAME, FRAME, 2, final=False) == MAX_CHUNK_FRAMES * FRAME
    # a chunk asked for larger than the cap keeps its size
    assert due_chunk_bits(80 * FRAME, FRAME, 32, final=False) == 32 * FRAME


def test_at_loss_of_signal_the_whole_backlog_is_due():
    assert due_chunk_bits(FRAME // 3, FRAME, 2, final=True) == FRAME // 3
    assert due_chunk_bits(9 * FRAME + 5, FRAME, 2, final=True) == 9 * FRAME + 5
    assert due_chunk_bits(0, FRAME, 2, final=True) == 0


def test_the_next_chunk_is_sized_for_the_error_rate_of_the_latest_bits():
    # Near loss of signal the QBER climbs within a chunk (micius-2017, seed 1: a 59 kbit
    # chunk at 1.65 %, the 15 kbit after it at 2.58 % took 16 retry rounds). The next
    # chunk is sized from the exact rate of the previous chunk's latest bits (its tail,
    # stream.chunk_tail_bits), not from the whole chunk's.
    bob = StreamBob.__new__(StreamBob)  # the sizing state only: no pass, no channel
    bob.config = Config()
    bob._sifted = _Sifted(("Z",))
    bob._sample_at = {"Z": _Growing(np.int64)}
    bob._sample_wrong = {"Z": _Growing(bool)}
    bob._chunk_errors, bob._chunk_tail, bob._chunk_log = {"Z": []}, {"Z": []}, []
    early, late = np.zeros(40_000, bool), np.zeros(20_000, bool)  # 60 kbit in time order
    early[::100] = True  # 1 %
    late[::40] = True  # 2.5 %
    bob._sifted.key_positions["Z"].extend(np.arange(80_000))
    bob._sifted.reconciled["Z"] = 60_000
    bob._record_chunk_errors("Z", np.concatenate([early, late]))
    qber, _, source = bob._estimate("Z")
    assert source == ("Z", 0)
    assert qber == pytest.approx(0.025, rel=0.01)  # the whole chunk's: 900 / 60,000 = 1.5 %


def test_a_first_chunk_sized_from_its_sample_counts_the_bit_its_request_tells():
    """A basis's first chunk is sized from the other basis's chunk just reconciled when
    the sample agrees with that chunk's tail rate. Whether it agrees is a function of that
    chunk's secret error count, and the request shows which way it went: named, the count
    is counted (ceil(log2(bits + 1))); not named, one bit, on both sides alike (a cold
    review found that bit uncounted)."""
    bob = StreamBob.__new__(StreamBob)
    bob.config = Config()
    bob._sifted = _Sifted(("Z", "X"))
    bob._sifted.key_positions["X"].extend(np.arange(100_000, 200_000))
    bob._sample_at = {"X": _Growing(np.int64)}
    bob._sample_at["X"].extend(np.arange(100_000, 102_000))
    bob._sample_wrong = {"X": _Growing(bool)}
    sample = np.zeros(2_000, bool)
    sample[::100] = True  # 1 %
    bob._sample_wrong["X"].extend(sample)
    charged, schedules = {}, []
    for tail_errors in (160, 400):  # Z0's tail at 1.0 % and 2.4 %
        bob._chunk_errors = {"Z": [], "X": []}
        bob._chunk_tail, bob._chunk_log = {"Z": [], "X": []}, []
        wrong = np.zeros(65_536, bool)
        wrong[-16_384:][: tail_errors * 40 : 40] = True  # the tail's errors, spread
        bob._record_chunk_errors("Z", wrong)
        _, _, source = bob._estimate("X")
        # the schedule (when the chunk is due, how long) does not look at Z0's tail: its
        # comparison, block after block, would show in the request's timing
        schedules.append(bob._estimate("X", compare_other=False))
        chunk_bits = {("Z", 0): 65_536}
        # Bob's count, from his state, and Alice's, from the request's public fields only
        bobs = request_reveals(source, set(), True, bob._chunk_log[-1], chunk_bits.get)
        alices = request_reveals(source, set(), True, ("Z", 0), chunk_bits.get)
        assert bobs == alices
        charged[tail_errors] = (source, bobs)
    assert charged[160] == (("Z", 0), (("Z", 0), 17))  # agreed: the count, 17 bits
    assert charged[400] == (None, (("Z", 0), 1))  # apart: one bit, on Z0
    assert schedules[0] == schedules[1] == (0.01, 2_000, None)  # the sample's alone
    # a later basis's chunk, or a first one with nothing reconciled before, tells nothing
    assert request_reveals(None, set(), False, ("Z", 0), chunk_bits.get) is None
    assert request_reveals(None, set(), True, None, chunk_bits.get) is None
    # a count is counted once however many requests name its chunk
    announced = set()
    assert request_reveals(("Z", 0), announced, False, None, chunk_bits.get)[1] == 17
    assert request_reveals(("Z", 0), announced, False, None, chunk_bits.get) is None


# Key bits of a frame of 2^16 and of 2^17 at 1.2 % QBER (micius-2017's mid-pass)
SHORT, LONG = 60_617, 121_234
LONG_FRAMES = StreamOptions(chunk_frames=1, frame_bits=2**17)


def test_during_the_pass_a_chunk_is_one_long_frame_with_one_held_back():
    # The stream's frames are 2^17 (docs/streaming.md, "Frame length and top-up"): a frame
    # of 2^16 at ~1.1-1.4 % decodes at f ~1.12-1.18, one of 2^17 ~0.02-0.03 lower.
    assert next_chunk(2 * LONG - 1, SHORT, LONG, LONG_FRAMES, False, hold=True) == 0
    assert next_chunk(2 * LONG, SHORT, LONG, LONG_FRAMES, False, hold=True) == LONG
    # a catch-up: every whole long frame but the held one, up to the bits of
    # MAX_CHUNK_FRAMES short frames (Bob's decoder memory)
    chunk = next_chunk(40 * LONG, SHORT, LONG, LONG_FRAMES, False, True)
    assert chunk == MAX_CHUNK_FRAMES // 2 * LONG


def test_near_loss_of_signal_every_whole_long_frame_goes_and_the_rest_at_the_end():
    # released (no frame held): every whole frame of the chunks' length at once, so that
    # what is left at loss of signal, which the keys wait for, is under one of them and the
    # last blocks; no longer whole frames of 2^16 (docs/streaming.md, "The last chunks in
    # one frame")
    assert next_chunk(3 * SHORT + 5, SHORT, LONG, LONG_FRAMES, False, hold=False) == LONG
    assert next_chunk(SHORT + 5, SHORT, LONG, LONG_FRAMES, False, hold=False) == 0
    # the last chunk: all of it
    assert next_chunk(SHORT + 5, SHORT, LONG, LONG_FRAMES, True, hold=False) == SHORT + 5


def test_near_the_link_end_a_first_chunk_of_a_short_frame_measures_the_speed():
    # Near the link's end, before any chunk has measured Bob's error correction, whole
    # frames of 2^16 go as before session 16: the cut's reserve is otherwise 8x the
    # warm-up's seconds per frame, 7-9x what the first chunk measures on an idle machine,
    # and a 40 s micius-2017 pass whose link ended at 28 or 32 s was cut at 13 or 18 s
    # waiting for a whole 2^17 frame (no key) instead of 20 or 24 s (2,578 or 8,133 bits)
    measure = dict(hold=False, measure_first=True)
    assert next_chunk(SHORT + 5, SHORT, LONG, LONG_FRAMES, False, **measure) == SHORT
    assert next_chunk(3 * SHORT + 5, SHORT, LONG, LONG_FRAMES, False, **measure) == 3 * SHORT
    assert next_chunk(SHORT - 1, SHORT, LONG, LONG_FRAMES, False, **measure) == 0
    # at the end all of it; during the pass (a frame held back) as without it
    assert next_chunk(SHORT + 5, SHORT, LONG, LONG_FRAMES, True, **measure) == SHORT + 5
    held = next_chunk(2 * LONG - 1, SHORT, LONG, LONG_FRAMES, False, True, measure_first=True)
    assert held == 0


# The estimate a last chunk is sized for in the tests below: 1.2 % from a tail of 16,384
# bits (stream.CHUNK_TAIL_MIN_BITS), as the last chunk's bound sizing names it
QBER, SAMPLE_BITS = 0.012, 16_384


def _frame_key_bits(frame_bits: int) -> int:
    return frame_key_bits(Config(), QBER, SAMPLE_BITS, frame_bits)


def test_a_last_chunk_of_more_than_a_short_frame_goes_in_one_long_frame_shortened():
    """The post-pass rule for a small block (ldpc.frame_bits_for, SMALL_BLOCK_MIN_FILL):
    a last chunk of 60 % of a 2^17 frame's key bits (more than a 2^16 frame holds) is
    asked in one frame of 2^17, shortened, not in two of 2^16; one that a 2^16 frame
    holds stays in it; a whole long frame or more in the chunks' length."""
    cfg, long_bits = Config(), _frame_key_bits(2**17)
    short_bits = _frame_key_bits(2**16)
    chunk = int(0.6 * long_bits)
    assert chunk > short_bits
    assert chunk_frame_bits(cfg, LONG_FRAMES, chunk, QBER, SAMPLE_BITS) == 2**17
    plan = reconcile._plan(chunk, QBER, cfg.ec_efficiency, SAMPLE_BITS, frame_bits=2**17)
    assert plan.key_bits == chunk  # one frame, what Alice's plan makes of the request
    assert chunk_frame_bits(cfg, LONG_FRAMES, short_bits, QBER, SAMPLE_BITS) == 2**16
    assert chunk_frame_bits(cfg, LONG_FRAMES, 3 * long_bits, QBER, SAMPLE_BITS) == 2**17
    # the rule's length, never longer than the chunks': with 2^16 chunks, 2^16
    short = StreamOptions(chunk_frames=2, frame_bits=2**16)
    assert chunk_frame_bits(cfg, short, chunk, QBER, SAMPLE_BITS) == 2**16
    # with 2^18 chunks, a last chunk of 60 % of a 2^18 frame takes one of 2^18
    longest = StreamOptions(chunk_frames=2, frame_bits=2**18)
    chunk = int(0.6 * _frame_key_bits(2**18))
    assert chunk_frame_bits(cfg, longest, chunk, QBER, SAMPLE_BITS) == 2**18


def test_a_last_chunks_frame_length_is_the_rules_at_the_sizing_its_request_names():
    """A last chunk is sized for the upper bound of its error rate (last_chunk_sizing), with
    the interval of the tail it is sized from (16,384 bits), not of a 2 % sample of the
    chunk (1,100 bits): narrower, so a frame holds more key bits there. Its frame length
    is picked at that sizing, the one Alice's plan sees (StreamBob._chunk_request), and the
    link-end reserve counts it so: 58,000 bits after a 55,000-bit chunk at 2 % fill 52 % of
    a 2^17 frame at the estimate, but one 2^16 frame holds them at the bound (61,231
    bits). Picked at the estimate, a 2^17 frame would be asked 47 % full at the bound,
    under ldpc.SMALL_BLOCK_MIN_FILL, and its graph decoded whole for a 2^16 frame's bits."""
    cfg, chunk = Config(), 58_000
    bob = StreamBob.__new__(StreamBob)  # the sizing state only: no pass, no channel
    bob.config, bob.stream = cfg, LONG_FRAMES
    bob._sifted = _Sifted(("Z",))
    bob._sifted.key_positions["Z"].extend(np.arange(55_000 + chunk))
    bob._sifted.reconciled["Z"] = 55_000
    bob._sample_at = {"Z": _Growing(np.int64)}
    bob._sample_wrong = {"Z": _Growing(bool)}
    bob._chunk_errors, bob._chunk_tail, bob._chunk_log = {"Z": []}, {"Z": []}, []
    bob._announced = set()
    wrong = np.zeros(55_000, bool)
    wrong[::50] = True  # 2 %
    bob._record_chunk_errors("Z", wrong)
    estimate = bob._estimate("Z")
    assert estimate[1:] == (1_100, ("Z", 0))
    assert chunk_frame_bits(cfg, LONG_FRAMES, chunk, *estimate[:2]) == 2**17
    qber, sample_bits, frame_bits = bob._chunk_request(chunk, *estimate, last=True)
    assert sample_bits == 16_384 and frame_bits == 2**16
    plan = reconcile._plan(chunk, qber, cfg.ec_efficiency, sample_bits, frame_bits=frame_bits)
    assert plan.key_bits == chunk  # one frame
    assert bob._last_chunk_short_frames("Z", chunk) == 1
    # sized at the bound up to LAST_CHUNK_MAX_FRAMES frames of the chunks' length, no
    # longer of 2^16: what is left at loss of signal is under one of them and the last
    # blocks (150,000 bits: 1.35 frames of 2^17, 2.7 of 2^16)
    assert bob._chunk_request(150_000, *estimate, last=True)[1] == 16_384


def test_short_frames_chunk_as_before():
    short = StreamOptions(chunk_frames=2, frame_bits=2**16)
    assert next_chunk(3 * SHORT, SHORT, SHORT, short, False, True) == 2 * SHORT
    assert next_chunk(3 * SHORT - 1, SHORT, SHORT, short, False, True) == 0
    # near loss of signal whole 2^16 frames, as before the long frames
    assert next_chunk(SHORT + 5, SHORT, SHORT, short, False, hold=False) == SHORT


def test_only_provisioned_frame_lengths_are_accepted():
    with pytest.raises(BadInput):
        StreamOptions(frame_bits=100_000).validate()
    for frame_bits in (2**16, 2**17, 2**18):
        StreamOptions(frame_bits=frame_bits).validate()


def test_the_link_end_estimate_counts_a_chunk_in_frames_of_2_16():
    # Bob's seconds per frame (the link's end reserve) are per frame of 2^16: a chunk of a
    # 2^16 probe and two 2^17 frames is 5 of them, not 3 and not 6
    assert chunk_short_frames({"frames": 3, "frame_bits": 2**17, "probe_bits": 60_000}) == 5
    assert chunk_short_frames({"frames": 2, "frame_bits": 2**17}) == 4
    assert chunk_short_frames({"frames": 2, "frame_bits": 2**16}) == 2


def _stream_options(*argv: str):
    import argparse

    from host.distil import run

    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    return run.stream_from_args(parser.parse_args(["--out", "unused", "--stream", *argv]))


@pytest.mark.parametrize("frame_bits", ["0", "-131072", "100000", "4096", str(2**30)])
def test_stream_frame_bits_of_no_provisioned_length_is_refused_by_name(frame_bits):
    # 0 was taken as "not given" (the default 2^17), a typo run silently on other frames
    with pytest.raises(BadInput, match="--stream-frame-bits"):
        _stream_options("--stream-frame-bits", frame_bits)
    assert _stream_options().frame_bits == 2**17
    assert _stream_options("--stream-frame-bits", "65536").frame_bits == 2**16


class _NoMessages:
    """A channel that must not be used: a refused request sends and receives nothing."""

    def send(self, *args, **kwargs):
        raise AssertionError("a message went out for a refused request")

    def recv(self, *args, **kwargs):
        raise AssertionError("a message was awaited for a refused request")


@pytest.mark.parametrize(
    "frame_bits", [100_000, 2**30, 0, -(2**17), 2**17 + 0.5, "131072", True, None]
)
def test_alice_refuses_a_frame_length_she_holds_no_code_for_before_using_any_bit(
    monkeypatch, frame_bits
):
    """Bob names each chunk's frame length (an authenticated field): Alice refuses any but
    ldpc.FRAME_BITS / LONG_FRAME_BITS (the provisioned codes) and a request that names none
    (a Bob before frame_bits, whose frames were ldpc.frame_bits_for's: 2^17 for a catch-up
    chunk where Alice would take 2^16, an abort after the chunk's syndromes) with a clear
    reason, before any message, any code is built (a 2^30-bit code would exhaust her
    memory, 100,000 bits is built at pass time) or any key bit is counted reconciled."""
    from types import SimpleNamespace

    from host.distil import ldpc
    from host.distil.stream import StreamAlice
    from host.errors import ProtocolAborted

    def no_build(*args, **kwargs):
        raise AssertionError("a code was built for a refused request")

    monkeypatch.setattr(ldpc, "construct", no_build)
    sifted = _Sifted(("Z",))
    sifted.bit.extend(np.zeros(400_000, np.uint8))
    sifted.key_positions["Z"].extend(np.arange(400_000))
    alice = SimpleNamespace(config=Config(), rng=np.random.default_rng(0))
    request = {"bits": 300_000, "qber": 0.012, "sample_bits": 20_000}
    msg = request if frame_bits is None else {**request, "frame_bits": frame_bits}
    with pytest.raises(ProtocolAborted, match="frame"):
        StreamAlice._reconcile(alice, _NoMessages(), msg, sifted, "Z")
    assert sifted.reconciled["Z"] == 0


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_a_peer_of_an_older_protocol_is_refused_at_the_hello_before_the_raw_data_is_claimed(
    version,
):
    """Protocol 4's stream Bob named no frame length (his catch-up chunks took
    ldpc.frame_bits_for's 2^17 where this Alice refuses the request, and this Bob's 2^17
    chunks met a protocol-4 Alice's 2^16: a code mismatch after the syndromes); protocol
    5's post-pass sides cut a block of 2-8 frames of 2^16 in 2^16 frames where these take
    longer ones (ldpc.frame_bits_for, session 15); protocol 6's Alice sends her syndromes
    without waiting for Bob's ec_sizing, and protocol 7's shorten other positions of the
    frames of low mother rates (both session 20). All abort mid-pass, after Alice claimed
    the pass's raw data (raw_data_record: no second run of it); the hello, before the
    claim, refuses the other version instead."""
    from types import SimpleNamespace

    from host.distil.protocol import Bob, pass_digest
    from host.errors import ProtocolAborted

    pass_json = {"pass": "a stand-in"}
    bob = SimpleNamespace(pass_json=pass_json, config=Config())
    hello = {
        "version": version,
        "pass_digest": pass_digest(pass_json),
        "config": Config().public(),
        "mode": "stream",
    }
    sent = []
    channel = SimpleNamespace(recv=lambda kind: hello, send=lambda kind, **f: sent.append(kind))
    with pytest.raises(ProtocolAborted, match=f"protocol {version}"):
        Bob._check_hello(bob, channel, mode="stream")
    assert not sent
