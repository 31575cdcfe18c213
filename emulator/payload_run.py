"""An emulated pass-mode run: the real firmware on a target, the emulated optical head on
its payload bus, driven over the authenticated ground link (host.link.client, the CCSDS
telecommands of docs/ground-link.md): configure, start, run, stop, then list and download
the products and read the data path's status from housekeeping.

Used by the end-to-end tests and the benchmarks. The payload is provisioned as a board
would be: the link key in `<storage>/link/key` (unix: a file in the storage folder;
QEMU: written through the raw REPL in maintenance boot, then the application started
from that REPL, which hands UART0 to the ground link).
"""

from __future__ import annotations

import base64
import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from emulator.optical_head import HeadServer, OpticalHead
from emulator.targets import (
    CONTROLLER_HEAP_BYTES,
    NETDUINO2_EMULATED_BUS_TIMEOUT_US,
    NETDUINO2_FLASH_DISK_ADDR,
    NETDUINO2_FLASH_DISK_BYTES,
    Netduino2Target,
    QemuTarget,
    UnixTarget,
)
from host.deploy.raw_repl import RawRepl
from host.distil.durable import write_atomic
from host.link.client import CommandRejected, PayloadClient

KEY = bytes(range(100, 132))  # the emulated payloads' link key (test provisioning only)
# the emulated payloads' product key (AES-256-GCM for pattern products; test provisioning
# only: a flight key is random, docs/ground-link.md "Product encryption")
PRODUCT_KEY = bytes(range(200, 232))
COMMAND_TIMEOUT_S = 60.0  # stop drains the TDC and flushes every log before it reports

_QEMU_PROVISION = """
import board, os, binascii, vfs
root = board.mount_storage()
try:
    os.mkdir(root + "/link")
except OSError:
    pass
with open(root + "/link/key", "wb") as f:
    f.write(binascii.a2b_base64(%r))
if %r:
    with open(root + "/link/product_key", "wb") as f:
        f.write(binascii.a2b_base64(%r))
vfs.umount(root)
"""


# The STM32 board's flash region, read out after provisioning (base64: the raw REPL's
# output is text)
_NETDUINO2_READ_FLASH = (
    "import uctypes, binascii\n"
    "print(binascii.b2a_base64(uctypes.bytearray_at("
    f"{NETDUINO2_FLASH_DISK_ADDR:#x}, {NETDUINO2_FLASH_DISK_BYTES}), newline=False).decode())\n"
)


def netduino2_storage_image(path: str | Path, product_key: bytes | None = None) -> Path:
    """The STM32 board's flash region with the link key (and product key) in its drop box,
    written to path: provisioned as payload_session does (the maintenance REPL, on QEMU
    with semihosting), then read out. Loaded into a board booted without semihosting
    (Netduino2Target(semihosting=False, storage_image=path)), which has no REPL to be
    provisioned through: a board whose flash was programmed on the bench."""
    with Netduino2Target(boot="maintenance") as target:
        repl = RawRepl(target.ground_port, timeout_s=30.0)
        repl.enter()
        product = base64.b64encode(product_key or b"").decode()
        repl.exec(_QEMU_PROVISION % (base64.b64encode(KEY).decode(), bool(product_key), product))
        image = base64.b64decode(repl.exec(_NETDUINO2_READ_FLASH).strip())
        repl.close()
    if len(image) != NETDUINO2_FLASH_DISK_BYTES:
        raise RuntimeError(f"read {len(image)} bytes of the board's flash region")
    # The link key (and product key) in the clear in littlefs: 0600, through a fresh
    # temporary (a symlink planted at the name is replaced, not written through)
    path = Path(path)
    write_atomic(path, image, 0o600)
    return path


