"""Trusted relay through the satellite (docs/network.md).

The satellite shares key K_A with station A and K_B with station B (their pools). To give
A and B a common key it takes N bytes of each, announces K_A xor K_B to B and tells A
which of its bytes were used; A keeps K_A, B computes (K_A xor K_B) xor K_B = K_A. Both
announcements are public but authenticated: Wegman-Carter, tag = h_k(message) xor r with
h the GF(2^64) polynomial hash of host/distil/gf64.py and k, r a fresh 64-bit hash key and
64-bit pad taken from the pool of the station addressed, right after its key bytes
(AUTH_BYTES per announcement, never reused). Every pool consumes exactly N + AUTH_BYTES.

Trust: the satellite holds K_A and K_B, so it learns the relayed key. The relay is as
secret as the satellite is trustworthy; the link itself (announcements in the clear) tells
an eavesdropper nothing, since K_A xor K_B is one-time padded by K_B.

The relayed key lands in the pair of pools A/B.pool and B/A.pool (same offset in both),
from where `qkdsat send` and the ETSI 014 server take it.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import uuid
from pathlib import Path

import numpy as np

from host.distil.channel import _fsync_directory
from host.distil.gf64 import poly_hash
from host.errors import BadInput, ProtocolAborted
from host.network.pool import (
    SATELLITE,
    PoolShort,
    StationPool,
    check_name,
    pair_lock,
    pool_path,
)

AUTH_BYTES = 16  # 64-bit hash key + 64-bit one-time pad of one Wegman-Carter tag
TAG_BYTES = 8


class RelayAuthenticationFailed(ProtocolAborted):
    pass


def wegman_carter_tag(message: bytes, key: bytes) -> bytes:
    """tag = h_k(message) xor r, key = k (8 bytes LE) | r (8 bytes LE), used once."""
    if len(key) != AUTH_BYTES:
        raise ValueError("a Wegman-Carter tag needs 16 key bytes")
    hash_key = int.from_bytes(key[:8], "little")
    pad = int.from_bytes(key[8:], "little")
    return (poly_hash(message, hash_key) ^ pad).to_bytes(TAG_BYTES, "little")


def _announcement(fields: dict, payload: bytes) -> bytes:
    header = json.dumps(fields, sort_keys=True).encode()
    return len(header).to_bytes(4, "little") + header + payload


def _parse_announcement(message: bytes) -> tuple[dict, bytes, bytes, bytes]:
    """(fields, payload, tag, authenticated body)."""
    size = int.from_bytes(message[:4], "little")
    if len(message) < 4 + size + TAG_BYTES:
        raise ValueError("announcement too short")
    body, tag = message[:-TAG_BYTES], message[-TAG_BYTES:]
    return json.loads(message[4 : 4 + size]), message[4 + size : -TAG_BYTES], tag, body


def xor_bytes(first: bytes, second: bytes) -> bytes:
    if len(first) != len(second):
        raise ValueError("xor of byte strings of different lengths")
    return np.bitwise_xor(
        np.frombuffer(first, dtype=np.uint8), np.frombuffer(second, dtype=np.uint8)
    ).tobytes()


def relay_shortfall(network_dir, source: str, target: str, key_bytes: int) -> list[str]:
    """What each of the four pools lacks for a relay of key_bytes (empty: enough)."""
    needed = key_bytes + AUTH_BYTES
    missing = []
    for holder, peer in ((SATELLITE, source), (SATELLITE, target), (source, SATELLITE),
                         (target, SATELLITE)):  # fmt: skip
        path = pool_path(network_dir, holder, peer)
        available = 0
        if path.exists():
            with StationPool(path) as pool:
                available = pool.available_for(SATELLITE)  # the relay is the satellite's
        if available < needed:
            missing.append(
                f"{'the satellite' if holder == SATELLITE else holder}'s pool for {peer} holds "
                f"{8 * available} bits for relays, {8 * (needed - available)} missing"
            )
    return missing


def _check_pair_in_step(network_dir, source: str, target: str) -> None:
    """The relayed pair A/B.pool and B/A.pool must hold the same number of bytes before a
    relay appends to both: a pair left out of step (a relay cut between its two fills)
    holds different keys at the same offset. Refused before the satellite spends a byte."""
    filled = {}
    for holder, peer in ((source, target), (target, source)):
        path = pool_path(network_dir, holder, peer)
        filled[holder] = 0
        if path.exists():
            with StationPool(path) as pool:
                filled[holder] = pool.filled_bytes
    if filled[source] != filled[target]:
        raise BadInput(
            f"relayed pools {source}/{target}.pool and {target}/{source}.pool out of step "
            f"({filled[source]} and {filled[target]} bytes filled): a relay was cut between "
            "them; nothing was taken"
        )


def _kept_key_path(network_dir, holder: str, peer: str, relay_id: str) -> Path:
    """Where `holder` keeps its relayed key until both relayed pools hold it."""
    return Path(network_dir) / holder / f".{peer}.relay-{relay_id}.key"


def _keep_key(path: Path, key: bytes) -> None:
    """Secret, as a pool: a fresh 0600 file (O_EXCL|O_NOFOLLOW), fsync'd, renamed."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_directory(str(path))


