# AES-256-GCM (FIPS 197, NIST SP 800-38D) for product encryption on the ground link
# (docs/ground-link.md "Product encryption"). MicroPython 1.25's `cryptolib` needs axTLS or
# mbedTLS, which Debian's source package strips and our unix and QEMU builds therefore do
# not have (MICROPY_PY_CRYPTOLIB stays 0), so both AES and GHASH are written here in viper:
# the same code on every target. Checked against FIPS 197 / SP 800-38D vectors and against
# `cryptography` on the host (tests/vectors/aesgcm.json).
#
# AES works on 32-bit column words with the four T-tables of FIPS 197's fast form (4 KiB
# of RAM), uint and masked to 32 bits (viper ints are 32-bit on the MCU and 64-bit on the
# unix port). GHASH multiplies in GF(2^128) a nibble at a time with a 16-entry table of
# multiples of H (Shoup's method; 256 bytes per key), on four 32-bit words, every word
# masked to 32 bits.
import array

import micropython
from micropython import const

_ROUNDS = const(14)
_KEY_BYTES = const(32)
NONCE_BYTES = const(12)
TAG_BYTES = const(16)


def _tables():
    sbox = bytearray(256)
    xtime = bytearray(256)
    p = q = 1
    while True:  # p runs over GF(2^8)* by multiplying with 3, q = p^-1 by dividing by 3
        p = p ^ ((p << 1) & 0xFF) ^ (0x1B if p & 0x80 else 0)
        q ^= q << 1
        q ^= q << 2
        q ^= q << 4
        q &= 0xFF
        if q & 0x80:
            q ^= 0x09
        x = q ^ (q << 1 | q >> 7) ^ (q << 2 | q >> 6) ^ (q << 3 | q >> 5) ^ (q << 4 | q >> 4)
        sbox[p] = (x ^ 0x63) & 0xFF
        if p == 1:
            break
    sbox[0] = 0x63
    for v in range(256):
        xtime[v] = ((v << 1) ^ (0x1B if v & 0x80 else 0)) & 0xFF
    return bytes(sbox), bytes(xtime)


_SBOX, _XTIME = _tables()
_ZERO_BLOCK = bytes(16)


def _expand_key(key):
    if len(key) != _KEY_BYTES:
        raise ValueError("AES-256 key: 32 bytes")
    rk = bytearray(16 * (_ROUNDS + 1))
    rk[:32] = key
    rcon = 1
    for i in range(8, 4 * (_ROUNDS + 1)):
        t = bytearray(rk[4 * i - 4 : 4 * i])
        if i % 8 == 0:
            t = bytearray((_SBOX[t[1]] ^ rcon, _SBOX[t[2]], _SBOX[t[3]], _SBOX[t[0]]))
            rcon = _XTIME[rcon]
        elif i % 8 == 4:
            t = bytearray(_SBOX[b] for b in t)
        for j in range(4):
            rk[4 * i + j] = rk[4 * i - 32 + j] ^ t[j]
    words = array.array("I", bytes(4 * 4 * (_ROUNDS + 1)))
    for i in range(4 * (_ROUNDS + 1)):
        words[i] = (rk[4 * i] << 24) | (rk[4 * i + 1] << 16) | (rk[4 * i + 2] << 8) | rk[4 * i + 3]
    return words


def _t_tables():
    """Te0..Te3 (FIPS 197 section 5.2.1's round as table look-ups): one array of 4 x 256
    big-endian words, Te_k[x] the column (2S, S, S, 3S)[x] rotated right by k bytes."""
    t = array.array("I", bytes(4 * 1024))
    for x in range(256):
        s1 = _SBOX[x]
        s2 = _XTIME[s1]
        s3 = s2 ^ s1
        column = (s2, s1, s1, s3)
        for k in range(4):
            b0, b1, b2, b3 = (
                column[(0 - k) % 4],
                column[(1 - k) % 4],
                column[(2 - k) % 4],
                column[(3 - k) % 4],
            )
            t[256 * k + x] = (b0 << 24) | (b1 << 16) | (b2 << 8) | b3
    return t


_TE = _t_tables()


