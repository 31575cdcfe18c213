"""The classical channel between Alice and Bob: transports (in-process, TCP), message
encoding, and Wegman-Carter authentication from a pre-shared key pool.

Authentication: every message carries tag = h_k(direction | seq | session | body) XOR r,
with h the GF(2^64) polynomial hash (host/distil/gf64.py), k a 64-bit hash key used for the
whole session (key recycling is allowed because the tag is one-time padded) and r a fresh
64-bit one-time pad per message. Both come from the pool file both parties hold. Pads are
laid out in the pool as [k | pad(A->B, 0) | pad(B->A, 0) | pad(A->B, 1) | ...] so each side
finds them without coordination; the pool consumed is 64 + 128 * max(messages each way)
bits. `session` is the two sides' fresh nonces, exchanged with the pool positions
(exchange_pool_start): a message recorded in an earlier session never verifies in a later
one, even at the same pool offset (a side whose usage record was rolled back).
A forged or altered message is accepted with probability <= (L + 1) / 2^64 for a message
of L 64-bit blocks.
"""

from __future__ import annotations

import hmac
import json
import os
import queue
import select
import socket
import struct
import sys
import threading
import time

import numpy as np

from host.distil.durable import fsync_directory, write_atomic
from host.distil.gf64 import poly_hash
from host.errors import BadInput, ProtocolAborted

ALICE, BOB = "alice", "bob"
_DIRECTION = {ALICE: 0, BOB: 1}  # the direction of messages this role sends
TAG_BYTES = 8
_LEN = struct.Struct("<I")
# Both sides refuse longer messages before checking their tag, so a forgery (any message
# substituted for one of at most this length) passes with probability <= (L + 1) / 2^64,
# L the 64-bit blocks of the longer (gf64.py): FORGERY_PER_MESSAGE, counted per message in
# the report's epsilon. 64 MiB holds a full pass's largest message (the detections) ~10x.
MAX_MESSAGE_BYTES = 1 << 26
SESSION_NONCE_BYTES = 16  # each side's, in its announcement; a tag covers both
# + the direction/seq/session prefix, and the length block
_MAX_HASH_BLOCKS = (MAX_MESSAGE_BYTES + 9 + 2 * SESSION_NONCE_BYTES + 7) // 8 + 1
FORGERY_PER_MESSAGE = (_MAX_HASH_BLOCKS + 1) / 2.0**64


class AuthenticationFailed(ProtocolAborted):
    pass


class PeerAborted(ProtocolAborted):
    pass


class ChannelClosed(ProtocolAborted):
    pass


# ------------------------------------------------------------------ key pool

# A side reserves this far beyond the last pad it takes, so that its usage record covers
# every pad the peer can have put on the wire, even if this side dies before receiving
# them: the peer sends at most MAX_UNANSWERED messages beyond the last one this side has
# acknowledged. Every message carries the sender's count of messages received (its
# acknowledgement, inside the authenticated body), and AuthChannel.send refuses a message
# beyond that window, whatever shape the protocol has (main counted messages since the
# last one received, which a side that sends while the peer's messages are in flight
# could exceed without noticing).
MAX_UNANSWERED = 32
_ACK_FIELD = "_ack"  # the acknowledgement's name in every message body
RESERVE_AHEAD_BYTES = 16 * (MAX_UNANSWERED + 1)
RESERVE_STEP_BYTES = 2048  # one fsync'd record per this many bytes, not one per message
MIN_POOL_LEFT_BYTES = 1024
PEER_FLOOR_FIELD = "peer_floor_bytes"  # KeyPool.peer_floor_byte, in the usage record
# The pool-start exchange (exchange_pool_start): each side's hello (its mode and a fresh
# session nonce, no position), then the two positions and the prover's confirmation,
# each tagged. 5: the prover confirms (the verifier takes no session byte before the
# prover has recorded past them) and a verifier refuses a position below its peer floor;
# 4: each party tags on its own lane of the pool (announcement_slot); 3: a lost answer let
# the prover's next announcement reuse its bytes; 2: an untagged position
_START_HELLO = b"QKDPOOL5"
_START = struct.Struct(f"<8sc{SESSION_NONCE_BYTES}s")
_ANNOUNCE = b"QKDPANN5"
_ANNOUNCEMENT = struct.Struct("<8sQ8s")  # magic, position, tag
ANNOUNCE_BYTES = 16  # an announcement's hash key and pad, at its place in the pool
_CONFIRM = 2  # the prover's confirmation, in its tag's body (announcements: 0 and 1)
# A verifier's refusal of a position below its peer floor: magic, that floor. Untagged
# (a tag would cost the verifier pool for every forgery): the prover only says it.
_REFUSE = b"QKDPREF5"
_REFUSAL = struct.Struct("<8sQ")
# The most pool one exchange takes: the prover's tag on its lane (up to 16 bytes skipped
# to reach it), the verifier's on the other lane right after, the prover's confirmation
# on its lane right after that.
POOL_START_MAX_BYTES = 4 * ANNOUNCE_BYTES
LISTENER, CONNECTOR = b"L", b"C"
# A listener gives a peer this long (wall seconds) from its acceptance to a verified
# announcement; a peer that fails (silent, garbage, a forged tag) is dropped, within the
# listener's own deadline (listen's timeout_s).
HANDSHAKE_TIMEOUT_S = 10.0
# A listener hears this many connections at once (ListeningTransport.first_verified);
# more wait in the listen queue. Strangers holding them all (10 s each) delay a peer
# queued behind B of them by B / 16 * 10 s: the kernel's queue (128) by 80 s, within a
# connector's 600 s wait.
MAX_PENDING_PEERS = 16
# A connector in a split mode (open_split) gives the pool-start exchange this long (wall
# seconds) from the peer's first byte, whatever the spacing of the bytes after it: a man
# in the middle dripping a byte every few minutes held it for good with only the socket's
# per-read timeout. From the first byte, not the connection: a connection may wait,
# silent, in the listen queue while strangers hold the listener's places (MAX_PENDING_PEERS,
# HANDSHAKE_TIMEOUT_S each), and counted from the connection that stopped the real peer. The
# real exchange takes milliseconds; 60 s leaves a loaded machine's stalls ample room.
CONNECT_HANDSHAKE_TIMEOUT_S = 60.0
# A session message's body gets this rate on top of the wait's bound (SocketTransport):
# 64 MiB, the largest message, 1,024 s more.
MESSAGE_BYTES_PER_S = 64 * 1024
_HANDSHAKE_FRAME_MAX = 64  # the exchange's frames are 24-25 bytes: a longer one is refused


