"""`make bench`: the full-scale Micius pass (2.7e10 slots) through `qkdsat simulate`.

Prints simulated slots/s and detections/s, the peak memory of the run (a child process,
so the figure is the simulator's own), the ratio against a baseline measured in the same
run (enumerating every slot's symbol with the same pattern source, which a slot-by-slot
simulator could not avoid), and the headline numbers against Liao et al. 2017.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from host.protocol.symbols import SymbolMapping, insecure_test_pattern_words
from host.simulate import profiles
from host.simulate.headline import compare_with_published, headline

BASELINE_SLOTS = 20_000_000


def enumerate_slots_rate() -> float:
    mapping = SymbolMapping.from_probabilities(0.5, [0.5, 0.25, 0.25])
    started = time.perf_counter()
    for first in range(0, BASELINE_SLOTS, 1 << 22):
        slots = np.arange(first, min(first + (1 << 22), BASELINE_SLOTS), dtype=np.int64)
        mapping.symbols(insecure_test_pattern_words(12345, slots))
    return BASELINE_SLOTS / (time.perf_counter() - started)


def test_bench_full_scale_micius_pass(tmp_path):
    out = tmp_path / "micius"
    baseline = enumerate_slots_rate()
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "host.cli", "simulate", "--profile", "micius-2017",
         "--seed", "1", "--out", str(out), "--quiet"],
        check=True,
    )  # fmt: skip
    wall = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    truth = json.loads((out / "truth" / "truth.json").read_text())
    slots, detections = truth["slot_count"], truth["detections"]
    result = headline(out)
    rows = compare_with_published(result, profiles.load("micius-2017")["published"])
    disk_mib = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()) / 2**20
    print()
    print(f"full-scale micius-2017 pass: {slots:.3e} slots, {detections} detections")
    print(f"  wall {wall:.1f} s (incl. interpreter start and file writing)")
    print(f"  simulated slots/s   {slots / wall:.3e}")
    print(f"  detections/s        {detections / wall:.3e}")
    print(f"  peak memory         {peak_mib:.0f} MiB; pass directory {disk_mib:.0f} MiB")
    print(f"  baseline: enumerating slot symbols {baseline:.3e} slots/s ->"
          f" simulate is {slots / wall / baseline:.0f}x faster than merely enumerating;"
          f" enumeration alone would take {slots / baseline / 60:.1f} min")  # fmt: skip
    print("  headline vs Liao et al. 2017 (simulated / published):")
    for key, row in rows.items():
        print(f"    {key:12s} {row['simulated']:>12.6g} / {row['published']:<10.6g}"
              f" ratio {row['ratio']:.3f}")  # fmt: skip
    print(f"    QBER over all sifted bits (incl. decoy and vacuum): {result['qber_all']:.4f}")
    for key in ("detections", "sifted_bits", "qber"):
        assert abs(rows[key]["ratio"] - 1) < 0.25, (key, rows[key])
