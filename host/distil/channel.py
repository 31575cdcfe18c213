"""The classical channel between Alice and Bob: transports (in-process, TCP), message
encoding, and Wegman-Carter authentication from a pre-shared key pool.

Authentication: every message carries tag = h_k(direction | seq | body) XOR r, with h the
GF(2^64) polynomial hash (host/distil/gf64.py), k a 64-bit hash key used for the whole
session (key recycling is allowed because the tag is one-time padded) and r a fresh 64-bit
one-time pad per message. Both come from the pool file both parties hold. Pads are laid out
in the pool as [k | pad(A->B, 0) | pad(B->A, 0) | pad(A->B, 1) | ...] so each side finds
them without coordination; the pool consumed is 64 + 128 * max(messages each way) bits.
A forged or altered message is accepted with probability <= (L + 1) / 2^64 for a message
of L 64-bit blocks.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import struct
import threading

import numpy as np

from host.distil.gf64 import poly_hash
from host.errors import BadInput, ProtocolAborted

ALICE, BOB = "alice", "bob"
_DIRECTION = {ALICE: 0, BOB: 1}  # the direction of messages this role sends
TAG_BYTES = 8
_LEN = struct.Struct("<I")
MAX_MESSAGE_BYTES = 1 << 30


class AuthenticationFailed(ProtocolAborted):
    pass


class PeerAborted(ProtocolAborted):
    pass


class ChannelClosed(ProtocolAborted):
    pass


# ------------------------------------------------------------------ key pool


class KeyPool:
    """Pre-shared secret bytes. `start_byte` skips what earlier sessions consumed."""

    def __init__(self, data: bytes, start_byte: int = 0, path: str | None = None):
        self.data = bytes(data)
        self.start_byte = start_byte
        self.path = path
        self.high_water_byte = start_byte

    @classmethod
    def from_file(cls, path: str) -> KeyPool:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as error:
            raise BadInput(f"authentication key pool {path}: {error.strerror}") from error
        start = 0
        used_path = path + ".used"
        if os.path.exists(used_path):
            try:
                with open(used_path) as handle:
                    start = int(json.load(handle)["used_bytes"])
            except (ValueError, KeyError, TypeError) as error:
                raise BadInput(f"{used_path}: not a key-pool usage record ({error})") from error
        if len(data) - start < 1024:
            raise BadInput(f"authentication key pool {path}: only {len(data) - start} bytes left")
        return cls(data, start, path)

    def take(self, offset_byte: int, count: int) -> bytes:
        """Bytes at offset_byte (relative to this session's start)."""
        begin = self.start_byte + offset_byte
        if begin + count > len(self.data):
            raise ProtocolAborted("authentication key pool exhausted")
        self.high_water_byte = max(self.high_water_byte, begin + count)
        return self.data[begin : begin + count]

    @property
    def used_bits(self) -> int:
        return 8 * (self.high_water_byte - self.start_byte)

    def commit(self) -> None:
        """Record the consumption next to the pool file, atomically: pads are never reused."""
        if self.path is None:
            return
        used_path = self.path + ".used"
        tmp = used_path + ".tmp"
        with open(tmp, "w") as handle:
            json.dump({"used_bytes": self.high_water_byte}, handle)
        os.replace(tmp, used_path)


# ------------------------------------------------------------------ transports


class QueueTransport:
    """One end of an in-process duplex pipe (two queues)."""

    def __init__(self, inbox: queue.Queue, outbox: queue.Queue, timeout_s: float = 600.0):
        self.inbox, self.outbox, self.timeout_s = inbox, outbox, timeout_s
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
    return QueueTransport(b_to_a, a_to_b, timeout_s), QueueTransport(a_to_b, b_to_a, timeout_s)


class SocketTransport:
    """Length-prefixed messages over a TCP stream."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send_bytes(self, data: bytes) -> None:
        try:
            self.sock.sendall(_LEN.pack(len(data)) + data)
        except OSError as error:
            raise ChannelClosed(f"send failed: {error}") from error

    def _recv_exact(self, count: int) -> bytes:
        parts, remaining = [], count
        while remaining:
            try:
                chunk = self.sock.recv(min(remaining, 1 << 20))
            except OSError as error:
                raise ChannelClosed(f"receive failed: {error}") from error
            if not chunk:
                raise ChannelClosed("peer closed the connection")
            parts.append(chunk)
            remaining -= len(chunk)
        return b"".join(parts)

    def recv_bytes(self) -> bytes:
        (length,) = _LEN.unpack(self._recv_exact(4))
        if length > MAX_MESSAGE_BYTES:
            raise ProtocolAborted(f"peer announced a {length}-byte message")
        return self._recv_exact(length)

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


def listen(address: str, timeout_s: float = 600.0, ready: threading.Event | None = None):
    host, port = parse_address(address)
    server = socket.create_server((host, port))
    server.settimeout(timeout_s)
    if ready is not None:
        ready.port = server.getsockname()[1]
        ready.set()
    try:
        conn, _ = server.accept()
    except TimeoutError as error:
        raise ChannelClosed(f"no peer connected to {address}") from error
    finally:
        server.close()
    conn.settimeout(timeout_s)
    return SocketTransport(conn)


def connect(address: str, timeout_s: float = 600.0, retry_s: float = 30.0):
    import time

    host, port = parse_address(address)
    deadline = time.monotonic() + retry_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
            return SocketTransport(sock)
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
    """Authenticated, counted, in-order messages for one role over a transport."""

    def __init__(self, transport, pool: KeyPool, role: str):
        self.transport, self.pool, self.role = transport, pool, role
        self.hash_key = int.from_bytes(pool.take(0, 8), "little")
        self.sent = 0
        self.received = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.closed = False

    def _pad(self, direction: int, seq: int) -> int:
        return int.from_bytes(self.pool.take(8 + 8 * (2 * seq + direction), 8), "little")

    def _tag(self, direction: int, seq: int, body: bytes) -> bytes:
        prefix = struct.pack("<BQ", direction, seq)
        h = poly_hash(prefix + body, self.hash_key) ^ self._pad(direction, seq)
        return h.to_bytes(8, "little")

    def send(self, kind: str, **fields) -> None:
        body = encode(kind, fields)
        direction = _DIRECTION[self.role]
        tag = self._tag(direction, self.sent, body)
        self.sent += 1
        frame = body + tag
        self.bytes_sent += len(frame) + _LEN.size
        self.transport.send_bytes(frame)

    def recv(self, expected_kind: str) -> dict:
        frame = self.transport.recv_bytes()
        self.bytes_received += len(frame) + _LEN.size
        direction = 1 - _DIRECTION[self.role]
        body, tag = frame[:-TAG_BYTES], frame[-TAG_BYTES:]
        seq = self.received
        self.received += 1
        if len(frame) < TAG_BYTES or tag != self._tag(direction, seq, body):
            raise AuthenticationFailed(
                f"authentication failed on message {seq} from {'bob' if direction else 'alice'}"
            )
        kind, fields = decode(body)
        if kind == "abort":
            raise PeerAborted(f"{fields.get('reason', 'peer aborted')}")
        if kind != expected_kind:
            raise ProtocolAborted(f"expected message {expected_kind!r}, received {kind!r}")
        return fields

    def abort(self, reason: str) -> None:
        """Tell the peer why we stop (best effort: the channel may already be gone)."""
        if self.closed:
            return
        try:
            self.send("abort", reason=reason)
        except (ProtocolAborted, OSError):
            pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()
