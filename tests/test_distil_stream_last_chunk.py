"""The last chunk of a basis, which the keys wait for (host/distil/stream.py
last_chunk_sizing, docs/streaming.md "The last chunk: sized for its upper bound"): one frame
after the last detection, reconciled by the real LDPC exchange (reconcile.ldpc_alice and
ldpc_bob over an in-process pipe, as reconcile.warm_up runs them)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from host.distil import reconcile
from host.distil.channel import queue_pair
from host.distil.finite_key import binary_entropy
from host.distil.protocol import Config
from host.distil.stream import last_chunk_sizing

# The jinan-1 (seed 1) pass's last chunk at its cut for the link's end: 33,606 key bits at
# 2.29 %, after a chunk of 55,474 bits whose latest 16,384 (its tail) were at 2.19 %; the
# QBER climbs towards low elevation. Throw-away bits with a fixed noise draw per seed
# (numpy: simulation only), so the rounds are fixed numbers, not a statistic.
LAST_BITS = 33_606
FRAME_BITS = 55_474
QBER_TRUE = 0.0229
QBER_TAIL = 0.0219
TAIL_BITS = 16_384
NOISE_SEEDS = range(1000, 1008)


def _reconcile(
    qber: float, sample_bits: int, seed: int, bits: int = LAST_BITS, qber_true: float = QBER_TRUE
) -> tuple[int, float]:
    """(retry rounds, f) of one chunk of `bits` at qber_true sized for (qber, sample_bits);
    both sides' keys are checked identical."""
    noise = np.random.default_rng(seed)
    alice_bits = noise.integers(0, 2, bits, dtype=np.uint8)
    flips = noise.random(bits) < qber_true
    bob_bits = alice_bits ^ flips.astype(np.uint8)
    efficiency = Config().ec_efficiency
    a_end, b_end = queue_pair(timeout_s=120.0)
    alice = {}

    def run_alice():
        try:
            alice["kept"], alice["stats"] = reconcile.ldpc_alice(
                reconcile._PipeChannel(a_end), alice_bits, qber, efficiency,
                np.random.default_rng(seed + 1), sample_bits,
            )  # fmt: skip
        finally:
            a_end.close()

    thread = threading.Thread(target=run_alice, daemon=True)
    thread.start()
    try:
        corrected, kept, stats = reconcile.ldpc_bob(  # as the stream calls it
            reconcile._PipeChannel(b_end), bob_bits, qber, efficiency, sample_bits,
            reconcile.LDPC_FIRST_F,
        )  # fmt: skip
    finally:
        b_end.close()
        thread.join()
    assert np.array_equal(corrected[kept], alice_bits[alice["kept"]])
    assert stats["leak_bits"] == alice["stats"]["leak_bits"]  # the leak counted alike
    return stats["retry_rounds"], stats["leak_bits"] / (bits * binary_entropy(flips.mean()))


@pytest.mark.slow
def test_the_last_frame_sized_for_its_upper_bound_decodes_in_a_few_rounds():
    # Sized like the chunks before it (the tail's rate, the interval of a 2 % sample of the
    # chunk it came from), a single frame starts ~0.1-0.2 in f below its threshold and the
    # retries climb 0.01 a round: here 84 rounds over the 8 seeds, up to 17 for one frame
    # (jinan-1's last chunk took 9, micius-2017's 9-17). Sized for the upper bound of its
    # error rate: 9 in all, at most 5, for ~0.01 more in f.
    cfg = Config()
    as_before = (QBER_TAIL, max(cfg.sample_min, int(cfg.sample_fraction * FRAME_BITS)))
    qber, sample_bits = last_chunk_sizing(QBER_TAIL, TAIL_BITS, LAST_BITS, FRAME_BITS)
    assert QBER_TAIL < qber < 0.03 and sample_bits == TAIL_BITS
    last = [_reconcile(qber, sample_bits, seed) for seed in NOISE_SEEDS]
    before = [_reconcile(*as_before, seed) for seed in NOISE_SEEDS]
    rounds_last, rounds_before = sum(r for r, _ in last), sum(r for r, _ in before)
    assert max(r for r, _ in last) <= 5 and rounds_last <= 12, last
    assert rounds_before >= 4 * rounds_last, before
    assert np.mean([f for _, f in last]) < np.mean([f for _, f in before]) + 0.03


@pytest.mark.slow
def test_a_short_last_frame_after_a_climbing_qber_is_sized_for_the_climb():
    # micius-2017's last chunks (a mission at load ~8.5, 2026-12-05): 12.8 and 14.3 kbit at
    # 2.36 and 2.68 %, sized from tails at ~2.0 % after chunks whose tails were at ~1.25 %:
    # 9 and 13 rounds with the bound alone. The rise from the chunk before is allowed for
    # again (StreamBob._climb, from error counts already announced): on these 8 draws 91
    # rounds in all (up to 17) with the bound alone, 15 (up to 7) with the climb, f 1.228
    # either way. (Session 12, Bob's QBER interval as wide as its real spread: 85 rounds
    # alone, 18 climbed, up to 8, f 1.225.)
    bits, qber_true, tail, tail_before = 13_000, 0.0268, 0.0199, 0.0124
    qber, sample_bits = last_chunk_sizing(tail, TAIL_BITS, bits, FRAME_BITS)
    alone = [_reconcile(qber, sample_bits, seed, bits, qber_true) for seed in NOISE_SEEDS]
    qber, sample_bits = last_chunk_sizing(
        tail, TAIL_BITS, bits, FRAME_BITS, climb=tail - tail_before
    )
    assert qber == pytest.approx(0.0323, abs=2e-4)
    climbed = [_reconcile(qber, sample_bits, seed, bits, qber_true) for seed in NOISE_SEEDS]
    rounds_climbed, rounds_alone = sum(r for r, _ in climbed), sum(r for r, _ in alone)
    assert max(r for r, _ in climbed) <= 8 and rounds_alone >= 3 * rounds_climbed, climbed
    assert np.mean([f for _, f in climbed]) < np.mean([f for _, f in alone]) + 0.05
