"""Count how often the stream's first block locks around the orbit prediction, over many
realisations of a pass's start (docs/streaming.md "The first lock of every realisation").

    python benchmarks/count_first_locks.py --profile jinan-1 --realisations 30

Realisation i: simulation seed 1 + i % 5, pattern secret bytes([i]) * 16 (a count's
patterns, not secret), the first 1.5 s of the pass from its start. Only the
synchronisation runs: the first second of detections (the stream's first block), its
first-anchor attempts around the prediction in the stream's order
(stream.first_sync_attempts, first_anchor_of_attempts), Alice answering in process from
her pattern source. Prints one line per realisation (the windows tried: z / z needed /
detections; the lock; the fraction of the detections within 20 ms of the anchor on their
true slot, truth/) and a summary, with the wrong lags' z counted against the exact null
distribution's expectation (timesync.NullCorrelation) and a Gaussian's. Passes are kept
under --work (reused when present)."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import scipy.stats

from host.distil import timesync
from host.distil.stream import FIRST_SYNC_DETECTIONS, first_sync_attempts
from host.formats.passdir import read_pass_json
from tests.first_lock_passes import first_block_and_synchroniser, simulate_pass_start

try:
    from host.distil.stream import first_anchor_of_attempts
except ImportError:  # older trees: the stream's loop, as it was inline

    def first_anchor_of_attempts(sync, t, attempts, final):
        missed = {}
        for window_s, kinds in attempts:
            try:
                return sync.first_anchor(t, window_s, kinds), window_s, missed
            except timesync.ProtocolAborted:
                missed.update(sync.first_tries)
        return None, None, missed


def pass_start(profile: str, seed: int, secret: bytes, work: Path) -> Path:
    out = work / f"{profile}-{seed}-{secret.hex()[:8]}"
    if not (out / "pass.json").exists():
        simulate_pass_start(profile, seed, secret, out)
    return out


def null_tail(null, n: int, z: float) -> float:
    """P(a wrong lag's sum of n slots reaches z) by the exact threshold, bisected."""
    x = n * null.mean + z * null.sd * math.sqrt(n)
    lo, hi = 1e-15, 1.0
    for _ in range(50):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if null.threshold(n, mid) <= x else (mid, hi)
    return hi


def one(profile: str, i: int, work: Path) -> dict:
    seed, secret = 1 + i % 5, bytes([i]) * 16
    started = time.perf_counter()
    out = pass_start(profile, seed, secret, work)
    t_all, det, block, sync = first_block_and_synchroniser(out)
    vectors = []
    sums = sync._sparse_correlation

    def kept(*args):
        vectors.append(np.asarray(sums(*args), np.float64))
        return vectors[-1]

    sync._sparse_correlation = kept
    needed = dict.fromkeys(("predicted", "full"), FIRST_SYNC_DETECTIONS)
    attempts = first_sync_attempts(sync, block, needed, final=False)
    predicted = [a for a in attempts if "full" not in a[1]]
    tried = []
    original = sync.first_anchor

    def logged(t_, window_s, kinds):
        try:
            return original(t_, window_s, kinds)
        finally:
            z, z_needed, n = sync.first_tries.get("predicted", (0.0, math.inf, 0))
            tried.append((window_s, round(z, 2), round(z_needed, 2), n))

    sync.first_anchor = logged
    tc, window_s, _ = first_anchor_of_attempts(sync, block, predicted, final=False)
    right = None
    if tc is not None:
        result = sync.assign(t_all, det)
        near = result.assigned & (np.abs(t_all - tc) < 0.02)
        truth = np.load(out / "truth" / "detections.npz")["slot"]
        right = round(float(np.mean(result.slots[near] == truth[near])), 3)
    wrong = []  # per vector: (lags, lags at z >= 3.5, at z >= 4)
    for v in vectors:
        others = np.delete(v, int(np.argmax(v)))
        z = (others - others.mean()) / others.std()
        wrong.append((int(z.size), int((z >= 3.5).sum()), int((z >= 4.0).sum())))
    return {
        "i": i,
        "seed": seed,
        "detections": int(block.size),
        "tried": tried,
        "lock_window_s": window_s,
        "search": sync.first_search if tc is not None else None,
        "right": right,
        "wrong_lags": wrong,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="jinan-1")
    parser.add_argument("--realisations", type=int, default=30)
    parser.add_argument("--work", type=Path, default=Path("/tmp/count_first_locks"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(args.realisations):
        rows.append(one(args.profile, i, args.work))
        print(json.dumps(rows[-1]), flush=True)
    locked = [r for r in rows if r["search"] == "predicted"]
    exact_null = getattr(timesync, "NullCorrelation", None)  # None: a tree before it
    first_pass = next(args.work.glob(f"{args.profile}-*/pass.json"))
    null = exact_null.of(read_pass_json(first_pass)) if exact_null else None
    counted = {3.5: 0, 4.0: 0}
    exact = {3.5: 0.0, 4.0: 0.0}
    gauss = {3.5: 0.0, 4.0: 0.0}
    for r in rows:
        for (lags, at35, at4), (_, _, _, n) in zip(r["wrong_lags"], r["tried"], strict=False):
            counted[3.5] += at35
            counted[4.0] += at4
            for z in (3.5, 4.0):
                if null is not None:
                    exact[z] += null_tail(null, n, z) * lags
                gauss[z] += float(scipy.stats.norm.sf(z)) * lags
    windows = sorted({r["lock_window_s"] for r in locked})
    print(
        f"{args.profile}: {len(locked)} of {len(rows)} realisations locked around the "
        f"prediction on their first second (windows {windows}); the lock's detections on "
        f"their true slot: {min((r['right'] for r in locked), default=None)} at least"
    )
    print(
        "wrong lags at z >= 3.5 / 4: counted "
        f"{counted[3.5]} / {counted[4.0]}, exact null {exact[3.5]:.1f} / {exact[4.0]:.1f}, "
        f"Gaussian {gauss[3.5]:.1f} / {gauss[4.0]:.1f}"
    )


if __name__ == "__main__":
    main()
