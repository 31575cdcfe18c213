"""Where Bob closes the pass ahead of the optical link's end (host/distil/stream.py
StreamBob._cut_for_link_end, docs/streaming.md "The link's end"): the rest after the cut
(the last frames, privacy amplification of the whole key block, the finish) is reserved
from what it costs on this machine, measured, times LINK_END_SAFETY."""

from __future__ import annotations

import time

import numpy as np

from host.distil.protocol import Config, Outcome
from host.distil.stream import (
    LINK_END_SAFETY,
    PassClock,
    StreamBob,
    StreamOptions,
    _Growing,
    _Sifted,
)

LINK_END_S = 400.0  # wall seconds after the first detection
JINAN_1_KEY_BLOCK_BITS = 5_311_900  # the key block of a full jinan-1 pass, reconciled
BACKLOG_BITS = 30_000  # under a frame left (no frame is held back near the link's end)
BLOCK_KEY_BITS = 5_000  # key bits the latest block added
# Bob's error correction, wall seconds a frame: a full jinan-1 mission at load 8-10 (132 s
# for 77 frames; stream.EC_S_PER_FRAME_UNMEASURED)
EC_S_PER_FRAME = 1.72
FRAMES_DONE = 77


def _decision(seconds_to_link_end: float, backlog_bits=BACKLOG_BITS, frame_bits=2**17):
    """Bob's decision at the end of a block, Bob keeping up with the detections, the link's
    end seconds_to_link_end wall seconds away: (the cut's report entry or None, near end).
    Bob's state is a jinan-1 pass near its end (the sizing state only: no pass, no link),
    backlog_bits unreconciled, chunks of frame_bits."""
    bob = StreamBob.__new__(StreamBob)
    bob.config = Config()
    bob.stream = StreamOptions(link_end_s=LINK_END_S, frame_bits=frame_bits)
    bob.key_bases = ["Z"]
    bob._warm_up_s_per_frame = 0.2
    bob._sifted = _Sifted(("Z",))
    bob._sifted.key_positions["Z"].extend(np.arange(JINAN_1_KEY_BLOCK_BITS + backlog_bits))
    bob._sifted.reconciled["Z"] = JINAN_1_KEY_BLOCK_BITS
    bob._sample_at = {n: _Growing(np.int64) for n in "ZX"}
    bob._sample_wrong = {n: _Growing(bool) for n in "ZX"}
    bob._chunk_errors, bob._chunk_tail, bob._chunk_log = {"Z": []}, {"Z": []}, []
    wrong = np.zeros(55_000, bool)
    wrong[::50] = True  # the last chunk reconciled: 2 % QBER
    bob._record_chunk_errors("Z", wrong)
    bob._ec_stats = {"Z": {"frames": FRAMES_DONE, "chunk_list": [{"frames": FRAMES_DONE}]}}
    out = Outcome("bob")
    out.stage_seconds["error_correction"] = EC_S_PER_FRAME * FRAMES_DONE
    clock = PassClock(1.0, epoch_unix_s=time.time() - (LINK_END_S - seconds_to_link_end))
    return bob._cut_for_link_end(out, clock, clock.now(), {"Z": BLOCK_KEY_BITS})


def test_a_jinan_1_pass_is_cut_seconds_not_a_minute_before_the_link_end():
    # With privacy amplification reserved at its measured cost (the carry-less hashing:
    # 0.28-0.38 s for this key block at load ~10), the rest after the cut is ~13 s here: one
    # frame, the hashing, the finish, times the safety. Before, the hashing was reserved at
    # the FFT's old rate (3.5e-6 s a bit: 19 s, 42.6 s with the rest and the safety) and a
    # jinan-1 pass was cut ~40 s before the link's end, ~230 k detections never sifted.
    cut, near_end = _decision(seconds_to_link_end=20.0)
    assert cut is None and near_end
    cut, _ = _decision(seconds_to_link_end=5.0)
    assert cut is not None
    # the reserve still holds the rest's parts at their measured costs, with the safety
    assert cut["rest_frames_estimated"] == 1
    needed_s = LINK_END_SAFETY * (EC_S_PER_FRAME + 0.38)
    assert needed_s < cut["reserve_wall_s"] < 15.0


def test_the_rest_is_reserved_in_the_frames_its_last_chunk_is_asked_in():
    # The rest after the cut is each basis's last chunk, asked in one frame of the length
    # the post-pass rule picks for its size (stream.chunk_frame_bits): counted in frames of
    # 2^16 of that length, as the seconds per frame are measured (a 2^17 frame is 2). With
    # 2^18 chunks, a rest of 150,000 bits at ~2 % (60 % of a 2^18 frame, three of 2^16) is
    # one 2^18 frame: 4, not the 3 frames of 2^16 it was counted as.
    rest_bits = 150_000
    cut, _ = _decision(5.0, backlog_bits=rest_bits - 2 * BLOCK_KEY_BITS, frame_bits=2**18)
    assert cut["rest_frames_estimated"] == 4
    short_cut, _ = _decision(5.0, backlog_bits=rest_bits - 2 * BLOCK_KEY_BITS, frame_bits=2**16)
    assert short_cut["rest_frames_estimated"] == 3
    assert cut["reserve_wall_s"] > short_cut["reserve_wall_s"]
    # 2^17 chunks: a rest of 75,000 bits (60 % of a 2^17 frame) is one 2^17 frame, 2
    cut, _ = _decision(5.0, backlog_bits=75_000 - 2 * BLOCK_KEY_BITS)
    assert cut["rest_frames_estimated"] == 2


def test_the_hashing_is_reserved_at_least_its_cost_measured_at_load_10_up_to_10x_jinan_1():
    # pa.toeplitz_hash in one fresh process at load 9.6-10 (docs/streaming.md, "The link's
    # end"): 5.3 Mbit -> 1.33 Mbit 0.38 s at worst, 53 -> 13.3 Mbit (the 10x stress
    # profile's block) 13.1 s; the carry-less work grows faster than the block (n l^0.585)
    from host.distil.stream import pa_rest_s

    assert pa_rest_s(JINAN_1_KEY_BLOCK_BITS) >= 2 * 0.38
    assert pa_rest_s(53_000_000) >= 2 * 13.1