def _fsync_directory(path: str) -> None:
    """The directory holding `path` (host/network imports this name)."""
    fsync_directory(os.path.dirname(os.path.abspath(path)) or ".")


class KeyPool:
    """Pre-shared secret bytes, consumed from `start_byte` on.

    A pool backed by a file (`from_file`) is locked for the session and its usage record,
    POOL.used, is moved forward and made durable (file and directory fsync'd) BEFORE any
    byte past the recorded point is used: a session that dies at any instant, even by
    SIGKILL or power loss, leaves a record at or beyond every pad it used, so the next
    session never reuses one. The record only grows; bytes reserved but not used by a
    session that stopped are lost (at most RESERVE_STEP_BYTES + RESERVE_AHEAD_BYTES).
    An in-memory pool (no path) records nothing: its bytes are used once, in one process.
    """

    def __init__(
        self,
        data: bytes,
        start_byte: int = 0,
        path: str | None = None,
        lock_fd=None,
        peer_floor_byte: int = 0,
    ):
        self.data = bytes(data)
        self.start_byte = start_byte
        self.path = path
        self.high_water_byte = start_byte
        self.reserved_byte = start_byte  # what the usage record on disk covers
        # The least position the peer may announce at (exchange_pool_start): past every
        # pool byte this side used in a session and every tag of the peer it verified.
        # Kept in the usage record beside used_bytes (PEER_FLOOR_FIELD).
        self.peer_floor_byte = peer_floor_byte
        self._floor_recorded = peer_floor_byte
        self._lock_fd = lock_fd
        self._mutex = threading.Lock()  # local mode: both endpoints' threads share a pool

    @classmethod
    def from_file(cls, path: str, new: bool = False) -> KeyPool:
        """Open, lock and check a pool file. new: the pool was never used, create its
        usage record at 0 (refused if one exists); otherwise the record must exist."""
        import fcntl

        used_path = path + ".used"
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            # its name is not echoed: a user who pasted the key material itself would see it
            raise BadInput(
                "--auth-pool: no such file; it takes the name of the FILE holding the "
                "pre-shared authentication key pool, never the key itself (the value is not "
                "shown)"
            ) from None
        except OSError as error:
            raise BadInput(f"authentication key pool {path}: {error.strerror}") from error
        try:
            mode = os.fstat(fd).st_mode
            if mode & 0o077:
                raise BadInput(
                    f"authentication key pool {path}: readable or writable by group or others "
                    f"(mode {mode & 0o777:o}); it is secret: chmod 600 {path}"
                )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as error:
                raise BadInput(
                    f"authentication key pool {path}: in use by another session (locked)"
                ) from error
            with os.fdopen(os.dup(fd), "rb") as handle:
                data = handle.read()
            if new:
                if os.path.exists(used_path):
                    raise BadInput(
                        f"authentication key pool {path}: declared new, but {used_path} "
                        "exists (the pool has been used)"
                    )
                start = floor = 0
            else:
                start, floor = _read_usage_record(path, used_path)
            if len(data) - start < MIN_POOL_LEFT_BYTES:
                raise BadInput(
                    f"authentication key pool {path}: only {len(data) - start} bytes left"
                )
            pool = cls(data, start, path, lock_fd=fd, peer_floor_byte=floor)
            if new:
                pool._write_record(0)
            return pool
        except BaseException:
            os.close(fd)
            raise

    def reserve_announcement(self, party: int) -> int:
        """The ANNOUNCE_BYTES of `party`'s lane at or after our start, for our
        announcement's tag (exchange_pool_start): recorded used, durably, before the tag
        goes out. Returns their offset."""
        with self._mutex:
            if self.high_water_byte != self.start_byte:
                raise RuntimeError("the announcement comes before any pad is taken")
            slot = announcement_slot(self.start_byte, party)
            end = slot + ANNOUNCE_BYTES
            if end + MIN_POOL_LEFT_BYTES > len(self.data):
                raise ProtocolAborted("authentication key pool exhausted")
            if self.path is not None and self.reserved_byte < end:
                self._write_record(end)
            return slot

    def agree_start(self, peer_start_byte: int, session_bytes: int = 0) -> None:
        """Begin this session at the later of the two sides' records (never earlier than
        our own, whatever the peer claims): both then take the same pads. The record then
        covers the session's first `session_bytes` (at least RESERVE_AHEAD_BYTES): every
        pad the peer may take before we see its messages (exchange_pool_start)."""
        with self._mutex:
            if self.high_water_byte != self.start_byte:
                raise RuntimeError("the session start is agreed before any pad is taken")
            start = max(self.start_byte, int(peer_start_byte))
            if start + MIN_POOL_LEFT_BYTES > len(self.data):
                raise ProtocolAborted("authentication key pool exhausted")
            self.start_byte = self.high_water_byte = start
            ahead = max(RESERVE_AHEAD_BYTES, int(session_bytes))
            if self.path is not None and self.reserved_byte < start + ahead:
                # cover the peer's first MAX_UNANSWERED messages (and a session's declared
                # one-time pads) at once, before any pad
                self._write_record(min(start + ahead, len(self.data)))

    def take(self, offset_byte: int, count: int) -> bytes:
        """Bytes at offset_byte (relative to this session's start), reserved durably first."""
        begin = self.start_byte + offset_byte
        end = begin + count
        if end > len(self.data):
            raise ProtocolAborted("authentication key pool exhausted")
        with self._mutex:
            if end + RESERVE_AHEAD_BYTES > self.reserved_byte and self.path is not None:
                target = max(end + RESERVE_AHEAD_BYTES, self.reserved_byte + RESERVE_STEP_BYTES)
                self._write_record(min(target, len(self.data)))
            self.high_water_byte = max(self.high_water_byte, end)
            # bytes used in a session may reach an eavesdropper (a pad of a predictable
            # plaintext, a tag's pad and key solved from two tags): never a peer's tag
            self.peer_floor_byte = max(self.peer_floor_byte, end)
        return self.data[begin:end]

    def raise_peer_floor(self, position: int) -> None:
        """The peer's record is known to have passed `position` (it recorded a tag we
        verified, or a session start, before it sent it): it never announces below."""
        with self._mutex:
            self.peer_floor_byte = max(self.peer_floor_byte, int(position))

    @property
    def used_bits(self) -> int:
        return 8 * (self.high_water_byte - self.start_byte)

    def _write_record(self, reserved_byte: int) -> None:
        # never past the record (a reader refuses that): a floor raised for a start this
        # side then failed to reserve is kept in memory only
        floor = min(self.peer_floor_byte, reserved_byte)
        write_usage_record(self.path, reserved_byte, **{PEER_FLOOR_FIELD: floor})
        self.reserved_byte = reserved_byte
        self._floor_recorded = floor

    def commit(self) -> None:
        """End of the session: the record already covers every pad used; release the lock."""
        self.close()

    def close(self) -> None:
        if self._lock_fd is not None and self.path is not None:
            # the floor this session raised (its pads), kept for the next pool start: a
            # failed write costs only that (the record still covers every pad used)
            if self.peer_floor_byte > self._floor_recorded:
                try:
                    self._write_record(self.reserved_byte)
                except OSError:
                    pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __del__(self):
        self.close()


