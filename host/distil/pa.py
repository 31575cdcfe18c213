"""Privacy amplification by Toeplitz hashing: y = T(seed) x over GF(2).

T (out_bits x in_bits) has T[i, j] = seed[i - j + in_bits - 1]: the seed (in + out - 1
bits) runs along the diagonals, so y_i = sum_j seed[i + n - 1 - j] x_j is coefficient
n - 1 + i of the product of the polynomials seed(t) = sum seed[k] t^k and x(t) over GF(2).

Two ways to compute it, giving the same bits:

- Carry-less (the default where the CPU has PCLMULQDQ, every x86-64 since 2010): the
  product over GF(2) itself, on the bits packed 64 to a word. Only the middle out_bits
  coefficients are needed, so x is cut into chunks of about out_bits and each chunk's
  square Toeplitz block is a middle product with its seed window, by Karatsuba's
  transpose (three half-size middle products a level) down to at most BASE_WORDS x
  BASE_WORDS schoolbook blocks of carry-less 64 x 64-bit multiplications (PCLMULQDQ);
  the chunks' results XOR into one accumulator. The work is about (in / out) Karatsuba
  products of out-bit size, against three transforms of in + out for the FFT. Integer
  arithmetic: no rounding. Checked all the same, by an independent O(in) computation
  on the unpacked bits: y(t) modulo the irreducible g = t^64 + t^4 + t^3 + t + 1 must
  equal sum_j x_j E_j(t) mod g, where E_j are the seed's windows (`_residues_of_hash`);
  a y with any error e passes only if g divides e. A failed check (a fault or a bug)
  never reaches the key: the FFT path below recomputes it, says so on stderr (sizes
  only, no bits) and counts it (`Hashed.check_failures`, report.json's
  `pa.check_failures`), since the method alone (`fft`) would not tell it from a CPU
  without PCLMULQDQ.
- FFT: the convolution in float64 (one real transform length of about in + out: a
  circular convolution of the seed's length wraps the linear one's tail onto its first
  in - 1 values only, which are not used). Its values are integers up to min(in, seed);
  the result is used only if every value is within EXACT_MARGIN of an integer, else it
  is recomputed exactly in integer blocks (never silently wrong).
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import llvmlite.binding
import numba
import numpy as np
import scipy.fft
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

import host.distil.numba_cache  # noqa: F401 - numba's cache index locked among processes

EXACT_MARGIN = 0.25
# Schoolbook at and below this many words (64 bits each). CPU time of the whole hash at
# 8 / 16 / 32 / 48 / 64 / 96 on 0.78 -> 0.13, 1.6 -> 0.3 and 5.6 -> 1.33 Mbit (docs/
# distillation.md, "Privacy amplification profile"): 32 the least, 8 2-3x it.
BASE_WORDS = 32
# t^64 + t^4 + t^3 + t + 1 (irreducible over GF(2)): its low part, t^64 = this mod g.
CHECK_POLY_LOW = np.uint64(0x1B)


def _numba_compiles_pclmul() -> bool:
    """Whether the CPU runs PCLMULQDQ and numba's code generator is allowed to emit it.
    numba compiles for NUMBA_CPU_NAME / NUMBA_CPU_FEATURES when they are set (its recipe
    for a cache portable between machines is NUMBA_CPU_NAME=generic): then the target has
    no pclmul feature and LLVM aborts the whole process ("Cannot select: intrinsic
    llvm.x86.pclmulqdq") when _clmul64 compiles. The target's features are read from
    numba's own code generator, so whatever numba decides, this agrees with it. Under
    NUMBA_DISABLE_JIT (numba's debugging switch) the intrinsic cannot run at all."""
    if numba.config.DISABLE_JIT:
        return False
    try:
        host = llvmlite.binding.get_host_cpu_features()
    except RuntimeError:  # LLVM cannot read this CPU's features: assume none
        return False
    if not host.get("pclmul", False):
        return False
    from numba.core.registry import cpu_target

    features = cpu_target.target_context.codegen()._tm_features
    return "+pclmul" in features.split(",")


CARRYLESS_AVAILABLE = _numba_compiles_pclmul()


class PrivacyAmplificationError(RuntimeError):
    pass


def seed_bits_needed(in_bits: int, out_bits: int) -> int:
    return in_bits + out_bits - 1


def fft_length(in_bits: int, out_bits: int) -> int:
    """The FFT path's transform length: the seed's length or the next fast one above it."""
    return scipy.fft.next_fast_len(seed_bits_needed(in_bits, out_bits), real=True)


@intrinsic
def _clmul64(typingctx, a, b):
    """The 128-bit carry-less product of two uint64 as (low, high) words (PCLMULQDQ)."""
    signature = types.UniTuple(types.uint64, 2)(types.uint64, types.uint64)

    def codegen(context, builder, sig, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        v2 = ir.VectorType(i64, 2)
        fnty = ir.FunctionType(v2, [v2, v2, ir.IntType(8)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.pclmulqdq")
        lane0 = ir.Constant(i32, 0)
        va = builder.insert_element(ir.Constant(v2, ir.Undefined), args[0], lane0)
        vb = builder.insert_element(ir.Constant(v2, ir.Undefined), args[1], lane0)
        product = builder.call(fn, [va, vb, ir.Constant(ir.IntType(8), 0)])
        low = builder.extract_element(product, lane0)
        high = builder.extract_element(product, ir.Constant(i32, 1))
        return context.make_tuple(builder, sig.return_type, [low, high])

    return signature, codegen


@numba.njit(cache=True)
def _middle_product(s, x, r, scratch, words):
    """r[:words] = words `words` .. 2 words - 1 of s[:2 words] * x[:words] over GF(2)
    (the middle third of the product; words a power of two times at most BASE_WORDS).
    Karatsuba's transpose: the words x words Toeplitz matrix of s in 2 x 2 blocks
    [[A, B], [C, A]] gives r = (A (x0 + x1) + (A + B) x1, A (x0 + x1) + (A + C) x0),
    three half-size middle products, so it costs one Karatsuba product of x's size.
    scratch holds 4 words."""
    if words <= BASE_WORDS:
        for j in range(words):
            xj = x[j]
            # s[m] x_j lands on words m + j - words (low) and m + j - words + 1 (high): of
            # m = words - 1 - j only the high word is in r, of m = 2 words - 1 - j the low
            low, carry = _clmul64(s[words - 1 - j], xj)
            for k in range(words):
                low, high = _clmul64(s[words - j + k], xj)
                if j == 0:
                    r[k] = low ^ carry
                else:
                    r[k] ^= low ^ carry
                carry = high
        return
    h = words // 2
    x_sum, s_sum, part = scratch[:h], scratch[h : 3 * h], scratch[3 * h : 4 * h]
    deeper = scratch[4 * h :]
    for i in range(h):
        x_sum[i] = x[i] ^ x[h + i]
    _middle_product(s[h : 3 * h], x_sum, r[:h], deeper, h)  # A (x0 + x1), both halves'
    for i in range(h):
        r[h + i] = r[i]
    for i in range(2 * h):
        s_sum[i] = s[h + i] ^ s[i]  # A + B: B is the upper right block (s[:2h])
    _middle_product(s_sum, x[h:], part, deeper, h)
    for i in range(h):
        r[i] ^= part[i]
    for i in range(2 * h):
        s_sum[i] = s[h + i] ^ s[2 * h + i]  # A + C
    _middle_product(s_sum, x[:h], part, deeper, h)
    for i in range(h):
        r[h + i] ^= part[i]


@numba.njit(cache=True)
def _chunked_middle_product(seed_words, x_words, chunks, words):
    """The XOR over x's chunks k of the middle products of chunk k with its seed window."""
    acc = np.zeros(words, np.uint64)
    part = np.empty(words, np.uint64)
    scratch = np.empty(4 * words, np.uint64)
    for k in range(chunks):
        window = (chunks - 1 - k) * words
        _middle_product(
            seed_words[window : window + 2 * words],
            x_words[k * words : (k + 1) * words],
            part,
            scratch,
            words,
        )
        for i in range(words):
            acc[i] ^= part[i]
    return acc


@numba.njit(cache=True)
def _times_t(v):
    """v t mod the check polynomial."""
    return (v << np.uint64(1)) ^ (CHECK_POLY_LOW * (v >> np.uint64(63)))


@numba.njit(cache=True)
def _residues_of_hash(x, seed, y):
    """(y(t), sum_j x_j E_j(t)) mod the check polynomial, equal if y = T(seed) x: with
    E_m(t) = sum_(d < out) seed[m + d] t^d, y(t) = sum_i y_i t^i = sum_m x_(n-1-m) E_m(t),
    and E_(m+1) = (E_m + seed[m] + seed[m + out] t^out) / t. Bit by bit over the
    uint8 bits themselves: independent of the packing and of the product's algorithm."""
    n, out = x.size, y.size
    one = np.uint64(1)
    y_residue = np.uint64(0)
    for i in range(out - 1, -1, -1):
        y_residue = _times_t(y_residue) ^ np.uint64(y[i])
    window = np.uint64(0)  # E_0
    t_out = one  # t^out
    for d in range(out - 1, -1, -1):
        window = _times_t(window) ^ np.uint64(seed[d])
        t_out = _times_t(t_out)
    total = np.uint64(0)
    for m in range(n):
        total ^= window * np.uint64(x[n - 1 - m])
        if m + 1 < n:
            v = window ^ np.uint64(seed[m]) ^ (t_out * np.uint64(seed[m + out]))
            low = v & one
            # v / t: v + g is divisible by t when v's constant term is 1 (g's is)
            window = ((v ^ (CHECK_POLY_LOW * low)) >> one) | (low << np.uint64(63))
    return y_residue, total


def chunk_plan(in_bits: int, out_bits: int) -> tuple[int, int]:
    """(words, chunks) of the least schoolbook work: x in `chunks` chunks of `words`
    64-bit words, each a words x words middle product with its seed window; words holds
    the out_bits outputs and 63 bits of the window's alignment."""
    need = -(-(out_bits + 63) // 64)
    best = None
    for base in range(1, BASE_WORDS + 1):
        words, levels = base, 0
        while words < need:
            words, levels = 2 * words, levels + 1
        if levels and 2 * base <= BASE_WORDS:
            continue  # the same size as 2 base one level less: fewer calls, same work
        while True:
            chunks = -(-in_bits // (64 * words))
            work = chunks * 3**levels * base * base
            if best is None or work < best[0]:
                best = (work, words, chunks)
            if chunks == 1:
                break
            words, levels = 2 * words, levels + 1
    return best[1], best[2]


def _pack_words(bits: np.ndarray, offset_bits: int, total_bits: int) -> np.ndarray:
    """bits placed at offset_bits in total_bits (a multiple of 64) zero bits, as uint64
    words, bit i of the array at bit i % 64 of word i // 64."""
    placed = np.zeros(total_bits, np.uint8)
    placed[offset_bits : offset_bits + bits.size] = bits
    return np.packbits(placed, bitorder="little").view("<u8")


def toeplitz_hash_carryless(
    x: np.ndarray, seed: np.ndarray, out_bits: int
) -> tuple[np.ndarray, bool]:
    """y = T(seed) x over GF(2) by carry-less middle products; (y, whether it passed the
    check modulo the check polynomial)."""
    n = x.size
    words, chunks = chunk_plan(n, out_bits)
    padded = chunks * 64 * words  # x padded with zeros at its end to whole chunks
    # y_i = coefficient padded - 1 + i of seed2(t) x(t) with seed2[m] = seed[m + n - padded]
    # (the zeros before the seed meet x's padding only); with one more word below each
    # chunk's window (its bits reach only lower coefficients), chunk k's window starts at
    # word (chunks - 1 - k) words and y is bit 63 + i of its middle product.
    seed_words = _pack_words(seed, 64 + padded - n, padded + 64 * words)
    x_words = _pack_words(x, 0, padded)
    acc = _chunked_middle_product(seed_words, x_words, chunks, words)
    y = np.unpackbits(acc.view(np.uint8), bitorder="little")[63 : 63 + out_bits].copy()
    y_residue, expected = _residues_of_hash(x, seed, y)
    return y, bool(y_residue == expected)


def _convolve_exact_blocks(seed: np.ndarray, x: np.ndarray, out_bits: int) -> np.ndarray:
    """Slow path: the same product with integer block arithmetic (numpy dot per block)."""
    n = x.size
    y = np.zeros(out_bits, dtype=np.uint8)
    xi = x.astype(np.int64)
    for start in range(0, out_bits, 256):
        stop = min(out_bits, start + 256)
        rows = np.lib.stride_tricks.sliding_window_view(seed[start : stop + n - 1], n)[:, ::-1]
        y[start:stop] = (rows.astype(np.int64) @ xi) & 1
    return y


class Hashed(NamedTuple):
    bits: np.ndarray  # y, uint8 bits
    rounding_margin: float  # the FFT's worst distance from an integer; 0.0 when carry-less
    method: str  # "carry-less", "fft" or "exact-blocks": which computation gave y
    check_failures: int = 0  # 1 when the carry-less product failed its check (then fft)


def toeplitz_hash_fft(x: np.ndarray, seed: np.ndarray, out_bits: int) -> Hashed:
    """y by the float64 FFT convolution, with the worst rounding distance. Falls back to
    the exact integer blocks ("exact-blocks") if any value is not within EXACT_MARGIN of
    an integer."""
    n = x.size
    size = fft_length(n, out_bits)
    # The seed's and the input's transforms in one batched call from one zero-padded array
    # (no separate float copies). Two workers, a row each, measured no faster on the
    # shared 2-core machine (2.82x one FFT against 2.61x with one), so one.
    padded = np.zeros((2, size), dtype=np.float64)
    padded[0, : seed.size] = seed
    padded[1, :n] = x
    spectra = scipy.fft.rfft(padded, axis=1, overwrite_x=True)
    spectrum = spectra[0]
    spectrum *= spectra[1]
    conv = scipy.fft.irfft(spectrum, size, overwrite_x=True)[n - 1 : n - 1 + out_bits]
    rounded = np.rint(conv)
    worst = float(np.max(np.abs(conv - rounded)))
    if not worst < EXACT_MARGIN:
        return Hashed(
            _convolve_exact_blocks(seed.astype(np.uint8), x, out_bits), worst, "exact-blocks"
        )
    return Hashed((rounded.astype(np.int64) & 1).astype(np.uint8), worst, "fft")


def toeplitz_hash(x: np.ndarray, seed: np.ndarray, out_bits: int) -> Hashed:
    """y = T(seed) x over GF(2), by the carry-less product where the CPU has it and its
    check passed, else by the FFT (and its exact fallback)."""
    x = np.asarray(x, dtype=np.uint8)
    seed = np.asarray(seed, dtype=np.uint8)
    n = x.size
    if out_bits <= 0:
        return Hashed(np.zeros(0, dtype=np.uint8), 0.0, "carry-less")
    if out_bits > n:  # more output than input: the extra bits are not key, whatever the seed
        raise PrivacyAmplificationError(f"{out_bits} output bits from a {n}-bit input")
    if seed.size != seed_bits_needed(n, out_bits):
        raise PrivacyAmplificationError(
            f"Toeplitz seed has {seed.size} bits, needs {seed_bits_needed(n, out_bits)}"
        )
    check_failures = 0
    if CARRYLESS_AVAILABLE:
        y, checked = toeplitz_hash_carryless(x, seed, out_bits)
        if checked:
            return Hashed(y, 0.0, "carry-less")
        check_failures = 1
        # sizes only: the hash, its input and the seed stay out of any log; one write of
        # the whole line, as Alice and Bob may hash at once (threads of one process)
        sys.stderr.write(
            f"qkdsat: privacy amplification: the carry-less product ({n} -> {out_bits} bits) "
            "failed its check modulo t^64 + t^4 + t^3 + t + 1; recomputed by the FFT\n"
        )
        sys.stderr.flush()
    return toeplitz_hash_fft(x, seed, out_bits)._replace(check_failures=check_failures)


# The warm-up's block: big enough for the Karatsuba levels and the chunk loop, so every
# function of the carry-less path is compiled for the types the key blocks use.
WARM_UP_BITS = 4096


def warm_up() -> float:
    """Hash throw-away bits (a public numpy generator: no key material) once, so that the
    hashing's machine code is loaded (numba's cache) or compiled before the pass, not at
    its end: with an empty cache the first hashing of a process took 3.9-4.2 s of which
    ~0.1 s hashing (jinan-1's 1.33 Mbit block at load ~8.8, against 0.9 s with the cache),
    a cost the stream's reserve at the link's end (stream.pa_rest_s) does not hold.
    Returns its wall seconds."""
    import time

    started = time.perf_counter()
    throwaway = np.random.default_rng(20261205)
    out_bits = WARM_UP_BITS * 3 // 4
    x = throwaway.integers(0, 2, WARM_UP_BITS, dtype=np.uint8)
    seed = throwaway.integers(0, 2, seed_bits_needed(WARM_UP_BITS, out_bits), dtype=np.uint8)
    toeplitz_hash(x, seed, out_bits)
    return time.perf_counter() - started
