"""When the streaming pipeline reconciles a key basis, and how much (host/distil/stream.py
due_chunk_bits, docs/streaming.md "Keeping up"): a backlog of many frames (a bright pass,
the catch-up after the first lock or an outage) goes as one chunk of every whole frame but
the held one, so the decoder works on its frames together instead of chunk after chunk."""

from __future__ import annotations

from host.distil.stream import MAX_CHUNK_FRAMES, due_chunk_bits

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
