"""The downlink an uplink attacker can provoke with rejection reports (docs/ground-link.md
"Verification and reason codes"): the unix target behind emulator.link_proxy paced at
115200 baud 8N1 (11520 bytes/s each way, as a UART), the attacker sending at the line's
full rate for FLOOD_S: (a) 5-byte framing-garbage frames ('short'), (b) wrong tags and a
recorded genuine frame replayed ('auth', 'replay'). Printed per pattern: TM 1,2 reports
received per second, their framed bytes per second and share of the downlink, the
transmit queue's dropped frames and the rejections left unreported.

Run alone: .venv/bin/python -m pytest benchmarks/bench_reject_flood.py -s -p no:randomly
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from linkhelpers import KEY, Downlink, unix_payload  # noqa: E402

from emulator.link_proxy import LinkProxy  # noqa: E402
from host.link.client import PayloadClient  # noqa: E402
from host.protocol import ccsds  # noqa: E402
from host.protocol.framing import encode_frame  # noqa: E402

BYTES_PER_S = 115200 / 10  # 8N1
FLOOD_S = 6.0
WRITE_EVERY_S = 0.05


def _pattern(kind: str) -> bytes:
    if kind == "garbage":
        return encode_frame(b"\x00")
    recorded = encode_frame(ccsds.build_tc(KEY, 1, ccsds.SVC_TEST, 1))
    return encode_frame(ccsds.build_tc(bytes(32), 7, ccsds.SVC_TEST, 1)) + recorded


@pytest.mark.parametrize("kind", ["garbage", "refusal"])
def test_reports_an_uplink_flood_provokes(tmp_path, kind):
    pattern = _pattern(kind)
    per_write = pattern * max(1, int(BYTES_PER_S * WRITE_EVERY_S) // len(pattern))
    with unix_payload(tmp_path, {}) as target:
        with LinkProxy(target.ground_port, bytes_per_s=BYTES_PER_S) as proxy:
            with PayloadClient(proxy.port, KEY, timeout_s=20.0) as payload:
                payload.ping()  # counter 1: the recorded frame
                with Downlink(payload.link.serial) as downlink:
                    started = time.monotonic()
                    sent = 0
                    while time.monotonic() - started < FLOOD_S:
                        payload.link.serial.write(per_write)
                        sent += len(per_write)
                        time.sleep(WRITE_EVERY_S)
                    downlink.wait_quiet(1.0, limit_s=60.0)
                payload.counter = 1_000_000
                link = payload.housekeeping()["link"]
    reports = [
        (at, size, tm)
        for at, size, tm in downlink.packets()
        if tm.service == ccsds.SVC_VERIFICATION and tm.subtype == 2
    ]
    span_s = max(FLOOD_S, max((at for at, _, _ in reports), default=started) - started)
    report_bytes = sum(size for _, size, _ in reports)
    print(
        f"\n{kind}: {sent} bytes up in {FLOOD_S:.0f} s ({sent / FLOOD_S:.0f} B/s offered, "
        f"{proxy.stats.up.bytes_out} delivered); {len(reports)} TM 1,2 in {span_s:.1f} s: "
        f"{len(reports) / span_s:.1f} reports/s, {report_bytes / span_s:.0f} B/s "
        f"({100 * report_bytes / span_s / BYTES_PER_S:.1f} % of the downlink), "
        f"largest {max((s for _, s, _ in reports), default=0)} B; tx_dropped "
        f"{link.get('tx_dropped', 0)}, unreported {link.get('tc_rejections_unreported', 0)}"
    )
