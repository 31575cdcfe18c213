"""An emulated pass-mode run: the real firmware on a target, the emulated optical head on
its payload bus, driven over the ground link with the controller's diagnostic service
(firmware/payload/app.py): configure, start, run, stop, then read the products back.

Used by the end-to-end tests and the benchmarks; products come back through the ground
link on every target (QEMU's storage lives inside the emulated MCU).
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field

from emulator.optical_head import HeadServer, OpticalHead
from emulator.targets import make_target
from host.link.framed_serial import FramedSerial, LinkTimeout

DIAG_VERSION = 0x01
DIAG_CONFIGURE = 0x03
DIAG_START = 0x04
DIAG_STOP = 0x05
DIAG_STATUS = 0x06
DIAG_PRODUCTS = 0x07
DIAG_READ = 0x08
REPLY_FLAG = 0x80
READ_CHUNK = 900


class DiagClient:
    """The controller's diagnostic service over a FramedSerial ground link."""

    def __init__(self, link: FramedSerial):
        self.link = link

    def request(self, kind: int, payload: bytes = b"", timeout_s: float = 30.0) -> bytes:
        self.link.send(bytes([kind]) + payload)
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self.link.receive(timeout_s=max(0.01, deadline - time.monotonic()))
            if reply and reply[0] == kind | REPLY_FLAG:
                return reply[1:]

    def request_json(self, kind: int, payload: bytes = b"", timeout_s: float = 30.0):
        return json.loads(self.request(kind, payload, timeout_s))

    def wait_ready(self, timeout_s: float = 20.0) -> str:
        """Ask for the version until the (booting) controller answers."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.request(DIAG_VERSION, timeout_s=0.5).decode()
            except LinkTimeout:
                if time.monotonic() > deadline:
                    raise

    def configure(self, config: dict) -> dict:
        return self.request_json(DIAG_CONFIGURE, json.dumps(config).encode())

    def start(self) -> dict:
        return self.request_json(DIAG_START)

    def stop(self) -> dict:
        return self.request_json(DIAG_STOP, timeout_s=120.0)

    def status(self) -> dict:
        return self.request_json(DIAG_STATUS)

    def products(self) -> list[tuple[str, int, int]]:
        return [tuple(p) for p in self.request_json(DIAG_PRODUCTS)]

    def read_product(self, name: str, size: int) -> bytes:
        data = bytearray()
        encoded = name.encode()
        while len(data) < size:
            chunk = min(READ_CHUNK, size - len(data))
            request = bytes([len(encoded)]) + encoded + struct.pack("<IH", len(data), chunk)
            reply = self.request(DIAG_READ, request)
            offset = struct.unpack_from("<I", reply)[0]
            if offset != len(data) or len(reply) <= 4:
                raise RuntimeError(f"reading {name} at {len(data)}: bad reply {reply[:8].hex()}")
            data += reply[4:]
        return bytes(data)


@dataclass
class PassRun:
    target: str
    configure_reply: dict
    telemetry: dict
    products: list[tuple[str, int, int]]
    files: dict[str, bytes] = field(default_factory=dict)
    seconds: float = 0.0


def run_pass(
    target_name: str,
    head: OpticalHead,
    config: dict,
    frames: int,
    timeout_s: float = 120.0,
    icount_shift: int | None = None,
    midway=None,
) -> PassRun:
    """Configure, run until the head emitted `frames` frames, stop, read products back.

    midway(head), if given, is called once half the frames have gone out."""
    started = time.monotonic()
    with HeadServer(head) as server:
        kwargs = {"bus_address": server.address}
        if target_name == "qemu" and icount_shift is not None:
            kwargs["icount_shift"] = icount_shift
        with make_target(target_name, **kwargs) as target:
            with FramedSerial(target.ground_port, max_body_bytes=4096) as link:
                diag = DiagClient(link)
                diag.wait_ready()
                reply = diag.configure(config)
                if not reply["ok"]:
                    return PassRun(target_name, reply, diag.status(), [])
                start_reply = diag.start()
                if not start_reply["ok"]:
                    raise RuntimeError(f"start refused: {start_reply}")
                deadline = time.monotonic() + timeout_s
                while len(head.emitted) + len(head.blank_frames) < frames:
                    if midway is not None and len(head.emitted) >= frames // 2:
                        midway(head)
                        midway = None
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"only {len(head.emitted)} frames in {timeout_s} s")
                    time.sleep(0.01)
                stop_reply = diag.stop()
                if not stop_reply["ok"]:
                    raise RuntimeError(f"stop refused: {stop_reply}")
                telemetry = diag.status()
                products = diag.products()
                files = {name: diag.read_product(name, size) for name, size, _ in products}
    return PassRun(
        target_name, reply, telemetry, products, files, round(time.monotonic() - started, 3)
    )
