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
of the emulated head is this function, not 13 GB of RAM).
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 32
BLOCK_BYTES = 16
WORDS_PER_BLOCK = BLOCK_BYTES // 4
DOMAIN_SLOT_WORDS = 1
DOMAIN_FIFO_BYTES = 2


class HeadQrng:
    """AES-256-CTR standing in for the head's QRNG. Never log, print or pickle it."""

    def __init__(self, key: bytes | None = None):
        key = os.urandom(KEY_BYTES) if key is None else bytes(key)
        if len(key) < KEY_BYTES:
            raise ValueError(f"head QRNG key of {len(key)} bytes: at least {KEY_BYTES} needed")
        self._key = key[:KEY_BYTES]
        self._ecb = Cipher(algorithms.AES(self._key), modes.ECB())
        self._fifo = Cipher(
            algorithms.AES(self._key), modes.CTR((DOMAIN_FIFO_BYTES << 64).to_bytes(16, "big"))
        ).encryptor()
        self.fifo_bytes_out = 0

    def __repr__(self) -> str:  # never the key
        return f"HeadQrng(fifo_bytes_out={self.fifo_bytes_out})"

    def __reduce__(self):
        raise TypeError("the head's QRNG stays in the head: it cannot be pickled")

    def _blocks(self, domain: int, block_indices: np.ndarray) -> np.ndarray:
        """Keystream blocks (n, 16) uint8 for the given block indices of a domain."""
        counters = np.empty((block_indices.size, 2), dtype=">u8")
        counters[:, 0] = domain
        counters[:, 1] = block_indices
        encryptor = self._ecb.encryptor()
        out = encryptor.update(counters.tobytes()) + encryptor.finalize()
        return np.frombuffer(out, dtype=np.uint8).reshape(-1, BLOCK_BYTES)

    def slot_words(self, slot_indices) -> np.ndarray:
        """u32 word of each generated slot (any slots, any order)."""
        slots = np.asarray(slot_indices, dtype=np.int64).reshape(-1)
        if slots.size and slots.min() < 0:
            raise IndexError("negative slot index")
        blocks, inverse = np.unique(slots // WORDS_PER_BLOCK, return_inverse=True)
        words = self._blocks(DOMAIN_SLOT_WORDS, blocks.astype(np.uint64)).view("<u4")
        return words[inverse, slots % WORDS_PER_BLOCK].astype(np.uint32)

    def slot_words_range(self, first: int, count: int) -> np.ndarray:
        """Words of slots first..first+count-1 (CTR mode, the fast path for long runs)."""
        block0 = first // WORDS_PER_BLOCK
        skip = first - block0 * WORDS_PER_BLOCK
        blocks = -(-(skip + count) // WORDS_PER_BLOCK)
        nonce = ((DOMAIN_SLOT_WORDS << 64) | block0).to_bytes(16, "big")
        encryptor = Cipher(algorithms.AES(self._key), modes.CTR(nonce)).encryptor()
        stream = encryptor.update(bytes(blocks * BLOCK_BYTES))
        return np.frombuffer(stream, dtype="<u4")[skip : skip + count].copy()

    def fifo_bytes(self, count: int) -> bytes:
        """The next `count` bytes of the QRNG FIFO stream."""
        self.fifo_bytes_out += count
        return self._fifo.update(bytes(count))
