"""Compact encodings for protocol messages (their size is a figure of merit)."""

from __future__ import annotations

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
