"""The emulated optical head's physical random source (docs/sequencer.md "Head QRNG").

Real hardware uses the bits of its quantum random number generator themselves: nothing
about them can be recomputed, by anyone. The emulator stands in for that physics with
AES-256 in counter mode (`cryptography`), keyed with 32 bytes from `os.urandom` (or a
test's fixture) when the head is built. The key is part of the emulated physics:

- it lives in this object only (`_key`), inside the emulated head;
- no register, bus operation, product, telemetry packet, message or log carries it or
  anything it was derived from other than the symbols the head emits and keeps in its
  pattern memory, which only the satellite side reads (the pattern-memory port);
- tests that need what was emitted get it through the emulator's truth interface
  (`emulator.pattern_generator.PatternGenerator.truth()`), as `truth/` works today.

Two streams come out of it, in disjoint counter domains so they never share a block:

- `slot_words(i)`: the u32 word of generated slot i (the head's generator at the slot
  clock, mapped by the integer thresholds of host/protocol/symbols.py);
- `fifo_bytes(n)`: the bytes the controller reads from the QRNG FIFO (controller-driven
  patterns, docs/sequencer.md).

AES-CTR is random access: keystream block j is AES_k(domain << 64 | j), so the word of any
slot is computed without the ones before it (a pass has ~3e10 slots; the pattern memory
of the emulated head is this function, not 13 GB of RAM):
`host.protocol.symbols.keyed_slot_words`, shared with simulations.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from host.protocol.symbols import keyed_slot_words

KEY_BYTES = 32
DOMAIN_SLOT_WORDS = 1
DOMAIN_FIFO_BYTES = 2


class HeadQrng:
    """AES-256-CTR standing in for the head's QRNG. Never log, print or pickle it."""

    def __init__(self, key: bytes | None = None):
        key = os.urandom(KEY_BYTES) if key is None else bytes(key)
        if len(key) < KEY_BYTES:
            raise ValueError(f"head QRNG key of {len(key)} bytes: at least {KEY_BYTES} needed")
        self._key = key[:KEY_BYTES]
        self._fifo = Cipher(
            algorithms.AES(self._key), modes.CTR((DOMAIN_FIFO_BYTES << 64).to_bytes(16, "big"))
        ).encryptor()
        self.fifo_bytes_out = 0

    def __repr__(self) -> str:  # never the key
        return f"HeadQrng(fifo_bytes_out={self.fifo_bytes_out})"

    def __reduce__(self):
        raise TypeError("the head's QRNG stays in the head: it cannot be pickled")

    def slot_words(self, slot_indices) -> np.ndarray:
        """u32 word of each generated slot (any slots, any order)."""
        return keyed_slot_words(self._key, slot_indices)

    def slot_words_range(self, first: int, count: int) -> np.ndarray:
        """Words of slots first..first+count-1."""
        return keyed_slot_words(self._key, np.arange(first, first + count, dtype=np.int64))

    def fifo_bytes(self, count: int) -> bytes:
        """The next `count` bytes of the QRNG FIFO stream."""
        self.fifo_bytes_out += count
        return self._fifo.update(bytes(count))
