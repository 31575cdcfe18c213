"""`make bench`: streaming distillation DURING the pass (docs/streaming.md), Alice on the
payload processor (one core) and Bob at the ground station over the emulated optical link,
in real time (`--stream-speedup 1`), on the full simulated micius-2017 and jinan-1 passes
(seed 1). Printed per pass:

- key latency after loss of signal (last detection -> each side's key written), and its
  ratio to the pass's duration (target: at most 5 s);
- the pipeline's lag behind the detections over the pass, maximum and median (target: at
  most 10 s);
- classical bytes per sifted bit each way;
- the streamed key against the post-pass key of the same pass (in-process reference, the
  same run; target: within 2 %);
- Alice's CPU seconds and peak memory on the processor.

    pytest -q benchmarks/bench_stream.py -p no:randomly -s [-k micius|jinan]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from emulator.link_session import distil_over_link
from emulator.optical_link import link_for_pass
from host.distil.protocol import Config
from host.distil.run import run_local

pytestmark = pytest.mark.timeout(7200)  # two whole passes in real time, and their references


@pytest.mark.parametrize("profile", ["micius-2017", "jinan-1"])
def test_bench_streaming_distillation_on_a_full_pass(profile, tmp_path):
    pass_dir = tmp_path / profile
    subprocess.run(
        [sys.executable, "-m", "host.cli", "simulate", "--profile", profile]
        + ["--seed", "1", "--out", str(pass_dir), "--quiet"],
        check=True,
    )
    # its own copy: a pass's raw data gives one key (host/distil/raw_data_record.py)
    reference_pass = shutil.copytree(pass_dir, tmp_path / f"{profile}-post-pass")
    reference = run_local(reference_pass, tmp_path / "post-pass", Config())
    run = distil_over_link(
        pass_dir,
        tmp_path / "stream",
        link_for_pass(pass_dir, seed=1),
        station=_station(pass_dir),
        distil_options=["--stream", "--stream-speedup", "1"],
    )
    # jinan-1's simulated pass makes no key post-pass either (finite-key length 0): its
    # pipeline figures are measured all the same, and both sides must agree
    assert run.codes in ((0, 0), (3, 3)), (run.codes, run.alice.get("abort_reason"))
    assert (run.codes == (3, 3)) == bool(reference["aborted"]), (
        reference["abort_reason"],
        run.bob.get("abort_reason"),
    )
    rows = run.bob["timeline"]
    detections = [r["t_s"] for r in rows if r["detections"] < rows[-1]["detections"]]
    pass_s = (detections[-1] + 1) if detections else rows[-1]["t_s"]
    budget = json.loads((run.alice_dir / "processor.json").read_text())
    sifted = rows[-1]["sifted_bits"]  # an abort mid-pass leaves no sifted_bits field
    print(
        f"\nstreaming over the optical link, {profile} full pass (seed 1, {pass_s} s of "
        f"detections): key {run.alice['key_bits']} bits, post-pass {reference['key_bits']} "
        f"bits (ratio {run.alice['key_bits'] / max(reference['key_bits'], 1):.4f})"
    )
    if reference["aborted"]:
        print(f"  post-pass aborted: {reference['abort_reason']}")
        print(f"  streamed aborted: {run.bob['abort_reason']}")
    for side, report in (("Alice (on board)", run.alice), ("Bob (ground)", run.bob)):
        latency = report["key_latency_s"]
        said = "none (no key)" if latency is None else f"{latency:.2f} s"
        ratio = "" if latency is None else f" = {latency / pass_s:.4f} of the pass"
        print(
            f"  {side}: key latency after the last detection {said}{ratio}; lag max "
            f"{report['lag_s_max']:.2f} s, median {report['lag_s_median']:.2f} s"
        )
    cut = run.bob.get("stream_cut")
    if cut:  # the pass closed ahead of the optical link's end (docs/streaming.md)
        print(
            f"  pass closed at {cut['cut_s']} s for the optical link's end at "
            f"{cut['link_end_s']:.1f} s (loss of signal {cut['loss_of_signal_s']:.1f} s): "
            f"{cut['detections_discarded']} detections discarded, the pipeline "
            f"{cut['behind_s']} s behind then; the rest took {cut.get('rest_wall_s')} s of "
            f"the {cut['reserve_wall_s']} s reserved"
        )
    bytes_each_way = run.alice["classical_bytes"]
    print(
        f"  classical bytes per sifted bit: down {bytes_each_way['down'] / sifted:.3f}, "
        f"up {bytes_each_way['up'] / sifted:.3f} (sifted {sifted})"
    )
    print(
        f"  Alice CPU {budget['cpu_s']:.2f} s on one core = {budget['cpu_s'] / pass_s:.4f} of "
        f"the pass, peak memory {budget['peak_rss_mb']:.0f} MB"
    )
    assert run.alice["key_bits"] == run.bob["key_bits"]


def _station(pass_dir) -> str:
    pass_json = json.loads((pass_dir / "pass.json").read_text())
    return (pass_json.get("station") or {}).get("name") or "station"
