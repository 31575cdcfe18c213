"""`make bench`: the stress profile, jinan-1 with 10x its detection rate
(host/simulate/profiles/jinan-1-stress10x.json), through the whole pipeline of the main
job: firmware and head, Bob's detections, Alice on the payload processor and Bob at the
ground station streaming over the emulated optical link in real time (`qkdsat mission
--segment-s`). Printed against jinan-1 on the same segment in the same run:

- detections per second arriving (at culmination) and detections per second the pipeline
  worked off (detections / wall time of the distillation), and their ratio: below 1 the
  pipeline cannot keep up with the pass and its lag grows without bound;
- the error-correction decoder's share of that time (is the decoder the bottleneck?);
- the lag behind the detections over the segment (max, median) and the key latency after
  loss of signal, from mission.json's timeline.
"""

from __future__ import annotations

import json
import subprocess
import sys

SEGMENT_S = 5.0  # seconds around culmination: ~2.9 M detections at 10x jinan-1


def _mission(out, profile: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "host.cli", "mission", "--profile", profile]
        + ["--segment-s", str(SEGMENT_S), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode in (0, 3), result.stderr[-2000:]
    return json.loads((out / "mission.json").read_text())


def _figures(summary: dict, out) -> dict:
    link = summary["stages"]["link"]
    ground = json.loads((out / "report.json").read_text())
    detections = summary["stages"]["ground"]["detections"]
    stages = ground.get("stage_seconds") or {}
    wall_s = link["wall_s"]
    return {
        "detections": detections,
        "arrival_per_s": detections / summary["stages"]["ground"]["segment_seconds"],
        "worked_off_per_s": detections / wall_s,
        "wall_s": wall_s,
        # the distillation ended this long after the last detection (the stream replays
        # the segment in real time, so the segment's length is not part of it)
        "after_los_s": wall_s - summary["stages"]["ground"]["segment_seconds"],
        "ec_s": stages.get("error_correction", 0.0),
        "sync_s": stages.get("sync", 0.0),
        "key_bits": summary["stages"]["distil"]["key_bits"],
        "aborted": summary["stages"]["distil"]["abort_reason"],
        "lag_s_max": summary["lag_s_max"],
        "lag_s_median": summary["lag_s_median"],
        "key_latency_s": summary["key_latency_s"],
        "too_slow": len(link["too_slow"]),
        "pipeline": summary["pipeline"],
        "cpu_s": link["processor"].get("cpu_s"),
        "peak_rss_mb": link["processor"].get("peak_rss_mb"),
    }


def test_bench_stress_profile_ten_times_jinan(tmp_path):
    runs = {}
    for profile in ("jinan-1", "jinan-1-stress10x"):
        out = tmp_path / profile
        runs[profile] = _figures(_mission(out, profile), out)
    base, stress = runs["jinan-1"], runs["jinan-1-stress10x"]
    print(
        f"\nstress profile: {SEGMENT_S:g} s around culmination, {stress['pipeline']} over the"
        " optical link"
    )
    for name, f in runs.items():
        keeps_up = f["worked_off_per_s"] / f["arrival_per_s"]
        verdict = "keeps up" if keeps_up >= 1 else "CANNOT keep up"
        print(
            f"  {name}: {f['detections']:,} detections ({f['arrival_per_s']:,.0f}/s arriving);"
            f" distillation {f['wall_s']:.1f} s wall ({f['worked_off_per_s']:,.0f}/s worked"
            f" off: {keeps_up:.2f}x the arrival rate, {verdict});"
            f" ended {f['after_los_s']:.1f} s after loss of signal;"
            f" sync {f['sync_s']:.1f} s, EC {f['ec_s']:.1f} s"
            f" ({f['ec_s'] / f['wall_s']:.0%} of the wall time); lag max {f['lag_s_max']} s,"
            f" median {f['lag_s_median']} s; key latency {f['key_latency_s']} s;"
            f" key {f['key_bits']} bits{'' if not f['aborted'] else ' (' + f['aborted'] + ')'};"
            f" too-slow reports {f['too_slow']}; Alice CPU {f['cpu_s']} s,"
            f" peak {f['peak_rss_mb']} MB"
        )
    print(
        f"  stress / jinan-1: detections {stress['detections'] / base['detections']:.2f}x,"
        f" distillation wall {stress['wall_s'] / base['wall_s']:.2f}x,"
        f" EC {stress['ec_s'] / max(base['ec_s'], 1e-9):.2f}x"
    )
