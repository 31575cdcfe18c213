"""`make bench` is the only place the performance figures come from, and nothing in the
test suite runs it: a benchmark module that no longer imports (bench_tracking.py after the
firmware's sine table moved to payload._sin_q14, unseen for two days) stops the whole run
at collection. The suite at least collects every benchmark the way `make bench` does."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_make_bench_collects_every_benchmark_module():
    recipe = re.search(r"^bench:.*\n\t(.+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert recipe and "pytest -q benchmarks -p no:randomly" in recipe.group(1)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly",
         "benchmarks"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    collected = {line.split("::")[0] for line in result.stdout.splitlines() if "::" in line}
    modules = {f"benchmarks/{p.name}" for p in (REPO / "benchmarks").glob("bench_*.py")
               if "def test_" in p.read_text()}  # fmt: skip
    assert modules and collected == modules
