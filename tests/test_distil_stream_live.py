"""A live time tagger's end of pass (docs/streaming.md, "End of pass from a live tagger"):
Bob reads ground/detections.qdet while a real writer appends it (qdet.LiveDetectionsWriter,
a thread writing the file as the tagger's clock runs), takes a block only once the tagger
has passed its end, and ends the pass at the tagger's end-of-pass record, at loss of signal
by the pass geometry, or after the idle timeout, never waiting forever."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from distil_passgen import make_pass

from host.distil.protocol import Config
from host.distil.run import key_names, run_local
from host.distil.stream import LiveDetectionFeed, StreamOptions
from host.errors import BadInput
from host.formats.qdet import LiveDetectionsWriter, read_detections

# a live tagger writes at 4x real time while Bob reads (Makefile test)
pytestmark = pytest.mark.realtime

OFFSET_PS = 5_000_000_000_000  # the tagger's clock at utc_start (no drift: marks exact)
PASS_JSON = {"utc_start": "2017-01-01T00:00:00Z", "utc_end": "2017-01-01T00:00:10Z"}
BLOCKED_S = 0.5  # how long a wait that must not return is watched


def _ps(true_s) -> np.ndarray:
    return (OFFSET_PS + np.rint(np.asarray(true_s, dtype=np.float64) * 1e12)).astype(np.int64)


class Tagger:
    """detections.qdet and pps.qdet of a live tagger in `ground`."""

    def __init__(self, ground: Path):
        ground.mkdir(parents=True, exist_ok=True)
        self.detections = LiveDetectionsWriter(ground / "detections.qdet", {"clock": "ground"})
        self.pps = LiveDetectionsWriter(ground / "pps.qdet", {"clock": "ground"})

    def clicks(self, true_s) -> None:
        true_s = np.asarray(true_s, dtype=np.float64)
        self.detections.append(_ps(true_s), (np.arange(true_s.size) % 4).astype(np.int16))

    def marks(self, seconds) -> None:
        seconds = np.asarray(seconds)
        self.pps.append(_ps(seconds), np.zeros(seconds.size, np.int16))


def _wait_in_thread(feed: LiveDetectionFeed, pass_s: float) -> threading.Event:
    returned = threading.Event()

    def wait():
        feed.wait_for(pass_s)
        returned.set()

    threading.Thread(target=wait, daemon=True).start()
    return returned


def test_a_block_is_taken_only_once_the_tagger_passed_its_end_and_the_pass_ends_at_its_record(
    tmp_path,
):
    tagger = Tagger(tmp_path / "ground")
    tagger.marks([-2, -1, 0])
    tagger.clicks(np.linspace(0.5, 1.4, 10))  # the first block (1 s from 0.5) is arriving
    feed = LiveDetectionFeed(tmp_path / "ground", PASS_JSON, idle_s=60.0)
    feed.start()
    assert feed.last_s == float("inf")  # no block is the last before the tagger says so
    returned = _wait_in_thread(feed, 1.0)
    assert not returned.wait(BLOCKED_S)  # the tagger is at 1.4 s: the block is not over
    tagger.clicks([1.45, 1.49])  # more of the same block arrives: still waiting
    assert not returned.wait(BLOCKED_S)
    tagger.marks([1, 2])  # the tagger's clock passes the block's end (a mark, no click)
    assert returned.wait(30)
    assert feed.until(1.0) == 12 and feed.end is None  # all of the block, nothing cut
    tagger.clicks([1.6, 2.5])
    tagger.detections.end(int(_ps(2.7)))
    feed.wait_for(100.0)  # returns at once: the pass is over
    assert feed.end == {"by": "end-of-pass record"}
    assert feed.count() == 14 and feed.last_s == pytest.approx(2.2)  # from the first click
    # the finished file reads post-pass too, without its end record; unfinished, it is
    # refused with the reason (the PPS file has no end record yet)
    assert read_detections(tmp_path / "ground" / "detections.qdet")[0].size == 14
    with pytest.raises(BadInput, match="without its end-of-pass record"):
        read_detections(tmp_path / "ground" / "pps.qdet")


def test_a_tagger_that_stops_without_its_end_record_ends_the_pass_after_the_idle_timeout(
    tmp_path,
):
    tagger = Tagger(tmp_path / "ground")
    tagger.marks([-2, -1, 0, 1])
    tagger.clicks(np.linspace(0.2, 1.2, 8))
    # the clock starts before the feed first sees the file (its idle time counts from
    # then): taken after feed.start(), a loaded machine's stall in between ate into the
    # measured wait and the bound needed slack
    started = time.monotonic()
    feed = LiveDetectionFeed(tmp_path / "ground", PASS_JSON, idle_s=1.0)
    feed.start()
    returned = _wait_in_thread(feed, 5.0)
    assert returned.wait(30)  # never forever
    assert time.monotonic() - started > 1.0  # and not before the tagger was silent idle_s
    assert feed.end == {"by": "idle", "idle_s": 1.0}
    assert feed.count() == 8 and feed.last_s == pytest.approx(1.0)  # up to its last record


def test_the_pass_ends_at_loss_of_signal_by_the_geometry_when_the_tagger_runs_on(tmp_path):
    """The tagger keeps writing after the pass (PPS marks, dark counts): the pass ends at
    utc_end, and nothing after it is the pass's."""
    tagger = Tagger(tmp_path / "ground")
    tagger.marks(np.arange(-2, 9))
    tagger.clicks(np.linspace(0.1, 8.9, 45))
    feed = LiveDetectionFeed(tmp_path / "ground", PASS_JSON, idle_s=60.0)
    feed.start()
    returned = _wait_in_thread(feed, 20.0)
    assert not returned.wait(BLOCKED_S)  # at 8.9 s, the pass (to 10 s) is still on
    tagger.clicks([9.5, 10.2, 11.0])  # a dark count before, two after utc_end
    tagger.marks([10, 11])
    assert returned.wait(30)
    assert feed.end["by"].startswith("loss of signal")
    assert feed.count() == 46 and feed.last_s == pytest.approx(9.9)  # 10 s from 0.1 s