def write_usage_record(path: str, used_bytes: int, **extra) -> None:
    """PATH.used, atomically and durably: temporary file 0600, fsync, rename, fsync of the
    directory (the rename itself must survive a power cut). `extra` fields are kept
    beside used_bytes for other readers of the same record (host/network/pool.py)."""
    used_path = str(path) + ".used"
    record = json.dumps({"used_bytes": int(used_bytes), **extra}).encode()
    # host/distil/durable.py: a fresh 0600 temporary (a leftover or a planted symlink
    # under its name is removed, never followed), fsync, rename, fsync of the directory
    write_atomic(used_path, record, 0o600, tmp=f"{used_path}.{os.getpid()}.tmp")


def _read_usage_record(path: str, used_path: str) -> tuple[int, int]:
    """(used_bytes, the peer's floor). A record without a floor (written by the network
    pool, the key store, or a qkdsat before pool-start protocol 5) has it at used_bytes:
    every byte below may have been used, for a pad an eavesdropper can undo."""
    try:
        with open(used_path) as handle:
            record = json.load(handle)
        start = int(record["used_bytes"])
        floor = int(record.get(PEER_FLOOR_FIELD, start))
    except FileNotFoundError as error:
        raise BadInput(
            f"authentication key pool {path}: its usage record {used_path} is missing; "
            "without it the pads already used would be used again. Restore it, or, for a "
            "pool never used before, pass --new-auth-pool"
        ) from error
    except (ValueError, KeyError, TypeError) as error:
        raise BadInput(f"{used_path}: not a key-pool usage record ({error})") from error
    if start < 0:
        raise BadInput(f"{used_path}: negative used_bytes {start}")
    if not 0 <= floor <= start:
        raise BadInput(f"{used_path}: {PEER_FLOOR_FIELD} {floor} outside 0..{start}")
    return start, floor


def _announcement_tag(pool: KeyPool, offset: int, body: bytes) -> bytes:
    """h_k(body) xor r, k and r the ANNOUNCE_BYTES at `offset` (every byte used once)."""
    key = int.from_bytes(pool.data[offset : offset + 8], "little")
    pad = int.from_bytes(pool.data[offset + 8 : offset + 16], "little")
    return (poly_hash(body, key) ^ pad).to_bytes(8, "little")


def _announcement_body(
    direction: int, prover_byte: int, verifier_byte: int, nonces, session_bytes: int = 0
) -> bytes:
    """What an announcement's tag covers: who sends it, both positions (the verifier's 0 in
    the prover's, who speaks first), the sender's nonce then the receiver's; the answer's
    and the confirmation's also the session's budget (exchange_pool_start session_bytes:
    each side then knows the other recorded it)."""
    body = _ANNOUNCE + struct.pack("<BQQ", direction, prover_byte, verifier_byte) + nonces
    return body if direction == 0 else body + struct.pack("<Q", session_bytes)


def _session_end(pool: KeyPool, start: int, session_bytes: int) -> int:
    """Where a side's record stands once it agreed on `start` (KeyPool.agree_start)."""
    return min(start + max(RESERVE_AHEAD_BYTES, int(session_bytes)), len(pool.data))


def _party(role: str | None, mode: bytes) -> int:
    """The lane of the pool whose announcement bytes this side alone tags: Alice's 0,
    Bob's 1 (without a role, as in one process: the listener's 0, the connector's 1)."""
    if role in (ALICE, BOB):
        return _DIRECTION[role]
    return 0 if mode == LISTENER else 1


def announcement_slot(position: int, party) -> int:
    """The first ANNOUNCE_BYTES at or after `position` on `party`'s lane (a party: 0 or 1,
    or a role): offsets = 16 * party modulo 32. Why lanes: a side's record covers the
    bytes it tagged, never the bytes of an answer the link lost on the way to it, so
    from its record alone it would tag its next announcement under the peer's lost
    answer's bytes (two tags under one key and pad give both away). On its own lane a
    party's tags meet only its own, each recorded before it is sent, whatever the roles
    (who listens, who proves) of each contact."""
    if isinstance(party, str):
        party = _DIRECTION[party]
    lane = ANNOUNCE_BYTES * party
    return position + (lane - position) % (2 * ANNOUNCE_BYTES)


def _fits(pool: KeyPool, offset: int) -> bool:
    return 0 <= offset and offset + ANNOUNCE_BYTES + MIN_POOL_LEFT_BYTES <= len(pool.data)


