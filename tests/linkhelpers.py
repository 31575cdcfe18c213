"""Test fixtures for the ground link: emulated payloads with a provisioned key and
product files, on the unix target (files written into its storage folder) and on QEMU
(written through the raw REPL in maintenance boot, then the application started from the
same REPL: UART0 becomes the ground link)."""

from __future__ import annotations

import base64
import contextlib
import random
import threading
import time
from pathlib import Path

from emulator.targets import QemuTarget, UnixTarget
from host.deploy.raw_repl import RawRepl
from host.protocol import ccsds
from host.protocol.framing import FrameReader, encode_frame

KEY = bytes(range(100, 132))
PRODUCT_KEY = bytes(range(200, 232))  # AES-256-GCM for pattern products (test provisioning)


def product_set(seed: int, sizes: dict[str, int]) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {name: rng.randbytes(size) for name, size in sizes.items()}


@contextlib.contextmanager
def unix_payload(
    tmp_path: Path,
    products: dict[str, bytes],
    key: bytes | None = KEY,
    product_key: bytes | None = None,
):
    storage = tmp_path / "flash"
    (storage / "products").mkdir(parents=True)
    (storage / "link").mkdir()
    if key is not None:
        (storage / "link" / "key").write_bytes(key)
    if product_key is not None:
        (storage / "link" / "product_key").write_bytes(product_key)
    for name, data in products.items():
        (storage / "products" / name).write_bytes(data)
    with UnixTarget(storage_dir=storage) as target:
        yield target


_QEMU_SETUP = """
import board, os, binascii, vfs
root = board.mount_storage()
for d in ("/link", "/products"):
    try:
        os.mkdir(root + d)
    except OSError:
        pass
def put(path, text):
    with open(root + path, "wb") as f:
        f.write(binascii.a2b_base64(text))
"""


@contextlib.contextmanager
def qemu_payload(
    products: dict[str, bytes],
    key: bytes | None = KEY,
    product_key: bytes | None = None,
    **target_args,
):
    with QemuTarget(boot="maintenance", **target_args) as target:
        repl = RawRepl(target.ground_port, timeout_s=30.0)
        repl.enter()
        repl.exec(_QEMU_SETUP)
        if key is not None:
            repl.exec(f"put('/link/key', {base64.b64encode(key).decode()!r})")
        if product_key is not None:
            repl.exec(f"put('/link/product_key', {base64.b64encode(product_key).decode()!r})")
        for name, data in products.items():
            repl.exec(f"f = open(root + '/products/{name}', 'wb'); f.close()")
            for start in range(0, len(data), 3072):
                text = base64.b64encode(data[start : start + 3072]).decode()
                repl.exec(
                    f"f = open(root + '/products/{name}', 'ab')\n"
                    f"f.write(binascii.a2b_base64({text!r}))\nf.close()"
                )
        # The application mounts storage itself; then it owns UART0 until told otherwise.
        repl.serial.write(b"vfs.umount(root)\nfrom payload import app\napp.run(board)\x04")
        repl._read_until(b"OK", 10.0)
        repl.close()
        yield target


class Downlink:
    """Everything the payload sends, read on a thread (so neither side blocks on a full
    pty), kept with the time each read returned."""

    def __init__(self, serial):
        self.serial = serial
        self.reads: list[tuple[float, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        serial.timeout = 0.02

    def _run(self):
        while not self._stop.is_set():
            chunk = self.serial.read(4096)
            if chunk:
                self.reads.append((time.monotonic(), chunk))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def wait_quiet(self, quiet_s: float = 1.0, limit_s: float = 30.0) -> None:
        """Until nothing came for quiet_s (counted from the call at the earliest)."""
        called = time.monotonic()
        while time.monotonic() < called + limit_s:
            last = max(self.reads[-1][0] if self.reads else 0.0, called)
            if time.monotonic() - last > quiet_s:
                return
            time.sleep(0.1)

    def packets(self) -> list[tuple[float, int, ccsds.Tm]]:
        """(time read, framed bytes, packet) for each telemetry packet received."""
        reader = FrameReader(ccsds.GROUND_MAX_BODY_BYTES)
        out = []
        for at, chunk in self.reads:
            for body in reader.feed(chunk):
                out.append((at, len(encode_frame(body)), ccsds.parse_tm(body, KEY)))
        return out
