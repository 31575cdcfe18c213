"""Toeplitz privacy amplification by FFT, cross-checked against randextract."""

import numpy as np
import pytest
from galois import GF2
from randextract import ToeplitzHashing

from host.distil import pa


@pytest.mark.parametrize("n,l", [(64, 20), (1000, 333), (4099, 2048)])
def test_toeplitz_fft_matches_randextract(n, l):
    rng = np.random.default_rng(n)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    seed = rng.integers(0, 2, n + l - 1, dtype=np.uint8)
    y, margin = pa.toeplitz_hash(x, seed, l)
    assert margin < 1e-6
    ext = ToeplitzHashing(n, l)
    # randextract's M[i, j] = seed[i - j] (negative indices wrap); ours seed[i - j + n - 1]
    theirs = ext.extract(GF2(x), GF2(np.roll(seed, -(n - 1))))
    assert np.array_equal(y, np.asarray(theirs, dtype=np.uint8))


def test_large_input_is_exact_against_the_block_integer_path():
    rng = np.random.default_rng(3)
    n, l = 200_000, 1_000
    x = rng.integers(0, 2, n, dtype=np.uint8)
    seed = rng.integers(0, 2, n + l - 1, dtype=np.uint8)
    y, margin = pa.toeplitz_hash(x, seed, l)
    assert margin < pa.EXACT_MARGIN
    assert np.array_equal(y, pa._convolve_exact_blocks(seed, x, l))


def test_inexact_fft_falls_back_to_exact(monkeypatch):
    monkeypatch.setattr(pa, "EXACT_MARGIN", -1.0)  # force the check to reject the FFT
    rng = np.random.default_rng(4)
    x = rng.integers(0, 2, 300, dtype=np.uint8)
    seed = rng.integers(0, 2, 399, dtype=np.uint8)
    y, _ = pa.toeplitz_hash(x, seed, 100)
    T = np.array([[seed[i - j + 299] for j in range(300)] for i in range(100)])
    assert np.array_equal(y, (T @ x) % 2)


def test_wrong_seed_length_is_refused():
    with pytest.raises(pa.PrivacyAmplificationError, match="needs"):
        pa.toeplitz_hash(np.zeros(10, np.uint8), np.zeros(10, np.uint8), 5)


def test_circular_transform_of_the_seeds_length_is_exact_where_its_wrap_lands():
    """The transform is only the seed's length (n + l - 1), so the linear convolution's
    tail wraps around; it must land only on the n - 1 values that are not output. With
    the first and last rows of T (the seed's ends) carrying all the ones, a wrong wrap
    would change the output; checked against the matrix product."""
    n, l = 257, 100
    rng = np.random.default_rng(7)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    x[-1] = 1
    seed = rng.integers(0, 2, n + l - 1, dtype=np.uint8)
    seed[:8] = 1
    seed[-8:] = 1
    assert pa.fft_length(n, l) < 2 * n + l - 2  # shorter than the linear convolution
    y, margin = pa.toeplitz_hash(x, seed, l)
    T = np.array([[seed[i - j + n - 1] for j in range(n)] for i in range(l)])
    assert margin < 1e-6
    assert np.array_equal(y, (T @ x) % 2)


def test_more_output_than_input_is_refused():
    """main's toeplitz_hash returned 300 bits from a 100-bit input (issue 16 item 5): only
    the protocol's caller checked; the hash itself must never stretch a key."""
    seed = np.zeros(pa.seed_bits_needed(100, 300), np.uint8)
    with pytest.raises(pa.PrivacyAmplificationError, match="300 output bits from a 100-bit"):
        pa.toeplitz_hash(np.zeros(100, np.uint8), seed, 300)
    assert (
        pa.toeplitz_hash(np.ones(100, np.uint8), seed[: pa.seed_bits_needed(100, 100)], 100)[
            0
        ].size
        == 100
    )
