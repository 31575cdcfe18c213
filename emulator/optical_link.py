"""The bidirectional optical link between the satellite and one ground station, emulated
between real processes over real sockets (docs/optical-link.md).

Each endpoint connects over TCP to its own terminal of the link (the satellite terminal
for Alice on the payload processor, the ground terminal for Bob) and speaks exactly what it
would speak over a direct TCP connection (host/distil/channel.py's SocketTransport). In
between, the bytes cross an emulated free-space link:

- framing: each direction cuts its byte stream into frames
  [u8 stream | u8 flags | u32 seq | u16 length | payload | u32 CRC-32], at most
  `frame_payload_bytes` of payload; the stream id multiplexes the distillation messages
  with time-transfer data (stream 1, reserved) on the same link;
- rate: a frame occupies its direction's transmitter for its bits / `rate_bps`;
- light time: it arrives one-way light time later, from the pass geometry's range;
- bit errors: every bit flips with probability `bit_error_rate` (the residual after the
  terminal's physical-layer FEC); the CRC-32 catches the frame and it is dropped;
- outages: clouds (profile intervals), loss of fine tracking (the tracking log), the
  satellite below the elevation mask, and outages a test adds; a frame is lost if the link
  is down when it leaves or when it arrives;
- retransmission: selective-repeat ARQ per stream (each frame acknowledged, with the
  cumulative count; the receiver holds out-of-order frames within the window), so an
  outage or a corrupted frame only delays the bytes and resends only what was lost; the
  transmitter pauses while it sees the link down (it knows: its fine-tracking loop has
  lost the beacon);
- lost for good: down longer than `max_outage_s`, or the satellite set with bytes still
  undelivered: both terminals close both TCP connections at the same moment, so both
  endpoints see the channel close and abort (no key), and the link report says why;
- too slow: when the bytes waiting at a transmitter would take longer than `too_slow_s`
  to send at its rate, or longer than is left until the satellite sets, the link says so
  on stderr and in its report (never silently).

Time: the link's clock is the pass clock, seconds after pass.json's `utc_start`; it starts
at `start_s` and runs with the wall clock.

    link = OpticalLink(config, schedule, start_s=0.0, seed=1)
    sat_port, ground_port = link.start()    # Alice --connect :sat_port, Bob :ground_port
    ...
    report = link.wait()                    # after both endpoints closed, or lost for good
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import select
import socket
import struct
import sys
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emulator.pass_model import geometry as geo
from host.errors import BadInput, ProtocolAborted

DOWN, UP = "down", "up"  # satellite -> ground, ground -> satellite
SATELLITE, GROUND = "satellite", "ground"
SOURCE_SIDE = {DOWN: SATELLITE, UP: GROUND}
STREAMS = {"distil": 0, "time_transfer": 1}  # stream ids in the frame header
FLAG_DATA, FLAG_FIN, FLAG_ACK = 0x01, 0x02, 0x04
FRAME_HEADER = struct.Struct("<BBIH")  # stream, flags, seq, length
CRC_BYTES = 4
ACK_RTO_MARGIN_S = 0.02  # retransmission timeout on top of the round trip: scheduling slack
TX_AHEAD_S = 0.005  # how far ahead the emulator queues frames on a transmitter (batching)
ACK = struct.Struct("<I")  # an acknowledgement's payload: the frame it acknowledges
SOCKET_READ_BYTES = 1 << 16


# ---------------------------------------------------------------- configuration


@dataclass
class OpticalLinkConfig:
    rate_bps: dict  # {DOWN: bit/s, UP: bit/s}
    bit_error_rate: float
    frame_payload_bytes: int
    window_frames: int
    max_outage_s: float
    too_slow_s: float
    cloud_outages_s: list = field(default_factory=list)  # [[start_s, end_s], ...]

    @classmethod
    def from_profile(cls, profile: dict) -> OpticalLinkConfig:
        """The profile's "optical_link" section; BadInput names the file and the field."""
        origin = profile.get("_path", profile.get("name", "profile"))
        section = profile.get("optical_link")
        if not isinstance(section, dict):
            raise BadInput(f"{origin}: no 'optical_link' section (docs/optical-link.md)")

        def number(name, low, high=math.inf, integer=False):
            value = section.get(name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or not low <= value <= high or (integer and value != int(value)):
                raise BadInput(f"{origin}: optical_link.{name} = {value!r}: need {low}..{high}")
            return int(value) if integer else float(value)

        outages = section.get("cloud_outages_s", [])
        if not isinstance(outages, list) or any(
            not isinstance(o, list) or len(o) != 2 or not 0 <= o[0] < o[1] for o in outages
        ):
            raise BadInput(
                f"{origin}: optical_link.cloud_outages_s: a list of [start_s, end_s], start < end"
            )
        return cls(
            rate_bps={DOWN: number("downlink_rate_bps", 1.0), UP: number("uplink_rate_bps", 1.0)},
            bit_error_rate=number("bit_error_rate", 0.0, 0.01),
            frame_payload_bytes=number("frame_payload_bytes", 16, 65535, integer=True),
            window_frames=number("window_frames", 1, 1 << 16, integer=True),
            max_outage_s=number("max_outage_s", 0.0),
            too_slow_s=number("too_slow_s", 0.0),
            cloud_outages_s=[[float(a), float(b)] for a, b in outages],
        )

    def to_json(self) -> dict:
        return {
            "downlink_rate_bps": self.rate_bps[DOWN],
            "uplink_rate_bps": self.rate_bps[UP],
            "bit_error_rate": self.bit_error_rate,
            "frame_payload_bytes": self.frame_payload_bytes,
            "window_frames": self.window_frames,
            "max_outage_s": self.max_outage_s,
            "too_slow_s": self.too_slow_s,
            "cloud_outages_s": self.cloud_outages_s,
        }


# ---------------------------------------------------------------- when the link exists


def _intervals_from_transitions(transitions, period_us: int, start_s: float) -> list:
    """[start, end) pass-time intervals in which the tracking loop was NOT in FINE, from the
    tracking log's transitions (step 0 at pass time start_s). Before the first transition
    the loop was acquiring; after the last, the last state holds."""
    from host.protocol.tracking import STATE_NAMES

    fine = STATE_NAMES.index("FINE")
    out, down_since = [], -math.inf
    for item in sorted(transitions, key=lambda tr: tr.step):
        t = start_s + item.step * period_us * 1e-6
        if item.new == fine and down_since is not None:
            if t > down_since:
                out.append([down_since, t])
            down_since = None
        elif item.new != fine and down_since is None:
            down_since = t
    if down_since is not None:
        out.append([down_since, math.inf])
    return out


@dataclass
class LinkSchedule:
    """When the link exists and how far away the satellite is, in link (pass) time: seconds
    after pass.json's utc_start. `geometry` covers the pass from rise to set at the mask;
    its time is link time + `geometry_offset_s`."""

    geometry: geo.PassGeometry
    geometry_offset_s: float
    elevation_mask_deg: float
    outages: list = field(default_factory=list)  # [start_s, end_s, cause]
    set_early_s: float | None = None  # set_at: the satellite sets here, before the geometry's

    @property
    def rise_s(self) -> float:
        return -self.geometry_offset_s

    @property
    def set_s(self) -> float:
        end = self.geometry.duration_s - self.geometry_offset_s
        return end if self.set_early_s is None else min(end, self.set_early_s)

    def shift(self, delta_s: float) -> None:
        """Move the whole pass (geometry, set, outages) delta_s later in link time."""
        self.geometry_offset_s -= delta_s
        if self.set_early_s is not None:
            self.set_early_s += delta_s
        for outage in self.outages:
            outage[0] += delta_s
            outage[1] += delta_s

    def light_time_s(self, t_s: float) -> float:
        t = min(max(t_s + self.geometry_offset_s, 0.0), self.geometry.duration_s)
        return float(self.geometry.range_at(t)) / geo.SPEED_OF_LIGHT_KM_S

    def down_cause(self, t_s: float) -> str | None:
        """Why the link is down at t_s, or None when it is up."""
        if not self.rise_s <= t_s < self.set_s:
            return "satellite below the elevation mask"
        t = t_s + self.geometry_offset_s
        if float(self.geometry.elevation_at(t)) < self.elevation_mask_deg:
            return "satellite below the elevation mask"
        for start, end, cause in self.outages:
            if start <= t_s < end:
                return cause
        return None

    def add_outage(self, start_s: float, end_s: float, cause: str) -> None:
        self.outages.append([float(start_s), float(end_s), cause])

    @classmethod
    def for_pass(
        cls,
        pass_json: dict,
        elevation_mask_deg: float,
        config: OpticalLinkConfig,
        tracking_log: Path | None = None,
        tracking_start_s: float = 0.0,
    ) -> LinkSchedule:
        """The schedule of the pass pass.json describes: a synthetic orbit is rebuilt from
        rise to set at the mask (the QKD window is only part of the time the link can be
        up); any other orbit uses pass.json's predicted geometry (the window only)."""
        orbit = pass_json.get("orbit") or {}
        utc_start = geo.parse_utc(pass_json["utc_start"], "pass.json utc_start")
        if orbit.get("kind") == "synthetic-circular":
            rs = geo.EARTH_RADIUS_KM + float(orbit["altitude_km"])
            re = geo.EARTH_RADIUS_KM
            el = math.radians(elevation_mask_deg)
            mask_range_km = math.sqrt(rs**2 - (re * math.cos(el)) ** 2) - re * math.sin(el)
            window = geo.synthetic_circular_pass(
                utc_start,
                orbit["altitude_km"],
                orbit["min_range_km"],
                orbit["start_range_km"],
                orbit["end_range_km"],
            )
            visible = geo.synthetic_circular_pass(
                utc_start, orbit["altitude_km"], orbit["min_range_km"], mask_range_km,
                mask_range_km, step_s=1.0,
            )  # fmt: skip
            window_begin_s = float((orbit.get("cropped_from_s") or [0.0])[0])
            # culmination at the same instant: link time 0 is the window's start (cropped)
            culmination_link_s = window.events["culmination"] - window_begin_s
            offset = visible.events["culmination"] - culmination_link_s
        elif orbit.get("kind") == "two-way-inertial":  # qkdsat simulate --two-way
            visible, offset = _inertial_visibility(orbit, utc_start, elevation_mask_deg)
        else:
            table = pass_json.get("predicted_geometry")
            if not table:
                raise BadInput("pass.json: no orbit or predicted_geometry for the optical link")
            t = np.asarray(table["t_s"], float)
            visible = geo.PassGeometry(
                utc_start, float(t[-1]), t, np.asarray(table["range_km"], float),
                np.asarray(table["elevation_deg"], float),
                np.asarray(table["range_rate_km_s"], float), {"kind": "predicted"},
            )  # fmt: skip
            offset = 0.0
        schedule = cls(visible, offset, float(elevation_mask_deg))
        for start, end in config.cloud_outages_s:
            schedule.add_outage(start, end, "clouds")
        if tracking_log is not None and Path(tracking_log).exists():
            from host.protocol.tracking import read_tracking_log

            _, transitions, period_us, _ = read_tracking_log(Path(tracking_log))
            for start, end in _intervals_from_transitions(
                transitions, period_us, tracking_start_s
            ):
                schedule.add_outage(start, end, "fine tracking lost")
        return schedule


def _inertial_visibility(orbit: dict, utc_start, elevation_mask_deg: float):
    """(geometry from rise to set at the mask, its time offset from link time) of a
    two-way pass's inertial orbit (host/timetransfer/simulate.py): link time 0 is the
    window's start, `t_reference_s` on the orbit's own time."""
    import dataclasses

    from emulator.pass_model.two_way import InertialPass, inertial_pass_geometry, pass_window

    base = InertialPass(
        float(orbit["altitude_km"]), float(orbit["inclination_deg"]),
        float(orbit["station_lat_deg"]), float(orbit["station_height_km"]),
        float(orbit["cross_track_deg"]),
    )  # fmt: skip
    window = pass_window(base, elevation_mask_deg)
    if window is None:
        raise BadInput("pass.json: the two-way orbit never rises above the link's mask")
    rise_s, set_s = window
    visible = inertial_pass_geometry(
        dataclasses.replace(base, t_reference_s=rise_s), set_s - rise_s, utc_start,
        {"kind": "two-way-inertial, rise to set"}, 850.0, 0.0, 0.0,
    )  # fmt: skip
    return visible, float(orbit["t_reference_s"]) - rise_s


# ---------------------------------------------------------------- frames


def encode_frame(stream: int, flags: int, seq: int, payload: bytes = b"") -> bytes:
    head = FRAME_HEADER.pack(stream, flags, seq, len(payload)) + payload
    return head + struct.pack("<I", zlib.crc32(head))


def decode_frame(frame: bytes) -> tuple[int, int, int, bytes] | None:
    """(stream, flags, seq, payload), or None if the CRC or the length is wrong."""
    if len(frame) < FRAME_HEADER.size + CRC_BYTES:
        return None
    body, crc = frame[:-CRC_BYTES], struct.unpack("<I", frame[-CRC_BYTES:])[0]
    if zlib.crc32(body) != crc:
        return None
    stream, flags, seq, length = FRAME_HEADER.unpack_from(body)
    if length != len(body) - FRAME_HEADER.size:
        return None
    return stream, flags, seq, bytes(body[FRAME_HEADER.size :])


def flip_bits(frame: bytes, ber: float, rng: random.Random) -> tuple[bytes, int]:
    """The frame after a binary symmetric channel of crossover `ber`: (bytes, flips)."""
    bits = 8 * len(frame)
    if ber <= 0:
        return frame, 0
    # geometric gaps between errors: exact and cheap at small ber
    out, flips, position = None, 0, -1
    log_q = math.log1p(-ber)
    while True:
        position += 1 + int(math.log(1.0 - rng.random()) / log_q)
        if position >= bits:
            break
        if out is None:
            out = bytearray(frame)
        out[position >> 3] ^= 1 << (position & 7)
        flips += 1
    return (bytes(out) if out is not None else frame), flips


# ---------------------------------------------------------------- the link


@dataclass
class DirectionStats:
    bytes_offered: int = 0  # payload bytes the source endpoint handed to its terminal
    bytes_delivered: int = 0  # payload bytes delivered, in order, to the other endpoint
    air_bytes: int = 0  # every byte transmitted: headers, CRCs, retransmissions, acks
    frames_sent: int = 0
    frames_retransmitted: int = 0
    frames_corrupted: int = 0  # caught by the CRC
    frames_lost_outage: int = 0
    acks_sent: int = 0
    bit_flips: int = 0
    max_backlog_bytes: int = 0
    max_backlog_s: float = 0.0


class _Stream:
    """One stream's ARQ state in one direction, and its TCP sockets at both ends."""

    def __init__(self, name: str, sid: int):
        self.name, self.sid = name, sid
        self.pending = {DOWN: bytearray(), UP: bytearray()}  # not yet framed
        self.eof = {DOWN: False, UP: False}  # the source closed: FIN after the bytes
        self.fin_sent = {DOWN: False, UP: False}
        self.next_seq = {DOWN: 0, UP: 0}
        self.unacked = {DOWN: {}, UP: {}}  # seq -> [flags, payload, sent_at], seq order
        self.expected = {DOWN: 0, UP: 0}  # receiver: next in-order seq
        self.held = {DOWN: {}, UP: {}}  # receiver: seq -> (flags, payload) out of order
        self.finished = {DOWN: False, UP: False}  # receiver delivered FIN
        self.sock = {SATELLITE: None, GROUND: None}
        self.outbox = {SATELLITE: deque(), GROUND: deque()}  # bytes to write to the socket
        self.capture = {DOWN: bytearray(), UP: bytearray()}
        self.bytes_delivered = {DOWN: 0, UP: 0}  # this stream's share of the direction's


class OpticalLink:
    def __init__(
        self,
        config: OpticalLinkConfig,
        schedule: LinkSchedule,
        *,
        start_s: float = 0.0,
        seed: int | None = None,
        streams: tuple[str, ...] = ("distil",),
        capture: bool = False,
        log=sys.stderr,
    ):
        self.config, self.schedule = config, schedule
        self.start_s = float(start_s)
        self.rng = random.Random(seed)
        self.capture = capture
        self._capture_asked = capture  # else only while hooks wait for their message
        self.log = log
        self.streams = {name: _Stream(name, STREAMS[name]) for name in streams}
        self.by_sid = {s.sid: s for s in self.streams.values()}
        self.stats = {DOWN: DirectionStats(), UP: DirectionStats()}
        self.tx_free_at = {DOWN: 0.0, UP: 0.0}  # link time the transmitter is next idle
        self.in_flight = []  # heap of (arrival link time, order, direction, frame bytes)
        self._order = 0
        self.lost_for_good: str | None = None
        self.lost_at_s: float | None = None
        self.too_slow_events: list = []
        self._too_slow_now = {DOWN: False, UP: False}
        self.outages_seen: list = []
        self._down_since: float | None = None
        self._down_cause: str | None = None
        self._lose_at_s: float | None = None
        self._triggers: list = []  # (direction, predicate(kind), action)
        self._scan = {DOWN: 0, UP: 0}  # capture offset parsed for triggers
        self._lock = threading.RLock()  # hooks run inside the engine
        self._done = threading.Event()
        self._servers: dict = {}
        self._thread: threading.Thread | None = None
        self._t0_wall = 0.0
        self.session: dict = {}

    # ------------------------------------------------------------ control

    def now_s(self) -> float:
        return self.start_s + (time.monotonic() - self._t0_wall)

    def start(self, satellite_address: str = "127.0.0.1:0", ground_address: str = "127.0.0.1:0"):
        """Listen for the endpoints ((satellite port, ground port) of the first stream) and
        run the link in a thread. Further streams listen on the next free ports
        (`ports()`)."""
        from host.distil.channel import parse_address

        for name in self.streams:
            for side, address in ((SATELLITE, satellite_address), (GROUND, ground_address)):
                host, port = parse_address(address)
                if name != next(iter(self.streams)):
                    port = 0
                server = socket.create_server((host, port))
                server.setblocking(False)
                self._servers[(name, side)] = server
        self._t0_wall = time.monotonic()
        self.started_unix_s = time.time()  # link time start_s, on the endpoints' UTC clock
        self._thread = threading.Thread(target=self._run, name="optical-link", daemon=True)
        self._thread.start()
        first = next(iter(self.streams))
        return self.port(first, SATELLITE), self.port(first, GROUND)

    def port(self, stream: str, side: str) -> int:
        return self._servers[(stream, side)].getsockname()[1]

    def add_outage(self, start_s: float, duration_s: float, cause: str = "test outage"):
        with self._lock:
            self.schedule.add_outage(start_s, start_s + duration_s, cause)

    def lose_for_good(self, at_s: float | None = None) -> None:
        """The link goes dark at at_s (default now) and never comes back."""
        with self._lock:
            self._lose_at_s = self.now_s() if at_s is None else at_s
            self.schedule.add_outage(self._lose_at_s, math.inf, "link lost for good (test)")

    def on_message(self, direction: str, kind: str, action, first: bool = False) -> None:
        """Hook: call action(link) the first time a distillation message of `kind` enters
        the link in `direction`, before any of its bytes are sent (`first`: before the
        hooks already waiting for it)."""
        with self._lock:
            self.capture = True
            self._triggers.insert(0 if first else len(self._triggers), [direction, kind, action])

    def set_at(self, at_s: float) -> None:
        """The satellite sets at at_s (link time), before the geometry's set: a pass whose
        link ends when a test wants, predicted like any set (predicted_end_s)."""
        with self._lock:
            self.schedule.set_early_s = float(at_s)

    def predicted_end_s(self) -> float:
        """When the pass geometry says the link ends (the satellite sets below the mask),
        link time: what both endpoints can predict. Clouds and tracking losses are not."""
        return self.schedule.set_s

    def align_pass_to_now(self) -> None:
        """The pass on the link's clock (geometry, set, outages) moves later so that link
        time start_s, the first detection, is now: a streamed pass's replay starts when the
        ground endpoint is ready (its stream_start), not when the link was started."""
        with self._lock:
            self.schedule.shift(self.now_s() - self.start_s)

    def wait(self, timeout_s: float | None = None) -> dict:
        if not self._done.wait(timeout_s):
            raise TimeoutError("the optical link session did not end")
        return self.report()

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._close_all()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def captured(self, direction: str, stream: str = "distil") -> bytes:
        """Every payload byte that entered the link in `direction` (capture=True)."""
        return bytes(self.streams[stream].capture[direction])

    def report(self) -> dict:
        sched = self.schedule
        return {
            "format_version": 1,
            "config": self.config.to_json(),
            "session": self.session,
            "pass_visibility_s": [round(sched.rise_s, 3), round(sched.set_s, 3)],
            "elevation_mask_deg": sched.elevation_mask_deg,
            "lost_for_good": self.lost_for_good is not None,
            "lost_reason": self.lost_for_good,
            "lost_at_s": self.lost_at_s,
            "outages": self.outages_seen,
            "too_slow": self.too_slow_events,
            "directions": {
                d: {
                    **vars(self.stats[d]),
                    "rate_bps": self.config.rate_bps[d],
                    "max_backlog_s": round(self.stats[d].max_backlog_s, 3),
                }
                for d in (DOWN, UP)
            },
            "bytes": {
                "satellite_to_ground": self.stats[DOWN].bytes_delivered,
                "ground_to_satellite": self.stats[UP].bytes_delivered,
            },
            # each stream's part (distillation, time transfer)
            "stream_bytes": {
                name: {
                    "satellite_to_ground": stream.bytes_delivered[DOWN],
                    "ground_to_satellite": stream.bytes_delivered[UP],
                }
                for name, stream in self.streams.items()
            },
        }

    # ------------------------------------------------------------ the engine

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as error:  # the link itself failed: say so, close everything
            self._declare_lost(f"link emulator failed: {type(error).__name__}: {error}")
            raise
        finally:
            self._close_all()
            self.session["end_s"] = round(self.now_s(), 3)
            self._done.set()

    def _loop(self) -> None:
        self.session["start_s"] = round(self.start_s, 3)
        while not self._done.is_set():
            now = self.now_s()
            with self._lock:
                self._check_lost(now)
            if self.lost_for_good is not None:
                return
            self._accept()
            self._read_sockets(timeout_s=self._next_event_delay(now))
            now = self.now_s()
            with self._lock:
                self._track_outage(now)
                self._deliver_arrivals(now)
                for direction in (DOWN, UP):
                    self._transmit(direction, now)
            self._write_sockets()
            if self._all_closed():
                return

    def _next_event_delay(self, now: float) -> float:
        delays = [0.05]
        if self.in_flight:
            delays.append(self.in_flight[0][0] - now)
        for direction in (DOWN, UP):
            if self.tx_free_at[direction] > now:
                delays.append(self.tx_free_at[direction] - now)
            for stream in self.streams.values():
                if stream.unacked[direction]:
                    oldest = min(item[2] for item in stream.unacked[direction].values())
                    delays.append(oldest + self._rto(direction) - now)
        return min(max(min(delays), 0.0), 0.05)

    def _rto(self, direction: str) -> float:
        frame_bits = 8 * (self.config.frame_payload_bytes + FRAME_HEADER.size + CRC_BYTES)
        serial = frame_bits / self.config.rate_bps[direction]
        ack = 8 * 16 / self.config.rate_bps[UP if direction == DOWN else DOWN]
        window = self.config.window_frames * serial
        return 2 * self.schedule.light_time_s(self.now_s()) + window + ack + ACK_RTO_MARGIN_S

    # sockets ---------------------------------------------------------

    def _accept(self) -> None:
        for (name, side), server in self._servers.items():
            stream = self.streams[name]
            if stream.sock[side] is not None or server.fileno() < 0:
                continue
            try:
                conn, _ = server.accept()
            except BlockingIOError:
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream.sock[side] = conn
            server.close()

    def _read_sockets(self, timeout_s: float) -> None:
        readers = {}
        for stream in self.streams.values():
            for side in (SATELLITE, GROUND):
                direction = DOWN if side == SATELLITE else UP
                sock = stream.sock[side]
                if sock is not None and not stream.eof[direction]:
                    readers[sock] = (stream, direction)
        servers = [s for s in self._servers.values() if s.fileno() >= 0]
        if not readers and not servers:
            time.sleep(timeout_s)
            return
        ready, _, _ = select.select(list(readers) + servers, [], [], timeout_s)
        for sock in ready:
            if sock not in readers:
                continue
            stream, direction = readers[sock]
            try:
                data = sock.recv(SOCKET_READ_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            with self._lock:
                if not data:
                    stream.eof[direction] = True
                    continue
                stream.pending[direction] += data
                self.stats[direction].bytes_offered += len(data)
                if self.capture:
                    stream.capture[direction] += data
                    self._fire_triggers(stream, direction)

    def _fire_triggers(self, stream: _Stream, direction: str) -> None:
        """Parse the captured distillation messages (u32 length + body + tag) for hooks."""
        if stream.name != "distil" or not self._triggers:
            return
        from host.distil.channel import TAG_BYTES, decode

        buf = stream.capture[direction]
        pos = self._scan[direction]
        while pos + 4 <= len(buf):
            (length,) = struct.unpack_from("<I", buf, pos)
            if pos + 4 + length > len(buf):
                break
            try:
                kind, _ = decode(bytes(buf[pos + 4 : pos + 4 + length - TAG_BYTES]))
            except ProtocolAborted:
                kind = None  # not a protocol message (e.g. the pool-position hello)
            for trigger in list(self._triggers):
                if trigger[0] == direction and trigger[1] == kind:
                    self._triggers.remove(trigger)
                    trigger[2](self)
            pos += 4 + length
        self._scan[direction] = pos
        if not self._triggers and not self._capture_asked:
            self.capture = False  # the hooks have fired: the rest need not be kept

    def _write_sockets(self) -> None:
        for stream in self.streams.values():
            for side in (SATELLITE, GROUND):
                sock, box = stream.sock[side], stream.outbox[side]
                while sock is not None and box:
                    chunk = box[0]
                    if chunk is None:  # FIN: the source closed after its last byte
                        box.popleft()
                        try:
                            sock.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        continue
                    try:
                        sent = sock.send(chunk)
                    except BlockingIOError:
                        break
                    except OSError:
                        box.clear()
                        break
                    if sent < len(chunk):
                        box[0] = chunk[sent:]
                        break
                    box.popleft()

    def _all_closed(self) -> bool:
        for stream in self.streams.values():
            if not (stream.finished[DOWN] and stream.finished[UP]):
                return False
            if any(stream.outbox[side] for side in (SATELLITE, GROUND)):
                return False
        return True

    def _close_all(self) -> None:
        for stream in self.streams.values():
            for side in (SATELLITE, GROUND):
                sock = stream.sock[side]
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    sock.close()
        for server in self._servers.values():
            server.close()

    # the air ---------------------------------------------------------

    def _track_outage(self, now: float) -> None:
        cause = self.schedule.down_cause(now)
        if cause is not None and self._down_since is None:
            self._down_since, self._down_cause = now, cause
        elif cause is None and self._down_since is not None:
            self.outages_seen.append(
                {
                    "start_s": round(self._down_since, 3),
                    "end_s": round(now, 3),
                    "cause": self._down_cause,
                }
            )
            self._down_since = None

    def _undelivered(self) -> int:
        total = 0
        for stream in self.streams.values():
            for direction in (DOWN, UP):
                total += len(stream.pending[direction])
                total += sum(len(item[1]) for item in stream.unacked[direction].values())
        return total

    def _check_lost(self, now: float) -> None:
        if self.lost_for_good is not None:
            return
        if self._lose_at_s is not None and now >= self._lose_at_s:
            self._declare_lost(f"optical link lost for good at t={now:.3f} s (test)")
            return
        self._track_outage(now)
        if self._down_since is not None:
            down_for = now - self._down_since
            if now >= self.schedule.set_s:
                undelivered = self._undelivered()
                busy = undelivered or not self._all_closed()
                if busy:
                    slow = ""
                    if any(e["direction"] for e in self.too_slow_events):
                        slow = "; the link was too slow for the traffic"
                    self._declare_lost(
                        f"optical link lost for good at t={now:.3f} s: loss of signal (the "
                        f"satellite set below the {self.schedule.elevation_mask_deg:g} deg "
                        f"mask) with {undelivered} bytes undelivered{slow}"
                    )
            elif down_for > self.config.max_outage_s:
                self._declare_lost(
                    f"optical link lost for good at t={now:.3f} s: {self._down_cause} since "
                    f"t={self._down_since:.3f} s, longer than the {self.config.max_outage_s:g}"
                    " s the terminals wait"
                )

    def _declare_lost(self, reason: str) -> None:
        self.lost_for_good = reason
        self.lost_at_s = round(self.now_s(), 3)
        print(f"optical link: {reason}", file=self.log, flush=True)

    def _send_air(self, direction: str, frame: bytes, now: float) -> None:
        """Put a frame on the transmitter: it leaves when the transmitter is free and
        arrives a light time after its last bit (or never, if the link is down)."""
        stats = self.stats[direction]
        begin = max(now, self.tx_free_at[direction])
        end = begin + 8 * len(frame) / self.config.rate_bps[direction]
        self.tx_free_at[direction] = end
        arrival = end + self.schedule.light_time_s(end)
        stats.air_bytes += len(frame)
        if self.schedule.down_cause(begin) or self.schedule.down_cause(arrival):
            stats.frames_lost_outage += 1
            return
        frame, flips = flip_bits(frame, self.config.bit_error_rate, self.rng)
        stats.bit_flips += flips
        self._order += 1
        heapq.heappush(self.in_flight, (arrival, self._order, direction, frame))

    def _transmit(self, direction: str, now: float) -> None:
        if self.schedule.down_cause(now) is not None:
            return  # the terminal sees no beacon: it waits instead of sending into the dark
        cfg = self.config
        rto = self._rto(direction)
        for stream in self.streams.values():
            unacked = stream.unacked[direction]
            # selective repeat: only the frames whose acknowledgement is overdue
            for seq, item in unacked.items():
                if now - item[2] > rto and self.tx_free_at[direction] <= now + TX_AHEAD_S:
                    self._send_air(direction, encode_frame(stream.sid, item[0], seq, item[1]), now)
                    item[2] = self.tx_free_at[direction]
                    self.stats[direction].frames_retransmitted += 1
            # new frames while the window (the receiver's buffer) and the transmitter allow
            pending = stream.pending[direction]
            oldest = next(iter(unacked), stream.next_seq[direction])
            while (
                stream.next_seq[direction] - oldest < cfg.window_frames
                and self.tx_free_at[direction] <= now + TX_AHEAD_S
            ):
                if pending:
                    payload = bytes(pending[: cfg.frame_payload_bytes])
                    del pending[: len(payload)]
                    flags = FLAG_DATA
                elif stream.eof[direction] and not stream.fin_sent[direction]:
                    payload, flags = b"", FLAG_FIN
                    stream.fin_sent[direction] = True
                else:
                    break
                seq = stream.next_seq[direction]
                stream.next_seq[direction] += 1
                self._send_air(direction, encode_frame(stream.sid, flags, seq, payload), now)
                unacked[seq] = [flags, payload, self.tx_free_at[direction]]
                self.stats[direction].frames_sent += 1
        self._watch_backlog(direction, now)

    def _watch_backlog(self, direction: str, now: float) -> None:
        stats = self.stats[direction]
        backlog = sum(
            len(s.pending[direction]) + sum(len(u[1]) for u in s.unacked[direction].values())
            for s in self.streams.values()
        )
        drain_s = 8 * backlog / self.config.rate_bps[direction]
        stats.max_backlog_bytes = max(stats.max_backlog_bytes, backlog)
        stats.max_backlog_s = max(stats.max_backlog_s, drain_s)
        # two deadlines: the pipeline's lag budget, and loss of signal (what cannot leave
        # before the satellite sets never arrives)
        remaining_s = self.schedule.set_s - now
        over_budget = drain_s > self.config.too_slow_s
        past_los = drain_s > remaining_s
        slow = over_budget or past_los
        if slow and not self._too_slow_now[direction]:
            deadline = "loss of signal" if past_los else "the lag budget"
            event = {
                "direction": direction,
                "t_s": round(now, 3),
                "backlog_bytes": backlog,
                "drain_s": round(drain_s, 3),
                "rate_bps": self.config.rate_bps[direction],
                "deadline": deadline,
                "until_loss_of_signal_s": round(remaining_s, 3),
            }
            self.too_slow_events.append(event)
            limit = (
                f"the satellite sets in {remaining_s:.1f} s"
                if past_los
                else f"more than {self.config.too_slow_s:g} s"
            )
            print(
                f"optical link: too slow for the traffic {direction}: {backlog} bytes waiting "
                f"need {drain_s:.1f} s at {self.config.rate_bps[direction]:g} bit/s "
                f"({limit}) at t={now:.3f} s",
                file=self.log,
                flush=True,
            )
        self._too_slow_now[direction] = slow

    def _deliver_arrivals(self, now: float) -> None:
        while self.in_flight and self.in_flight[0][0] <= now:
            arrival, _, direction, frame = heapq.heappop(self.in_flight)
            if self.schedule.down_cause(arrival) is not None:
                self.stats[direction].frames_lost_outage += 1  # an outage added in flight
                continue
            decoded = decode_frame(frame)
            if decoded is None:
                self.stats[direction].frames_corrupted += 1
                continue
            sid, flags, seq, payload = decoded
            stream = self.by_sid.get(sid)
            if stream is None:
                continue
            if flags & FLAG_ACK:
                # an acknowledgement travelling in `direction` acknowledges the other way
                acked = UP if direction == DOWN else DOWN
                unacked = stream.unacked[acked]
                for done in [s for s in unacked if s < seq]:  # cumulative
                    del unacked[done]
                if len(payload) == ACK.size:
                    unacked.pop(ACK.unpack(payload)[0], None)  # this frame
                continue
            expected = stream.expected[direction]
            if expected <= seq < expected + self.config.window_frames:
                stream.held[direction][seq] = (flags, payload)
            destination = GROUND if direction == DOWN else SATELLITE
            held = stream.held[direction]
            while stream.expected[direction] in held:
                flags_in, data = held.pop(stream.expected[direction])
                stream.expected[direction] += 1
                if flags_in & FLAG_FIN:
                    stream.finished[direction] = True
                    stream.outbox[destination].append(None)
                elif data:
                    stream.outbox[destination].append(data)
                    self.stats[direction].bytes_delivered += len(data)
                    stream.bytes_delivered[direction] += len(data)
            # acknowledgement on the reverse direction: this frame, and everything before
            # the next expected one (also for duplicates: the first ack may have been lost)
            reverse = UP if direction == DOWN else DOWN
            if self.schedule.down_cause(now) is None:
                ack = encode_frame(sid, FLAG_ACK, stream.expected[direction], ACK.pack(seq))
                self._send_air(reverse, ack, now)
                self.stats[reverse].acks_sent += 1


# ---------------------------------------------------------------- command line


def link_for_pass(
    pass_dir: Path,
    profile_name: str | None = None,
    *,
    start_s: float = 0.0,
    seed: int | None = None,
    tracking_start_s: float = 0.0,
    capture: bool = False,
    overrides: dict | None = None,
    streams: tuple[str, ...] = ("distil",),
) -> OpticalLink:
    """The link of the pass in pass_dir, configured from its profile (pass.json names it;
    `overrides` as `qkdsat simulate --set`, e.g. {"optical_link.uplink_rate_bps": 1e5});
    `streams`: what it carries (the distillation's, and the time transfer's beside it)."""
    from host.formats.passdir import read_pass_json
    from host.simulate import profiles

    pass_dir = Path(pass_dir)
    pass_json = read_pass_json(pass_dir / "pass.json")
    name = profile_name or pass_json.get("profile")
    if not name:
        raise BadInput(f"{pass_dir / 'pass.json'}: no profile named for the optical link")
    profile = profiles.load(name, overrides)
    config = OpticalLinkConfig.from_profile(profile)
    station = profiles.station(profile, (pass_json.get("station") or {}).get("name"))
    schedule = LinkSchedule.for_pass(
        pass_json,
        station["elevation_mask_deg"],
        config,
        pass_dir / "satellite" / "tracking.qrec",
        tracking_start_s,
    )
    return OpticalLink(
        config, schedule, start_s=start_s, seed=seed, capture=capture, streams=streams
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emulator.optical_link",
        description="Emulated optical link of a pass between two TCP endpoints.",
    )
    parser.add_argument("pass_dir")
    parser.add_argument("--satellite", default="127.0.0.1:0", help="HOST:PORT for Alice")
    parser.add_argument("--ground", default="127.0.0.1:0", help="HOST:PORT for Bob")
    parser.add_argument("--start-s", type=float, default=0.0, help="pass time at start")
    parser.add_argument("--seed", type=int, help="seed of the bit errors (tests)")
    parser.add_argument("--report", help="write the link report (JSON) here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    try:
        link = link_for_pass(
            Path(args.pass_dir), start_s=args.start_s, seed=args.seed, overrides=overrides
        )
        sat, ground = link.start(args.satellite, args.ground)
    except BadInput as error:
        print(f"optical link: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"satellite_port": sat, "ground_port": ground}), flush=True)
    report = link.wait()
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    return 3 if report["lost_for_good"] else 0


if __name__ == "__main__":
    sys.exit(main())
