"""Ground time-tagger files: PicoQuant PTU T2, qutools quTAG binary and CSV round-trip to
the detections format exactly; truncated and foreign files are clear errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from host.cli import main as qkdsat
from host.errors import BadInput
from host.formats import ptu, qutag, tagcsv
from host.formats.qdet import read_detections, write_detections
from host.formats.timetags import read_tags, write_tags


@pytest.fixture
def tags():
    rng = np.random.default_rng(5)
    gaps = rng.exponential(2e7, 20_000).astype(np.int64)
    gaps[100] = 3 * 2**50  # a pause longer than 2**25 wraps of 2**25 ps (several overflows)
    time_ps = 12_345_678_901 + np.cumsum(gaps)
    time_ps[500] = time_ps[499]  # simultaneous clicks on two detectors
    channel = rng.integers(0, 4, time_ps.size).astype(np.int16)
    return time_ps, channel


@pytest.mark.parametrize("fmt, suffix", [("ptu", ".ptu"), ("qutag", ".bin"),
                                         ("qutag-raw", ".raw"), ("csv", ".csv")])  # fmt: skip
def test_round_trip_gives_identical_detections(tmp_path, tags, fmt, suffix):
    time_ps, channel = tags
    path = tmp_path / f"tags{suffix}"
    write_tags(path, time_ps, channel, fmt)
    back_t, back_c = read_tags(path, fmt)
    assert back_t.dtype == np.int64 and back_c.dtype == np.int16
    assert np.array_equal(back_t, time_ps) and np.array_equal(back_c, channel)


def test_cli_converts_qdet_to_ptu_and_back(tmp_path, tags):
    time_ps, channel = tags
    write_detections(tmp_path / "in.qdet", time_ps, channel, {"clock": "ground"})
    assert qkdsat(["timetags", str(tmp_path / "in.qdet"), "--out", str(tmp_path / "x.ptu")]) == 0
    assert qkdsat(["timetags", str(tmp_path / "x.ptu"), "--out", str(tmp_path / "y.qdet")]) == 0
    back_t, back_c, header = read_detections(tmp_path / "y.qdet")
    assert np.array_equal(back_t, time_ps) and np.array_equal(back_c, channel)
    assert header["clock"] == "ground"


def test_ptu_header_is_what_picoquant_readers_expect(tmp_path, tags):
    path = tmp_path / "t.ptu"
    ptu.write_ptu(path, *tags)
    data = path.read_bytes()
    header, offset = ptu.read_ptu_header(data, "t.ptu")
    assert data[:8] == b"PQTTTR\x00\x00"
    assert header["TTResultFormat_TTTRRecType"] == ptu.RT_MULTIHARP_T2
    assert header["MeasDesc_GlobalResolution"] == 1e-12
    assert (len(data) - offset) // 4 == header["TTResult_NumberOfRecords"]


def test_ptu_reader_decodes_hand_made_hydraharp_records(tmp_path):
    """Records built by hand after PicoQuant's layout: an old-style overflow (time 0 means
    one wrap), a marker and a sync (skipped), photons on channels 0 and 5."""
    records = [
        (0 << 31) | (0 << 25) | 100,  # channel 0 at 100
        (1 << 31) | (63 << 25) | 0,  # one overflow (V1 style)
        (1 << 31) | (63 << 25) | 2,  # two more
        (1 << 31) | (3 << 25) | 7,  # marker 3: skipped
        (1 << 31) | (0 << 25) | 8,  # sync: skipped
        (0 << 31) | (5 << 25) | 9,  # channel 5 at 3 wraps + 9
    ]
    path = tmp_path / "hand.ptu"
    ptu.write_ptu(path, np.zeros(0, np.int64), np.zeros(0, np.int16))
    data = bytearray(path.read_bytes())
    count_at = data.index(b"TTResult_NumberOfRecords") + 40
    data[count_at : count_at + 8] = struct.pack("<q", len(records))
    data += np.array(records, dtype="<u4").tobytes()
    path.write_bytes(bytes(data))
    time_ps, channel, _ = ptu.read_ptu(path)
    assert time_ps.tolist() == [100, 3 * 2**25 + 9]
    assert channel.tolist() == [0, 5]


def _ptu_with_records(path, rec_type: int, records: list[int]) -> None:
    ptu.write_ptu(path, np.zeros(0, np.int64), np.zeros(0, np.int16))
    data = bytearray(path.read_bytes())
    for ident, value in (("TTResult_NumberOfRecords", len(records)),
                         ("TTResultFormat_TTTRRecType", rec_type)):  # fmt: skip
        at = data.index(ident.encode()) + 40
        data[at : at + 8] = struct.pack("<q", value)
    path.write_bytes(bytes(data) + np.array(records, dtype="<u4").tobytes())


def test_ptu_reader_knows_the_hydraharp_v1_and_picoharp_wraps(tmp_path):
    path = tmp_path / "v1.ptu"
    _ptu_with_records(path, ptu.RT_HYDRAHARP_T2, [(1 << 31) | (63 << 25) | 5, (2 << 25) | 4])
    time_ps, channel, _ = ptu.read_ptu(path)
    assert time_ps.tolist() == [33552000 + 4] and channel.tolist() == [2]
    path = tmp_path / "ph.ptu"
    # PicoHarp T2: overflow = channel 15 with marker bits 0; then channel 3 at time 11.
    _ptu_with_records(path, ptu.RT_PICOHARP_T2, [15 << 28, (15 << 28) | 2, (3 << 28) | 11])
    time_ps, channel, _ = ptu.read_ptu(path)
    assert time_ps.tolist() == [210698240 + 11] and channel.tolist() == [3]


def test_truncated_ptu_is_bad_input(tmp_path, tags):
    path = tmp_path / "t.ptu"
    ptu.write_ptu(path, *tags)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(BadInput, match="truncated: header says"):
        ptu.read_ptu(path)
    path.write_bytes(data[:200])
    with pytest.raises(BadInput, match="truncated"):
        ptu.read_ptu(path)


def test_foreign_files_are_named_as_such(tmp_path, tags):
    qdet = tmp_path / "d.qdet"
    write_detections(qdet, *tags)
    with pytest.raises(BadInput, match="not a PicoQuant PTU file"):
        ptu.read_ptu(qdet)
    with pytest.raises(BadInput, match="this is a .qdet file, not a quTAG"):
        qutag.read_qutag(qdet)
    ptu_path = tmp_path / "t.ptu"
    ptu.write_ptu(ptu_path, *tags)
    with pytest.raises(BadInput, match="PicoQuant PTU file, not a quTAG"):
        qutag.read_qutag(ptu_path)
    with pytest.raises(BadInput, match="PicoQuant PTU file, not a CSV"):
        tagcsv.read_csv(ptu_path)
    with pytest.raises(BadInput, match="first line must be"):
        tagcsv.read_csv(qdet.with_name("x.csv")) if qdet.with_name("x.csv").write_text(
            "a,b\n"
        ) else None
    text = tmp_path / "notes.bin"
    text.write_bytes(b"x" * 40 + b"hello world, this is not time tags!!")
    with pytest.raises(BadInput, match="not a whole number|not a quTAG input"):
        qutag.read_qutag(text)


def test_truncated_qutag_and_malformed_csv_are_bad_input(tmp_path, tags):
    path = tmp_path / "t.bin"
    qutag.write_qutag(path, *tags)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(BadInput, match="truncated or not quTAG"):
        qutag.read_qutag(path)
    csv = tmp_path / "t.csv"
    csv.write_text("time_ps,channel\n100,1\n200;2\n")
    with pytest.raises(BadInput, match="line 3"):
        tagcsv.read_csv(csv)


def test_t3_ptu_is_refused(tmp_path):
    path = tmp_path / "t3.ptu"
    ptu.write_ptu(path, np.zeros(0, np.int64), np.zeros(0, np.int16))
    data = bytearray(path.read_bytes())
    at = data.index(b"TTResultFormat_TTTRRecType") + 40
    data[at : at + 8] = struct.pack("<q", 0x00010307)
    path.write_bytes(bytes(data))
    with pytest.raises(BadInput, match="T3-mode"):
        ptu.read_ptu(path)
