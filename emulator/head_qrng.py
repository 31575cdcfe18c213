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
        self._stuck_from: int | None = None  # fault injection (stick_from), else None
        self._stuck_word = 0

    def stick_from(self, word_index: int, word: int = 0) -> None:
        """Fault injection (tests): the physical source sticks from slot word `word_index`
        on, every word from there `word` (a dead detector, a saturated ADC). What the
        head's own health tests must catch (emulator/pattern_generator.py)."""
        self._stuck_from = int(word_index)
        self._stuck_word = int(word) & 0xFFFFFFFF

    def stuck_from(self) -> int | None:
        """The first stuck word, or None for a healthy source."""
        return self._stuck_from

    def __repr__(self) -> str:  # never the key
        return f"HeadQrng(fifo_bytes_out={self.fifo_bytes_out})"

    def __reduce__(self):
        raise TypeError("the head's QRNG stays in the head: it cannot be pickled")

    def slot_words(self, slot_indices) -> np.ndarray:
        """u32 word of each generated slot (any slots, any order)."""
        words = keyed_slot_words(self._key, slot_indices)
        if self._stuck_from is not None:
            slots = np.asarray(slot_indices, dtype=np.int64).reshape(-1)
            words = words.copy()
            words[slots >= self._stuck_from] = self._stuck_word
        return words

    def slot_words_range(self, first: int, count: int) -> np.ndarray:
        """Words of slots first..first+count-1."""
        return self.slot_words(np.arange(first, first + count, dtype=np.int64))

    def fifo_bytes(self, count: int) -> bytes:
        """The next `count` bytes of the QRNG FIFO stream."""
        self.fifo_bytes_out += count
        return self._fifo.update(bytes(count))


# SP 800-90B 4.4 continuous health tests, as the firmware runs them on the QRNG FIFO's
# bytes (firmware/payload/sequencer.py qrng_health: one sample = one byte, H = 7 bits,
# alpha = 2**-40): the head's generator runs the same on its QRNG's bytes before it maps
# them (emulator/pattern_generator.py).
RCT_CUTOFF = 7
APT_WINDOW = 512
APT_CUTOFF = 27
RCT_FAILED = 1
APT_FAILED = 2


def health_failures(data: bytes) -> int:
    """0, or RCT_FAILED | APT_FAILED: the repetition count test (a run of RCT_CUTOFF
    equal bytes) and the adaptive proportion test (the first byte of a 512-byte window
    seen APT_CUTOFF times in it) over `data`, from a fresh state."""
    samples = np.frombuffer(bytes(data), dtype=np.uint8)
    failed = 0
    if samples.size == 0:
        return failed
    starts = np.flatnonzero(np.diff(samples) != 0) + 1
    edges = np.concatenate(([0], starts, [samples.size]))
    if int(np.diff(edges).max()) >= RCT_CUTOFF:
        failed |= RCT_FAILED
    for start in range(0, samples.size, APT_WINDOW):
        window = samples[start : start + APT_WINDOW]
        if int(np.count_nonzero(window == window[0])) >= APT_CUTOFF:
            failed |= APT_FAILED
            break
    return failed
