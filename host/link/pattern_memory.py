"""The payload processor's reader of the optical head's pattern memory (docs/payload-bus.md
"Pattern-memory port"): symbols by lists of slot indices, the way Alice needs them for the
slots Bob detected, and for the contiguous windows of the time synchronisation (sent as
runs of consecutive slots, PATTERN_READ_RUNS, whenever that is the smaller request). On
board only: the port is the processor's link to the head, never a ground link, and the
symbols it returns are Alice's raw data.

    with PatternMemoryClient(server.pattern_address, slot_count) as memory:
        nibbles = memory.symbols(np.array([12, 7, 99_000_000]))

It answers the pattern interface of host/formats/patterns.py (`symbols`, `covers`,
`first_slot`, `slot_count`), so `host.distil.protocol.Alice(..., patterns=memory)` reads
from it. `slot_count` is the run's length as the controller reports it (housekeeping
`generator.frames` x the frame's slots): slots past it are not asked for.
"""

from __future__ import annotations

import socket
import time

import numpy as np

from host.protocol import payload_bus as pb
from host.protocol.framing import FrameReader, encode_frame

MAX_OFFSET = 2**32 - 1


class PatternMemoryError(RuntimeError):
    """The head refused a read or did not answer; the message says which."""


class _UnknownOp(PatternMemoryError):
    pass


class PatternMemoryClient:
    first_slot = 0

    def __init__(self, address: tuple[str, int], slot_count: int, timeout_s: float = 10.0):
        self.address = address
        self.slot_count = int(slot_count)
        self.timeout_s = timeout_s
        self._sock = socket.create_connection(address, timeout=timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = FrameReader(pb.PATTERN_PORT_MAX_BODY_BYTES)
        self._tag = 0
        self.runs_supported = True  # cleared if the head answers PATTERN_READ_RUNS unknown
        self.requests = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def covers(self, slot_indices) -> np.ndarray:
        slots = np.asarray(slot_indices, dtype=np.int64)
        return (slots >= 0) & (slots < self.slot_count)

    def symbols(self, slot_indices) -> np.ndarray:
        """Symbol nibbles (uint8) of the given slots, in the given order."""
        slots = np.asarray(slot_indices, dtype=np.int64).reshape(-1)
        out = np.empty(slots.size, dtype=np.uint8)
        if slots.size == 0:
            return out
        if not np.all(self.covers(slots)):
            raise IndexError("slot not in the pattern memory's run")
        order = np.argsort(slots, kind="stable")
        ordered = slots[order]
        at = 0
        while at < ordered.size:
            end = min(at + pb.MAX_PATTERN_READ_SLOTS, ordered.size)
            base = int(ordered[at])
            # every offset of one request fits a u32
            end = at + int(np.searchsorted(ordered[at:end], base + MAX_OFFSET, side="right"))
            out[order[at:end]] = self._read(base, ordered[at:end] - base)
            at = end
        return out

    def _read(self, base: int, offsets: np.ndarray) -> np.ndarray:
        """Symbols of slots base + offsets (sorted), in one request: as runs of consecutive
        slots (PATTERN_READ_RUNS, 6 bytes a run) when that is the smaller body, else as the
        slot list (PATTERN_READ, 4 bytes a slot): an intensity window of 16,384 slots is one
        run, 18 bytes instead of 65,548; scattered detections stay a list."""
        run_starts = np.flatnonzero(np.diff(offsets, prepend=-2) != 1)
        if (
            self.runs_supported
            and run_starts.size <= pb.MAX_PATTERN_READ_RUNS
            and pb.PATTERN_RUN_BYTES * run_starts.size < 4 * offsets.size
        ):
            lengths = np.diff(run_starts, append=offsets.size)
            op = pb.OP_PATTERN_READ_RUNS
            body = pb.pack_pattern_read_runs(self._next_tag(), base, offsets[run_starts], lengths)
            try:
                return self._request(op, body, offsets.size)
            except _UnknownOp:
                # a head built before PATTERN_READ_RUNS: lists from now on
                self.runs_supported = False
        body = pb.pack_pattern_read(self._next_tag(), base, offsets)
        return self._request(pb.OP_PATTERN_READ, body, offsets.size)

    def _next_tag(self) -> int:
        self._tag = (self._tag + 1) & 0xFF
        return self._tag

    def _request(self, op: int, body: bytes, slot_count: int) -> np.ndarray:
        frame = encode_frame(body)
        self._sock.sendall(frame)
        self.bytes_sent += len(frame)
        self.requests += 1
        deadline = time.monotonic() + self.timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PatternMemoryError(f"pattern memory at {self.address}: no answer")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not chunk:
                raise PatternMemoryError(f"pattern memory at {self.address} closed the port")
            self.bytes_received += len(chunk)
            for body in self._reader.feed(chunk):
                if body[:2] != bytes((op | pb.REPLY_FLAG, self._tag)):
                    continue  # a late reply to an abandoned request
                tag, status, nibbles = pb.unpack_pattern_reply(body, op)
                if status == pb.E_UNKNOWN_OP:
                    raise _UnknownOp(f"pattern memory does not know op {op:#04x}")
                if status != pb.OK:
                    name = pb.STATUS_NAMES.get(status, str(status))
                    raise PatternMemoryError(f"pattern memory refused a read: {name}")
                if nibbles.size != slot_count:
                    raise PatternMemoryError("pattern memory answered the wrong number of slots")
                return nibbles
