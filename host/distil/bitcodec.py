"""Compact encodings for protocol messages (their size is a figure of merit)."""

from __future__ import annotations

import numba
import numpy as np

import host.distil.numba_cache  # noqa: F401 - numba's cache index locked among processes


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


# The kernels write and read the packed bits (most significant first, np.packbits' order)
# a few bits at a time: unpacked, a slot's ~13 bits took a byte each (~23 MB zeroed, packed,
# unpacked and copied for the 30 s jinan-1 pass's 1.76 M slots), and a bit at a time into
# bytes measured slower still. Encoding 45-50 -> 25 ms, decoding 45 -> 29 ms there.


@numba.njit(cache=True, inline="always")
def _put_bits(out, acc, held, at, value, count):
    """Append `count` (<= 48) bits of value to the `held` (< 8) bits in acc; whole bytes go
    to out[at], ...; returns (acc, held, at)."""
    acc = (acc << count) | value
    held += count
    while held >= 8:
        held -= 8
        out[at] = (acc >> held) & 0xFF
        at += 1
    acc &= (np.int64(1) << held) - 1
    return acc, held, at


@numba.njit(cache=True)
def _rice_encode(gaps, k, out):
    """The Rice code of the gaps into out (zeroed bytes); returns the bits written."""
    acc = np.int64(0)
    held = np.int64(0)
    at = np.int64(0)
    bits = 0
    for i in range(gaps.size):
        g = gaps[i]
        q = g >> k
        if q >= RICE_ESCAPE:  # RICE_ESCAPE zeros, a one, the raw 64-bit gap (g >= 0)
            acc, held, at = _put_bits(out, acc, held, at, np.int64(0), 32)
            acc, held, at = _put_bits(out, acc, held, at, np.int64(0), 32)
            acc, held, at = _put_bits(out, acc, held, at, np.int64(1), 1)
            acc, held, at = _put_bits(out, acc, held, at, (g >> 32) & 0xFFFFFFFF, 32)
            acc, held, at = _put_bits(out, acc, held, at, g & 0xFFFFFFFF, 32)
            bits += RICE_ESCAPE + 1 + 64
        else:
            zeros = q
            while zeros > 40:
                acc, held, at = _put_bits(out, acc, held, at, np.int64(0), 40)
                zeros -= 40
            acc, held, at = _put_bits(out, acc, held, at, np.int64(1), zeros + 1)
            rest = k
            while rest > 40:  # k > 40: gaps of 2^40 slots and more on average
                rest -= 40
                acc, held, at = _put_bits(out, acc, held, at, (g >> rest) & 0xFFFFFFFFFF, 40)
            if rest > 0:
                acc, held, at = _put_bits(out, acc, held, at, g & ((1 << rest) - 1), rest)
            bits += q + 1 + k
    if held > 0:
        out[at] = (acc << (8 - held)) & 0xFF
    return bits


@numba.njit(cache=True, inline="always")
def _get_bits(packed, pos, count):
    """The `count` (<= 48) bits from bit pos, most significant first, as an integer."""
    if count == 0:
        return np.int64(0)
    first = pos >> 3
    skip = pos & 7
    nbytes = (skip + count + 7) >> 3
    v = np.int64(0)
    for j in range(nbytes):
        v = (v << 8) | np.int64(packed[first + j])
    return (v >> (nbytes * 8 - skip - count)) & ((np.int64(1) << count) - 1)


@numba.njit(cache=True)
def _rice_decode(packed, count, k, out):
    """The gaps of a Rice code in packed bytes; returns the bits read, or (the stream ends
    early) one more than it holds, never reading past it. A 1 after its last bit stops a
    runaway unary (as the stream's own 1 would)."""
    pos = np.int64(0)
    end = np.int64(packed.size) * 8
    for i in range(count):
        q = np.int64(0)
        while pos < end:  # pos == end: the 1 after the stream
            rest = (np.int64(packed[pos >> 3]) << (pos & 7)) & 0xFF
            if rest == 0:
                step = 8 - (pos & 7)
                q += step
                pos += step
                continue
            while (rest & 0x80) == 0:
                rest <<= 1
                q += 1
                pos += 1
            break
        pos += 1
        if pos + (64 if q >= RICE_ESCAPE else k) > end:
            return end + 1  # the stream ends early: never read past it
        if q >= RICE_ESCAPE:
            pos += 1  # the sign bit of the raw 64-bit gap (always 0)
            out[i] = (_get_bits(packed, pos, 31) << 32) | _get_bits(packed, pos + 31, 32)
            pos += 63
        else:
            value = np.int64(0)
            rest = k
            while rest > 40:
                value = (value << 40) | _get_bits(packed, pos, 40)
                pos += 40
                rest -= 40
            value = (value << rest) | _get_bits(packed, pos, rest)
            pos += rest
            out[i] = (q << k) | value
    return pos


def rice_encode_sorted(slots: np.ndarray) -> tuple[int, np.ndarray]:
    """(k, packed bits) for strictly increasing non-negative slot indices."""
    slots = np.asarray(slots, dtype=np.int64)
    gaps = np.diff(slots, prepend=np.int64(0))
    if slots.size and (slots[0] < 0 or np.any(gaps[1:] <= 0)):
        raise ValueError("slots must be non-negative and strictly increasing")
    return _rice_encode_gaps(gaps)


def _rice_encode_gaps(gaps: np.ndarray) -> tuple[int, np.ndarray]:
    """rice_encode_sorted's code of the gaps, unchecked (a test's forged encoder sends a
    gap of 0 through it)."""
    k = rice_parameter(gaps[1:] if gaps.size > 1 else gaps)
    # exact length: the unary quotients, a stop bit and k bits a gap, 64 more per escape
    # (a bound of 65 + k bits for every gap zeroed ~43 MB per block at 10x jinan-1's rate)
    quotients = gaps >> k
    escapes = int(np.count_nonzero(quotients >= RICE_ESCAPE))
    bound = int(np.sum(np.minimum(quotients, RICE_ESCAPE))) + gaps.size * (1 + k) + 64 * escapes
    out = np.zeros((bound + 7) // 8 + 1, dtype=np.uint8)
    used = _rice_encode(gaps, np.int64(k), out)
    return k, out[: (used + 7) // 8].copy()


def rice_decode_sorted(k: int, packed: np.ndarray, count: int) -> np.ndarray:
    """The `count` slots of a Rice code with parameter k (rice_encode_sorted). k and count
    come from the peer's message: a k outside 0..63 (a negative one moved the kernel's
    read position before the stream, where numba checks no bounds) or a negative count
    raises ValueError, as a stream too short for `count` slots does."""
    k, count = int(k), int(count)
    if not 0 <= k < 64:
        raise ValueError(f"Rice parameter {k} outside 0..63")
    if count < 0:
        raise ValueError(f"Rice-coded slot count {count} is negative")
    # a writable copy (a message's arrays are read-only views): the kernel's one signature,
    # the one the setup's warm-up compiles
    packed = np.array(packed, dtype=np.uint8).reshape(-1)
    # every slot takes at least 1 + k bits: a count the stream cannot hold is refused
    # before its output is allocated (a peer's count of 10^12 was a MemoryError)
    if count * (1 + k) > packed.size * 8:
        raise ValueError("Rice stream ends early")
    out = np.zeros(count, dtype=np.int64)
    used = _rice_decode(packed, count, np.int64(k), out)
    if used > packed.size * 8:
        raise ValueError("Rice stream ends early")
    return np.cumsum(out)
