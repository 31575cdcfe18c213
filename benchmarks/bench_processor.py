"""`make bench`: Alice on the payload processor over the emulated optical link, on the full
simulated micius-2017 pass (seed 1; docs/payload-processor.md, docs/optical-link.md).

- Alice's CPU seconds and peak memory per pass on the processor (one core), as a fraction
  of the pass's duration and against Bob's CPU seconds on the same pass (same run);
- classical bytes per sifted bit each way, and the link's air bytes (framing, resends,
  acknowledgements) against the payload bytes.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from emulator.link_session import distil_over_link
from emulator.optical_link import DOWN, UP, link_for_pass


def test_bench_payload_processor_on_a_full_micius_pass(tmp_path):
    pass_dir = tmp_path / "micius"
    subprocess.run(
        [sys.executable, "-m", "host.cli", "simulate", "--profile", "micius-2017"]
        + ["--seed", "1", "--out", str(pass_dir), "--quiet"],
        check=True,
    )
    duration_s = json.loads((pass_dir / "pass.json").read_text())["simulator"]["geometry"][
        "duration_s"
    ]
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = distil_over_link(
        pass_dir, tmp_path / "out", link_for_pass(pass_dir, seed=1), station="Xinglong"
    )
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert run.codes == (0, 0), (run.alice.get("abort_reason"), run.bob.get("abort_reason"))
    budget = json.loads((run.alice_dir / "processor.json").read_text())
    both_cpu_s = (children.ru_utime + children.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    bob_cpu_s = both_cpu_s - budget["cpu_s"]
    sifted = run.alice["sifted_bits"]
    link = run.link["directions"]
    print(
        f"\npayload processor, micius-2017 full pass (seed 1, {duration_s:.0f} s), "
        f"key {run.alice['key_bits']} bits, sifted {sifted}"
    )
    print(
        f"  Alice CPU {budget['cpu_s']:.2f} s on one core = {budget['cpu_s'] / duration_s:.4f}"
        f" of the pass; Bob CPU {bob_cpu_s:.2f} s (Alice/Bob {budget['cpu_s'] / bob_cpu_s:.3f});"
        f" Alice peak memory {budget['peak_rss_mb']:.0f} MB; Alice wall {budget['wall_s']:.1f} s"
    )
    for direction, name in ((DOWN, "satellite -> ground"), (UP, "ground -> satellite")):
        stats = link[direction]
        print(
            f"  {name}: {stats['bytes_delivered']} bytes = "
            f"{stats['bytes_delivered'] / sifted:.3f} bytes per sifted bit; on the air "
            f"{stats['air_bytes'] / max(stats['bytes_delivered'], 1):.3f} x (frames, resends, "
            f"acks); {stats['frames_corrupted']} frames caught by the CRC"
        )
