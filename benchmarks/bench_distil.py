"""`make bench`: key distillation figures, each against a baseline measured in the same run.

- LDPC efficiency f and frame error rate (first attempt, and after the retry path) at
  QBER 1, 2, 3, 5 %; Cascade's efficiency on the same data.
- Decoder throughput against the `ldpc` package's BpDecoder on the same frames (ratio).
- Privacy amplification time against one FFT of the same size (ratio).
- The simulated micius-2017 pass (`qkdsat simulate`) end to end: stage throughputs in
  sifted Mbit/s, key length against the published 300,939 bits, and the time to distil
  as a fraction of the pass's duration.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import scipy.fft
import scipy.sparse

from host.distil import channel as ch
from host.distil import ldpc, pa, reconcile
from host.distil.finite_key import binary_entropy
from host.distil.protocol import Config
from host.distil.run import run_local

BLOCK_BITS = 1_000_000  # 16 frames of 2^16: about the micius pass's 1.6 M sifted


def _exchange(method, x, y, q):
    data = np.random.default_rng(0).bytes(1 << 20)
    t_a, t_b = ch.queue_pair()
    a = ch.AuthChannel(t_a, ch.KeyPool(data), ch.ALICE)
    b = ch.AuthChannel(t_b, ch.KeyPool(data), ch.BOB)
    result = {}

    def alice():
        if method == "ldpc":
            result["a"] = reconcile.ldpc_alice(
                a, x, q, Config.ec_efficiency, np.random.default_rng(2)
            )[1]
        else:
            result["a"] = reconcile.cascade_alice(a, x, q, 7)

    thread = threading.Thread(target=alice)
    thread.start()
    t0 = time.perf_counter()
    if method == "ldpc":
        corrected, kept, stats = reconcile.ldpc_bob(b, y, q, Config.ec_efficiency)
    else:
        corrected, stats = reconcile.cascade_bob(b, y, q, 7)
        kept = np.ones(x.size, bool)
    seconds = time.perf_counter() - t0
    thread.join()
    assert np.array_equal(corrected[kept], x[kept])  # discarded frames are counted as FER
    return stats, result["a"], seconds


def test_bench_reconciliation_efficiency():
    print("\nreconciliation on", BLOCK_BITS, "bits per QBER (f = leak / (n h(QBER)))")
    print(
        f"LDPC: frames of {ldpc.FRAME_BITS} bits, first attempt sized for f = "
        f"{Config.ec_efficiency}, then retries of {reconcile.LDPC_REVEAL_STEP_F} n h(QBER) "
        "bits each; FER first = frames needing a retry, FER final = frames discarded "
        "(not decoded after the retries, or failing the check tags)"
    )
    print(
        " QBER  | LDPC f | FER first | FER final | frames | retry rounds | LDPC Mbit/s | "
        "Cascade f (Alice) | Cascade f (both ways) | Cascade rounds"
    )
    for q in (0.01, 0.02, 0.03, 0.05):
        rng = np.random.default_rng(int(q * 1000))
        x = rng.integers(0, 2, BLOCK_BITS, dtype=np.uint8)
        y = x ^ (rng.random(BLOCK_BITS) < q).astype(np.uint8)
        h = BLOCK_BITS * binary_entropy(float((x != y).mean()))
        stats, _, seconds = _exchange("ldpc", x, y, q)
        c_stats, c_alice, _ = _exchange("cascade", x, y, q)
        print(
            f" {q:.2f}  | {stats['leak_bits'] / h:6.3f} | "
            f"{stats['frame_errors'] / stats['frames']:9.3f} | "
            f"{stats['frames_discarded'] / stats['frames']:9.3f} | "
            f"{stats['frames']:6d} | {stats['retry_rounds']:12d} | "
            f"{BLOCK_BITS / seconds / 1e6:11.3f} | {c_alice['leak_bits'] / h:17.3f} | "
            f"{c_stats['leak_bits'] / h:21.3f} | {c_stats['rounds']:d}"
        )


def test_bench_decoder_against_ldpc_package():
    from ldpc import BpDecoder

    code = ldpc.construct(ldpc.FRAME_BITS, 0.8, 1)
    q, frames = 0.02, 6
    rng = np.random.default_rng(5)
    x = rng.integers(0, 2, (frames, code.n), dtype=np.uint8)
    e = (rng.random((frames, code.n)) < q).astype(np.uint8)
    y = x ^ e
    syndromes = code.syndrome(x)
    llr = np.stack([ldpc.channel_llr(row, q) for row in y])
    out = np.zeros_like(x)
    iters = np.zeros(frames, np.int64)
    ldpc.decode_frames(
        llr[:1], syndromes[:1], code.check_ptr, code.check_var, 100, out[:1], iters[:1]
    )  # compile outside the timing
    t0 = time.perf_counter()
    ok = ldpc.decode_frames(llr, syndromes, code.check_ptr, code.check_var, 100, out, iters)
    ours = time.perf_counter() - t0
    H = scipy.sparse.csr_matrix(
        (np.ones(code.edges, np.uint8), code.check_var, code.check_ptr), shape=(code.m, code.n)
    )
    decoder = BpDecoder(
        H, error_rate=q, max_iter=100, bp_method="product_sum", schedule="parallel"
    )
    t0 = time.perf_counter()
    theirs_ok = 0
    for f in range(frames):
        # the package decodes the error pattern from its syndrome H e = s_A + H y
        s_err = (syndromes[f] ^ code.syndrome(y[f])[0]).astype(np.uint8)
        theirs_ok += np.array_equal(decoder.decode(s_err), e[f])
    theirs = time.perf_counter() - t0
    bits = frames * code.n
    print(
        f"\nBP decoder, {frames} frames of {code.n} bits at QBER {q}: ours "
        f"{bits / ours / 1e6:.3f} Mbit/s ({int(ok.sum())} decoded, layered, 2 threads), "
        f"ldpc.BpDecoder {bits / theirs / 1e6:.3f} Mbit/s ({theirs_ok} decoded, flooding); "
        f"ratio {theirs / ours:.1f}x"
    )


def test_bench_privacy_amplification_against_one_fft():
    n, l = 1_600_000, 300_000
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    seed = rng.integers(0, 2, n + l - 1, dtype=np.uint8)
    pa.toeplitz_hash(x[:1000], seed[: 1000 + 99], 100)
    t0 = time.perf_counter()
    _, margin = pa.toeplitz_hash(x, seed, l)
    pa_s = time.perf_counter() - t0
    size = scipy.fft.next_fast_len(seed.size + n - 1, real=True)
    t0 = time.perf_counter()
    scipy.fft.rfft(seed.astype(np.float64), size)
    fft_s = time.perf_counter() - t0
    print(
        f"\nToeplitz PA {n} -> {l} bits: {pa_s * 1e3:.0f} ms ({n / pa_s / 1e6:.1f} Mbit/s), "
        f"one real FFT of the same size {fft_s * 1e3:.0f} ms: ratio {pa_s / fft_s:.1f}; "
        f"worst rounding distance {margin:.2e}"
    )


def test_bench_micius_pass_end_to_end(tmp_path):
    pass_dir = tmp_path / "micius"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "host.cli",
            "simulate",
            "--profile",
            "micius-2017",
            "--seed",
            "1",
            "--out",
            str(pass_dir),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    duration_s = json.loads((pass_dir / "pass.json").read_text())["simulator"]["geometry"][
        "duration_s"
    ]
    for tail in ("hoeffding", "chernoff"):
        report = run_local(pass_dir, tmp_path / f"out-{tail}", Config(tail=tail))
        assert not report["aborted"], report["abort_reason"]
        sifted = report["sifted_bits"]
        stages = report["stage_seconds"]
        print(
            f"\nmicius-2017 seed 1, {tail}: key {report['key_bits']} bits "
            f"({report['key_bits'] / 300_939:.2f} x published 300,939), sifted {sifted}, "
            f"QBER Z {report['qber']['Z']:.4f} X {report['qber']['X']:.4f}, "
            f"EC f {report['ec']['efficiency']:.3f}, "
            f"bytes A->B {report['classical_bytes']['alice_to_bob']} "
            f"B->A {report['classical_bytes']['bob_to_alice']}, "
            f"auth key {report['auth_key_bits_used']} bits"
        )
        for name, seconds in sorted(stages.items()):
            print(
                f"  {name:24s} {seconds:8.2f} s  {sifted / max(seconds, 1e-9) / 1e6:8.3f} "
                "sifted Mbit/s"
            )
        print(f"  time to distil / pass duration: {stages['total'] / duration_s:.3f}")
