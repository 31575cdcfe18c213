"""Host framing (CPython twin of firmware/payload/framing.py) against the golden vectors."""

import json
import random
import struct
import zlib
from pathlib import Path

import pytest

from host.protocol import framing
from tests import cobs_reference

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


def _cobs_cases():
    """Inputs on both sides of the vectorised size, with the block-code edges: empty, all
    zeros, runs of 253/254/255 bytes (in the middle and at the end), a body of 16,384
    consecutive u32 offsets (half zeros) and random bytes of several zero densities."""
    rng = random.Random(7)
    cases = [b"", b"\x00", bytes(1), bytes(2000), bytes(framing.VECTORISE_FROM_BYTES)]
    for size in (253, 254, 255, 508, 509):
        run = bytes(rng.randrange(1, 256) for _ in range(size))
        for pad in (0, 1, 900, 1500):
            filler = bytes(rng.choice((0, 0, 7)) for _ in range(pad))
            cases += [run, run + b"\x00", b"\x00" + run, filler + run, run + filler]
            cases += [filler + run + b"\x00" + run + filler]
    cases.append(bytes(12) + bytes(range(0, 256)) * 8)
    cases.append(struct.pack("<BBQH", 5, 1, 2**32, 16384) + struct.pack("<16384I", *range(16384)))
    # a slot list's offsets above 2^24 (the detections of a sifting block): long zero-free
    # runs, each cut by 0xFF blocks
    offsets = sorted(rng.sample(range(2**24, 2**32), 16384))
    cases.append(struct.pack("<BBQH", 5, 1, 2**32, 16384) + struct.pack("<16384I", *offsets))
    for size in (254 * 3, 254 * 3 + 1, 254 * 5 - 1):
        run = bytes(rng.randrange(1, 256) for _ in range(size))
        cases += [run, run + b"\x00", run + b"\x00" + run, b"\x00" * 3 + run + b"\x00" * 2]
    for _ in range(300):
        size = rng.choice((rng.randrange(0, 64), rng.randrange(900, 1200), rng.randrange(3000)))
        zero_fraction = rng.choice((0.0, 0.004, 0.1, 0.5, 0.95, 1.0))
        cases.append(
            bytes(
                0 if rng.random() < zero_fraction else rng.randrange(1, 256) for _ in range(size)
            )
        )
    return cases


def test_cobs_gives_the_reference_bytes_on_every_path():
    # The firmware shares these bytes (golden vectors): the vectorised paths must give
    # exactly what the byte-wise reference gives, and decode it back.
    for raw in _cobs_cases():
        encoded = cobs_reference.cobs_encode(raw)
        assert framing.cobs_encode(raw) == encoded, len(raw)
        assert framing._cobs_encode_blocks(raw) == encoded
        assert framing._cobs_encode_vectorised(raw) == encoded
        short_runs = framing._cobs_encode_short_runs(raw)
        assert short_runs in (None, encoded)
        assert (short_runs is None) == any(len(run) >= 254 for run in raw.split(b"\x00"))
        assert framing.cobs_decode(encoded) == raw
        assert framing._cobs_decode_vectorised(encoded) == raw
        assert framing.cobs_decode(bytearray(encoded)) == raw


def test_cobs_decode_refuses_what_the_reference_refuses_with_the_same_reason():
    rng = random.Random(8)
    for raw in _cobs_cases()[::3]:
        encoded = bytearray(cobs_reference.cobs_encode(raw))
        for _ in range(3):
            damaged = bytearray(encoded)
            damaged[rng.randrange(len(damaged))] = rng.choice((0, 1, 0xFF, rng.randrange(256)))
            damaged = bytes(damaged[: rng.choice((len(damaged), rng.randrange(len(damaged) + 1)))])
            try:
                expected = cobs_reference.cobs_decode(damaged)
            except cobs_reference.ReferenceCobsError as error:
                with pytest.raises(framing.CobsError) as raised:
                    framing.cobs_decode(damaged)
                assert str(raised.value) == str(error)
            else:
                assert framing.cobs_decode(damaged) == expected
