"""Host framing (CPython twin of firmware/payload/framing.py) against the golden vectors."""

import json
import random
import zlib
from pathlib import Path

import pytest

from host.protocol import framing

VECTORS = json.loads((Path(__file__).parent / "vectors" / "framing.json").read_text())


@pytest.mark.parametrize("case", VECTORS["crc16_ccitt_false"])
def test_crc16_check_values(case):
    assert framing.crc16(bytes.fromhex(case["data"])) == case["crc"]


@pytest.mark.parametrize("case", VECTORS["crc32"])
def test_crc32_check_values(case):
    assert framing.crc32(bytes.fromhex(case["data"])) == case["crc"]


@pytest.mark.parametrize("case", VECTORS["cobs"])
def test_cobs_published_examples(case):
    raw, encoded = bytes.fromhex(case["raw"]), bytes.fromhex(case["encoded"])
    assert framing.cobs_encode(raw) == encoded
    assert framing.cobs_decode(encoded) == raw


def test_golden_frames_round_trip():
    for case in VECTORS["frames"]:
        body, frame = bytes.fromhex(case["body"]), bytes.fromhex(case["frame"])
        assert framing.encode_frame(body) == frame
        assert 0 not in frame[:-1]
        assert framing.decode_frame(frame[:-1], VECTORS["max_body_bytes"]) == body


def test_reader_counts_each_bad_frame_by_reason_and_keeps_the_good():
    reader = framing.FrameReader(VECTORS["max_body_bytes"])
    stream = b"".join(bytes.fromhex(c["frame"]) for c in VECTORS["bad_frames"])
    stream += b"".join(bytes.fromhex(c["frame"]) for c in VECTORS["frames"])
    bodies = []
    for start in range(0, len(stream), 7):  # arbitrary read boundaries
        bodies += reader.feed(stream[start : start + 7])
    assert bodies == [bytes.fromhex(c["body"]) for c in VECTORS["frames"]]
    for case in VECTORS["bad_frames"]:
        assert reader.drops[case["reason"]] == 1, case["why"]


def test_random_bodies_round_trip_and_every_single_bit_flip_is_caught():
    rng = random.Random(1)
    for _ in range(200):
        body = rng.randbytes(rng.randrange(1, 600))
        frame = framing.encode_frame(body)
        assert framing.decode_frame(frame[:-1], 1024) == body
        position = rng.randrange(len(frame) - 1)
        corrupted = bytearray(frame[:-1])
        corrupted[position] ^= 1 << rng.randrange(8)
        if 0 in corrupted:
            continue  # the flip made a delimiter: the reader sees two short frames
        with pytest.raises(framing.FrameError):
            framing.decode_frame(bytes(corrupted), 1024)


def test_crc32_matches_zlib_in_pieces():
    data = bytes(range(256)) * 10
    assert framing.crc32(data[500:], framing.crc32(data[:500])) == zlib.crc32(data)
