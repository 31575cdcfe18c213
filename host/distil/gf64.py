"""Polynomial hashing over GF(2^64): the almost-XOR-universal family behind message
authentication (Wegman-Carter) and key verification.

h_k(M) = m_1 k^L + m_2 k^(L-1) + ... + m_L k, with M cut into 64-bit little-endian blocks
(zero-padded) and a final block holding the message length in bytes, so messages of
different lengths never collide trivially. For M != M', Pr_k[h_k(M) ^ h_k(M') = c] <=
(L + 1) / 2^64 (a non-zero polynomial of degree <= L+1 has at most L+1 roots).
Field: GF(2)[x] / (x^64 + x^4 + x^3 + x + 1).
"""

from __future__ import annotations

import numba
import numpy as np

import host.distil.numba_cache  # noqa: F401 - numba's cache index locked among processes
from host.distil.pa import CARRYLESS_AVAILABLE
from host.distil.pa import _clmul64 as clmul64

_REDUCTION = np.uint64(0x1B)  # x^4 + x^3 + x + 1


@numba.njit(cache=True, nogil=True)
def gf64_mul(a: np.uint64, b: np.uint64) -> np.uint64:
    result = np.uint64(0)
    one = np.uint64(1)
    high = np.uint64(1) << np.uint64(63)
    red = np.uint64(0x1B)
    for _ in range(64):
        if b & one:
            result ^= a
        b >>= one
        carry = a & high
        a <<= one
        if carry:
            a ^= red
    return result


@numba.njit(cache=True, nogil=True)
def _horner(blocks: np.ndarray, key: np.uint64, length_block: np.uint64) -> np.uint64:
    acc = np.uint64(0)
    for i in range(blocks.size):
        acc = gf64_mul(acc ^ blocks[i], key)
    return gf64_mul(acc ^ length_block, key)


@numba.njit(cache=True, nogil=True)
def gf64_mul_carryless(a: np.uint64, b: np.uint64) -> np.uint64:
    """gf64_mul by the CPU's carry-less product (PCLMULQDQ): the same field product. The
    128-bit product's high word h stands for h x^64 = h (x^4 + x^3 + x + 1): folded in by a
    second product, whose own high word (below x^4) folds in by shifts."""
    low, high = clmul64(a, b)
    low2, high2 = clmul64(high, np.uint64(0x1B))
    one, three, four = np.uint64(1), np.uint64(3), np.uint64(4)
    return low ^ low2 ^ high2 ^ (high2 << one) ^ (high2 << three) ^ (high2 << four)


@numba.njit(cache=True, nogil=True)
def _horner_carryless(blocks: np.ndarray, key: np.uint64, length_block: np.uint64) -> np.uint64:
    acc = np.uint64(0)
    for i in range(blocks.size):
        acc = gf64_mul_carryless(acc ^ blocks[i], key)
    return gf64_mul_carryless(acc ^ length_block, key)


# Every message's tag is hashed by its sender and its receiver, one after the other: the
# bit-serial product cost ~150 ns a 64-bit block (a 3 MB sync answer or detections
# message ~60 ms each side; 0.17 CPU s of the 30 s jinan-1 pass's messages), the
# carry-less one a few ns. The same hash (tests/test_distil_channel.py compares them).
_HORNER = _horner_carryless if CARRYLESS_AVAILABLE else _horner


def poly_hash(message: bytes | np.ndarray, key: int) -> int:
    """The 64-bit hash of a byte string (or uint8 array) under a 64-bit key."""
    data = (
        np.frombuffer(bytes(message), dtype=np.uint8)
        if not isinstance(message, np.ndarray)
        else np.ascontiguousarray(message, dtype=np.uint8)
    )
    pad = (-data.size) % 8
    if pad:
        data = np.concatenate([data, np.zeros(pad, dtype=np.uint8)])
    blocks = data.view("<u8")
    return int(_HORNER(blocks, np.uint64(key), np.uint64(data.size - pad)))


def bits_hash(bits: np.ndarray, keys: tuple[int, ...]) -> bytes:
    """Verification tag of a bit string: one 64-bit hash per key, concatenated."""
    packed = np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes()
    packed += int(bits.size).to_bytes(8, "little")
    return b"".join(poly_hash(packed, k).to_bytes(8, "little") for k in keys)
