"""QRNG words -> BB84 decoy-state symbols: the mapping the firmware's sequencer applies
(firmware/payload/sequencer.py is the MicroPython twin; docs/sequencer.md), vectorised.

Per slot one u32 word r (4 QRNG bytes, little-endian):
    bit       = r & 1
    basis     = Z if ((r >> 1) & 0x7FFF) < round(p_Z * 2**15) else X
    intensity = smallest k with (r >> 16) < round(cumulative_p_k * 2**16)
Each probability is realised as an integer count over 2**15 or 2**16 equally likely
values, so the realised probability differs from the configured one by at most 2**-16
(half a step of 2**-15), and the three choices use disjoint bits: they are independent.

Symbol nibble (docs/formats.md): bit 0 = bit value, bit 1 = basis (1 = X), bits 2-3 =
intensity class index.

`insecure_test_pattern_words` (splitmix64 of the slot index) gives reproducible words for
simulations and tests. It is not a random source: a few dozen published symbols pin its
seed. Keys come from the head's QRNG; `keyed_slot_words` (AES-256-CTR under a secret key)
stands in for it in the emulated head (emulator/head_qrng.py) and in simulations that
need a pattern only the key's holder can compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BASIS_BITS = 15
INTENSITY_BITS = 16
MAX_INTENSITY_CLASSES = 4
PROBABILITY_TOLERANCE = 1e-9

NIBBLE_BIT = 0x1
NIBBLE_BASIS_X = 0x2
NIBBLE_INTENSITY_SHIFT = 2


class MappingError(ValueError):
    pass


@dataclass(frozen=True)
class SymbolMapping:
    """Integer thresholds realising p_Z and the intensity probabilities."""

    basis_threshold: int  # Z if the 15-bit field is below this
    intensity_thresholds: tuple[int, ...]  # cumulative, over 2**16; the last is 65536

    @classmethod
    def from_probabilities(
        cls, basis_probability_z: float, intensity_probabilities: list[float]
    ) -> SymbolMapping:
        if not 0.0 <= basis_probability_z <= 1.0:
            raise MappingError(f"basis_probability_z={basis_probability_z} is not in [0, 1]")
        count = len(intensity_probabilities)
        if not 1 <= count <= MAX_INTENSITY_CLASSES:
            raise MappingError(
                f"{count} intensity classes: between 1 and {MAX_INTENSITY_CLASSES} supported"
            )
        if any(not 0.0 <= p <= 1.0 for p in intensity_probabilities):
            raise MappingError(f"intensity probabilities {intensity_probabilities} not in [0, 1]")
        total = float(sum(intensity_probabilities))
        if abs(total - 1.0) > PROBABILITY_TOLERANCE:
            raise MappingError(f"intensity probabilities sum to {total}, not 1")
        cumulative = np.cumsum(intensity_probabilities)
        thresholds = [int(round(c * 2**INTENSITY_BITS)) for c in cumulative]
        thresholds[-1] = 2**INTENSITY_BITS
        return cls(int(round(basis_probability_z * 2**BASIS_BITS)), tuple(thresholds))

    def realised_probabilities(self) -> tuple[float, list[float]]:
        """The probabilities the integer thresholds actually give."""
        previous = 0
        intensity = []
        for threshold in self.intensity_thresholds:
            intensity.append((threshold - previous) / 2**INTENSITY_BITS)
            previous = threshold
        return self.basis_threshold / 2**BASIS_BITS, intensity

    def symbols(self, words: np.ndarray) -> np.ndarray:
        """Symbol nibbles (uint8) for an array of u32 QRNG words."""
        words = np.asarray(words, dtype=np.uint32)
        bit = (words & 1).astype(np.uint8)
        basis_x = (((words >> 1) & 0x7FFF) >= self.basis_threshold).astype(np.uint8)
        high = words >> 16
        intensity = np.zeros(words.shape, dtype=np.uint8)
        for threshold in self.intensity_thresholds[:-1]:
            intensity += (high >= threshold).astype(np.uint8)
        return bit | (basis_x << 1) | (intensity << NIBBLE_INTENSITY_SHIFT)

    def intensity_codes(self, high: np.ndarray) -> np.ndarray:
        """The intensity index (uint8) of each slot from the high 16 bits of its u32 word:
        symbols()'s intensity field alone (a threshold of 2^16 is never reached)."""
        codes = np.zeros(np.shape(high), dtype=np.uint8)
        for threshold in self.intensity_thresholds[:-1]:
            if threshold < 2**INTENSITY_BITS:
                codes += high >= threshold
        return codes


def words_from_qrng_bytes(data: bytes) -> np.ndarray:
    if len(data) % 4:
        raise MappingError(f"{len(data)} QRNG bytes: 4 per slot needed")
    return np.frombuffer(data, dtype="<u4")