def exchange_pool_start(
    transport, pool: KeyPool, role: str | None = None, session_bytes: int = 0
) -> bytes:
    """Agree where this session begins in the pool, authenticated before anything a peer
    says is committed (docs/distillation.md, "The pool-start exchange"). Returns the
    session (both sides' fresh nonces, in a fixed order) for AuthChannel, whose every tag
    covers it: a message recorded in another session never verifies.

    1. Each side sends its hello: its mode (listener or connector) and a fresh nonce.
       Nothing is committed: a hello costs no pool.
    2. The PROVER sends its position p (the first slot of its own lane at or after its
       usage record, announcement_slot) with a tag under the ANNOUNCE_BYTES at p,
       recorded used (durably) before it is sent, covering both nonces. A listener is
       never the prover: whoever connects proves first, so a stranger connecting to a
       listener costs it nothing. Two connectors (through a relay, or one
       process): Bob proves, Alice verifies.
    3. The VERIFIER checks that tag at p without committing anything: a forged or replayed
       announcement fails (the tag covers its fresh nonce) and changes nothing on this side.
       So does a position off the prover's lane, or below the verifier's peer floor
       (KeyPool.peer_floor_byte: past every byte it used in a session and every tag of
       the peer it verified; a legitimate peer's record is past it, and bytes below it
       may be known to an eavesdropper, who could tag there). Then it takes q, the first
       slot of its own lane at or after max(p + ANNOUNCE_BYTES, its own position), and c,
       the prover's slot right after q; it records the session start c + ANNOUNCE_BYTES
       (durably, with RESERVE_AHEAD_BYTES) and sends its position, tagged at q.
    4. The prover checks that tag, records the session start (durably), and only then
       CONFIRMS, tagged at c; the verifier checks the confirmation before the session
       takes any byte. Without it a verifier that spoke first (Alice) used the session's
       first bytes while a prover whose answer was lost had recorded only its own
       announcement: its next announcement on its lane was tagged under the session's
       hash key and first pad (protocol 4).
    So no byte serves two tags, a peer without the pool moves neither record (protocol 2:
    one forged position burnt the pool to its end), and the session begins past both
    records. A listener drops a peer that fails (a forged tag, garbage, silence for
    HANDSHAKE_TIMEOUT_S) and accepts the next (ListeningTransport).
    `session_bytes`: the most of the pool the session may take from its start (the time
    transfer's key budget: its one-time pads come after the tags' region), recorded by
    each side with its start (KeyPool.agree_start), before its answer or confirmation
    lets the peer take any: the peer floor stands past every pad this side took, and a
    sealed message the link lost carried pads only its sender took. Without this
    reservation the receiver's record lay below them, and the sender, verifying at the
    next contact, refused its announcement, 32 bytes further each time."""
    while True:
        try:
            return _exchange_pool_start(transport, pool, role, session_bytes)
        except (ProtocolAborted, OSError) as error:
            # a listener whose peer failed before anything was committed: the next peer
            if not getattr(transport, "accept_next", lambda _reason: False)(str(error)):
                raise


def _open_exchange(transport, role: str | None):
    """Step 1, the hellos: (our nonce, the peer's, our lane, whether we prove)."""
    mode = getattr(transport, "mode", CONNECTOR)
    nonce = os.urandom(SESSION_NONCE_BYTES)
    transport.send_bytes(_START.pack(_START_HELLO, mode, nonce))
    data = transport.recv_bytes()
    if data[:8] in (b"QKDPOOL1", b"QKDPOOL2"):
        raise ProtocolAborted(
            "the peer announces its pool position without authentication: it speaks an "
            "older protocol"
        )
    if data[:8] in (b"QKDPOOL3", b"QKDPOOL4"):
        raise ProtocolAborted(
            f"the peer speaks pool-start protocol {data[7:8].decode()} (it could tag under "
            "the bytes of an answer the link lost, or of a session's first message): "
            "update it"
        )
    if len(data) != _START.size or data[:8] != _START_HELLO:
        raise ProtocolAborted("the peer did not open the pool-start exchange")
    _, peer_mode, peer_nonce = _START.unpack(data)
    party = _party(role, mode)
    if mode == LISTENER:
        prover = False
    elif peer_mode == LISTENER:
        prover = True
    elif role in (ALICE, BOB):
        prover = role == BOB
    else:
        raise ProtocolAborted("pool start: two connectors and no role to tell who proves")
    return nonce, peer_nonce, party, prover


def _verify_announcement(transport, pool: KeyPool, party: int, nonce, peer_nonce) -> int:
    """Step 3's check, the verifier's: the prover's position, its tag checked. Commits
    nothing (it only reads the pool): a listener runs it for every queued connection at
    once (ListeningTransport.first_verified)."""
    theirs, their_tag = _read_announcement(transport.recv_bytes())
    body = _announcement_body(0, theirs, 0, peer_nonce + nonce)
    if (
        not _fits(pool, theirs)
        or announcement_slot(theirs, 1 - party) != theirs  # off the peer's lane
        or not hmac.compare_digest(their_tag, _announcement_tag(pool, theirs, body))
    ):
        raise AuthenticationFailed("the peer's pool position failed authentication")
    floor = pool.peer_floor_byte
    if theirs < floor:
        # checked after the tag, so that the reason names only a position the peer
        # could tag; nothing is committed either way
        try:
            transport.send_bytes(_REFUSAL.pack(_REFUSE, floor))
        except ProtocolAborted:
            pass  # the refusal is said best effort: the reason below is this side's
        raise AuthenticationFailed(
            f"the peer's pool position {theirs} lies below {floor}, "
            "where this side's record says the peer's stood: bytes already used, "
            "which an eavesdropper may know (a forgery, or the peer's record rolled "
            "back)"
        )
    return theirs


