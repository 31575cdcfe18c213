"""When the streaming pipeline reconciles a key basis, and how much (host/distil/stream.py
due_chunk_bits, docs/streaming.md "Keeping up"): a backlog of many frames (a bright pass,
the catch-up after the first lock or an outage) goes as one chunk of every whole frame but
the held one, so the decoder works on its frames together instead of chunk after chunk."""

from __future__ import annotations

import numpy as np
import pytest

from host.distil.protocol import Config
from host.distil.stream import (
    MAX_CHUNK_FRAMES,
    StreamBob,
    StreamOptions,
    _Growing,
    _Sifted,
    chunk_short_frames,
    due_chunk_bits,
    next_chunk,
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


# Key bits of a frame of 2^16 and of 2^17 at 1.2 % QBER (micius-2017's mid-pass)
SHORT, LONG = 60_617, 121_234
LONG_FRAMES = StreamOptions(chunk_frames=1, frame_bits=2**17)


def test_during_the_pass_a_chunk_is_one_long_frame_with_one_held_back():
    # The stream's frames are 2^17 (docs/streaming.md, "Frame length and top-up"): a frame
    # of 2^16 at ~1.1-1.4 % decodes at f ~1.12-1.18, one of 2^17 ~0.02-0.03 lower.
    assert next_chunk(2 * LONG - 1, SHORT, LONG, LONG_FRAMES, False, hold=True)[0] == 0
    assert next_chunk(2 * LONG, SHORT, LONG, LONG_FRAMES, False, hold=True) == (
        LONG,
        LONG,
        2**17,
    )
    # a catch-up: every whole long frame but the held one, up to the bits of
    # MAX_CHUNK_FRAMES short frames (Bob's decoder memory)
    chunk, frame, frame_bits = next_chunk(40 * LONG, SHORT, LONG, LONG_FRAMES, False, True)
    assert (chunk, frame_bits) == (MAX_CHUNK_FRAMES // 2 * LONG, 2**17)


def test_near_loss_of_signal_every_short_frame_goes_and_the_rest_in_short_frames():
    # released (no frame held): whole frames of 2^16, so that what is left at loss of
    # signal, which the keys wait for, is under a 2^16 frame and the last blocks as before
    # the long frames; a chunk of a long frame or more is still asked in 2^17 frames
    assert next_chunk(3 * SHORT + 5, SHORT, LONG, LONG_FRAMES, False, hold=False) == (
        3 * SHORT,
        SHORT,
        2**17,
    )
    assert next_chunk(SHORT + 5, SHORT, LONG, LONG_FRAMES, False, hold=False) == (
        SHORT,
        SHORT,
        2**16,
    )
    # the last chunk, under a long frame: 2^16 frames (a 2^17 frame shortened to 15 kbit
    # would decode its whole graph for them)
    assert next_chunk(15_000, SHORT, LONG, LONG_FRAMES, True, hold=False) == (
        15_000,
        SHORT,
        2**16,
    )


def test_short_frames_chunk_as_before():
    short = StreamOptions(chunk_frames=2, frame_bits=2**16)
    assert next_chunk(3 * SHORT, SHORT, SHORT, short, False, True) == (2 * SHORT, SHORT, 2**16)
    assert next_chunk(3 * SHORT - 1, SHORT, SHORT, short, False, True)[0] == 0


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