@pytest.fixture(scope="module")
def short_pass(tmp_path_factory):
    return make_pass(tmp_path_factory.mktemp("live") / "pass", duration_s=4.0, seed=2)


def _play_live(source: Path, live: Path) -> threading.Thread:
    """A tagger thread that writes `source`'s detections and PPS marks into `live` as its
    clock (the wall clock from the first detection) reaches them, 0.1 s at a time, then
    its end-of-pass record at the last detection."""
    shutil.copytree(source, live, ignore=shutil.ignore_patterns("*.qdet"))
    det_ps, det_ch, _ = read_detections(source / "ground" / "detections.qdet")
    pps_ps, pps_ch, _ = read_detections(source / "ground" / "pps.qdet")
    detections = LiveDetectionsWriter(live / "ground" / "detections.qdet", {"clock": "ground"})
    pps = LiveDetectionsWriter(live / "ground" / "pps.qdet", {"clock": "ground"})

    def run():
        first, start, d, p = int(det_ps[0]), time.monotonic(), 0, 0
        while d < det_ps.size:
            now_ps = first + int((time.monotonic() - start) * 1e12)
            d_next = int(np.searchsorted(det_ps, now_ps, side="right"))
            p_next = int(np.searchsorted(pps_ps, now_ps, side="right"))
            detections.append(det_ps[d:d_next], det_ch[d:d_next])
            pps.append(pps_ps[p:p_next], pps_ch[p:p_next])
            d, p = d_next, p_next
            time.sleep(0.1)
        detections.end(int(det_ps[-1]))
        pps.end(max(int(det_ps[-1]), pps.last_ps))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_a_live_tagger_s_pass_ends_at_its_record_with_the_replay_s_key(short_pass, tmp_path):
    """Streamed from a file the tagger is still writing, the pass ends at the tagger's
    end-of-pass record, every detection is taken, and the key is the one the replay of the
    finished file gives (same endpoint randomness): the blocks were the same, none cut."""
    seed, names = 7, key_names(True)
    replay = run_local(
        shutil.copytree(short_pass, tmp_path / "replay"),
        tmp_path / "out-replay",
        Config(),
        insecure_deterministic_seed=seed,
        stream=StreamOptions(speedup=4.0),
    )
    tagger = _play_live(short_pass, tmp_path / "live")
    live = run_local(
        tmp_path / "live",
        tmp_path / "out-live",
        Config(),
        insecure_deterministic_seed=seed,
        stream=StreamOptions(),
    )
    tagger.join(timeout=60)
    assert not live["aborted"] and live["key_bits"] == replay["key_bits"] > 0
    assert live["end_of_pass"]["by"] == "end-of-pass record"
    detections = read_detections(short_pass / "ground" / "detections.qdet")[0].size
    assert live["end_of_pass"]["detections"] == live["sync"]["detections"] == detections
    for role in ("alice", "bob"):
        key = f"{names[role]}.key"
        assert (tmp_path / "out-live" / key).read_bytes() == (
            tmp_path / "out-replay" / key
        ).read_bytes()


def test_a_live_file_is_read_at_the_tagger_s_pace_not_replayed_faster(short_pass, tmp_path):
    tagger = Tagger(tmp_path / "pass" / "ground")
    shutil.copytree(short_pass, tmp_path / "pass", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.qdet"))  # fmt: skip
    with pytest.raises(BadInput, match="live tagger's file, read at the tagger's pace"):
        run_local(tmp_path / "pass", tmp_path / "out", Config(), stream=StreamOptions(speedup=4))
    tagger.detections.close()
    assert not (tmp_path / "out").exists()
