"""The shared formats and the symbol mapping: golden vectors, round trips, bad input."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from host.errors import BadInput
from host.formats import qdet, qrec
from host.formats.patterns import (
    InsecureTestPatternSource,
    PatternLog,
    open_patterns,
    read_pattern_source,
    write_pattern_source,
)
from host.protocol.symbols import (
    MappingError,
    SymbolMapping,
    insecure_test_pattern_words,
    pack_nibbles,
    unpack_nibbles,
    words_from_qrng_bytes,
)

SYMBOLS = json.loads((Path(__file__).parent / "vectors" / "symbols.json").read_text())


@pytest.mark.parametrize("case", SYMBOLS["mappings"], ids=lambda c: c["name"])
def test_symbol_mapping_golden_vectors(case):
    mapping = SymbolMapping.from_probabilities(
        case["basis_probability_z"], case["intensity_probabilities"]
    )
    assert mapping.basis_threshold == case["basis_threshold"]
    assert list(mapping.intensity_thresholds) == case["intensity_thresholds"]
    symbols = mapping.symbols(words_from_qrng_bytes(bytes.fromhex(case["qrng_bytes"])))
    assert symbols.tolist() == case["symbols"]
    assert pack_nibbles(symbols).hex() == case["packed"]
    assert unpack_nibbles(bytes.fromhex(case["packed"]), len(symbols)).tolist() == case["symbols"]


def test_symbol_mapping_threshold_edges():
    edges = SYMBOLS["edge_words"]
    mapping = SymbolMapping.from_probabilities(
        edges["basis_probability_z"], edges["intensity_probabilities"]
    )
    assert mapping.symbols(np.array(edges["words"], dtype=np.uint32)).tolist() == edges["symbols"]


@pytest.mark.parametrize("p_z", [0.5, 0.9, 0.123456, 0.999])
def test_realised_probabilities_within_the_documented_bias_bound(p_z):
    probs = [0.61803, 0.28197, 0.1]
    realised_z, realised = SymbolMapping.from_probabilities(p_z, probs).realised_probabilities()
    assert abs(realised_z - p_z) <= 2**-16
    assert all(abs(a - b) <= 2**-16 for a, b in zip(realised, probs, strict=True))


def test_symbol_frequencies_follow_the_probabilities_on_uniform_words():
    mapping = SymbolMapping.from_probabilities(0.9, [0.7, 0.2, 0.1])
    symbols = mapping.symbols(insecure_test_pattern_words(7, np.arange(400_000)))
    n = symbols.size
    x_fraction = np.mean((symbols >> 1) & 1)
    assert abs(x_fraction - 0.1) < 5 * np.sqrt(0.09 / n)
    for index, p in enumerate([0.7, 0.2, 0.1]):
        assert abs(np.mean((symbols >> 2) == index) - p) < 5 * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("case", SYMBOLS["invalid"], ids=lambda c: c["why"])
def test_invalid_probabilities_are_refused(case):
    with pytest.raises(MappingError):
        SymbolMapping.from_probabilities(
            case["basis_probability_z"], case["intensity_probabilities"]
        )


def test_insecure_test_pattern_words_golden_vectors_any_order():
    vec = SYMBOLS["insecure_test_pattern_words"]
    slots = np.array(vec["slots"], dtype=np.uint64)
    assert insecure_test_pattern_words(vec["seed"], slots).tolist() == vec["words"]
    assert insecure_test_pattern_words(vec["seed"], slots[::-1]).tolist() == vec["words"][::-1]


def test_record_log_round_trip_and_torn_tail_keeps_every_whole_record(tmp_path):
    path = tmp_path / "tdc.qrec"
    writer = qrec.RecordWriter(path)
    payloads = [bytes([i]) * (i * 37 % 200) for i in range(20)]
    for payload in payloads:
        writer.append(qrec.Kind.HOUSEKEEPING, payload)
    whole = path.read_bytes()
    log = qrec.read_records(path)
    assert log.complete and [r.payload for r in log.records] == payloads
    for cut in range(1, len(whole), 53):  # a power cut at many points
        log = qrec.parse_records(whole[:cut])
        assert all(r.payload == payloads[r.seq] for r in log.records)
        kept = len(log.records)
        assert log.valid_bytes == (
            log.records[-1].offset + 16 + len(payloads[kept - 1]) if kept else 0
        )
        if log.valid_bytes != cut:
            assert "torn" in log.problem
    # appending after a torn tail drops the torn part and continues the sequence
    path.write_bytes(whole[: len(whole) - 3])
    qrec.RecordWriter(path).append(qrec.Kind.HOUSEKEEPING, b"after")
    log = qrec.read_records(path)
    assert log.complete and log.records[-1].payload == b"after" and log.records[-1].seq == 19


def test_record_log_rejects_corruption_and_sequence_gaps():
    good = qrec.encode_record(1, 0, b"abc") + qrec.encode_record(1, 1, b"def")
    flipped = bytearray(good)
    flipped[len(good) - 6] ^= 0x10
    assert "CRC" in qrec.parse_records(bytes(flipped)).problem
    gap = qrec.encode_record(1, 0, b"abc") + qrec.encode_record(1, 2, b"def")
    log = qrec.parse_records(gap)
    assert [r.seq for r in log.records] == [0, 2] and "sequence 2" in log.problem
    assert log.missing_records == 1


def test_record_log_skips_a_corrupt_record_and_keeps_every_later_one():
    # one bit flip in an old record must cost that record only (as the firmware reads it)
    records = [qrec.encode_record(3, seq, bytes([seq]) * (seq * 11 % 60)) for seq in range(8)]
    data = b"".join(records)
    at = sum(len(r) for r in records[:3])
    for where in (0, 5, 9, 14):  # magic, seq, length, payload of record 3
        flipped = bytearray(data)
        flipped[at + where] ^= 0x08
        log = qrec.parse_records(bytes(flipped))
        assert [r.seq for r in log.records] == [0, 1, 2, 4, 5, 6, 7], where
        assert all(r.payload == bytes([r.seq]) * (r.seq * 11 % 60) for r in log.records)
        assert log.skipped == [(at, len(records[3]), log.skipped[0][2])]
        assert log.missing_records == 1 and not log.complete


def test_a_log_read_while_it_is_written_gives_each_record_once_whole_and_never_early(tmp_path):
    # the controller's TDC log read during the pass (qrec.AppendedRecords): the file grows
    # a few bytes at a time; a record is returned once all its bytes are there, never a
    # part of one, and a corrupt whole record is skipped as the reader of the finished
    # file skips it (payload bit flip of record 3)
    records = [qrec.encode_record(2, seq, bytes([seq]) * (seq * 11 % 60)) for seq in range(8)]
    data = bytearray(b"".join(records))
    at = sum(len(r) for r in records[:3])
    data[at + 14] ^= 0x08
    path = tmp_path / "tdc.qrec"
    live = qrec.AppendedRecords(path)
    assert live.poll() == []  # not created yet
    got = []
    for cut in range(0, len(data) + 1, 7):
        path.write_bytes(bytes(data[:cut]))
        new = live.poll()
        assert all(r.offset + len(r.payload) + 16 <= cut for r in new)
        got += new
    path.write_bytes(bytes(data))
    got += live.poll(final=True)
    whole = qrec.parse_records(bytes(data))
    assert [(r.seq, r.payload, r.offset) for r in got] == [
        (r.seq, r.payload, r.offset) for r in whole.records
    ]
    assert [r.seq for r in got] == [0, 1, 2, 4, 5, 6, 7]
    assert live.skipped == whole.skipped and live.missing_records == whole.missing_records == 1
    # a torn tail is a record still being written; at the writer's end it is skipped
    path.write_bytes(bytes(data) + records[0][:10])
    assert live.poll() == [] and live.offset == len(data)
    assert live.poll(final=True) == [] and live.skipped[-1] == (
        len(data),
        10,
        "torn record (10 bytes left)",
    )


def test_pattern_log_answers_slots_across_frames(tmp_path):
    mapping = SymbolMapping.from_probabilities(0.5, [0.5, 0.25, 0.25])
    path = tmp_path / "patterns.qrec"
    writer = qrec.RecordWriter(path)
    truth = {}
    for frame_number, first in enumerate([0, 1000, 5000]):  # a gap between 2000 and 5000
        nibbles = mapping.symbols(insecure_test_pattern_words(3, np.arange(first, first + 1001)))
        frame = qrec.PatternFrame(frame_number, first, 1001, pack_nibbles(nibbles))
        writer.append(qrec.Kind.PATTERN_FRAME, frame.encode())
        truth.update(zip(range(first, first + 1001), nibbles.tolist(), strict=True))
    # frames 0 and 1 overlap by one slot: refused
    with pytest.raises(BadInput, match="overlap"):
        PatternLog(path)
    path.unlink()
    writer = qrec.RecordWriter(path)
    for frame_number, first in enumerate([0, 1001, 5000]):
        nibbles = mapping.symbols(insecure_test_pattern_words(3, np.arange(first, first + 1001)))
        writer.append(
            qrec.Kind.PATTERN_FRAME,
            qrec.PatternFrame(frame_number, first, 1001, pack_nibbles(nibbles)).encode(),
        )
    log = open_patterns(tmp_path)
    slots = np.array([0, 999, 1000, 1001, 2001, 5000, 6000])
    expected = mapping.symbols(insecure_test_pattern_words(3, slots))
    assert log.symbols(slots).tolist() == expected.tolist()
    assert log.covers(np.array([2002, 4999, 6001])).tolist() == [False, False, False]
    with pytest.raises(IndexError):
        log.symbols(np.array([3000]))
    # a bit flip in the middle frame's record: that frame is a gap, the others stand
    data = bytearray(path.read_bytes())
    data[qrec.parse_records(bytes(data)).records[1].offset + 40] ^= 0x01
    path.write_bytes(bytes(data))
    log = open_patterns(tmp_path)
    assert log.covers(np.array([0, 1001, 2001, 5000])).tolist() == [True, False, False, True]
    assert log.symbols(slots[[0, 1, 2, 5, 6]]).tolist() == expected[[0, 1, 2, 5, 6]].tolist()


def test_pattern_source_round_trip_is_private(tmp_path):
    mapping = SymbolMapping.from_probabilities(0.5, [0.5, 0.25, 0.25])
    source = InsecureTestPatternSource(99, mapping, 0, 27_400_000_000)
    write_pattern_source(tmp_path / "pattern_source.json", source)
    assert os.stat(tmp_path / "pattern_source.json").st_mode & 0o077 == 0
    back = read_pattern_source(tmp_path / "pattern_source.json")
    slots = np.array([0, 27_399_999_999])
    assert back.symbols(slots).tolist() == source.symbols(slots).tolist()


def test_detections_round_trip_and_clear_errors(tmp_path):
    path = tmp_path / "detections.qdet"
    times = np.array([5, 10, 10, 2**62], dtype=np.int64)
    channels = np.array([0, 1, 3, 2], dtype=np.int16)
    qdet.write_detections(path, times, channels, {"clock": "ground"})
    back_t, back_c, header = qdet.read_detections(path)
    assert back_t.tolist() == times.tolist() and back_c.tolist() == channels.tolist()
    assert header["clock"] == "ground" and header["count"] == 4
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(BadInput, match="truncated"):
        qdet.read_detections(path)
    (tmp_path / "foreign.bin").write_bytes(b"PQTTTR\x00\x00" + bytes(100))
    with pytest.raises(BadInput, match="magic"):
        qdet.read_detections(tmp_path / "foreign.bin")
    with pytest.raises(ValueError, match="sorted"):
        qdet.write_detections(path, times[::-1], channels)


def test_a_pattern_key_is_never_written_through_a_symlink_planted_at_its_temporary(tmp_path):
    """write_pattern_source wrote Alice's pattern key to PATH.tmp with the default mode,
    following a symlink planted there (the key went into the attacker's file), and only
    then set 0600. Now it is the one atomic writer's fresh 0600 temporary."""
    from host.formats.patterns import KeyedPatternSource

    trap = tmp_path / "readable-by-all"
    trap.write_bytes(b"")
    trap.chmod(0o666)
    path = tmp_path / "pattern_source.json"
    path.with_name(path.name + ".tmp").symlink_to(trap)
    mapping = SymbolMapping.from_probabilities(0.5, [0.5, 0.25, 0.25])
    source = KeyedPatternSource(os.urandom(32), mapping, 0, 1000)
    write_pattern_source(path, source)
    assert trap.stat().st_size == 0  # (not compared: it would hold the key)
    assert not path.is_symlink() and os.stat(path).st_mode & 0o777 == 0o600
    assert read_pattern_source(path).symbols(np.arange(5)).tolist() == (
        source.symbols(np.arange(5)).tolist()
    )


def test_detections_are_private_and_never_written_through_a_planted_symlink(tmp_path):
    """A .qdet's channels are the receiver's raw key (basis and bit of every click): main
    wrote PATH.tmp with the default mode (0644: readable by every user), through a
    symlink planted under that name."""
    trap = tmp_path / "readable-by-all"
    trap.write_bytes(b"")
    trap.chmod(0o666)
    path = tmp_path / "detections.qdet"
    path.with_name(path.name + ".tmp").symlink_to(trap)
    path.with_name(f".{path.name}.{os.getpid()}.tmp").symlink_to(trap)
    times = np.array([5, 10, 2**40], dtype=np.int64)
    qdet.write_detections(path, times, np.array([0, 3, 1], dtype=np.int16))
    assert trap.stat().st_size == 0
    assert not path.is_symlink() and os.stat(path).st_mode & 0o777 == 0o600
    assert qdet.read_detections(path)[1].tolist() == [0, 3, 1]
