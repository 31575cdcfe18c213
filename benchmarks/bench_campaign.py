"""`make bench`: `qkdsat campaign` on a LocalCluster of 1 and of 2 workers (speed-up), and
the key per station per day it yields. Each scheduled pass of 3 days over the seven
stations is simulated (micius-2017 with a brighter link for a 0.28 m portable station,
2 urad beam and lossless optics, at a 20 MHz slot rate; the 16 s around culmination:
~0.8-1.5 million detections, a key in seconds of CPU) and distilled (Cascade). Both runs share the
campaign secret, so they simulate the same photons: the speed-up compares like with like.
On a shared machine the ratio, not the seconds, is the figure."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from host.cli import main as qkdsat

TLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "sso-500km.tle"
STATIONS = "Jinan,Hefei,Nanshan,Wuhan,Beijing,Shanghai,Stellenbosch"


def _campaign(out: Path, workers: int) -> float:
    args = (
        f"campaign --tle {TLE} --stations {STATIONS} --start 2024-03-01T00:00:00Z --days 3 "
        "--profile micius-2017 --set link.divergence_full_urad=2 --set link.optics_efficiency=1 "
        "--set source.slot_rate_hz=2e7 --duration-s 16 "
        f"--ec cascade --workers {workers} --out {out} --quiet"
    )
    t0 = time.perf_counter()
    assert qkdsat(args.split()) == 0
    return time.perf_counter() - t0


@pytest.mark.timeout(3600)
def test_bench_campaign_speed_up_and_key_per_station_per_day(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    seconds_one = _campaign(one, 1)
    two.mkdir()
    shutil.copy2(one / "campaign.secret", two / "campaign.secret")
    seconds_two = _campaign(two, 2)
    report = json.loads((two / "report.json").read_text())
    same = [p["detections"] for p in report["passes"]] == [
        p["detections"] for p in json.loads((one / "report.json").read_text())["passes"]
    ]
    assert same
    print(
        f"\ncampaign: {len(report['passes'])} passes (3 days, 7 stations), "
        f"1 worker {seconds_one:.0f} s, 2 workers {seconds_two:.0f} s: "
        f"speed-up x{seconds_one / seconds_two:.2f}"
    )
    for station, entry in report["stations"].items():
        print(
            f"  {station:<13} {entry['passes']} passes, {entry['passes_with_key']} with key, "
            f"{entry['key_bits_per_day']:9.0f} bit/day (16 s per pass)"
        )
    print(f"  relay capacity (bits): {report['relay_capacity_bits']}")
