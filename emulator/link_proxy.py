"""A serial-link stand-in between the ground tools and an emulated payload: forwards the
bytes of the target's ground-link pty to a new pty that the host opens instead, and on the
way limits the byte rate (a UART at a set baud rate) and injects faults at rates the test
sets: dropped bytes, flipped bits, truncated frames, whole frames lost, and link cuts.

    with LinkProxy(target.ground_port, LinkFaults(flip_rate=1e-4), seed=1) as proxy:
        PayloadClient(proxy.port, key) ...
        proxy.cut_after(20_000)        # the link goes dark after 20 kB towards the ground
        proxy.restore()

Faults act per direction on whole frames (split at the 0x00 delimiter), so a truncated
frame is cut short before its delimiter, as when a receiver loses sync.
"""

from __future__ import annotations

import fcntl
import os
import random
import select
import threading
import time
import tty
from dataclasses import dataclass, field


@dataclass
class LinkFaults:
    drop_rate: float = 0.0  # per byte: the byte vanishes
    flip_rate: float = 0.0  # per byte: one random bit flips
    truncate_rate: float = 0.0  # per frame: a random tail before the delimiter is lost
    frame_loss_rate: float = 0.0  # per frame: the whole frame vanishes
    # every frame longer than this vanishes (None: none): a line that passes the short
    # acceptance reports and loses long telemetry, such as a housekeeping reply
    loss_above_bytes: int | None = None


@dataclass
class DirectionStats:
    frames: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped_bytes: int = 0
    flipped_bits: int = 0
    truncated_frames: int = 0
    lost_frames: int = 0
    cut_bytes: int = 0


@dataclass
class ProxyStats:
    up: DirectionStats = field(default_factory=DirectionStats)  # ground -> payload
    down: DirectionStats = field(default_factory=DirectionStats)  # payload -> ground


class LinkProxy:
    def __init__(
        self,
        target_port: str,
        down: LinkFaults | None = None,
        up: LinkFaults | None = None,
        *,
        bytes_per_s: float | None = None,
        seed: int = 0,
        capture: bool = False,
    ):
        self.target_port = target_port
        # capture: every byte as it arrived, per direction (tests that decode the link)
        self.captured = {"down": bytearray(), "up": bytearray()} if capture else None
        self.faults = {"down": down or LinkFaults(), "up": up or LinkFaults()}
        self.bytes_per_s = bytes_per_s
        self.random = {"down": random.Random(seed), "up": random.Random(seed + 1)}
        self.stats = ProxyStats()
        self._cut = False
        self._cut_after_down: int | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._target_fd = os.open(target_port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self._target_fd)
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        flags = fcntl.fcntl(self._master, fcntl.F_GETFL)
        fcntl.fcntl(self._master, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self.port = os.ttyname(self._slave)
        self._pending = {"down": bytearray(), "up": bytearray()}
        self._next_send = {"down": 0.0, "up": 0.0}
        # one thread per direction, so pacing one way never holds up the other (full duplex)
        self._threads = [
            threading.Thread(target=self._run, args=(fd, direction), daemon=True)
            for fd, direction in ((self._target_fd, "down"), (self._master, "up"))
        ]

    # ------------------------------------------------------------------ control

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=2.0)
        for fd in (self._target_fd, self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass

    def cut(self) -> None:
        """The link goes dark both ways (bytes in flight are lost) until restore()."""
        with self._lock:
            self._cut = True

    def cut_after(self, down_bytes: int) -> None:
        """Cut the link once `down_bytes` more bytes have gone towards the ground."""
        with self._lock:
            self._cut_after_down = self.stats.down.bytes_out + down_bytes

    def restore(self) -> None:
        with self._lock:
            self._cut = False
            self._cut_after_down = None

    def inject(self, direction: str, data: bytes) -> None:
        """An intruder's transmitter: `data` reaches the other end as if sent on the link
        ("down": towards the ground), e.g. frames recorded earlier with capture=True."""
        self._emit(direction, bytes(data), getattr(self.stats, direction))

    # ------------------------------------------------------------------ forwarding

    def _run(self, fd: int, direction: str) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([fd], [], [], 0.02)
            except (OSError, ValueError):
                return
            if not ready:
                continue
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue
            except OSError:
                time.sleep(0.01)  # the host side closed its end: wait for it to reopen
                continue
            if data:
                self._forward(direction, data)

    def _forward(self, direction: str, data: bytes) -> None:
        stats = getattr(self.stats, direction)
        stats.bytes_in += len(data)
        if self.captured is not None:
            self.captured[direction] += data
        pending = self._pending[direction]
        pending += data
        while True:
            end = pending.find(b"\x00")
            if end < 0:
                # Non-frame traffic (REPL text) is passed through once it stops growing.
                if len(pending) > 4096:
                    frame = bytes(pending)
                    pending.clear()
                    self._emit(direction, frame, stats)
                return
            frame = bytes(pending[: end + 1])
            del pending[: end + 1]
            stats.frames += 1
            self._emit(direction, self._mangle(direction, frame, stats), stats)

    def _mangle(self, direction: str, frame: bytes, stats: DirectionStats) -> bytes:
        faults = self.faults[direction]
        rng = self.random[direction]
        if faults.loss_above_bytes is not None and len(frame) > faults.loss_above_bytes:
            stats.lost_frames += 1
            return b""
        if faults.frame_loss_rate and rng.random() < faults.frame_loss_rate:
            stats.lost_frames += 1
            return b""
        if faults.truncate_rate and len(frame) > 2 and rng.random() < faults.truncate_rate:
            keep = rng.randrange(1, len(frame) - 1)
            frame = frame[:keep] + b"\x00"
            stats.truncated_frames += 1
        if faults.drop_rate or faults.flip_rate:
            out = bytearray()
            for byte in frame:
                if faults.drop_rate and rng.random() < faults.drop_rate:
                    stats.dropped_bytes += 1
                    continue
                if faults.flip_rate and rng.random() < faults.flip_rate:
                    byte ^= 1 << rng.randrange(8)
                    stats.flipped_bits += 1
                out.append(byte)
            frame = bytes(out)
        return frame

    def _emit(self, direction: str, data: bytes, stats: DirectionStats) -> None:
        fd = self._master if direction == "down" else self._target_fd
        for start in range(0, len(data), 64):
            piece = data[start : start + 64]
            with self._lock:
                if direction == "down" and self._cut_after_down is not None:
                    if stats.bytes_out + len(piece) >= self._cut_after_down:
                        self._cut = True
                        self._cut_after_down = None
                cut = self._cut
            if cut:
                stats.cut_bytes += len(piece)
                continue
            if self.bytes_per_s:
                # pace like a UART: a byte every 1/bytes_per_s seconds while data is queued;
                # a late wake-up is caught up (up to 10 ms) so sleep jitter does not slow
                # the line below its rate
                now = time.monotonic()
                due = max(self._next_send[direction], now - 0.01)
                if due > now:
                    time.sleep(due - now)
                self._next_send[direction] = due + len(piece) / self.bytes_per_s
            self._write_all(fd, piece)
            stats.bytes_out += len(piece)

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._stop.is_set():
            try:
                written = os.write(fd, view)
                view = view[written:]
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:
                return
