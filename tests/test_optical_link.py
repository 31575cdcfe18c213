"""The emulated optical link (emulator/optical_link.py, docs/optical-link.md) between real
TCP endpoints: framing with CRC and go-back-N retransmission under bit errors, light time
from the range, outages that only delay, a link lost for good that closes both ends, and
a link too slow for its traffic reported, never silent."""

from __future__ import annotations

import io
import json
import math
import socket
import threading
import time
from datetime import UTC, datetime

import numpy as np
import pytest

from emulator.optical_link import (
    DOWN,
    UP,
    LinkSchedule,
    OpticalLink,
    OpticalLinkConfig,
    decode_frame,
    encode_frame,
)
from emulator.pass_model import geometry as geo
from host.errors import BadInput
from host.protocol import tracking as trk
from host.simulate import profiles


def _config(**changes) -> OpticalLinkConfig:
    values = {
        "rate_bps": {DOWN: 10e6, UP: 10e6},
        "bit_error_rate": 0.0,
        "frame_payload_bytes": 1024,
        "window_frames": 64,
        "max_outage_s": 60.0,
        "too_slow_s": 10.0,
    }
    values.update(changes)
    return OpticalLinkConfig(**values)


def _schedule(range_km: float = 1200.0, duration_s: float = 600.0) -> LinkSchedule:
    """A satellite hanging at `range_km`, 45 deg up, from t = 0 to duration_s."""
    t = np.arange(0.0, duration_s + 1.0)
    flat = np.ones_like(t)
    geometry = geo.PassGeometry(
        datetime(2017, 1, 1, tzinfo=UTC), duration_s, t, range_km * flat, 45.0 * flat,
        0.0 * flat, {"kind": "test"},
    )  # fmt: skip
    return LinkSchedule(geometry, 0.0, 10.0)


class _Ends:
    """The two endpoints: plain TCP clients of the link's terminals."""

    def __init__(self, link: OpticalLink):
        sat, ground = link.start()
        self.sat = socket.create_connection(("127.0.0.1", sat), timeout=30)
        self.ground = socket.create_connection(("127.0.0.1", ground), timeout=30)

    @staticmethod
    def read_all(sock: socket.socket, count: int | None = None) -> bytes:
        data = bytearray()
        while count is None or len(data) < count:
            try:
                chunk = sock.recv(1 << 16)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        return bytes(data)


