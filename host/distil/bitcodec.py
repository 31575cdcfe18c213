"""Compact encodings for protocol messages (their size is a figure of merit)."""

from __future__ import annotations

import numba
import numpy as np


def varint_encode(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of each value, vectorised (values < 2**63)."""
    v = np.asarray(values, dtype=np.uint64)
    if v.size == 0:
        return b""
    nbytes = np.ones(v.size, dtype=np.int64)
    for k in range(1, 10):
        nbytes += (v >= np.uint64(1) << np.uint64(7 * k)).astype(np.int64)
    ends = np.cumsum(nbytes)
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    starts = ends - nbytes
    for k in range(int(nbytes.max())):
        sel = nbytes > k
        chunk = ((v[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        more = (nbytes[sel] > k + 1).astype(np.uint8) << 7
        out[starts[sel] + k] = chunk | more
    return out.tobytes()


def varint_decode(data: bytes, count: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    last = np.nonzero((raw & 0x80) == 0)[0]
    if last.size != count or (raw.size and last[-1] != raw.size - 1):
        raise ValueError(f"varint stream holds {last.size} values, expected {count}")
    starts = np.concatenate([[0], last[:-1] + 1])
    lengths = last - starts + 1
    out = np.zeros(count, dtype=np.uint64)
    for k in range(int(lengths.max()) if count else 0):
        sel = lengths > k
        out[sel] |= (raw[starts[sel] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return out


def encode_sorted(slots: np.ndarray) -> bytes:
    """Strictly increasing int64 slot indices as varint deltas."""
    slots = np.asarray(slots, dtype=np.int64)
    if slots.size == 0:
        return b""
    deltas = np.diff(slots, prepend=np.int64(0))
    if np.any(deltas[1:] <= 0) or slots[0] < 0:
        raise ValueError("slots must be non-negative and strictly increasing")
    return varint_encode(deltas.astype(np.uint64))


def decode_sorted(data: bytes, count: int) -> np.ndarray:
    return np.cumsum(varint_decode(data, count).astype(np.int64))


def pack_bits(bits: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(bits, dtype=np.uint8))


def unpack_bits(packed: np.ndarray, count: int) -> np.ndarray:
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), count=count)


def pack_2bit(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.uint8)
    pad = (-v.size) % 4
    if pad:
        v = np.concatenate([v, np.zeros(pad, dtype=np.uint8)])
    v = v.reshape(-1, 4)
    return (v[:, 0] | (v[:, 1] << 2) | (v[:, 2] << 4) | (v[:, 3] << 6)).astype(np.uint8)


def unpack_2bit(packed: np.ndarray, count: int) -> np.ndarray:
    p = np.asarray(packed, dtype=np.uint8)
    out = np.stack([p & 3, (p >> 2) & 3, (p >> 4) & 3, (p >> 6) & 3], axis=1).reshape(-1)
    return out[:count]


# ------------------------------------------------------------------ Rice code for gaps
#
# Detected slots are sparse and nearly Poisson: their gaps are geometric, for which a Rice
# code (unary quotient, k-bit remainder) is within ~3 % of the entropy. A quotient of
# RICE_ESCAPE or more (the first slot, gaps in the data) is written as RICE_ESCAPE zeros,
# a one, then the raw 64-bit gap.

RICE_ESCAPE = 64


def rice_parameter(gaps: np.ndarray) -> int:
    mean = float(np.mean(gaps)) if gaps.size else 1.0
    return max(0, int(np.floor(np.log2(max(mean * np.log(2), 1.0)))))


@numba.njit(cache=True)
def _rice_encode(gaps, k, out):
    pos = 0
    for i in range(gaps.size):
        g = gaps[i]
        q = g >> k
        if q >= RICE_ESCAPE:
            pos += RICE_ESCAPE
            out[pos] = 1
            pos += 1
            for b in range(64):
                out[pos + b] = (g >> (63 - b)) & 1  # g >= 0: the top bit is 0
            pos += 64
        else:
            pos += q
            out[pos] = 1
            pos += 1
            for b in range(k):
                out[pos + b] = (g >> (k - 1 - b)) & 1
            pos += k
    return pos


@numba.njit(cache=True)
def _rice_decode(bits, count, k, out):
    pos = 0
    end = bits.size - 1  # the last bit is the caller's sentinel
    for i in range(count):
        q = 0
        while bits[pos] == 0:
            q += 1
            pos += 1
        pos += 1
        if pos + (64 if q >= RICE_ESCAPE else k) > end:
            return end + 1  # the stream ends early: never read past it
        value = 0
        width = 63 if q >= RICE_ESCAPE else k
        if q >= RICE_ESCAPE:
            pos += 1  # the sign bit of the raw 64-bit gap (always 0)
        for b in range(width):
            value = (value << 1) | np.int64(bits[pos + b])
        pos += width
        out[i] = value if q >= RICE_ESCAPE else (np.int64(q) << k) | value
    return pos


def rice_encode_sorted(slots: np.ndarray) -> tuple[int, np.ndarray]:
    """(k, packed bits) for strictly increasing non-negative slot indices."""
    slots = np.asarray(slots, dtype=np.int64)
    gaps = np.diff(slots, prepend=np.int64(0))
    if slots.size and (slots[0] < 0 or np.any(gaps[1:] <= 0)):
        raise ValueError("slots must be non-negative and strictly increasing")
    k = rice_parameter(gaps[1:] if gaps.size > 1 else gaps)
    # exact length: the unary quotients, a stop bit and k bits a gap, 64 more per escape
    # (a bound of 65 + k bits for every gap zeroed ~43 MB per block at 10x jinan-1's rate)
    quotients = gaps >> k
    escapes = int(np.count_nonzero(quotients >= RICE_ESCAPE))
    bound = int(np.sum(np.minimum(quotients, RICE_ESCAPE))) + slots.size * (1 + k) + 64 * escapes
    out = np.zeros(bound + 8, dtype=np.uint8)
    used = _rice_encode(gaps, np.int64(k), out)
    return k, np.packbits(out[:used])


def rice_decode_sorted(k: int, packed: np.ndarray, count: int) -> np.ndarray:
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8))
    bits = np.concatenate([bits, np.ones(1, np.uint8)])  # a sentinel stops a runaway unary
    out = np.zeros(count, dtype=np.int64)
    used = _rice_decode(bits, count, np.int64(k), out)
    if used > bits.size - 1:
        raise ValueError("Rice stream ends early")
    return np.cumsum(out)