@micropython.viper
def _aes_ctr(rk: ptr32, t: ptr32, sbox: ptr8, counter: ptr8, src: ptr8, dst: ptr8, n: int):
    # dst[:n] = src[:n] ^ AES(counter), AES(counter + 1), ...; inc32 (the last four bytes
    # count) after each block. One call per chunk, no bytecode per block. Columns as
    # big-endian 32-bit words; uint and masked to 32 bits (the 64-bit unix port).
    mask = uint(0xFFFF)
    mask = (mask << 16) | uint(0xFFFF)
    at = 0
    while at < n:
        c = counter
        s0 = (uint(c[0]) << 24) | (uint(c[1]) << 16) | (uint(c[2]) << 8) | uint(c[3])
        s1 = (uint(c[4]) << 24) | (uint(c[5]) << 16) | (uint(c[6]) << 8) | uint(c[7])
        s2 = (uint(c[8]) << 24) | (uint(c[9]) << 16) | (uint(c[10]) << 8) | uint(c[11])
        s3 = (uint(c[12]) << 24) | (uint(c[13]) << 16) | (uint(c[14]) << 8) | uint(c[15])
        s0 = (s0 ^ uint(rk[0])) & mask
        s1 = (s1 ^ uint(rk[1])) & mask
        s2 = (s2 ^ uint(rk[2])) & mask
        s3 = (s3 ^ uint(rk[3])) & mask
        k = 4
        while k < 56:
            t0 = uint(t[int(s0 >> 24)]) ^ uint(t[256 + int((s1 >> 16) & 0xFF)])
            t0 ^= uint(t[512 + int((s2 >> 8) & 0xFF)]) ^ uint(t[768 + int(s3 & 0xFF)])
            t1 = uint(t[int(s1 >> 24)]) ^ uint(t[256 + int((s2 >> 16) & 0xFF)])
            t1 ^= uint(t[512 + int((s3 >> 8) & 0xFF)]) ^ uint(t[768 + int(s0 & 0xFF)])
            t2 = uint(t[int(s2 >> 24)]) ^ uint(t[256 + int((s3 >> 16) & 0xFF)])
            t2 ^= uint(t[512 + int((s0 >> 8) & 0xFF)]) ^ uint(t[768 + int(s1 & 0xFF)])
            t3 = uint(t[int(s3 >> 24)]) ^ uint(t[256 + int((s0 >> 16) & 0xFF)])
            t3 ^= uint(t[512 + int((s1 >> 8) & 0xFF)]) ^ uint(t[768 + int(s2 & 0xFF)])
            s0 = (t0 ^ uint(rk[k])) & mask
            s1 = (t1 ^ uint(rk[k + 1])) & mask
            s2 = (t2 ^ uint(rk[k + 2])) & mask
            s3 = (t3 ^ uint(rk[k + 3])) & mask
            k += 4
        # last round: SubBytes, ShiftRows, AddRoundKey (no MixColumns)
        t0 = (uint(sbox[int(s0 >> 24)]) << 24) | (uint(sbox[int((s1 >> 16) & 0xFF)]) << 16)
        t0 |= (uint(sbox[int((s2 >> 8) & 0xFF)]) << 8) | uint(sbox[int(s3 & 0xFF)])
        t1 = (uint(sbox[int(s1 >> 24)]) << 24) | (uint(sbox[int((s2 >> 16) & 0xFF)]) << 16)
        t1 |= (uint(sbox[int((s3 >> 8) & 0xFF)]) << 8) | uint(sbox[int(s0 & 0xFF)])
        t2 = (uint(sbox[int(s2 >> 24)]) << 24) | (uint(sbox[int((s3 >> 16) & 0xFF)]) << 16)
        t2 |= (uint(sbox[int((s0 >> 8) & 0xFF)]) << 8) | uint(sbox[int(s1 & 0xFF)])
        t3 = (uint(sbox[int(s3 >> 24)]) << 24) | (uint(sbox[int((s0 >> 16) & 0xFF)]) << 16)
        t3 |= (uint(sbox[int((s1 >> 8) & 0xFF)]) << 8) | uint(sbox[int(s2 & 0xFF)])
        t0 = (t0 ^ uint(rk[56])) & mask
        t1 = (t1 ^ uint(rk[57])) & mask
        t2 = (t2 ^ uint(rk[58])) & mask
        t3 = (t3 ^ uint(rk[59])) & mask
        j = 0
        while j < 16 and at + j < n:
            w = t0
            if j >= 12:
                w = t3
            elif j >= 8:
                w = t2
            elif j >= 4:
                w = t1
            dst[at + j] = src[at + j] ^ (int(w >> (24 - 8 * (j & 3))) & 0xFF)
            j += 1
        i = 15
        while i >= 12:
            v = (c[i] + 1) & 0xFF
            c[i] = v
            if v:
                break
            i -= 1
        at += 16


def _reduction_table():
    """R[r]: what the nibble r shifted out of the low end of Z by Z * x^4 folds back into
    Z's top 16 bits (x^128 = x^7 + x^2 + x + 1, GCM's reflected bit order)."""
    table = array.array("H", bytes(32))
    for r in range(16):
        v = r
        for _ in range(4):
            v = (v >> 1) ^ ((0xE1 << 120) if v & 1 else 0)
        table[r] = v >> 112
    return table


_REDUCE4 = _reduction_table()


