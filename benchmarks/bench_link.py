"""Ground-link download throughput (`make bench`).

1. At a set baud rate (115200 baud 8N1 = 11520 bytes/s, paced by emulator.link_proxy as a
   UART would), download goodput (product bytes per second, CRC-verified on disk) as a
   fraction of the link's raw byte rate. Target: at least 90 %.
2. Over the bare pty (no baud limit): bytes/s from the unix target and from QEMU, against
   a baseline measured in the same run: the raw pty copy rate of the same bytes.

The product is a TDC log: pattern products are served only sealed (docs/ground-link.md),
which would measure AES-GCM on the target too, not the link.

Run alone: .venv/bin/python -m pytest benchmarks/bench_link.py -s
"""

from __future__ import annotations

import os
import select
import sys
import time
import tty
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from linkhelpers import KEY, product_set, qemu_payload, unix_payload  # noqa: E402

from emulator.link_proxy import LinkProxy  # noqa: E402
from host.link.client import PayloadClient  # noqa: E402

BAUD = 115200
RAW_BYTES_PER_S = BAUD / 10  # 8N1: start + 8 data + stop bits per byte


def _download(port: str, folder: Path, size: int, window: int = 4) -> tuple[float, object]:
    with PayloadClient(port, KEY, timeout_s=5.0) as payload:
        (entry,) = payload.list_products()
        assert entry.size == size
        started = time.perf_counter()
        result = payload.download(entry, folder, window=window, request_timeout_s=2.0)
        return time.perf_counter() - started, result


def _pty_copy_rate(size: int, timeout_s: float = 30.0) -> float:
    """Baseline: how fast this machine moves bytes through a bare pty pair.

    Both ends are non-blocking and served by select(): a blocking write into the master
    stalls for good once the pty's buffer is full, because the read that would drain it
    comes after it in the same loop. Every wait has the deadline timeout_s."""
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        os.set_blocking(master, False)
        os.set_blocking(slave, False)
        data = os.urandom(size)
        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        sent = received = 0
        while received < size:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise TimeoutError(f"pty copy: {received} of {size} bytes in {timeout_s} s")
            writers = [master] if sent < size else []
            readable, writable, _ = select.select([slave], writers, [], remaining_s)
            if writable:
                try:
                    sent += os.write(master, data[sent : sent + 4096])
                except BlockingIOError:
                    pass
            if readable:
                try:
                    received += len(os.read(slave, 65536))
                except BlockingIOError:
                    pass
        elapsed = time.perf_counter() - started
    finally:
        os.close(master)
        os.close(slave)
    return size / elapsed


@pytest.mark.parametrize("target_name", ["unix", "qemu"])
def test_goodput_at_115200_baud(tmp_path, target_name):
    size = 64 * 1024
    data = product_set(30, {"tdc.qrec": size})
    payload = unix_payload(tmp_path, data) if target_name == "unix" else qemu_payload(data)
    with payload as target:
        with LinkProxy(target.ground_port, bytes_per_s=RAW_BYTES_PER_S) as proxy:
            seconds, result = _download(proxy.port, tmp_path / "sat", size)
            wire_bytes = proxy.stats.down.bytes_out
    assert (tmp_path / "sat" / "tdc.qrec").read_bytes() == data["tdc.qrec"]
    goodput = size / seconds
    fraction = goodput / RAW_BYTES_PER_S
    efficiency = size / wire_bytes
    print(
        f"\n{target_name}: link at {BAUD} baud 8N1 ({RAW_BYTES_PER_S:.0f} B/s raw): "
        f"{size} B product in {seconds:.2f} s = {goodput:.0f} B/s goodput = "
        f"{100 * fraction:.1f} % of the raw byte rate (target >= 90 %); "
        f"framing+packet efficiency {100 * efficiency:.1f} % ({wire_bytes} B on the wire); "
        f"{result.retransmissions} resent"
    )


@pytest.mark.parametrize("target_name", ["unix", "qemu"])
def test_bytes_per_second_over_a_bare_pty(tmp_path, target_name):
    size = 512 * 1024 if target_name == "unix" else 128 * 1024
    data = product_set(31, {"tdc.qrec": size})
    if target_name == "unix":
        payload = unix_payload(tmp_path, data)
    else:
        payload = qemu_payload(data)
    with payload as target:
        seconds, result = _download(target.ground_port, tmp_path / "sat", size, window=8)
    assert (tmp_path / "sat" / "tdc.qrec").read_bytes() == data["tdc.qrec"]
    baseline = _pty_copy_rate(4 * 1024 * 1024)
    rate = size / seconds
    print(
        f"\n{target_name}: {size} B over a bare pty in {seconds:.2f} s = {rate / 1e3:.1f} kB/s "
        f"({rate * 10 / 1e6:.2f} Mbaud equivalent); baseline pty copy {baseline / 1e6:.1f} "
        f"MB/s; ratio {rate / baseline:.4f}; {result.retransmissions} resent"
    )