def _exchange_pool_start(
    transport, pool: KeyPool, role: str | None, session_bytes: int = 0
) -> bytes:
    if hasattr(transport, "first_verified"):
        # a listener: every queued connection's opening read at once, the first whose
        # announcement checks taken (nothing committed before)
        def hear(candidate):
            opened = _open_exchange(candidate, role)
            return opened, _verify_announcement(candidate, pool, opened[2], *opened[:2])

        (nonce, peer_nonce, party, prover), theirs = transport.first_verified(hear)
    else:
        if hasattr(transport, "start_handshake"):
            transport.start_handshake()
        nonce, peer_nonce, party, prover = _open_exchange(transport, role)
        if not prover:
            theirs = _verify_announcement(transport, pool, party, nonce, peer_nonce)
    if prover:
        mine = pool.reserve_announcement(party)
        body = _announcement_body(0, mine, 0, nonce + peer_nonce)
        tag = _announcement_tag(pool, mine, body)
        transport.send_bytes(_ANNOUNCEMENT.pack(_ANNOUNCE, mine, tag))
        answer = transport.recv_bytes()
        if len(answer) == _REFUSAL.size and answer[:8] == _REFUSE:
            floor = _REFUSAL.unpack(answer)[1]
            # the refusal is untagged: anyone on the link can send it with any F, so F is
            # said as the peer's claim only; an instruction to set used_bytes to F let a
            # man in the middle make the operator burn the pool to a place of his choosing
            raise AuthenticationFailed(
                f"the peer refuses our pool position {mine}: it claims our usage record "
                f"stood at {floor} or later. Unauthenticated (anyone on the link can send "
                "this; nothing was moved): compare it out of band with the peer's own "
                f"record ({PEER_FLOOR_FIELD} in its .used) before changing "
                f"{pool.path or 'the pool'}.used"
            )
        theirs, their_tag = _read_announcement(answer)
        at = announcement_slot(max(mine + ANNOUNCE_BYTES, theirs), 1 - party)
        body = _announcement_body(1, mine, theirs, peer_nonce + nonce, session_bytes)
        if not _fits(pool, at) or not hmac.compare_digest(
            their_tag, _announcement_tag(pool, at, body)
        ):
            raise AuthenticationFailed(
                "the peer's pool position failed authentication (or its session budget "
                f"differs from ours, {session_bytes} bytes)"
            )
        confirm_at = announcement_slot(at + ANNOUNCE_BYTES, party)
        if not _fits(pool, confirm_at):
            raise ProtocolAborted("authentication key pool exhausted")
        # the verifier recorded this start before its answer; ours is durable before the
        # confirmation goes out, so neither side's next tag falls on the session's bytes
        # (the verifier's record covers the session's budget: its answer's tag says so)
        pool.raise_peer_floor(_session_end(pool, confirm_at + ANNOUNCE_BYTES, session_bytes))
        pool.agree_start(confirm_at + ANNOUNCE_BYTES, session_bytes)
        body = _announcement_body(_CONFIRM, mine, theirs, nonce + peer_nonce, session_bytes)
        tag = _announcement_tag(pool, confirm_at, body)
        transport.send_bytes(_ANNOUNCEMENT.pack(_ANNOUNCE, confirm_at, tag))
    else:  # the prover's announcement checked (_verify_announcement)
        mine = pool.start_byte
        at = announcement_slot(max(theirs + ANNOUNCE_BYTES, mine), party)
        confirm_at = announcement_slot(at + ANNOUNCE_BYTES, 1 - party)
        if not _fits(pool, confirm_at):
            raise ProtocolAborted("authentication key pool exhausted")
        pool.raise_peer_floor(theirs + ANNOUNCE_BYTES)  # the peer recorded them first
        # durable before our tag uses the bytes at q, and before the prover can send
        # anything under the session's (RESERVE_AHEAD_BYTES)
        pool.agree_start(confirm_at + ANNOUNCE_BYTES, session_bytes)
        body = _announcement_body(1, theirs, mine, nonce + peer_nonce, session_bytes)
        tag = _announcement_tag(pool, at, body)
        transport.send_bytes(_ANNOUNCEMENT.pack(_ANNOUNCE, mine, tag))
        position, confirm_tag = _read_announcement(transport.recv_bytes())
        body = _announcement_body(_CONFIRM, theirs, mine, peer_nonce + nonce, session_bytes)
        if position != confirm_at or not hmac.compare_digest(
            confirm_tag, _announcement_tag(pool, confirm_at, body)
        ):
            raise AuthenticationFailed("the peer's pool-start confirmation failed authentication")
        # it recorded the start and the session's budget first: every pad it may take in
        # the session (a sealed message the link loses: pads only it took, which an
        # eavesdropper may know) lies below its record, and so below our floor
        pool.raise_peer_floor(_session_end(pool, confirm_at + ANNOUNCE_BYTES, session_bytes))
    if hasattr(transport, "handshake_done"):
        transport.handshake_done()
    return min(nonce, peer_nonce) + max(nonce, peer_nonce)


def _read_announcement(data: bytes) -> tuple[int, bytes]:
    if len(data) != _ANNOUNCEMENT.size or data[:8] != _ANNOUNCE:
        raise ProtocolAborted("the peer did not announce its authentication pool position")
    _, position, tag = _ANNOUNCEMENT.unpack(data)
    return position, tag


# ------------------------------------------------------------------ transports


class QueueTransport:
    """One end of an in-process duplex pipe (two queues). mode: as a socket's (the pool-start
    exchange's asymmetry): queue_pair's first end stands for the listener."""

    def __init__(
        self,
        inbox: queue.Queue,
        outbox: queue.Queue,
        timeout_s: float = 600.0,
        mode: bytes = CONNECTOR,
    ):
        self.inbox, self.outbox, self.timeout_s = inbox, outbox, timeout_s
        self.mode = mode
        self.tamper = None  # test hook on the wire: callable(bytes) -> bytes

    def send_bytes(self, data: bytes) -> None:
        if self.tamper is not None:
            data = self.tamper(data)
        self.outbox.put(data)

    def recv_bytes(self) -> bytes:
        try:
            data = self.inbox.get(timeout=self.timeout_s)
        except queue.Empty as error:
            raise ChannelClosed("peer did not answer within the timeout") from error
        if data is None:
            raise ChannelClosed("peer closed the channel")
        return data

    def close(self) -> None:
        self.outbox.put(None)


def queue_pair(timeout_s: float = 600.0) -> tuple[QueueTransport, QueueTransport]:
    a_to_b, b_to_a = queue.Queue(), queue.Queue()
    return (
        QueueTransport(b_to_a, a_to_b, timeout_s, LISTENER),
        QueueTransport(a_to_b, b_to_a, timeout_s, CONNECTOR),
    )


