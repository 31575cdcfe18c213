"""Encrypted messages between two stations from their shared key pool (docs/network.md):
`qkdsat send` / `qkdsat receive`.

Default, information-theoretic: a one-time pad from the pool (as long as the file) and a
Wegman-Carter tag (host/network/relay.py: GF(2^64) hash, 16 pool bytes, used once) over
header and ciphertext. Option `--cipher aes-256-gcm`: 32 pool bytes key AES-256-GCM, the
header as associated data; COMPUTATIONALLY secure only (marked so in the header and the
output), for files larger than the pool.

Message file: MAGIC | header length (4, LE) | header JSON | body [| tag]. The header (from,
to, cipher, pool offset, lengths, file name) is public and authenticated.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
from pathlib import Path

from host.distil.durable import write_atomic
from host.errors import BadInput, ProtocolAborted
from host.network.pool import PoolShort, StationPool, check_name, pool_path
from host.network.relay import AUTH_BYTES, TAG_BYTES, wegman_carter_tag, xor_bytes

MAGIC = b"QKDSATM1"
OTP, AES_GCM = "otp-wegman-carter", "aes-256-gcm"
AES_KEY_BYTES, AES_NONCE_BYTES = 32, 12
MAX_MESSAGE_BYTES = 1 << 30
SECURITY = {OTP: "information-theoretic", AES_GCM: "computational"}


class MessageRejected(ProtocolAborted):
    pass


def pool_bytes_needed(cipher: str, plaintext_bytes: int) -> int:
    return plaintext_bytes + AUTH_BYTES if cipher == OTP else AES_KEY_BYTES


def _write_atomic(path: Path, data: bytes) -> None:
    """A decrypted message is as secret as the pad that hid it: the one durable writer
    (host/distil/durable.py), created 0600."""
    write_atomic(path, data, 0o600)


def send(network_dir, sender: str, receiver: str, in_path, out_path, cipher: str = OTP) -> dict:
    check_name(sender), check_name(receiver)
    if cipher not in SECURITY:
        raise BadInput(f"--cipher {cipher}: one of {', '.join(SECURITY)}")
    try:
        plaintext = Path(in_path).read_bytes()
    except OSError as error:
        raise BadInput(f"{in_path}: {error.strerror}") from error
    if len(plaintext) > MAX_MESSAGE_BYTES:
        raise BadInput(f"{in_path}: larger than {MAX_MESSAGE_BYTES} bytes")
    needed = pool_bytes_needed(cipher, len(plaintext))
    out_dir = Path(out_path).parent
    if not out_dir.is_dir() or not os.access(out_dir, os.W_OK | os.X_OK):
        # checked before the pad is taken: a message that cannot be written burns nothing
        raise BadInput(f"--out {out_path}: {out_dir} is not a writable directory")
    path = pool_path(network_dir, sender, receiver)
    if not path.exists():
        raise BadInput(
            f"{sender} shares no key with {receiver} ({path} missing): relay one first "
            f"(qkdsat relay --from {sender} --to {receiver} --bits N)"
        )
    with StationPool(path) as pool:
        # only the sender's share of the pair: the receiver's own sends take the other
        # share, so two messages crossing never share a pad (pool.split_fill)
        available = pool.available_for(sender)
        if available < needed:
            raise PoolShort(
                f"{sender}'s pool for {receiver} holds {8 * available} bits for messages from "
                f"{sender}, the message needs {8 * needed} ({8 * (needed - available)} "
                "missing); nothing was taken",
                available,
                needed,
            )
        offset = pool.position(sender)
        key = pool.take(needed, f"send {Path(in_path).name} to {receiver}", offset, sender)
    header = {
        "from": sender, "to": receiver, "cipher": cipher, "security": SECURITY[cipher],
        "pool_offset": offset, "pool_bytes": needed, "plaintext_bytes": len(plaintext),
        "name": Path(in_path).name,
    }  # fmt: skip
    head = pack_head(header)
    if cipher == OTP:
        body = xor_bytes(plaintext, key[: len(plaintext)])
        message = head + body + wegman_carter_tag(head + body, key[len(plaintext) :])
    else:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = os.urandom(AES_NONCE_BYTES)  # the key is used once; a fresh nonce anyway
        message = head + nonce + AESGCM(key).encrypt(nonce, plaintext, head)
    del key
    _write_atomic(Path(out_path), message)
    return header


def pack_head(header: dict) -> bytes:
    """A message file's head: MAGIC | header length (4, LE) | header JSON (the writer)."""
    encoded = json.dumps(header, sort_keys=True).encode()
    return MAGIC + len(encoded).to_bytes(4, "little") + encoded


