"""Profile Bob's and Alice's streaming loops (host/distil/stream.py), one cProfile per
endpoint thread of an in-process run, and print each side's top functions by own time
(figures in docs/streaming.md, "Where the time goes"). Not part of `make bench`:

    python benchmarks/profile_stream.py PASS_DIR [--speedup 1000] [--top 25]

A speed-up of 1000 replays the pass as fast as the pipeline goes (compute-bound), so the
profile shows what the pipeline costs, not the pass's own pace.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import tempfile
import time
from pathlib import Path

from host.distil import stream
from host.distil.protocol import Config
from host.distil.run import run_local

SEED = 33  # the endpoints' deterministic seed: the same key on every run of a pass


def _profiled(cls, profiles: dict):
    run = cls.run

    def wrapped(self, *args, **kwargs):
        profile = cProfile.Profile()
        profile.enable()
        try:
            return run(self, *args, **kwargs)
        finally:
            profile.disable()
            profiles[cls.__name__] = profile

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pass_dir", type=Path)
    parser.add_argument("--speedup", type=float, default=1000.0)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    profiles: dict = {}
    for cls in (stream.StreamAlice, stream.StreamBob):
        cls.run = _profiled(cls, profiles)
    out = Path(tempfile.mkdtemp(prefix="profile-stream-"))
    try:
        start = time.perf_counter()
        report = run_local(
            args.pass_dir,
            out,
            Config(),
            insecure_deterministic_seed=SEED,
            stream=stream.StreamOptions(block_s=1.0, speedup=args.speedup),
        )
        wall_s = time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)
    stages = {k: round(v, 2) for k, v in (report.get("stage_seconds") or {}).items()}
    print(f"wall {wall_s:.2f} s, key {report.get('key_bits')} bits, stages {stages}")
    for name in ("StreamBob", "StreamAlice"):
        print(f"===== {name}")
        pstats.Stats(profiles[name]).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
