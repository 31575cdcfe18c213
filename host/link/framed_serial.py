"""Frames over a serial port (a real UART/USB port, or an emulated target's pty).

Reads in bulk (whatever the port has, at least one byte per call) and splits frames with
host.protocol.framing.FrameReader, so throughput does not hang on one call per byte.
"""

from __future__ import annotations

import collections
import time

import serial

from host.protocol.framing import FrameReader, encode_frame


class LinkTimeout(TimeoutError):
    """Nothing (that parsed) came in time. refused: why the last packet of the wait was
    refused, if one was (a wrong key, a replay), for the caller's message."""

    def __init__(self, message: str, refused: str | None = None):
        super().__init__(message)
        self.refused = refused


class LinkLost(ConnectionError):
    """The port went away (a USB adapter unplugged, the emulator ended)."""


class FramedSerial:
    def __init__(self, port: str, baudrate: int = 115200, max_body_bytes: int = 1024):
        self.port_name = port
        self.serial = serial.Serial(port, baudrate=baudrate, timeout=0.02)
        self.reader = FrameReader(max_body_bytes)
        self._bodies: collections.deque[bytes] = collections.deque()
        self.bytes_sent = 0
        self.bytes_received = 0

    def close(self) -> None:
        self.serial.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def write(self, data: bytes) -> None:
        """Raw bytes (an encoded frame, delimiters) onto the port."""
        try:
            self.serial.write(data)
        except (serial.SerialException, OSError) as error:
            raise LinkLost(f"{self.port_name}: link lost while sending ({error})") from None
        self.bytes_sent += len(data)

    def send(self, body: bytes) -> None:
        self.write(encode_frame(body))

    def receive(self, timeout_s: float) -> bytes:
        """The next good frame body; bad frames are counted in self.reader.drops.

        The deadline holds whatever arrives: a noisy line (a wrong baud rate) delivers
        bytes all the time but never a good frame, so it is checked after every read,
        not only after a read that returned nothing."""
        deadline = time.monotonic() + timeout_s
        while not self._bodies:
            if time.monotonic() > deadline:
                raise LinkTimeout(f"no frame from {self.port_name} within {timeout_s:.1f} s")
            try:
                chunk = self.serial.read(max(1, self.serial.in_waiting))
            except (serial.SerialException, OSError) as error:
                raise LinkLost(f"{self.port_name}: link lost ({error})") from None
            if chunk:
                self.bytes_received += len(chunk)
                self._bodies.extend(self.reader.feed(chunk))
        return self._bodies.popleft()

    def request(self, body: bytes, timeout_s: float = 5.0) -> bytes:
        self.send(body)
        return self.receive(timeout_s)
