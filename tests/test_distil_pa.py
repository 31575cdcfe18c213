"""Toeplitz privacy amplification: the carry-less product and the FFT, cross-checked
against randextract, against each other and against main's keys (golden digests)."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from galois import GF2, Poly
from randextract import ToeplitzHashing

from host.distil import pa

carryless = pytest.mark.skipif(not pa.CARRYLESS_AVAILABLE, reason="no PCLMULQDQ on this CPU")


def _carryless(x, seed, l):
    y, checked = pa.toeplitz_hash_carryless(x, seed, l)
    assert checked
    return y


def _fft(x, seed, l):
    hashed = pa.toeplitz_hash_fft(x, seed, l)
    assert hashed.rounding_margin < 1e-6
    return hashed.bits


PATHS = [pytest.param(_carryless, marks=carryless, id="carry-less"), pytest.param(_fft, id="fft")]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n,l", [(64, 20), (1000, 333), (4099, 2048)])
def test_toeplitz_matches_randextract(path, n, l):
    rng = np.random.default_rng(n)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    seed = rng.integers(0, 2, n + l - 1, dtype=np.uint8)
    y = path(x, seed, l)
    ext = ToeplitzHashing(n, l)
    # randextract's M[i, j] = seed[i - j] (negative indices wrap); ours seed[i - j + n - 1]
    theirs = ext.extract(GF2(x), GF2(np.roll(seed, -(n - 1))))
    assert np.array_equal(y, np.asarray(theirs, dtype=np.uint8))


@pytest.fixture(scope="module")
def large_input_and_exact_hash():
    """200,000 -> 1,000 bits and its hash by the integer blocks (2-4 s: once)."""
    rng = np.random.default_rng(3)
    n, l = 200_000, 1_000
    x = rng.integers(0, 2, n, dtype=np.uint8)
    seed = rng.integers(0, 2, n + l - 1, dtype=np.uint8)
    return x, seed, l, pa._convolve_exact_blocks(seed, x, l)


@pytest.mark.parametrize("path", PATHS)
def test_large_input_is_exact_against_the_block_integer_path(path, large_input_and_exact_hash):
    x, seed, l, exact = large_input_and_exact_hash
    assert np.array_equal(path(x, seed, l), exact)


# sha256 of np.packbits(y) from main's toeplitz_hash (the FFT path, 5ff717b) for inputs
# drawn by default_rng(s): the keys of a pass must not change with the method.
GOLDEN = [
    (64, 20, 11, "2a1763c545fece3b3bb7a950ea0cd0674d7145b5bc670fd4d3a311d571245243"),
    (1000, 333, 12, "6d3a6bc753a588cc939b3150461104fdcf205fdf09866a8dbe4de283146b8454"),
    (4099, 2048, 13, "19f9b9f7dad8e7c948197c05c985b0ac03b4855155288ce21a1ef3c0a45ec193"),
    (100_003, 37_001, 14, "d971635377134f0afe7af74a47ef90c94f35217bd371bc73c60141facada3c60"),
    # a micius-2017 full pass's key block (docs/distillation.md)
    (782_264, 131_029, 15, "a7828aab2f1ab2101bc5fc501cf33562a894679f2d45aba4379a2fa497cf073d"),
]


@pytest.mark.parametrize("path", [*PATHS, pytest.param(None, id="default")])
@pytest.mark.parametrize("n,l,s,digest", GOLDEN, ids=[f"{g[0]}-{g[1]}" for g in GOLDEN])
def test_keys_are_bit_for_bit_those_of_mains_fft(path, n, l, s, digest):
    rng = np.random.default_rng(s)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    seed = rng.integers(0, 2, n + l - 1, dtype=np.uint8)
    if path is None:
        hashed = pa.toeplitz_hash(x, seed, l)
        assert hashed.method == ("carry-less" if pa.CARRYLESS_AVAILABLE else "fft")
        y = hashed.bits
    else:
        y = path(x, seed, l)
    assert hashlib.sha256(np.packbits(y).tobytes()).hexdigest() == digest


@carryless
def test_carryless_equals_fft_across_chunk_and_word_boundaries():
    """Sizes at the carry-less path's seams: one output bit, out = in, inputs a word or
    a chunk (64 x chunk_plan's words) long and one bit either side, outputs that just
    fit a chunk's words with the window's 63 alignment bits or just do not."""
    rng = np.random.default_rng(21)
    cases = [(1, 1), (2, 1), (2, 2), (63, 1), (64, 64), (65, 64), (70_000, 1), (9_000, 9_000)]
    words, _ = pa.chunk_plan(50_000, 5_000)
    chunk = 64 * words
    cases += [(chunk + d, 5_000) for d in (-1, 0, 1)] + [(3 * chunk + 1, 5_000)]
    for out in (64 * words - 63, 64 * words - 62):
        cases.append((4 * out + 5, out))
    for n, l in cases:
        x = rng.integers(0, 2, n, dtype=np.uint8)
        seed = rng.integers(0, 2, n + l - 1, dtype=np.uint8)
        assert np.array_equal(_carryless(x, seed, l), _fft(x, seed, l)), (n, l)


# One golden case hashed in a process of its own (run by the test below).
_HASH_IN_A_FRESH_PROCESS = """
import hashlib, numpy as np
from host.distil import pa
rng = np.random.default_rng(12)
x = rng.integers(0, 2, 1000, dtype=np.uint8)
seed = rng.integers(0, 2, 1000 + 333 - 1, dtype=np.uint8)
hashed = pa.toeplitz_hash(x, seed, 333)
print(hashed.method, hashlib.sha256(np.packbits(hashed.bits).tobytes()).hexdigest())
"""


def _output_of_a_fresh_process(program: str, env: dict, numba_cache) -> list[str]:
    """The words `program` prints, run by a new interpreter on this tree with numba's cache
    in `numba_cache` (empty: everything compiled there); it must exit 0."""
    env = dict(env, NUMBA_CACHE_DIR=str(numba_cache))
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1])]
        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    done = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


@pytest.mark.parametrize(
    "setting", [{"NUMBA_CPU_NAME": "generic"}, {"NUMBA_DISABLE_JIT": "1"}], ids=str
)
def test_a_numba_target_without_pclmul_hashes_by_the_fft_and_does_not_abort(tmp_path, setting):
    """NUMBA_CPU_NAME=generic (numba's recipe for a cache portable between machines)
    makes numba compile for a CPU without PCLMULQDQ, whatever the host has: the
    carry-less product must not be compiled then (LLVM aborted the whole process,
    'Cannot select: intrinsic llvm.x86.pclmulqdq', exit -6, before any key), and the
    keys are main's all the same. A fresh numba cache: no code compiled for the host.
    Under NUMBA_DISABLE_JIT the intrinsic cannot run (NotImplementedError before)."""
    env = dict(os.environ, **setting)
    env.pop("NUMBA_CPU_FEATURES", None)
    method, digest = _output_of_a_fresh_process(_HASH_IN_A_FRESH_PROCESS, env, tmp_path)
    assert method == "fft"
    assert digest == GOLDEN[1][3]


def test_the_check_polynomial_is_irreducible():
    """t^64 + t^4 + t^3 + t + 1: a field, so a nonzero error e of degree < 64 never
    divides out, and t (the check's evaluation point) has an inverse."""
    g = Poly.Degrees([64, 4, 3, 1, 0])
    assert g.is_irreducible()
    assert int(pa.CHECK_POLY_LOW) == sum(1 << d for d in (4, 3, 1, 0))


@carryless
def test_the_check_rejects_any_single_wrong_bit_of_the_hash_or_its_inputs():
    rng = np.random.default_rng(22)
    n, l = 5_000, 1_500
    x = rng.integers(0, 2, n, dtype=np.uint8)
    seed = rng.integers(0, 2, n + l - 1, dtype=np.uint8)
    y = _carryless(x, seed, l)
    residue, expected = pa._residues_of_hash(x, seed, y)
    assert residue == expected
    for i in (0, 1, 63, 64, 777, l - 1):
        wrong = y.copy()
        wrong[i] ^= 1
        residue, expected = pa._residues_of_hash(x, seed, wrong)
        assert residue != expected, i
    for j in (0, n // 2, n - 1):  # y checked against another input (T's column j is not 0)
        other = x.copy()
        other[j] ^= 1
        residue, expected = pa._residues_of_hash(other, seed, y)
        assert residue != expected, j


@carryless
def test_a_wrong_carryless_product_never_reaches_the_key(monkeypatch, capsys):
    """A fault in the product (one accumulator bit flipped, as a bug or a hardware fault
    would) fails the check, and the FFT recomputes the hash: the key is still right, and
    the failure is counted and said on stderr (sizes only)."""
    rng = np.random.default_rng(23)
    n, l = 20_000, 3_000
    x = rng.integers(0, 2, n, dtype=np.uint8)
    seed = rng.integers(0, 2, n + l - 1, dtype=np.uint8)
    right = _fft(x, seed, l)
    product = pa._chunked_middle_product

    def faulty(*args):
        acc = product(*args)
        acc[5] ^= np.uint64(1 << 17)  # bit 5 * 64 + 17 - 63 of y
        return acc

    monkeypatch.setattr(pa, "_chunked_middle_product", faulty)
    y, checked = pa.toeplitz_hash_carryless(x, seed, l)
    assert not checked and not np.array_equal(y, right)
    hashed = pa.toeplitz_hash(x, seed, l)
    assert hashed.method == "fft" and np.array_equal(hashed.bits, right)
    assert hashed.check_failures == 1
    assert capsys.readouterr().err == (
        f"qkdsat: privacy amplification: the carry-less product ({n} -> {l} bits) failed its "
        "check modulo t^64 + t^4 + t^3 + t + 1; recomputed by the FFT\n"
    )
    monkeypatch.setattr(pa, "_chunked_middle_product", product)
    assert pa.toeplitz_hash(x, seed, l).check_failures == 0
    assert capsys.readouterr().err == ""


def test_inexact_fft_falls_back_to_exact(monkeypatch):
    monkeypatch.setattr(pa, "EXACT_MARGIN", -1.0)  # force the check to reject the FFT
    rng = np.random.default_rng(4)
    x = rng.integers(0, 2, 300, dtype=np.uint8)
    seed = rng.integers(0, 2, 399, dtype=np.uint8)
    y = pa.toeplitz_hash_fft(x, seed, 100).bits
    T = np.array([[seed[i - j + 299] for j in range(300)] for i in range(100)])
    assert np.array_equal(y, (T @ x) % 2)


def test_wrong_seed_length_is_refused():
    with pytest.raises(pa.PrivacyAmplificationError, match="needs"):
        pa.toeplitz_hash(np.zeros(10, np.uint8), np.zeros(10, np.uint8), 5)


def test_circular_transform_of_the_seeds_length_is_exact_where_its_wrap_lands():
    """The FFT is only the seed's length (n + l - 1), so the linear convolution's tail
    wraps around; it must land only on the n - 1 values that are not output. With the
    first and last rows of T (the seed's ends) carrying all the ones, a wrong wrap would
    change the output; checked against the matrix product (and the carry-less path)."""
    n, l = 257, 100
    rng = np.random.default_rng(7)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    x[-1] = 1
    seed = rng.integers(0, 2, n + l - 1, dtype=np.uint8)
    seed[:8] = 1
    seed[-8:] = 1
    assert pa.fft_length(n, l) < 2 * n + l - 2  # shorter than the linear convolution
    T = np.array([[seed[i - j + n - 1] for j in range(n)] for i in range(l)])
    assert np.array_equal(_fft(x, seed, l), (T @ x) % 2)
    assert np.array_equal(pa.toeplitz_hash(x, seed, l).bits, (T @ x) % 2)


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


_WARM_UP_THEN_HASH_A_KEY_BLOCK = """
import numba, numpy as np
from host.distil import pa

def compiled():
    return {
        name: len(f.signatures)
        for name, f in vars(pa).items()
        if isinstance(f, numba.core.registry.CPUDispatcher)
    }

pa.warm_up()
warmed = compiled()
rng = np.random.default_rng(5)
n, out = 300_000, 200_000
x = rng.integers(0, 2, n, dtype=np.uint8)
seed = rng.integers(0, 2, pa.seed_bits_needed(n, out), dtype=np.uint8)
hashed = pa.toeplitz_hash(x, seed, out)
print(hashed.method, warmed == compiled(), min(warmed.values()))
"""


@pytest.mark.slow  # 4-13 s at load 8-10: a fresh process compiles the hashing
@carryless
def test_the_warm_up_compiles_everything_a_key_blocks_hashing_runs(tmp_path):
    """With numba's cache empty (a fresh install on the payload processor, a clean CI
    clone) the first hashing of a process compiles the carry-less path, ~4 s at load 8-9
    against the ~0.1 s of a 1.33 Mbit block's hashing: the stream's reserve at the link's
    end (stream.pa_rest_s) counts the hashing only. pa.warm_up, which both stream
    endpoints run before the pass clock starts, must leave nothing to compile for a key
    block's hashing (no dispatcher gains a signature)."""
    method, unchanged, fewest = _output_of_a_fresh_process(
        _WARM_UP_THEN_HASH_A_KEY_BLOCK, dict(os.environ), tmp_path
    )
    assert method == "carry-less"
    assert int(fewest) >= 1  # every dispatcher compiled by the warm-up
    assert unchanged == "True"