@contextlib.contextmanager
def payload_session(
    target_name: str,
    bus_address: tuple[str, int],
    storage_dir: str | Path | None = None,
    icount_shift: int | None = None,
    unix_env: dict[str, str] | None = None,
    product_key: bytes | None = PRODUCT_KEY,
    unix_heap_bytes: int = CONTROLLER_HEAP_BYTES,
    before_app: str | list[str] = "",
    image: str | Path | None = None,
    track_address: tuple[str, int] | str | None = None,
    bus_timeout_us: int | None = NETDUINO2_EMULATED_BUS_TIMEOUT_US,
):
    """A provisioned emulated payload wired to the head at bus_address; yields
    (target, PayloadClient). track_address (QEMU boards): the head's tracking link
    (HeadServer.track_address), over which the board's timer interrupt runs the tracking
    loop (docs/scheduling.md); without it the loop is paced over the payload bus, as on
    unix. unix_env: extra environment for the unix board;
    unix_heap_bytes: its heap (below the controller's to show a margin).
    before_app (QEMU boards): MicroPython run in the raw REPL just before the application
    starts, as a program of its own, or a list of such programs run in turn (a
    benchmark's or a test's instrumentation).
    image (QEMU boards): a firmware image other than the build's (a benchmark's baseline).
    product_key: provisioned on the payload and given to the client (None: neither, so
    the payload refuses to serve pattern products).
    bus_timeout_us (netduino2): the launcher's override of the board's bus timeout (None:
    the board's flight value; targets.Netduino2Target)."""
    if target_name == "unix":
        with contextlib.ExitStack() as stack:
            if storage_dir is None:
                storage_dir = stack.enter_context(tempfile.TemporaryDirectory())
            storage = Path(storage_dir)
            (storage / "link").mkdir(parents=True, exist_ok=True)
            (storage / "link" / "key").write_bytes(KEY)
            if product_key is not None:
                (storage / "link" / "product_key").write_bytes(product_key)
            target = stack.enter_context(
                UnixTarget(
                    storage_dir=storage,
                    bus_address=bus_address,
                    extra_env=unix_env,
                    heap_bytes=unix_heap_bytes,
                )
            )
            payload = stack.enter_context(
                PayloadClient(
                    target.ground_port,
                    KEY,
                    product_key=product_key,
                    timeout_s=COMMAND_TIMEOUT_S,
                )
            )
            payload.ping()
            yield target, payload
        return
    if target_name not in ("qemu", "netduino2"):
        raise ValueError(f"unknown target {target_name!r}")
    target_class = QemuTarget if target_name == "qemu" else Netduino2Target
    options = {} if image is None else {"image": image}
    if target_name == "netduino2":
        options["bus_timeout_us"] = bus_timeout_us
    with target_class(
        boot="maintenance",
        bus_address=bus_address,
        icount_shift=icount_shift,
        track_address=track_address,
        **options,
    ) as t:
        repl = RawRepl(t.ground_port, timeout_s=30.0)
        repl.enter()
        product = base64.b64encode(product_key or b"").decode()
        repl.exec(_QEMU_PROVISION % (base64.b64encode(KEY).decode(), bool(product_key), product))
        # each its own program, so that its module-level code is freed before the
        # application starts (what it defines stays in the REPL's globals): an
        # instrument's footprint in the heap is its functions and data only
        for instrument in [before_app] if isinstance(before_app, str) else before_app:
            if instrument:
                repl.exec(instrument)
        program = "from payload import app\napp.run(board)\x04"
        repl.serial.write(program.encode())
        repl._read_until(b"OK", 10.0)
        repl.close()
        with PayloadClient(
            t.ground_port, KEY, product_key=product_key, timeout_s=COMMAND_TIMEOUT_S
        ) as payload:
            payload.ping()
            yield t, payload


@dataclass
class PassRun:
    target: str
    configure_reply: dict
    telemetry: dict
    products: list[tuple[str, int, int]]
    files: dict[str, bytes] = field(default_factory=dict)
    seconds: float = 0.0
    run_seconds: float = 0.0  # from the start reply to the stop request


def wait_frames(head: OpticalHead, frames: int, timeout_s: float, midway=None) -> None:
    deadline = time.monotonic() + timeout_s
    while len(head.emitted) + len(head.blank_frames) < frames:
        if midway is not None and len(head.emitted) >= frames // 2:
            midway(head)
            midway = None
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(head.emitted)} frames in {timeout_s} s")
        time.sleep(0.005)


def download_products(payload: PayloadClient, folder: Path):
    """[(name, bytes, crc32)] as listed, and {name: bytes} downloaded and CRC-checked."""
    entries = payload.list_products()
    files = {}
    for entry in entries:
        files[entry.name] = payload.download(entry, folder).path.read_bytes()
    return [(e.name, e.size, e.crc32) for e in entries], files


def run_pass(
    target_name: str,
    head: OpticalHead,
    config: dict,
    frames: int,
    timeout_s: float = 120.0,
    icount_shift: int | None = None,
    midway=None,
    unix_env: dict[str, str] | None = None,
    uploads: list[dict] | None = None,
    unix_heap_bytes: int = CONTROLLER_HEAP_BYTES,
) -> PassRun:
    """Configure, run until the head emitted `frames` frames, stop, download products.

    midway(head), if given, is called once half the frames have gone out; `uploads` are
    configure telecommands sent before the configuration (a full-pass prediction)."""
    started = time.monotonic()
    with HeadServer(head) as server, tempfile.TemporaryDirectory() as downloads:
        with payload_session(
            target_name,
            server.address,
            icount_shift=icount_shift,
            unix_env=unix_env,
            unix_heap_bytes=unix_heap_bytes,
            track_address=server.track_address,
        ) as (
            _target,
            payload,
        ):
            try:
                for upload in uploads or ():
                    payload.configure(upload)
                payload.configure(config)
            except CommandRejected as error:
                reply = {"ok": False, "reason": str(error)}
                return PassRun(target_name, reply, payload.housekeeping().get("mission"), [])
            payload.start()
            run_started = time.monotonic()
            wait_frames(head, frames, timeout_s, midway)
            run_seconds = time.monotonic() - run_started
            payload.stop()
            telemetry = payload.housekeeping()["mission"]
            products, files = download_products(payload, Path(downloads))
    return PassRun(
        target_name,
        {"ok": True, "reason": None},
        telemetry,
        products,
        files,
        round(time.monotonic() - started, 3),
        run_seconds,
    )