def decode_symbols(nibbles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(basis_x, bit, intensity_index) arrays from symbol nibbles."""
    nibbles = np.asarray(nibbles, dtype=np.uint8)
    return (
        (nibbles >> 1) & 1,
        nibbles & 1,
        nibbles >> NIBBLE_INTENSITY_SHIFT,
    )


def pack_nibbles(nibbles: np.ndarray) -> bytes:
    """Two slots per byte, slot 2k in the low nibble of byte k (docs/formats.md)."""
    nibbles = np.asarray(nibbles, dtype=np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_nibbles(packed: bytes, count: int) -> np.ndarray:
    raw = np.frombuffer(packed, dtype=np.uint8)
    if raw.size * 2 < count:
        raise MappingError(f"{raw.size} packed bytes hold fewer than {count} slots")
    out = np.empty(raw.size * 2, dtype=np.uint8)
    out[0::2] = raw & 0x0F
    out[1::2] = raw >> 4
    return out[:count]


# ---------------------------------------------------------------- insecure test pattern

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def insecure_test_pattern_words(seed: int, slot_indices: np.ndarray) -> np.ndarray:
    """u32 word of each slot: the high half of splitmix64's output number i+1 for the
    stream seeded with `seed` (Steele, Lea & Flood 2014). Any slot, in any order.
    INSECURE: invertible and non-cryptographic; reproducible patterns for tests only."""
    index = np.asarray(slot_indices, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + (index + np.uint64(1)) * _GOLDEN_GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(32)).astype(np.uint32)


# ---------------------------------------------------------------- keyed (AES-256-CTR)

_SLOT_WORDS_DOMAIN = 1  # counter block = domain << 64 | block index (head_qrng.py)
_WORDS_PER_BLOCK = 4


def keyed_run_high_halves(key: bytes, first: int, count: int) -> np.ndarray:
    """The high 16 bits (uint16, a read-only strided view) of keyed_slot_words of the slots
    first .. first + count - 1: one CTR pass, no index array (the words are little-endian
    u32, so each one's high half is the second u16 of its 4 bytes)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if first < 0:
        raise IndexError("negative slot index")
    if count <= 0:
        return np.zeros(0, np.uint16)
    block0 = first // _WORDS_PER_BLOCK
    skip = first - block0 * _WORDS_PER_BLOCK
    blocks = -(-(skip + count) // _WORDS_PER_BLOCK)
    nonce = ((_SLOT_WORDS_DOMAIN << 64) | block0).to_bytes(16, "big")
    stream = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor().update(bytes(16 * blocks))
    return np.frombuffer(stream, dtype="<u2")[2 * skip + 1 : 2 * (skip + count) : 2]


def keyed_slot_words(key: bytes, slot_indices) -> np.ndarray:
    """u32 word of each slot: word i%4 of AES-256_key(1 << 64 | i // 4), i.e. AES-256 in
    counter mode read at any slot, in any order (a dense run costs one CTR pass)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    slots = np.asarray(slot_indices, dtype=np.int64).reshape(-1)
    if slots.size == 0:
        return np.zeros(0, np.uint32)
    lo, hi = int(slots.min()), int(slots.max())
    if lo < 0:
        raise IndexError("negative slot index")
    if hi - lo < 4 * slots.size:  # dense: one CTR pass over the span
        block0 = lo // _WORDS_PER_BLOCK
        skip = lo - block0 * _WORDS_PER_BLOCK
        blocks = -(-(skip + hi - lo + 1) // _WORDS_PER_BLOCK)
        nonce = ((_SLOT_WORDS_DOMAIN << 64) | block0).to_bytes(16, "big")
        stream = (
            Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor().update(bytes(16 * blocks))
        )
        return np.frombuffer(stream, dtype="<u4")[skip + slots - lo].astype(np.uint32)
    block_of = slots // _WORDS_PER_BLOCK
    if np.all(slots[1:] >= slots[:-1]):
        # in order (Bob's detected slots, Alice's sync windows): np.unique's blocks and
        # inverse from neighbours, without its sort
        starts = np.empty(slots.size, dtype=bool)
        starts[0] = True
        np.not_equal(block_of[1:], block_of[:-1], out=starts[1:])
        blocks, inverse = block_of[starts], np.cumsum(starts) - 1
    else:
        blocks, inverse = np.unique(block_of, return_inverse=True)
    counters = np.empty((blocks.size, 2), dtype=">u8")
    counters[:, 0] = _SLOT_WORDS_DOMAIN
    counters[:, 1] = blocks
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    words = np.frombuffer(encryptor.update(counters.tobytes()), dtype="<u4")
    # word (block i, slot % 4) of the flat stream: one index instead of two
    return words[inverse * _WORDS_PER_BLOCK + (slots % _WORDS_PER_BLOCK)].astype(np.uint32)