def _complete_cut_relays(network_dir, source: str, target: str) -> list[str]:
    """Finish the fills of a relay cut between its two relayed pools. Both stations' keys
    are kept (_keep_key, A's then B's) before either fill and removed after both: when
    both are there the fills may have begun and are completed (a fill's source makes it
    happen once); when only one is, either no fill began (B's never written) or both
    ended (one removed): it goes. Returns the relay_ids completed."""
    completed = []
    for holder, peer in ((source, target), (target, source)):
        for leftover in (Path(network_dir) / holder).glob(f".{peer}.relay-*.key.tmp"):
            leftover.unlink()  # a key cut while being kept: its relay filled nothing
    for kept_a in sorted((Path(network_dir) / source).glob(f".{target}.relay-*.key")):
        relay_id = kept_a.name.removeprefix(f".{target}.relay-").removesuffix(".key")
        kept_b = _kept_key_path(network_dir, target, source, relay_id)
        if kept_b.exists():
            for holder, peer, kept in ((source, target, kept_a), (target, source, kept_b)):
                with StationPool(pool_path(network_dir, holder, peer), create=True) as pool:
                    if f"relay:{relay_id}" not in pool.sources:
                        pool.fill(kept.read_bytes(), f"relay:{relay_id}")
            completed.append(relay_id)
        for kept in (kept_a, kept_b):
            kept.unlink(missing_ok=True)
    for kept_b in (Path(network_dir) / target).glob(f".{source}.relay-*.key"):
        kept_b.unlink()  # A's already removed: both fills ended
    return completed


def relay(network_dir: str | Path, source: str, target: str, bits: int) -> dict:
    """Give `source` and `target` a common key of `bits` through the satellite. Refused,
    nothing consumed, when any pool is short (the message says how many bits are missing)."""
    check_name(source), check_name(target)
    if source == target or SATELLITE in (source, target):
        raise BadInput("--from and --to must be two different stations")
    if bits <= 0 or bits % 8:
        raise BadInput(f"--bits {bits}: must be a positive multiple of 8")
    with pair_lock(network_dir, source, target):
        _complete_cut_relays(network_dir, source, target)
        _complete_cut_relays(network_dir, target, source)
        return _relay(network_dir, source, target, bits)