def unpack_head(message: bytes) -> tuple[dict, int]:
    """(header, head length) of a message file (the reader); ValueError or TypeError if
    it is not one."""
    if message[:8] != MAGIC:
        raise ValueError("not a qkdsat message")
    size = int.from_bytes(message[8:12], "little")
    header = json.loads(message[12 : 12 + size])
    if not isinstance(header, dict):
        raise TypeError("the header is not a JSON object")
    return header, 12 + size


def receive(network_dir, receiver: str, in_path, out_path) -> dict:
    """Check and decrypt a message; the output is written only when it authenticated. The
    pool bytes (at the sender's offset in its share) are taken, durably, only once the
    message authenticated and its file is written: a forged message moves nothing, a
    replayed one is refused (its bytes are used), and a receive cut before its take (or
    whose file cannot be written) can run again."""
    check_name(receiver)
    try:
        message = Path(in_path).read_bytes()
    except OSError as error:
        raise BadInput(f"{in_path}: {error.strerror}") from error
    try:
        header, head_bytes = unpack_head(message)
        head = message[:head_bytes]
        sender, cipher, addressee = check_name(header["from"]), header["cipher"], header["to"]
        offset, needed = int(header["pool_offset"]), int(header["pool_bytes"])
        plaintext_bytes = int(header["plaintext_bytes"])
    except (ValueError, KeyError, TypeError) as error:
        raise BadInput(f"{in_path}: not a qkdsat message ({error})") from error
    if addressee != receiver:
        raise BadInput(f"{in_path}: addressed to {addressee}, not {receiver}")
    if cipher not in SECURITY or needed != pool_bytes_needed(cipher, plaintext_bytes):
        raise MessageRejected(f"{in_path}: inconsistent header")
    body = message[len(head) :]
    # the lengths before anything is read from the pool: the tag covers the header, but
    # a header claiming a large file must not make the receiver read that much
    expected_bytes = plaintext_bytes + (TAG_BYTES if cipher == OTP else AES_NONCE_BYTES + 16)
    if plaintext_bytes < 0 or len(body) != expected_bytes:
        raise MessageRejected(f"{in_path}: length does not match its header")
    decrypted = []

    def authentic(key: bytes) -> bool:
        if cipher == OTP:
            ciphertext, tag = body[:-TAG_BYTES], body[-TAG_BYTES:]
            expected = wegman_carter_tag(head + ciphertext, key[plaintext_bytes:])
            if hmac.compare_digest(expected, tag):
                decrypted.append(xor_bytes(ciphertext, key[:plaintext_bytes]))
            return bool(decrypted)
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        with contextlib.suppress(InvalidTag):
            nonce, sealed = body[:AES_NONCE_BYTES], body[AES_NONCE_BYTES:]
            decrypted.append(AESGCM(key).decrypt(nonce, sealed, head))
        return bool(decrypted)

    def authentic_and_written(key: bytes) -> bool:
        if not authentic(key):
            return False
        # before the pool moves: the pad is only ever used by the sender, so a receive cut
        # here leaks nothing and runs again; written after the take, a cut or an unwritable
        # --out lost the message for good (its bytes used, its file never written)
        try:
            _write_atomic(Path(out_path), decrypted[0])
        except OSError as error:
            raise BadInput(f"{out_path}: {error.strerror} (no pool byte was used)") from None
        return True

    # The tag is checked BEFORE the pool moves (under the pool's lock), and the bytes are
    # taken only for a message that authenticated: a forgery naming a far pool_offset
    # must not burn the bytes up to it. The pad then serves one check per forgery, never
    # an output; a forger's chance stays (L + 1)/2^64 per forged message (docs).
    with StationPool(pool_path(network_dir, receiver, sender)) as pool:
        key = pool.take_checked(
            needed, f"receive {header.get('name')} from {sender}", offset, sender,
            authentic_and_written,
        )  # fmt: skip
    if key is None:
        raise MessageRejected(
            f"{in_path}: authentication failed: altered or forged (no pool byte was used)"
        )
    return header
