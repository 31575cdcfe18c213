"""Where the endpoints' random values come from.

Every random value Alice or Bob draws is either secret (punctured LDPC bits, squashing
choices) or published but security-relevant (hash keys for verification and the EC check,
the Toeplitz seed, the sample positions): an attacker who can predict them breaks the
leftover hash lemma, the verification bound or the sampling argument. So they come from
the operating system's CSPRNG (os.urandom, the same source as `secrets`).

`SystemRandom` offers the small part of numpy's Generator interface the protocol uses, so
the code that draws does not change. `InsecureDeterministicRandom` replays a seed, for
tests that need identical runs; its name is what a reviewer sees at every call site, and
a run using it is marked insecure in its report and key file names (host/distil/run.py).
numpy generators remain right for simulation (host/simulate), never here.
"""

from __future__ import annotations

import os
import secrets

import numpy as np

_U64_SPAN = 1 << 64


def _uniform_below(span: int, size: int) -> np.ndarray:
    """`size` independent uniform integers in [0, span), span <= 2^64, by rejection of the
    top partial range of 64-bit words (no modulo bias)."""
    if not 0 < span <= _U64_SPAN:
        raise ValueError(f"range of {span} values is not in (0, 2^64]")
    if span == _U64_SPAN:
        return np.frombuffer(os.urandom(8 * size), dtype="<u8").astype(np.uint64)
    limit = (_U64_SPAN // span) * span  # accept words below this multiple of span
    out = np.empty(0, dtype=np.uint64)
    while out.size < size:
        need = size - out.size
        words = np.frombuffer(os.urandom(8 * (need + need // 8 + 4)), dtype="<u8")
        if limit < _U64_SPAN:
            words = words[words < np.uint64(limit)]
        out = np.concatenate([out, (words % np.uint64(span))[:need]])
    return out


class SystemRandom:
    """Cryptographic randomness (os.urandom) behind numpy-Generator-like calls."""

    insecure = False

    def integers(self, low, high=None, size=None, dtype=np.int64):
        if high is None:
            low, high = 0, low
        low, high = int(low), int(high)
        if high <= low:
            raise ValueError(f"empty range [{low}, {high})")
        span = high - low
        if size is None:
            value = low + secrets.randbelow(span)
            return np.dtype(dtype).type(value)
        count = int(np.prod(size))
        if span == 2 and count > 64:  # bits: one urandom byte gives eight
            bits = np.unpackbits(np.frombuffer(os.urandom((count + 7) // 8), np.uint8))
            values = bits[:count].astype(np.uint64)
        else:
            values = _uniform_below(span, count)
        out = (values.astype(object) + low) if low < 0 else values + np.uint64(low)
        return np.asarray(out).astype(dtype).reshape(size)

    def permutation(self, n: int) -> np.ndarray:
        """Uniform random permutation: Fisher-Yates with unbiased draws."""
        perm = np.arange(int(n))
        for i in range(perm.size - 1, 0, -1):
            j = secrets.randbelow(i + 1)
            perm[i], perm[j] = perm[j], perm[i]
        return perm

    def choice(self, n: int, size: int, replace: bool = False) -> np.ndarray:
        """`size` distinct values of range(n), uniform over subsets (Floyd's algorithm:
        `size` draws, whatever n)."""
        if replace:
            return self.integers(0, n, size)
        n, size = int(n), int(size)
        if size > n:
            raise ValueError(f"cannot take {size} distinct values out of {n}")
        chosen: set[int] = set()
        out = []
        for j in range(n - size, n):
            t = secrets.randbelow(j + 1)
            pick = j if t in chosen else t
            chosen.add(pick)
            out.append(pick)
        return np.array(out, dtype=np.int64)

    def bytes(self, count: int) -> bytes:
        return os.urandom(count)


class InsecureDeterministicRandom:
    """TESTS ONLY: a seeded numpy generator. Every hash key and the privacy-amplification
    seed are then known before the quantum exchange, so no key it helps make is secret."""

    insecure = True

    def __init__(self, seed: int):
        self._generator = np.random.default_rng(seed)

    def integers(self, *args, **kwargs):
        return self._generator.integers(*args, **kwargs)

    def permutation(self, n: int) -> np.ndarray:
        return self._generator.permutation(n)

    def choice(self, n: int, size: int, replace: bool = False) -> np.ndarray:
        return self._generator.choice(n, size=size, replace=replace)

    def bytes(self, count: int) -> bytes:
        return self._generator.bytes(count)


def endpoint_random(insecure_deterministic_seed: int | None = None):
    """The endpoint's source: the CSPRNG, unless a test asks for a replayable one."""
    if insecure_deterministic_seed is None:
        return SystemRandom()
    return InsecureDeterministicRandom(insecure_deterministic_seed)
