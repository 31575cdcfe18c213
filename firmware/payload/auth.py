# Telecommand authentication (docs/ground-link.md): HMAC-SHA256 (RFC 2104) with the
# payload's own key, truncated to TAG_BYTES, and a 32-bit security counter that must
# strictly increase. hashlib.sha256 is in MicroPython 1.25 on the unix port and in the
# QEMU image (MICROPY_PY_HASHLIB, EXTRA_FEATURES level); tests check it against RFC 4231.
import hashlib

from micropython import const

TAG_BYTES = const(16)  # 128-bit tag: forging one takes ~2**128 tries, no brute force
_BLOCK_BYTES = const(64)
# There is no built-in key for telecommands: a payload without a provisioned one accepts
# none (docs/ground-link.md, "Key provisioning and key storage"). Its telemetry (the
# rejections saying why) is tagged with this public key, so the ground can read them:
# SHA-256 of b"qkdsat development key, not for flight" (host ccsds.DEVELOPMENT_KEY).
UNPROVISIONED_TM_KEY = bytes.fromhex(
    "7813be0a19e110814d12de0192a9c9c234272cd7d9e05a565031b5becf6c4572"
)


def key_id(key):
    """A short public name of a key (binds the replay counter to the key it counts for)."""
    digest = hashlib.sha256(b"qkdsat key id" + key).digest()
    return "".join("%02x" % b for b in digest[:8])


class Hmac:
    """HMAC-SHA256 with the key's padded blocks computed once (two hashes per message)."""

    def __init__(self, key):
        if len(key) > _BLOCK_BYTES:
            key = hashlib.sha256(key).digest()
        inner = bytearray(_BLOCK_BYTES)
        outer = bytearray(_BLOCK_BYTES)
        for i in range(_BLOCK_BYTES):
            k = key[i] if i < len(key) else 0
            inner[i] = k ^ 0x36
            outer[i] = k ^ 0x5C
        self._inner = inner
        self._outer = outer

    def wipe(self):
        """Overwrite the key-derived pads (they are as good as the key)."""
        for i in range(_BLOCK_BYTES):
            self._inner[i] = 0
            self._outer[i] = 0

    def digest(self, message):
        h = hashlib.sha256(self._inner)
        h.update(message)
        o = hashlib.sha256(self._outer)
        o.update(h.digest())
        return o.digest()

    def verify(self, message, tag):
        """True if tag (TAG_BYTES) is HMAC(message) truncated; time does not depend on
        where the first wrong byte is."""
        if len(tag) != TAG_BYTES:
            return False
        expected = self.digest(message)
        diff = 0
        for i in range(TAG_BYTES):
            diff |= expected[i] ^ tag[i]
        return diff == 0