class SocketTransport:
    """Length-prefixed messages over a TCP stream. mode: LISTENER for a connection this side
    accepted, CONNECTOR for one it made (exchange_pool_start: a listener never proves
    first)."""

    def __init__(
        self,
        sock: socket.socket,
        mode: bytes = CONNECTOR,
        handshake_timeout_s: float | None = None,
    ):
        self.sock = sock
        self.mode = mode
        self.handshake_s = handshake_timeout_s
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send_bytes(self, data: bytes) -> None:
        try:
            self.sock.sendall(_LEN.pack(len(data)) + data)
        except OSError as error:
            raise ChannelClosed(f"send failed: {error}") from error

    # A whole message must arrive within the socket's timeout (each wait's bound, listen's
    # and connect's timeout_s) plus MESSAGE_BYTES_PER_S of its length, not only each wait
    # for a byte: a man in the middle dripping a byte just within the timeout held a
    # session for good; now he holds a message no longer than his silence would.
    handshake_deadline = None
    handshake_s = None  # the pool-start exchange's bound (wall seconds), when it has one

    _handshake_pending = False  # bounded, and the peer has not sent its first byte yet

    def start_handshake(self) -> None:
        """The pool-start exchange begins: with a bound (a connector of a split mode,
        connect's handshake_timeout_s), it must end within it of the peer's first byte.
        Not of the connection: a connection may wait, silent, in the listen queue while
        strangers hold the listener's places (MAX_PENDING_PEERS, HANDSHAKE_TIMEOUT_S
        each); silence itself has the socket's timeout, as every wait."""
        if self.handshake_s is not None:
            self._read_timeout_s = self.sock.gettimeout()
            self._handshake_pending = True

    def handshake_done(self) -> None:
        self._handshake_pending = False
        if self.handshake_deadline is not None:
            self.handshake_deadline = None
            self.sock.settimeout(self._read_timeout_s)  # each later wait's own bound

    def _handshake_overdue(self) -> Exception:
        message = f"the pool-start exchange took more than {self.handshake_s:g} s"
        if self.mode == LISTENER:
            return ChannelClosed(message)  # the listener drops this peer, takes the next
        from host.errors import EnvironmentFailure

        # a connector: the link failed before the protocol began (exit 1, as open_split's
        # "no peer answering"); nothing of the pool was committed but its announcement
        return EnvironmentFailure(f"{message} (the peer or the link stalls it)")

    def _recv_exact(self, count: int, deadline: float | None = None, wait_s=None) -> bytes:
        parts, remaining = [], count
        while remaining:
            if self.handshake_deadline is not None:  # the pool-start exchange's bound
                left = self.handshake_deadline - time.monotonic()
                if left <= 0:
                    raise self._handshake_overdue()
                self.sock.settimeout(left)
            elif deadline is not None:  # a session message's bound
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._message_overdue(deadline)
                self.sock.settimeout(min(left, wait_s))
            try:
                chunk = self.sock.recv(min(remaining, 1 << 20))
            except TimeoutError as error:
                if self.handshake_deadline is not None:
                    raise self._handshake_overdue() from error
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._message_overdue(deadline) from error
                raise ChannelClosed(f"receive failed: {error}") from error
            except OSError as error:
                raise ChannelClosed(f"receive failed: {error}") from error
            if not chunk:
                # on the optical link this is also how a link lost for good shows
                raise ChannelClosed("connection closed: the peer stopped or the link was lost")
            if self._handshake_pending:  # the peer's first byte: the bound runs from here
                self._handshake_pending = False
                self.handshake_deadline = time.monotonic() + self.handshake_s
            parts.append(chunk)
            remaining -= len(chunk)
        return b"".join(parts)

    def _message_overdue(self, deadline: float) -> ChannelClosed:
        return ChannelClosed(
            f"a message took more than {deadline - self._message_began:.0f} s to arrive "
            "(the peer or the link stalls it)"
        )

    def recv_bytes(self) -> bytes:
        deadline = wait_s = None
        if self.handshake_deadline is None:
            wait_s = self.sock.gettimeout()
            if wait_s is not None:
                self._message_began = time.monotonic()
                deadline = self._message_began + wait_s
        try:
            (length,) = _LEN.unpack(self._recv_exact(4, deadline, wait_s))
            in_handshake = self.handshake_deadline is not None or self._handshake_pending
            limit = _HANDSHAKE_FRAME_MAX if in_handshake else MAX_MESSAGE_BYTES
            if length > limit:
                raise ProtocolAborted(f"peer announced a {length}-byte message")
            if deadline is not None:
                deadline += length / MESSAGE_BYTES_PER_S
            return self._recv_exact(length, deadline, wait_s)
        finally:
            if wait_s is not None:
                try:
                    self.sock.settimeout(wait_s)  # each later wait's own bound again
                except OSError:
                    pass  # closed meanwhile: the next use says so

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError as error:
        raise BadInput(f"address {text!r}: expected HOST:PORT") from error


class ListeningTransport(SocketTransport):
    """The transport of a side that listens. Until the pool-start exchange has verified a
    peer (exchange_pool_start), the listening socket stays open and every connection is
    heard at once (first_verified): up to MAX_PENDING_PEERS at a time, each in its own
    thread, each given HANDSHAKE_TIMEOUT_S from its acceptance to a verified announcement;
    the first that verifies is taken and the others closed. A peer that fails (silent,
    garbage, a forged or replayed announcement) is dropped, said on stderr, all within
    the listener's own deadline (timeout_s from the start). A stranger holds one of the
    MAX_PENDING_PEERS places for at most HANDSHAKE_TIMEOUT_S, never the listener, and
    never commits anything on this side."""

    def __init__(self, server: socket.socket, address: str, timeout_s: float):
        self.server, self.address, self.timeout_s = server, address, timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.mode = LISTENER
        self.dropped = []  # why each peer before the verified one was dropped
        # the first connection is awaited here, as a listen() nobody reaches says at once
        # (open_split: exit 1); first_verified accepts it
        if not select.select([server], [], [], timeout_s)[0]:
            self._give_up()

    def _give_up(self) -> None:
        self.server.close()
        self.server = None
        raise ChannelClosed(f"no peer connected to {self.address}")

    def _drop(self, reason: str) -> None:
        self.dropped.append(reason)
        print(
            f"qkdsat: {self.address}: dropped a peer before the session ({reason}); "
            "waiting for the next",
            file=sys.stderr,
            flush=True,
        )

    def first_verified(self, hear):
        """`hear(candidate)` (the verifier's side of the exchange up to its check of the
        prover's tag, committing nothing) on each connection, concurrently, each on its
        own SocketTransport bounded by HANDSHAKE_TIMEOUT_S from its acceptance. Returns the
        first result; its connection becomes this transport's, the others are closed.
        Why concurrently: one connection at a time, strangers queued ahead of the peer (a
        valid hello, then silence) held the listener HANDSHAKE_TIMEOUT_S each, and enough
        of them (600 s / 10 s) made every --connect run fail."""
        results = queue.Queue()
        wake_r, wake_w = socket.socketpair()
        pending = {}  # thread -> its candidate transport

        def run(candidate):
            try:
                outcome = (candidate, hear(candidate), None)
            except BaseException as error:  # dropped, or re-raised by the listener's thread
                outcome = (candidate, None, error)
            results.put(outcome)
            try:
                wake_w.send(b"\0")
            except OSError:
                pass  # the listener already took a peer

        try:
            while True:
                while not results.empty():
                    candidate, result, error = results.get()
                    pending.pop(candidate, None)
                    if error is None:
                        self._adopt(candidate)
                        return result
                    candidate.close()
                    if not isinstance(error, (ProtocolAborted, OSError)):
                        raise error
                    self._drop(str(error))
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    self._give_up()
                # at the cap, further connections wait in the listen queue: strangers
                # cost the listener threads and descriptors only up to MAX_PENDING_PEERS
                waiting = [wake_r] + ([self.server] if len(pending) < MAX_PENDING_PEERS else [])
                readable, _, _ = select.select(waiting, [], [], remaining)
                if wake_r in readable:
                    wake_r.recv(4096)
                if self.server in readable:
                    try:
                        conn, _ = self.server.accept()
                    except OSError:
                        continue  # the connection went before it was accepted
                    candidate = SocketTransport(conn, LISTENER)
                    candidate.handshake_s = min(HANDSHAKE_TIMEOUT_S, remaining)
                    candidate.handshake_deadline = time.monotonic() + candidate.handshake_s
                    pending[candidate] = True
                    threading.Thread(target=run, args=(candidate,), daemon=True).start()
        finally:
            for candidate in pending:
                try:  # wakes its thread's read (a bare close may not)
                    candidate.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                candidate.close()
            wake_r.close()
            wake_w.close()

    def send_bytes(self, data: bytes) -> None:
        if not hasattr(self, "sock"):
            self._accept_unverified()
        super().send_bytes(data)

    def recv_bytes(self) -> bytes:
        if not hasattr(self, "sock"):
            self._accept_unverified()
        return super().recv_bytes()

    def _accept_unverified(self) -> None:
        """Used without the pool-start exchange (a channel of its own: in-process tests),
        the first connection is this transport's."""
        self.server.settimeout(max(self.deadline - time.monotonic(), 0.001))
        try:
            conn, _ = self.server.accept()
        except TimeoutError:
            self._give_up()
        SocketTransport.__init__(self, conn, LISTENER)
        self.sock.settimeout(self.timeout_s)

    def _adopt(self, candidate: SocketTransport) -> None:
        """The verified connection becomes this transport's; its exchange's bound holds."""
        self.sock = candidate.sock
        self.handshake_s = candidate.handshake_s
        self.handshake_deadline = candidate.handshake_deadline

    def accept_next(self, reason: str) -> bool:
        """A peer failed the pool-start exchange after its announcement verified (its
        confirmation): drop it and hear the next (True), or False once a peer was
        verified to the end (the failure is then the session's)."""
        if self.server is None:
            return False
        self._drop(reason)
        if hasattr(self, "sock"):
            self.sock.close()
            del self.sock
        return True

    def handshake_done(self) -> None:
        self.server.close()
        self.server = None
        self.handshake_deadline = None
        self.sock.settimeout(self.timeout_s)

    def close(self) -> None:
        if hasattr(self, "sock"):
            super().close()
        if self.server is not None:
            self.server.close()
            self.server = None


