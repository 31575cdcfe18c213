"""`make bench`: a full simulated micius-2017 pass distilled with the OS CSPRNG (no seed
anywhere at the endpoints; the simulator's pattern secret fresh too) under Lim 2014 and
Rusca 2018, each with Hoeffding and Chernoff tails: identical keys on both sides, and a
length equal to the independent recomputation (tests/finite_key_reference.py) from the
report's counts. Printed against the published 300,939 bits (Liao et al. 2017)."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import finite_key_reference as reference  # noqa: E402

from host.cli import main as qkdsat  # noqa: E402
from host.distil.protocol import Config  # noqa: E402
from host.distil.run import run_local  # noqa: E402

PUBLISHED_BITS = 300_939


@pytest.mark.timeout(3600)  # whole passes / hundreds of sessions
def test_bench_full_micius_pass_csprng_four_analyses(tmp_path):
    pass_dir = tmp_path / "micius"
    assert qkdsat(["simulate", "--profile", "micius-2017", "--quiet", "--out", str(pass_dir)]) == 0
    lines = []
    for analysis in ("lim2014", "rusca2018"):
        for tail in ("hoeffding", "chernoff"):
            out = tmp_path / f"{analysis}-{tail}"
            t0 = time.perf_counter()
            # a copy per run: a pass's raw data gives one key (host/distil/raw_data_record.py)
            run_pass = shutil.copytree(pass_dir, tmp_path / f"pass-{analysis}-{tail}")
            report = run_local(run_pass, out, Config(analysis=analysis, tail=tail))
            shutil.rmtree(run_pass)
            wall = time.perf_counter() - t0
            assert not report["aborted"], (analysis, tail, report["abort_reason"])
            assert "insecure_deterministic" not in report
            assert (out / "alice.key").read_bytes() == (out / "bob.key").read_bytes()
            recomputed = reference.recomputed_key_bits(report)
            assert report["key_bits"] == recomputed, (analysis, tail)
            lines.append(
                f"{analysis:9s} {tail:9s}: key {report['key_bits']:8d} bits = recomputed "
                f"{recomputed}, {report['key_bits'] / PUBLISHED_BITS:.2f} x published, "
                f"eps total {report['epsilon']['total']:.3e}, {wall:.0f} s"
            )
    print("\nfull micius-2017 pass, CSPRNG endpoints:\n" + "\n".join(lines))
