# AES-256-GCM (FIPS 197, NIST SP 800-38D) for product encryption on the ground link
# (docs/ground-link.md "Product encryption"). MicroPython 1.25's `cryptolib` needs axTLS or
# mbedTLS, which Debian's source package strips and our unix and QEMU builds therefore do
# not have (MICROPY_PY_CRYPTOLIB stays 0), so both AES and GHASH are written here in viper:
# the same code on every target. Checked against FIPS 197 / SP 800-38D vectors and against
# `cryptography` on the host (tests/vectors/aesgcm.json).
#
# AES works on bytes (S-box and xtime tables, no 32-bit constants: viper ints are 32-bit
# on the MCU and 64-bit on the unix port). GHASH multiplies in GF(2^128) bit by bit on
# four 32-bit words (SP 800-38D algorithm 1), every word masked to 32 bits.
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
    return rk


@micropython.viper
def _encrypt_block(rk: ptr8, src: ptr8, dst: ptr8, sbox: ptr8, xt: ptr8, s: ptr8):
    # state s[4c + row], column-major as FIPS 197; dst doubles as the round's scratch
    for i in range(16):
        s[i] = src[i] ^ rk[i]
    r = 1
    while r < 14:
        k = r * 16
        for c in range(4):
            a0 = sbox[s[4 * c]]
            a1 = sbox[s[4 * ((c + 1) & 3) + 1]]
            a2 = sbox[s[4 * ((c + 2) & 3) + 2]]
            a3 = sbox[s[4 * ((c + 3) & 3) + 3]]
            x = a0 ^ a1 ^ a2 ^ a3
            o = 4 * c
            dst[o] = a0 ^ x ^ xt[a0 ^ a1] ^ rk[k + o]
            dst[o + 1] = a1 ^ x ^ xt[a1 ^ a2] ^ rk[k + o + 1]
            dst[o + 2] = a2 ^ x ^ xt[a2 ^ a3] ^ rk[k + o + 2]
            dst[o + 3] = a3 ^ x ^ xt[a3 ^ a0] ^ rk[k + o + 3]
        for i in range(16):
            s[i] = dst[i]
        r += 1
    k = 14 * 16
    for c in range(4):
        o = 4 * c
        dst[o] = sbox[s[o]] ^ rk[k + o]
        dst[o + 1] = sbox[s[4 * ((c + 1) & 3) + 1]] ^ rk[k + o + 1]
        dst[o + 2] = sbox[s[4 * ((c + 2) & 3) + 2]] ^ rk[k + o + 2]
        dst[o + 3] = sbox[s[4 * ((c + 3) & 3) + 3]] ^ rk[k + o + 3]


@micropython.viper
def _ghash_block(y: ptr8, block: ptr8, n: int, h: ptr8):
    # y = (y ^ block[:n] zero-padded) * H in GF(2^128), GCM's bit order (SP 800-38D).
    # uint throughout: logical right shifts; masked to 32 bits for the 64-bit unix port.
    for i in range(n):
        y[i] = y[i] ^ block[i]
    mask = uint(0xFFFF)
    mask = (mask << 16) | uint(0xFFFF)
    v0 = uint((h[0] << 24) | (h[1] << 16) | (h[2] << 8) | h[3]) & mask
    v1 = uint((h[4] << 24) | (h[5] << 16) | (h[6] << 8) | h[7]) & mask
    v2 = uint((h[8] << 24) | (h[9] << 16) | (h[10] << 8) | h[11]) & mask
    v3 = uint((h[12] << 24) | (h[13] << 16) | (h[14] << 8) | h[15]) & mask
    z0 = uint(0)
    z1 = uint(0)
    z2 = uint(0)
    z3 = uint(0)
    r = (uint(0xE1) << 24) & mask
    for i in range(16):
        byte = y[i]
        bit = 0x80
        while bit:
            if byte & bit:
                z0 ^= v0
                z1 ^= v1
                z2 ^= v2
                z3 ^= v3
            carry = v3 & 1
            v3 = ((v3 >> 1) | ((v2 & 1) << 31)) & mask
            v2 = ((v2 >> 1) | ((v1 & 1) << 31)) & mask
            v1 = ((v1 >> 1) | ((v0 & 1) << 31)) & mask
            v0 = v0 >> 1
            if carry:
                v0 ^= r
            bit = bit >> 1
    for j in range(4):
        sh = 24 - 8 * j
        y[j] = int(z0 >> sh) & 0xFF
        y[4 + j] = int(z1 >> sh) & 0xFF
        y[8 + j] = int(z2 >> sh) & 0xFF
        y[12 + j] = int(z3 >> sh) & 0xFF


@micropython.viper
def _xor_into(dst: ptr8, src: ptr8, pad: ptr8, n: int):
    for i in range(n):
        dst[i] = src[i] ^ pad[i]


class AesGcm:
    """AES-256-GCM encryption with one key; buffers preallocated, so sealing a chunk
    allocates only the views of its arguments."""

    def __init__(self, key):
        self._rk = _expand_key(key)
        self._state = bytearray(16)
        self._pad = bytearray(16)
        self._counter = bytearray(16)
        self._y = bytearray(16)
        self._h = bytearray(16)
        self._lengths = bytearray(16)
        self.encrypt_block(bytes(16), self._h)

    def encrypt_block(self, src, dst):
        _encrypt_block(self._rk, src, dst, _SBOX, _XTIME, self._state)

    def _ghash(self, data, n):
        y = self._y
        h = self._h
        view = memoryview(data)
        at = 0
        while at < n:
            take = min(16, n - at)
            _ghash_block(y, view[at:], take, h)
            at += 16

    def seal(self, nonce, aad, data, n, out, tag):
        """Encrypt data[:n] into out[:n] and write the 16-byte tag into `tag`; aad is
        authenticated, not encrypted. The nonce (12 bytes) must never repeat for a key."""
        if len(nonce) != NONCE_BYTES:
            raise ValueError("GCM nonce: 12 bytes")
        counter = self._counter
        counter[:12] = nonce
        counter[12] = counter[13] = counter[14] = 0
        counter[15] = 2  # J0 + 1: the first block of data
        pad = self._pad
        src = memoryview(data)
        dst = memoryview(out)
        at = 0
        while at < n:
            self.encrypt_block(counter, pad)
            take = min(16, n - at)
            _xor_into(dst[at:], src[at:], pad, take)
            at += 16
            i = 15  # inc32: the last four bytes count
            while i >= 12:
                counter[i] = (counter[i] + 1) & 0xFF
                if counter[i]:
                    break
                i -= 1
        y = self._y
        for i in range(16):
            y[i] = 0
        self._ghash(aad, len(aad))
        self._ghash(out, n)
        lengths = self._lengths
        abits = len(aad) * 8
        cbits = n * 8
        for i in range(8):
            lengths[7 - i] = (abits >> (8 * i)) & 0xFF if i < 4 else 0
            lengths[15 - i] = (cbits >> (8 * i)) & 0xFF if i < 4 else 0
        _ghash_block(y, lengths, 16, self._h)
        counter[:12] = nonce
        counter[12] = counter[13] = counter[14] = 0
        counter[15] = 1  # J0
        self.encrypt_block(counter, pad)
        _xor_into(tag, y, pad, TAG_BYTES)
