"""`qkdsat smoke`: boot the real firmware on an emulated target and prove both UARTs work:
an authenticated are-you-alive telecommand on the ground link (UART0) answered with the
firmware version, and a payload-bus loopback test (TC 17,128) through UART1 to an
emulated endpoint and back."""

from __future__ import annotations

import argparse
import time

from emulator.endpoint import FrameEndpoint, echo
from emulator.payload_run import payload_session
from host.link.client import LinkError, PayloadClient
from host.protocol import ccsds


def run_smoke(target_name: str, echo_payload: bytes = b"hello optical head") -> dict:
    started = time.monotonic()
    with FrameEndpoint(echo) as endpoint:
        # provisioned with a test key as a board would be (the firmware has no built-in
        # key): unix writes it into the storage folder, QEMU through the maintenance REPL
        # (no product key: the smoke test reads no pattern product)
        with payload_session(target_name, endpoint.address, product_key=None) as (
            _target,
            payload,
        ):
            payload.timeout_s = 0.5
            version = ping_until_up(payload, timeout_s=20.0)
            payload.timeout_s = 10.0
            tm = payload.command("bus loopback", ccsds.SVC_TEST, 128, echo_payload, reply=129)
            return {
                "target": target_name,
                "version": version,
                "bus_echo": tm.data,
                "endpoint_frames": endpoint.reader.frames_ok,
                "seconds": round(time.monotonic() - started, 3),
            }


def ping_until_up(payload: PayloadClient, timeout_s: float) -> str:
    """The first telecommand may reach a target that is still booting: ask until it
    answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return payload.ping()
        except LinkError:
            if time.monotonic() > deadline:
                raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        choices=["unix", "qemu", "netduino2", "all"],
        default="all",
        help="which emulated target to boot",
    )


def run(args: argparse.Namespace) -> int:
    targets = ["unix", "qemu", "netduino2"] if args.target == "all" else [args.target]
    for name in targets:
        result = run_smoke(name)
        print(
            f"{name:5s}  firmware '{result['version']}' answered on the ground link; "
            f"payload bus echoed {result['bus_echo']!r}  ({result['seconds']:.2f} s)"
        )
    return 0