def listen(
    address: str, timeout_s: float = 600.0, ready: threading.Event | None = None, on_listening=None
):
    """`on_listening()`, when given, is called once the address is bound (not before: a
    "listening on" line must not precede a bind error)."""
    host, port = parse_address(address)
    server = socket.create_server((host, port))
    if on_listening is not None:
        on_listening()
    if ready is not None:
        ready.port = server.getsockname()[1]
        ready.set()
    return ListeningTransport(server, address, timeout_s)


def open_split(listen_address: str | None, connect_address: str | None, on_listening=None):
    """A split mode's transport: listen on `listen_address` or connect to `connect_address`
    (HOST:PORT, exactly one given). A bad address is bad input (exit 2); no peer coming or
    none answering is an EnvironmentFailure (exit 1: the link failed before the protocol
    began; exit 3 is for a protocol that stopped, with its report). A connector's
    pool-start exchange is bounded as a whole (CONNECT_HANDSHAKE_TIMEOUT_S): past it,
    EnvironmentFailure too."""
    from host.errors import EnvironmentFailure

    option = "--listen" if listen_address else "--connect"
    address = listen_address or connect_address
    try:
        if listen_address:
            return listen(listen_address, on_listening=on_listening)
        return connect(connect_address, handshake_timeout_s=CONNECT_HANDSHAKE_TIMEOUT_S)
    except (OSError, OverflowError) as error:
        raise BadInput(f"{option} {address}: {error}") from None
    except ChannelClosed as error:
        raise EnvironmentFailure(f"{option} {address}: {error}") from None


def connect(
    address: str,
    timeout_s: float = 600.0,
    retry_s: float = 30.0,
    handshake_timeout_s: float | None = None,
):
    """handshake_timeout_s: the pool-start exchange's bound from the connection (split
    modes: CONNECT_HANDSHAKE_TIMEOUT_S); without it (two connectors through the optical
    link's relay, which passes nothing until the link is up) only timeout_s bounds each
    wait."""
    host, port = parse_address(address)
    deadline = time.monotonic() + retry_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
            return SocketTransport(sock, handshake_timeout_s=handshake_timeout_s)
        except OSError as error:
            if time.monotonic() > deadline:
                raise ChannelClosed(f"cannot connect to {address}: {error}") from error
            time.sleep(0.1)


# ------------------------------------------------------------------ messages


def encode(kind: str, fields: dict) -> bytes:
    """kind, a JSON header of scalars and array descriptors, then the raw arrays."""
    scalars, arrays, blobs = {}, [], []
    for name, value in fields.items():
        if isinstance(value, np.ndarray):
            arr = np.ascontiguousarray(value)
            arrays.append([name, arr.dtype.str, list(arr.shape)])
            blobs.append(arr.tobytes())
        elif isinstance(value, bytes):
            arrays.append([name, "bytes", [len(value)]])
            blobs.append(value)
        else:
            scalars[name] = value
    header = json.dumps({"k": kind, "s": scalars, "a": arrays}, separators=(",", ":")).encode()
    return _LEN.pack(len(header)) + header + b"".join(blobs)


def decode(body: bytes) -> tuple[str, dict]:
    try:
        (hlen,) = _LEN.unpack_from(body, 0)
        header = json.loads(body[4 : 4 + hlen])
        fields = dict(header["s"])
        pos = 4 + hlen
        for name, dtype, shape in header["a"]:
            if dtype == "bytes":
                fields[name] = bytes(body[pos : pos + shape[0]])
                pos += shape[0]
                continue
            dt = np.dtype(dtype)
            count = int(np.prod(shape)) if shape else 1
            nbytes = count * dt.itemsize
            if pos + nbytes > len(body):
                raise ValueError("array runs past the message")
            fields[name] = np.frombuffer(body, dtype=dt, count=count, offset=pos).reshape(shape)
            pos += nbytes
        if pos != len(body):
            raise ValueError("trailing bytes")
        return header["k"], fields
    except (ValueError, KeyError, TypeError, struct.error) as error:
        # Only reachable after the tag checked: the peer itself sent nonsense.
        raise ProtocolAborted(f"malformed protocol message: {error}") from error