def _exchange(link: OpticalLink, down: bytes, up: bytes) -> tuple[bytes, bytes]:
    """Send `down` from the satellite and `up` from the ground at once, close, collect."""
    ends = _Ends(link)
    got = {}

    def sender(sock, data):
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    threads = [
        threading.Thread(target=sender, args=(ends.sat, down)),
        threading.Thread(target=sender, args=(ends.ground, up)),
        threading.Thread(target=lambda: got.__setitem__("g", _Ends.read_all(ends.ground))),
        threading.Thread(target=lambda: got.__setitem__("s", _Ends.read_all(ends.sat))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    ends.sat.close()
    ends.ground.close()
    return got["g"], got["s"]


def test_frame_crc_catches_a_flipped_bit_and_a_wrong_length():
    frame = encode_frame(0, 1, 7, b"payload")
    assert decode_frame(frame) == (0, 1, 7, b"payload")
    for bit in (0, 8 * 9 + 3, 8 * len(frame) - 1):
        bad = bytearray(frame)
        bad[bit >> 3] ^= 1 << (bit & 7)
        assert decode_frame(bytes(bad)) is None
    assert decode_frame(frame[:-1]) is None


def test_bit_errors_are_caught_and_resent_so_every_byte_arrives_in_order():
    rng = np.random.default_rng(1)
    down, up = rng.bytes(150_000), rng.bytes(60_000)
    link = OpticalLink(_config(bit_error_rate=2e-5), _schedule(), seed=3, log=io.StringIO())
    with link:
        at_ground, at_sat = _exchange(link, down, up)
        report = link.wait(30)
    assert at_ground == down and at_sat == up
    stats = report["directions"]
    assert stats[DOWN]["frames_corrupted"] > 0 and stats[DOWN]["frames_retransmitted"] > 0
    assert stats[DOWN]["bit_flips"] >= stats[DOWN]["frames_corrupted"]
    assert report["bytes"] == {"satellite_to_ground": len(down), "ground_to_satellite": len(up)}
    assert not report["lost_for_good"]


def test_a_message_takes_at_least_the_light_time_each_way():
    link = OpticalLink(_config(), _schedule(range_km=1500.0), log=io.StringIO())
    with link:
        ends = _Ends(link)
        ends.sat.sendall(b"x")  # let the link see both ends before timing
        assert _Ends.read_all(ends.ground, 1) == b"x"
        t0 = time.monotonic()
        ends.sat.sendall(b"ping")
        assert _Ends.read_all(ends.ground, 4) == b"ping"
        ends.ground.sendall(b"pong")
        assert _Ends.read_all(ends.sat, 4) == b"pong"
        round_trip_s = time.monotonic() - t0
    assert round_trip_s >= 2 * 1500.0 / geo.SPEED_OF_LIGHT_KM_S  # 10 ms


def test_an_outage_delays_the_bytes_and_loses_none():
    rng = np.random.default_rng(2)
    down, up = rng.bytes(400_000), rng.bytes(20_000)
    # 400 kB at 1 Mbit/s take 3.2 s: the outage from 0.5 s to 1.5 s falls inside
    config = _config(rate_bps={DOWN: 1e6, UP: 1e6})
    link = OpticalLink(config, _schedule(), log=io.StringIO())
    link.schedule.add_outage(0.5, 1.5, "clouds")
    t0 = time.monotonic()
    with link:
        at_ground, at_sat = _exchange(link, down, up)
        report = link.wait(30)
    assert at_ground == down and at_sat == up
    assert time.monotonic() - t0 >= 3.2 + 1.0
    assert [o["cause"] for o in report["outages"]] == ["clouds"]
    assert report["directions"][DOWN]["frames_lost_outage"] > 0
    assert not report["lost_for_good"]


def test_a_link_down_longer_than_the_terminals_wait_is_lost_for_good_on_both_ends():
    log = io.StringIO()
    link = OpticalLink(_config(max_outage_s=0.5), _schedule(), log=log)
    link.schedule.add_outage(0.3, 100.0, "fine tracking lost")
    with link:
        ends = _Ends(link)
        ends.sat.sendall(b"before")
        assert _Ends.read_all(ends.ground, 6) == b"before"
        time.sleep(0.4)
        ends.sat.sendall(b"never arrives")
        # both endpoints see their connection end, at the same moment
        assert _Ends.read_all(ends.ground) == b""
        assert _Ends.read_all(ends.sat) == b""
        report = link.wait(10)
    assert report["lost_for_good"]
    assert "fine tracking lost" in report["lost_reason"]
    assert "lost for good" in log.getvalue()


def test_a_link_too_slow_for_the_traffic_is_reported_and_then_lost_at_loss_of_signal():
    log = io.StringIO()
    # 40 kB at 16 kbit/s need 20 s: more than too_slow_s, and the satellite sets after 2 s
    config = _config(rate_bps={DOWN: 16e3, UP: 16e3}, too_slow_s=5.0)
    link = OpticalLink(config, _schedule(duration_s=2.0), log=log)
    with link:
        ends = _Ends(link)
        ends.sat.sendall(bytes(40_000))
        received = _Ends.read_all(ends.ground)
        report = link.wait(10)
    assert len(received) < 40_000
    assert report["too_slow"] and report["too_slow"][0]["direction"] == DOWN
    assert report["too_slow"][0]["drain_s"] > 5.0
    assert "too slow for the traffic" in log.getvalue()
    assert report["lost_for_good"] and "loss of signal" in report["lost_reason"]
    assert "too slow" in report["lost_reason"]


def test_traffic_that_cannot_leave_before_loss_of_signal_is_reported_at_once():
    """Within the lag budget but not within the pass: 40 kB at 16 kbit/s need 20 s, the
    budget allows 1000 s, the satellite sets after 8 s. The link says so as soon as the
    bytes queue, not only when the satellite has set."""
    log = io.StringIO()
    config = _config(rate_bps={DOWN: 16e3, UP: 16e3}, too_slow_s=1000.0)
    link = OpticalLink(config, _schedule(duration_s=8.0), log=log)
    with link:
        ends = _Ends(link)
        ends.sat.sendall(bytes(40_000))
        deadline = time.monotonic() + 5
        while not link.too_slow_events and time.monotonic() < deadline:
            time.sleep(0.05)
        first = list(link.too_slow_events)
        received = _Ends.read_all(ends.ground)
        report = link.wait(15)
    assert first and first[0]["t_s"] < 2.0  # reported while the satellite was still up
    event = report["too_slow"][0]
    assert event["direction"] == DOWN and event["deadline"] == "loss of signal"
    assert event["drain_s"] > event["until_loss_of_signal_s"]
    assert "the satellite sets in" in log.getvalue()
    assert len(received) < 40_000 and report["lost_for_good"]
    assert "too slow" in report["lost_reason"]


def test_schedule_of_a_simulated_pass_uses_its_geometry_mask_and_tracking_log(tmp_path):
    profile = profiles.load("micius-2017")
    config = OpticalLinkConfig.from_profile(profile)
    window = geo.synthetic_circular_pass(
        geo.parse_utc("2016-12-19T16:00:00Z"), 500, 645, 1196, 1189
    )
    culmination = window.events["culmination"]
    pass_json = {
        "utc_start": "2016-12-19T16:02:00Z",
        "orbit": {**window.source, "cropped_from_s": [120.0, 140.0]},
    }
    # the tracking loop: FINE from 1 s, beacon lost 5-8 s, FINE again (step 0 at t = 0)
    fine, hold = trk.STATE_NAMES.index("FINE"), trk.STATE_NAMES.index("HOLD")
    coarse = trk.STATE_NAMES.index("COARSE")
    log = tmp_path / "tracking.qrec"
    transitions = [
        trk.Transition(1000, coarse, fine, 5),
        trk.Transition(5000, fine, hold, 6),
        trk.Transition(8000, hold, fine, 7),
    ]
    trk.write_tracking_log(log, [trk.encode_transitions(transitions, 1000)])
    schedule = LinkSchedule.for_pass(pass_json, 10.0, config, log)
    at_culmination = culmination - 120.0
    assert schedule.light_time_s(at_culmination) == pytest.approx(645 / 299792.458, rel=1e-4)
    assert schedule.down_cause(0.5) == "fine tracking lost"  # still acquiring
    assert schedule.down_cause(3.0) is None
    assert schedule.down_cause(6.0) == "fine tracking lost"
    assert schedule.down_cause(9.0) is None
    # the link spans rise to set at the 10 deg mask, longer than the QKD window
    assert schedule.rise_s < -120.0 and schedule.set_s > window.duration_s - 120.0
    assert schedule.down_cause(schedule.set_s + 1) == "satellite below the elevation mask"
    mask_range = schedule.geometry.range_at(0.0)
    assert float(schedule.geometry.elevation_at(0.0)) == pytest.approx(10.0, abs=0.05)
    assert mask_range > 1196


def test_profiles_give_the_link_and_a_bad_field_is_named(tmp_path):
    for name in ("micius-2017", "jinan-1"):
        config = OpticalLinkConfig.from_profile(profiles.load(name))
        assert config.rate_bps[DOWN] > 0 and 0 <= config.bit_error_rate < 1e-3
        assert config.max_outage_s > 20  # a 20 s outage only delays
    raw = json.loads(profiles.resolve("micius-2017").read_text())
    raw["optical_link"]["uplink_rate_bps"]["value"] = -5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(BadInput, match=r"bad\.json.*optical_link\.uplink_rate_bps"):
        OpticalLinkConfig.from_profile(profiles.load(str(bad)))
    assert math.isfinite(OpticalLinkConfig.from_profile(profiles.load("jinan-1")).too_slow_s)


def test_the_link_runs_as_its_own_process_for_a_pass_directory(tmp_path):
    """`python -m emulator.optical_link PASS_DIR`: the relay process between two endpoints
    of a simulated pass, its ports on stdout, its report written when both ends closed."""
    import subprocess
    import sys

    from host.cli import main as qkdsat

    pass_dir = tmp_path / "pass"
    argv = ["simulate", "--profile", "jinan-1", "--duration-s", "0.2", "--quiet"]
    assert qkdsat(argv + ["--out", str(pass_dir)]) == 0
    relay = subprocess.Popen(
        [sys.executable, "-m", "emulator.optical_link", str(pass_dir)]
        + ["--report", str(tmp_path / "link.json"), "--seed", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ports = json.loads(relay.stdout.readline())
        sat = socket.create_connection(("127.0.0.1", ports["satellite_port"]), timeout=30)
        ground = socket.create_connection(("127.0.0.1", ports["ground_port"]), timeout=30)
        sat.sendall(b"hello ground")
        sat.shutdown(socket.SHUT_WR)
        assert _Ends.read_all(ground, 12) == b"hello ground"
        ground.shutdown(socket.SHUT_WR)
        assert _Ends.read_all(sat) == b""
        assert relay.wait(timeout=30) == 0
    finally:
        if relay.poll() is None:
            relay.kill()
    report = json.loads((tmp_path / "link.json").read_text())
    assert report["bytes"] == {"satellite_to_ground": 12, "ground_to_satellite": 0}
    assert report["elevation_mask_deg"] == 15.0  # the jinan-1 station's mask
    assert report["config"]["downlink_rate_bps"] == 10e6


def test_time_transfer_data_shares_the_link_on_its_own_stream():
    """Stream 1 (time transfer) beside stream 0 (distillation): each pair of endpoints
    gets exactly its own bytes, on the same transmitters."""
    link = OpticalLink(
        _config(bit_error_rate=1e-5), _schedule(), streams=("distil", "time_transfer"), seed=2
    )
    rng = np.random.default_rng(5)
    payload = {name: rng.bytes(30_000) for name in ("distil", "time_transfer")}
    with link:
        link.start()
        ends = {
            name: {
                side: socket.create_connection(("127.0.0.1", link.port(name, side)), timeout=30)
                for side in ("satellite", "ground")
            }
            for name in payload
        }
        for name, data in payload.items():
            ends[name]["satellite"].sendall(data)
            ends[name]["satellite"].shutdown(socket.SHUT_WR)
        for name, data in payload.items():
            assert _Ends.read_all(ends[name]["ground"], len(data)) == data
            ends[name]["ground"].shutdown(socket.SHUT_WR)
            assert _Ends.read_all(ends[name]["satellite"]) == b""
        report = link.wait(30)
    assert report["bytes"]["satellite_to_ground"] == 60_000
    # both streams' frames went through the one downlink transmitter
    assert report["directions"][DOWN]["frames_sent"] >= 2 * math.ceil(30_000 / 1024)