def _ghash_table(h):
    """M[n] = n * H for the 16 nibbles n (GCM bit order: a nibble's top bit is x^0), as 4
    big-endian 32-bit words each: 256 bytes per key (Shoup's 4-bit table; the 8-bit one,
    4 KiB, did not fit the STM32 board's heap beside the data path, docs/targets.md)."""
    words = array.array("I", bytes(16 * 16))
    v = int.from_bytes(h, "big")
    bit = 8
    while bit:
        for w in range(4):
            words[4 * bit + w] = (v >> (96 - 32 * w)) & 0xFFFFFFFF
        v = (v >> 1) ^ ((0xE1 << 120) if v & 1 else 0)  # * x
        bit >>= 1
    i = 2
    while i < 16:
        for j in range(1, i):
            for w in range(4):
                words[4 * (i + j) + w] = words[4 * i + w] ^ words[4 * j + w]
        i <<= 1
    return words


@micropython.viper
def _ghash(y: ptr8, data: ptr8, n: int, m: ptr32, reduce4: ptr16):
    # for each 16-byte block of data[:n] (the last zero-padded): y = (y ^ block) * H in
    # GF(2^128), a nibble at a time, last nibble first (Shoup's method with 4-bit tables;
    # a byte's low nibble holds the higher powers of x), on four big-endian 32-bit words;
    # uint throughout (logical shifts), masked to 32 bits for the 64-bit unix port.
    mask = uint(0xFFFF)
    mask = (mask << 16) | uint(0xFFFF)
    at = 0
    while at < n:
        j = 0
        while j < 16 and at + j < n:
            y[j] = y[j] ^ data[at + j]
            j += 1
        at += 16
        k = 4 * (y[15] & 0xF)
        z0 = uint(m[k]) & mask
        z1 = uint(m[k + 1]) & mask
        z2 = uint(m[k + 2]) & mask
        z3 = uint(m[k + 3]) & mask
        step = 30  # nibble 31 (y[15]'s low one) done; odd steps low nibbles, even high
        while step >= 0:
            b = y[step >> 1]
            if step & 1:
                nibble = b & 0xF
            else:
                nibble = b >> 4
            rem = int(z3 & 0xF)
            z3 = ((z3 >> 4) | (z2 << 28)) & mask
            z2 = ((z2 >> 4) | (z1 << 28)) & mask
            z1 = ((z1 >> 4) | (z0 << 28)) & mask
            z0 = (z0 >> 4) ^ (uint(reduce4[rem]) << 16)
            k = 4 * nibble
            z0 ^= uint(m[k]) & mask
            z1 ^= uint(m[k + 1]) & mask
            z2 ^= uint(m[k + 2]) & mask
            z3 ^= uint(m[k + 3]) & mask
            step -= 1
        for j in range(4):
            sh = 24 - 8 * j
            y[j] = int(z0 >> sh) & 0xFF
            y[4 + j] = int(z1 >> sh) & 0xFF
            y[8 + j] = int(z2 >> sh) & 0xFF
            y[12 + j] = int(z3 >> sh) & 0xFF


class AesGcm:
    """AES-256-GCM encryption with one key; buffers and tables made once per key, so
    sealing a chunk allocates nothing (tested under heap_lock)."""

    def __init__(self, key):
        self._rk = _expand_key(key)
        self._counter = bytearray(16)
        self._y = bytearray(16)
        self._lengths = bytearray(16)
        self._block = bytearray(16)
        h = bytearray(16)
        self.encrypt_block(bytes(16), h)
        self._m = _ghash_table(h)

    def encrypt_block(self, src, dst):
        block = self._block
        block[:] = src
        _aes_ctr(self._rk, _TE, _SBOX, block, _ZERO_BLOCK, dst, 16)

    def seal(self, nonce, aad, data, n, out, tag):
        """Encrypt data[:n] into out[:n] and write the 16-byte tag into `tag`; aad is
        authenticated, not encrypted. The nonce (12 bytes) must never repeat for a key."""
        if len(nonce) != NONCE_BYTES:
            raise ValueError("GCM nonce: 12 bytes")
        counter = self._counter
        for i in range(12):  # no slice assignment: a slice object is an allocation
            counter[i] = nonce[i]
        counter[12] = counter[13] = counter[14] = 0
        counter[15] = 2  # J0 + 1: the first block of data
        _aes_ctr(self._rk, _TE, _SBOX, counter, data, out, n)
        y = self._y
        for i in range(16):
            y[i] = 0
        _ghash(y, aad, len(aad), self._m, _REDUCE4)
        _ghash(y, out, n, self._m, _REDUCE4)
        lengths = self._lengths
        abits = len(aad) * 8
        cbits = n * 8
        for i in range(8):
            lengths[7 - i] = (abits >> (8 * i)) & 0xFF if i < 4 else 0
            lengths[15 - i] = (cbits >> (8 * i)) & 0xFF if i < 4 else 0
        _ghash(y, lengths, 16, self._m, _REDUCE4)
        for i in range(12):
            counter[i] = nonce[i]
        counter[12] = counter[13] = counter[14] = 0
        counter[15] = 1  # J0
        _aes_ctr(self._rk, _TE, _SBOX, counter, y, tag, TAG_BYTES)  # E(J0) ^ GHASH