class AuthChannel:
    """Authenticated, counted, in-order messages for one role over a transport.

    Pad safety when the two sides' pool records differ (a crash, or a man in the middle
    rewriting the announced positions): Alice speaks first, from her own record or later,
    so her pads were never used by her nor, thanks to RESERVE_AHEAD_BYTES, by Bob in a
    session she took part in. Bob sends nothing authenticated (not even an abort) until
    Alice's first message has verified, which happens only if both began at the same
    point, at or after both records, in this session: the tags cover both sides' fresh
    nonces, so Alice's messages of an earlier session replayed to a Bob whose record was
    rolled back to its start do not verify. Alice, who speaks first, relies on her own
    record alone: if it is rolled back, a man in the middle who lowers Bob's announced
    position makes her tag her first message under a pad she used before (docs)."""

    def __init__(self, transport, pool: KeyPool, role: str, session: bytes = b""):
        """session: what exchange_pool_start returned (empty in one process, where
        nothing is replayed and both endpoints share the pool's record)."""
        self.transport, self.pool, self.role = transport, pool, role
        self.session = bytes(session)
        self._hash_key = None
        self.sent = 0
        self.received = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.peer_acknowledged = 0  # of our messages, as the peer's last message said
        self.peer_verified = False
        self.forgery_bound = 0.0  # sum over messages of (L + 1) / 2^64, L = max blocks
        self.closed = False
        self.tag_region_messages = None  # each way, when bounded: limit_tag_region()

    @property
    def hash_key(self) -> int:
        if self._hash_key is None:  # taken only once the session start is agreed
            self._hash_key = int.from_bytes(self.pool.take(0, 8), "little")
        return self._hash_key

    def limit_tag_region(self, messages_each_way: int) -> None:
        """Keep the tags inside a region of the session's key that holds the hash key and
        the pads of this many messages each way, the last kept for an abort: a protocol
        that lays other pads after it (the time transfer's sealing) must never see one
        taken twice. A message past the region is refused before its pad is taken."""
        self.tag_region_messages = messages_each_way

    def _pad(self, direction: int, seq: int) -> int:
        region = self.tag_region_messages
        if region is not None and seq >= region:
            raise ProtocolAborted(
                f"message {seq} {'from bob' if direction else 'from alice'} is past the "
                f"session's tag region ({region} messages each way): its pad would be "
                "another region's"
            )
        return int.from_bytes(self.pool.take(8 + 8 * (2 * seq + direction), 8), "little")

    def _tag(self, direction: int, seq: int, body: bytes) -> bytes:
        prefix = struct.pack("<BQ", direction, seq) + self.session
        h = poly_hash(prefix + body, self.hash_key) ^ self._pad(direction, seq)
        return h.to_bytes(8, "little")

    @property
    def unanswered(self) -> int:
        """Our messages the peer has not acknowledged (may still be in flight)."""
        return self.sent - self.peer_acknowledged

    def send(self, kind: str, **fields) -> None:
        body = encode(kind, {**fields, _ACK_FIELD: self.received})
        if len(body) + TAG_BYTES > MAX_MESSAGE_BYTES:
            raise RuntimeError(f"message {kind!r} of {len(body)} bytes exceeds the bound")
        if self.unanswered >= MAX_UNANSWERED:
            # a protocol bug, never the peer's doing: the peer's usage record would not
            # cover this pad (RESERVE_AHEAD_BYTES), so it is refused, loudly
            raise RuntimeError(
                f"message {kind!r}: {self.unanswered} messages not yet acknowledged by the "
                f"peer, the most its pool reserve covers is {MAX_UNANSWERED}"
            )
        region = self.tag_region_messages
        if region is not None and kind != "abort" and self.sent >= region - 1:
            raise ProtocolAborted(
                f"message {kind!r}: the session's tag region holds {region - 1} messages "
                "each way and an abort, and this side has sent them"
            )
        direction = _DIRECTION[self.role]
        tag = self._tag(direction, self.sent, body)
        self.sent += 1
        self.forgery_bound += FORGERY_PER_MESSAGE
        frame = body + tag
        self.bytes_sent += len(frame) + _LEN.size
        self.transport.send_bytes(frame)

    def recv(self, expected_kind: str) -> dict:
        frame = self.transport.recv_bytes()
        self.bytes_received += len(frame) + _LEN.size
        direction = 1 - _DIRECTION[self.role]
        seq = self.received
        self.received += 1
        self.forgery_bound += FORGERY_PER_MESSAGE
        if not TAG_BYTES <= len(frame) <= MAX_MESSAGE_BYTES:
            raise AuthenticationFailed(
                f"authentication failed on message {seq} from {'bob' if direction else 'alice'}"
                f": {len(frame)} bytes"
            )
        body, tag = frame[:-TAG_BYTES], frame[-TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(direction, seq, body)):
            raise AuthenticationFailed(
                f"authentication failed on message {seq} from {'bob' if direction else 'alice'}"
            )
        self.peer_verified = True
        kind, fields = decode(body)
        acknowledged = fields.pop(_ACK_FIELD, None)
        if acknowledged is None:
            raise ProtocolAborted(
                f"message {seq} ({kind!r}) carries no acknowledgement: the peer speaks an "
                "older protocol (before version 4)"
            )
        if not isinstance(acknowledged, int) or not 0 <= acknowledged <= self.sent:
            raise ProtocolAborted(f"message {seq}: acknowledges {acknowledged!r} of {self.sent}")
        self.peer_acknowledged = max(self.peer_acknowledged, acknowledged)
        region = self.tag_region_messages
        if region is not None and kind != "abort" and seq >= region - 1:
            raise ProtocolAborted(
                f"message {seq} ({kind!r}): the peer sent more than the {region - 1} "
                "messages each way the session's tag region holds"
            )
        if kind == "abort":
            raise PeerAborted(f"{fields.get('reason', 'peer aborted')}")
        if kind != expected_kind:
            raise ProtocolAborted(f"expected message {expected_kind!r}, received {kind!r}")
        return fields

    def abort(self, reason: str) -> None:
        """Tell the peer why we stop (best effort: the channel may already be gone). Bob
        stays silent until Alice's first message verified (see the class docstring)."""
        if self.closed or (self.role == BOB and not self.peer_verified):
            return
        try:
            self.send("abort", reason=reason)
        except (ProtocolAborted, OSError, RuntimeError):
            pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()


def endpoint_thread(name: str, endpoint, chan, result: dict) -> threading.Thread:
    """A thread running `endpoint.run(chan)` (one side of a protocol in this process, for
    distillation and time transfer alike): its outcome goes to result[name], an exception
    to result[name + "_error"] for the caller to re-raise, and the channel is closed
    whatever happens, so that the peer stops waiting."""

    def body():
        try:
            result[name] = endpoint.run(chan)
        except BaseException as error:  # re-raised in the calling thread
            result[f"{name}_error"] = error
        finally:
            chan.close()

    return threading.Thread(target=body, name=name, daemon=True)
