"""`make bench`: does the stream's fallback to 2^16 frames (host/distil/stream.py
frame_bits_for_lag; docs/streaming.md "Falling back to 2^16 frames when the lag grows")
let a slowed Bob catch up? A timing measurement, so a benchmark, not a test: beside two
busy loops its 2^16 chunks fell behind too (docs/streaming.md, "Review of the fallback").
The rule itself is tested without timing in tests/test_distil_stream_lag_fallback.py.

A streamed minute of jinan-1's brightest (~39 kbit of key a second: a chunk of 2 x 2^17
frames every ~6 s) replayed at SPEEDUP, Bob's decoder slowed as a loaded machine slows it:
each chunk costs him SLOW_S_PER_KEY_BIT more wall seconds a key bit in 2^17 frames,
WORK_2_17_TO_2_16 times less in 2^16 frames (the decoder work per key bit measured,
docs/distillation.md "Issue 17 after session 14"). The same stream runs twice in this
run: with the rule, and with it off (the baseline: chunks kept in 2^17). Printed for each:
the lag's maximum, its troughs in the 10 s after the first fallback and over the pass's
last 15 s, the switches, the key. Measured in session 17: with the rule the troughs
stopped growing (at load ~4 back to 1 s, at load ~8 they stayed at 10-14 s); without it
they rose from 3 s to 8-13 s, the maximum 15-22 s.

    pytest -q benchmarks/bench_stream_lag_fallback.py -p no:randomly -s
"""

from __future__ import annotations

import os
import time

import pytest

from host.distil import ldpc, reconcile, stream
from host.distil.protocol import Config
from host.distil.run import run_local
from host.distil.stream import LAG_FALLBACK_S, StreamOptions
from tests.test_distil_stream_lag_fallback import PASS_S, WORK_2_17_TO_2_16, jinan_40s

__all__ = ["jinan_40s"]  # the fixture, taken from the tests

SPEEDUP = 2.0
# Wall seconds a key bit Bob's decoder is slowed by in 2^17 frames: ~3.4 s more for a
# chunk of ~240 kbit, whose detections came in ~3 wall s at SPEEDUP. At 2.0e-5 (and load
# ~7) the 2^16 chunks too fell behind, at 1.4e-5 and load ~8 they about kept up; at 1.2e-5
# the 2^17 ones about kept up (the rule-off run's troughs stayed at 2-3 s)
SLOW_S_PER_KEY_BIT = 1.3e-5


def _slowed_bob(monkeypatch) -> None:
    """Bob's half of each chunk's reconciliation slowed by SLOW_S_PER_KEY_BIT a key bit in
    2^17 frames, WORK_2_17_TO_2_16 times less in 2^16 ones (Alice's half is not slowed: she
    waits for Bob's messages)."""
    ldpc_bob = reconcile.ldpc_bob

    def slowed(channel, bits, *args, **kwargs):
        result = ldpc_bob(channel, bits, *args, **kwargs)
        frame_bits = result[2].get("frame_bits", ldpc.FRAME_BITS)
        scale = 1.0 if frame_bits > ldpc.FRAME_BITS else 1.0 / WORK_2_17_TO_2_16
        time.sleep(SLOW_S_PER_KEY_BIT * scale * len(bits))
        return result

    monkeypatch.setattr(reconcile, "ldpc_bob", slowed)


def _slowed_stream(pass_dir, out) -> dict:
    report = run_local(
        pass_dir,
        out,
        Config(tail="chernoff"),
        insecure_deterministic_seed=7,
        stream=StreamOptions(block_s=1.0, speedup=SPEEDUP),
    )
    assert not report["aborted"], report["abort_reason"]
    return report


def _troughs(report: dict, after_s: float) -> tuple[float, float]:
    """The lag's lowest in the 10 pass s after `after_s` and over the pass's last 15 s."""
    rows = report["timeline"]
    following = [r["lag_s"] for r in rows if 0 < r["t_s"] - after_s <= 10]
    last = [r["lag_s"] for r in rows if PASS_S - 15 <= r["t_s"] <= PASS_S - 2]
    return min(following), min(last)


@pytest.mark.slow
def test_bench_a_slowed_bob_with_and_without_the_fallback(jinan_40s, tmp_path, monkeypatch):
    _slowed_bob(monkeypatch)
    with_rule = _slowed_stream(jinan_40s, tmp_path / "rule")
    switches = with_rule["stream"]["frame_switches"]
    # the slowing is what makes the rule act: without a switch there is nothing to measure
    assert switches and switches[0]["frame_bits"] == ldpc.FRAME_BITS, with_rule["lag_s_max"]
    assert switches[0]["lag_wall_s"] > LAG_FALLBACK_S
    first_s = switches[0]["t_s"]
    monkeypatch.setattr(stream, "frame_bits_for_lag", lambda current, lag, frame_bits: frame_bits)
    without = _slowed_stream(jinan_40s, tmp_path / "off")
    assert not without["stream"]["frame_switches"]
    print(f"\nslowed Bob, jinan-1 {PASS_S:.0f} s at {SPEEDUP}x, load {os.getloadavg()[0]:.1f}")
    print("| rule | lag max s | trough 10 s after fallback | trough last 15 s | switches | key |")
    print("|---|---|---|---|---|---|")
    for name, report in (("on", with_rule), ("off (baseline)", without)):
        after, last = _troughs(report, first_s)
        print(
            f"| {name} | {report['lag_s_max']:.1f} | {after:.1f} | {last:.1f} "
            f"| {len(report['stream']['frame_switches'])} | {report['key_bits']} |"
        )
    print(
        f"lag max on / off {with_rule['lag_s_max'] / without['lag_s_max']:.2f}, "
        f"key on / off {with_rule['key_bits'] / without['key_bits']:.3f}"
    )
