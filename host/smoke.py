"""`qkdsat smoke`: boot the real firmware on an emulated target and prove both UARTs work:
a version query on the ground link (UART0), and a frame echoed through the payload bus
(UART1) by an emulated endpoint."""

from __future__ import annotations

import argparse
import time

from emulator.endpoint import FrameEndpoint, echo
from emulator.targets import make_target
from host.link.framed_serial import FramedSerial

DIAG_VERSION = 0x01
DIAG_BUS_ECHO = 0x02
REPLY_FLAG = 0x80


def run_smoke(target_name: str, echo_payload: bytes = b"hello optical head") -> dict:
    started = time.monotonic()
    with FrameEndpoint(echo) as endpoint:
        with make_target(target_name, bus_address=endpoint.address) as target:
            with FramedSerial(target.ground_port) as link:
                reply = _request_with_retry(link, bytes([DIAG_VERSION]), timeout_s=20.0)
                version = reply[1:].decode()
                link.send(bytes([DIAG_BUS_ECHO]) + echo_payload)
                reply = _receive_kind(link, DIAG_BUS_ECHO, timeout_s=10.0)
                if reply != bytes([DIAG_BUS_ECHO | REPLY_FLAG]) + echo_payload:
                    raise RuntimeError(f"payload-bus echo came back wrong: {reply!r}")
                return {
                    "target": target_name,
                    "version": version,
                    "bus_echo": reply[1:],
                    "endpoint_frames": endpoint.reader.frames_ok,
                    "seconds": round(time.monotonic() - started, 3),
                }


def _request_with_retry(link: FramedSerial, body: bytes, timeout_s: float) -> bytes:
    """The first request may reach a target that is still booting: ask again until then."""
    deadline = time.monotonic() + timeout_s
    while True:
        link.send(body)
        try:
            return _receive_kind(link, body[0], timeout_s=0.5)
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def _receive_kind(link: FramedSerial, kind: int, timeout_s: float) -> bytes:
    """The next reply to a request of this kind; answers to earlier retries are skipped."""
    deadline = time.monotonic() + timeout_s
    while True:
        reply = link.receive(timeout_s=max(0.01, deadline - time.monotonic()))
        if reply and reply[0] == kind | REPLY_FLAG:
            return reply


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", choices=["unix", "qemu", "all"], default="all")


def run(args: argparse.Namespace) -> int:
    targets = ["unix", "qemu"] if args.target == "all" else [args.target]
    for name in targets:
        result = run_smoke(name)
        print(
            f"{name:5s}  firmware '{result['version']}' answered on the ground link; "
            f"payload bus echoed {result['bus_echo']!r}  ({result['seconds']:.2f} s)"
        )
    return 0