def _relay(network_dir, source: str, target: str, bits: int) -> dict:
    key_bytes = bits // 8
    missing = relay_shortfall(network_dir, source, target, key_bytes)
    if missing:
        needed = 8 * (key_bytes + AUTH_BYTES)
        raise PoolShort(
            f"relay {source} -> {target} of {bits} bits refused: each pool must hold {needed} "
            f"bits ({bits} + {8 * AUTH_BYTES} authentication); " + "; ".join(missing),
            0,
            needed,
        )
    _check_pair_in_step(network_dir, source, target)
    relay_id = str(uuid.uuid4())

    # ---- on the satellite: take K_A and K_B (write-ahead), announce
    # (offsets are positions in the satellite's share of each pair: pool.split_fill)
    with StationPool(pool_path(network_dir, SATELLITE, source)) as pool_a:
        offset_a = pool_a.position(SATELLITE)
        taken = pool_a.take(key_bytes + AUTH_BYTES, f"relay {relay_id} to {target}")
    key_a, auth_a = taken[:key_bytes], taken[key_bytes:]
    with StationPool(pool_path(network_dir, SATELLITE, target)) as pool_b:
        offset_b = pool_b.position(SATELLITE)
        taken = pool_b.take(key_bytes + AUTH_BYTES, f"relay {relay_id} from {source}")
    key_b, auth_b = taken[:key_bytes], taken[key_bytes:]
    xor = xor_bytes(key_a, key_b)
    common = {"relay_id": relay_id, "from": source, "to": target, "bytes": key_bytes}
    to_b = _announcement({**common, "offset": offset_b}, xor)
    to_b += wegman_carter_tag(to_b, auth_b)
    to_a = _announcement({**common, "offset": offset_a}, b"")
    to_a += wegman_carter_tag(to_a, auth_a)
    del key_a, key_b, xor  # the satellite keeps nothing of the relayed key

    # ---- at the stations: each checks its announcement and takes the same bytes
    key_at_a = _station_receives(network_dir, source, to_a, expect_payload=False)
    key_at_b = _station_receives(network_dir, target, to_b, expect_payload=True)
    # each station keeps its key until both relayed pools hold it: a relay cut between the
    # two fills is completed by the next one (_complete_cut_relays) instead of leaving the
    # pair out of step for good. A's is kept first (the order that function relies on).
    fills = ((source, target, key_at_a), (target, source, key_at_b))
    for holder, peer, key in fills:
        _keep_key(_kept_key_path(network_dir, holder, peer, relay_id), key)
    offsets = {}
    for holder, peer, key in fills:
        with StationPool(pool_path(network_dir, holder, peer), create=True) as pool:
            offsets[holder] = pool.fill(key, f"relay:{relay_id}")
    for holder, peer, _ in fills:
        _kept_key_path(network_dir, holder, peer, relay_id).unlink()
    if offsets[source] != offsets[target]:
        raise BadInput(
            f"relayed pools {source}/{target}.pool and {target}/{source}.pool out of step "
            f"(offsets {offsets[source]} and {offsets[target]})"
        )
    return {"relay_id": relay_id, "from": source, "to": target, "bits": bits,
            "consumed_bits_per_pool": 8 * (key_bytes + AUTH_BYTES),
            "announcement_bytes": {source: len(to_a), target: len(to_b)},
            "offset": offsets[source]}  # fmt: skip


def _station_receives(network_dir, station: str, message: bytes, expect_payload: bool) -> bytes:
    """A station's side: verify the satellite's announcement with its own pool bytes and
    return its share (K_A for the source, the payload xor K_B for the target)."""
    try:
        fields, payload, tag, body = _parse_announcement(message)
        offset, key_bytes = int(fields["offset"]), int(fields["bytes"])
    except (ValueError, KeyError, TypeError) as error:
        raise RelayAuthenticationFailed(f"{station}: malformed relay announcement") from error
    if expect_payload and len(payload) != key_bytes:
        raise RelayAuthenticationFailed(f"{station}: relay payload of the wrong length")

    def authentic(taken: bytes) -> bool:
        return hmac.compare_digest(wegman_carter_tag(body, taken[key_bytes:]), tag)

    with StationPool(pool_path(network_dir, station, SATELLITE)) as pool:
        # checked before the pool moves, taken only when authentic: a forged announcement
        # naming a far offset must not burn the station's key up to it
        taken = pool.take_checked(
            key_bytes + AUTH_BYTES, f"relay {fields.get('relay_id')}", offset, SATELLITE,
            authentic,
        )  # fmt: skip
    if taken is None:
        raise RelayAuthenticationFailed(f"{station}: relay announcement failed authentication")
    own = taken[:key_bytes]
    if not expect_payload:
        return own
    return xor_bytes(payload, own)
