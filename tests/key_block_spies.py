"""Spies on the key blocks' reconciliation (post-pass and stream tests): what each side
reconciled and the noise shares Bob decoded with (host/distil/noise_model.py)."""

import numpy as np

from host.distil import noise_model, reconcile


def spy_on_key_blocks(monkeypatch) -> tuple[list, list]:
    """Spies (that change nothing) on reconcile.ldpc_alice and ldpc_bob: the lists they
    fill, per key block (or chunk), with Alice's bits and with Bob's (bits, noise shares);
    the warm-up's throw-away blocks left out."""
    real_alice, real_bob = reconcile.ldpc_alice, reconcile.ldpc_bob
    alice, bob = [], []

    def warm_up(channel) -> bool:
        return type(channel).__name__ == "_PipeChannel"

    def alice_spy(channel, key, *args, **kwargs):
        if not warm_up(channel):
            alice.append(np.array(key))
        return real_alice(channel, key, *args, **kwargs)

    def bob_spy(channel, bits, *args, noise_share=None, **kwargs):
        if not warm_up(channel):
            bob.append((np.array(bits), noise_share))
        return real_bob(channel, bits, *args, noise_share=noise_share, **kwargs)

    monkeypatch.setattr(reconcile, "ldpc_alice", alice_spy)
    monkeypatch.setattr(reconcile, "ldpc_bob", bob_spy)
    return alice, bob


def noise_bits_err_half_the_time(alice: list, bob: list, min_noise_bits: int, windows=1) -> None:
    """Each key block's bits that Bob's prior calls pure noise (share 1: vacuum-pulse
    detections) err about half the time and the others near the optics' rate: the shares
    reach his decoder aligned with the bits (misaligned, the share-1 bits would err at the
    block's QBER, ~1 %). The others' shares are small but not 0, one per class (signal,
    decoy) and 10 s window, `windows` of them at least."""
    assert len(alice) == len(bob) > 0
    for key, (bits, share) in zip(alice, bob, strict=True):
        assert share is not None and share.shape == bits.shape == key.shape
        noise, wrong = share == 1.0, bits != key
        assert noise.sum() >= min_noise_bits
        assert wrong[noise].mean() > 0.3 and wrong[~noise].mean() < 0.03
        assert 0 < share[~noise].mean() < 0.1
        assert np.unique(share[~noise]).size >= 2 * windows


def public_entropy_ratios(share, qber: float, sample_bits: int, probe_errors, efficiency):
    """What anyone recomputes of one key block's (or chunk's) ec_sizing ratios from public
    values alone: the bits' shares, the block's sizing QBER and sample, and, for a block
    reconciled in two parts (reconcile._probe_split), the probe's announced error count
    (probe_errors[0]); the probe at the sample's interval, the rest at the pooled one
    (reconcile._after_probe, PROBE_SIGMAS), each at its low end."""
    split = reconcile._probe_split(share.size, qber, efficiency, sample_bits)
    low = reconcile.qber_interval(qber, sample_bits)[0]
    if split is None:
        parts = [(share, low)]
    else:
        probe, rest = split
        estimate, bits = reconcile._after_probe(probe_errors[0], probe.size, qber, sample_bits)
        rest_low = reconcile.qber_interval(estimate, bits, reconcile.PROBE_SIGMAS)[0]
        parts = [(share[probe], low), (share[rest], rest_low)]
    return [
        reconcile.entropy_ratio(noise_model.BitErrorModel(part), part_low, efficiency)
        for part, part_low in parts
    ]
