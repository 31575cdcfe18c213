"""Sealed pattern products (`make bench`): AES-256-GCM of a 1 KiB chunk in viper
(firmware/payload/aesgcm.py) against the CRC-32 an unsealed chunk costs (the baseline,
the same run), on the unix target (wall time) and on QEMU (-icount shift=0: one emulated
ns per instruction, so instructions per byte); then a sealed and an unsealed download of
the same product from the unix target over its pty (goodput ratio).

Numbers are printed, not asserted; run with -s to see them."""

import random
import tempfile
from pathlib import Path

import mpbench

from emulator.targets import UnixTarget
from host.link.client import PayloadClient

KERNELS = (
    """
import board
from payload import aesgcm
from payload.products import chunk_crc32
"""
    + mpbench.TIMED
    + """

CHUNK = 1024
plain = bytearray((i * 37 + 11) & 0xFF for i in range(CHUNK))
out = bytearray(CHUNK)
tag = bytearray(16)
nonce = bytearray(12)
aad = bytearray(20)
gcm = aesgcm.AesGcm(bytes(range(32)))
view = memoryview(plain)


def seal():
    gcm.seal(nonce, aad, plain, CHUNK, out, tag)


def crc():
    chunk_crc32(view, CHUNK)


R = REPS
print("BENCH", {"bytes": CHUNK, "seal": timed(seal, R[0]), "crc": timed(crc, R[1])})
"""
)


def _run_unix(reps) -> dict:
    return mpbench.run_unix(KERNELS.replace("REPS", repr(reps)))


def _run_qemu(reps) -> dict:
    return mpbench.run_qemu(KERNELS.replace("REPS", repr(reps)))


def _per_byte(entry, size):
    elapsed_us, reps = entry
    return elapsed_us / (reps * size)


def test_bench_seal_kernel_unix_and_qemu():
    r = _run_unix((50, 500))
    seal, crc = _per_byte(r["seal"], r["bytes"]), _per_byte(r["crc"], r["bytes"])
    print(f"\n[unix] AES-256-GCM seal of a {r['bytes']}-byte chunk (wall time)")
    print(f"  seal   {1000 / seal:10,.1f} kB/s")
    print(f"  CRC-32 {1000 / crc:10,.1f} kB/s   seal / CRC-32 time ratio: {seal / crc:.1f}")
    q = _run_qemu((3, 10))
    seal, crc = _per_byte(q["seal"], q["bytes"]), _per_byte(q["crc"], q["bytes"])
    print(f"[qemu MPS2-AN385] AES-256-GCM seal of a {q['bytes']}-byte chunk (-icount)")
    print(f"  seal   {seal * 1000:8.0f} instructions/byte")
    print(f"  CRC-32 {crc * 1000:8.0f} instructions/byte   seal / CRC-32 ratio: {seal / crc:.1f}")
    print(f"  at 25 MHz and 1 instruction/cycle: {25e6 / (seal * 1000) / 1000:.1f} kB/s sealed")


def test_bench_sealed_download_goodput_unix():
    data = random.Random(3).randbytes(200_000)
    key, product_key = bytes(range(100, 132)), bytes(range(200, 232))
    with tempfile.TemporaryDirectory() as work:
        storage = Path(work) / "flash"
        (storage / "products").mkdir(parents=True)
        (storage / "link").mkdir()
        (storage / "link" / "key").write_bytes(key)
        (storage / "link" / "product_key").write_bytes(product_key)
        (storage / "products" / "patterns.qrec").write_bytes(data)
        (storage / "products" / "stream.qrec").write_bytes(data)
        with UnixTarget(storage_dir=storage) as target:
            with PayloadClient(target.ground_port, key, product_key=product_key) as payload:
                entries = {e.name: e for e in payload.list_products()}
                clear = payload.download(entries["stream.qrec"], Path(work) / "sat")
                sealed = payload.download(entries["patterns.qrec"], Path(work) / "sat")
        assert sealed.sealed and sealed.path.read_bytes() == data
    clear_rate, sealed_rate = clear.size / clear.seconds, sealed.size / sealed.seconds
    ratio = sealed_rate / clear_rate
    print(f"\n[unix, pty] 200 kB download: clear {clear_rate / 1000:,.0f} kB/s, sealed "
          f"{sealed_rate / 1000:,.0f} kB/s: sealed / clear goodput {ratio:.2f}")  # fmt: skip
