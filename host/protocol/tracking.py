"""TRACKING records (record kind 4, docs/formats.md, docs/tracking.md): the CPython twin of
firmware/payload/tracking.py's pack_samples/pack_transitions.

Payload header (12 bytes): u8 version (1), u8 subtype (1 samples, 2 transitions),
u16 count, u32 loop period (us), u32 decimation (steps per sample; 0 for transitions).
Sample (24 bytes): u32 step, u8 state, u8 flags (0), u16 signal (QPD counts above
background, clipped), i32 error x, i32 error y (nrad), i32 mirror x, i32 mirror y (nrad).
Transition (8 bytes): u32 step, u8 from, u8 to, u8 reason, u8 0.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from host.formats import qrec

RECORD_KIND_TRACKING = 4
VERSION = 1
SUBTYPE_SAMPLES = 1
SUBTYPE_TRANSITIONS = 2
HEADER = struct.Struct("<BBHII")
SAMPLE_DTYPE = np.dtype(
    [
        ("step", "<u4"),
        ("state", "u1"),
        ("flags", "u1"),
        ("signal", "<u2"),
        ("err_x_nrad", "<i4"),
        ("err_y_nrad", "<i4"),
        ("fsm_x_nrad", "<i4"),
        ("fsm_y_nrad", "<i4"),
    ]
)
TRANSITION = struct.Struct("<IBBBB")
STATE_NAMES = ("IDLE", "OPEN_LOOP", "SCAN", "COARSE", "FINE", "HOLD", "REACQ", "LOST")
REASON_NAMES = (
    "",
    "command start",
    "command stop",
    "on prediction",
    "camera signal",
    "fine signal",
    "signal lost",
    "signal back",
    "hold timeout",
    "scan exhausted",
    "camera lost",
)


class TrackingFormatError(ValueError):
    pass


# ------------------------------------------------------------ full-pass prediction upload
# (docs/tracking.md "Full-pass prediction upload"; the firmware's reader is
# firmware/payload/tracking.py PredictionUpload.) A node is 8 little-endian int32:
# x, y (nrad), vx, vy (nrad/ms), ax, ay (nrad/ms^2, Q16), pa x, pa y (nrad).
NODE = struct.Struct("<8i")
CONFIGURE_MAX_BYTES = 512  # the configure telecommand's JSON (firmware telecommands.py)
NODES_PER_CHUNK = 6  # 6 nodes = 384 hex characters: the JSON stays under 512 bytes


def pack_nodes(rows: list[list[int]]) -> bytes:
    return b"".join(NODE.pack(*row) for row in rows)


def prediction_upload(rows: list[list[int]]) -> tuple[list[dict], dict]:
    """(chunk configurations, tracking predictions reference) for a whole pass: send each
    chunk as its own configure telecommand, in order, then the pass configuration with
    `"tracking": {"parameters": ..., "predictions": reference}`."""
    packed = pack_nodes(rows)
    chunks = []
    for first in range(0, len(rows), NODES_PER_CHUNK):
        part = packed[first * NODE.size : (first + NODES_PER_CHUNK) * NODE.size]
        chunk = {"tracking_predictions": {"first": first, "total": len(rows), "hex": part.hex()}}
        if len(json.dumps(chunk, separators=(",", ":"))) > CONFIGURE_MAX_BYTES:
            raise ValueError("prediction chunk does not fit the configure telecommand")
        chunks.append(chunk)
    return chunks, {"nodes": len(rows), "crc32": zlib.crc32(packed)}


@dataclass(frozen=True)
class Transition:
    step: int
    old: int
    new: int
    reason: int

    def describe(self, period_us: int) -> str:
        return (
            f"{self.step * period_us / 1e6:9.3f} s  {STATE_NAMES[self.old]:>9} -> "
            f"{STATE_NAMES[self.new]:<9} ({REASON_NAMES[self.reason]})"
        )


def decode_payload(payload: bytes) -> tuple[int, int, int, np.ndarray | list[Transition]]:
    """(subtype, period_us, decimation, samples array or transitions list)."""
    if len(payload) < HEADER.size:
        raise TrackingFormatError(f"TRACKING payload of {len(payload)} bytes: header cut short")
    version, subtype, count, period_us, decimation = HEADER.unpack_from(payload)
    if version != VERSION:
        raise TrackingFormatError(f"TRACKING payload version {version}, expected {VERSION}")
    body = payload[HEADER.size :]
    if subtype == SUBTYPE_SAMPLES:
        if len(body) != count * SAMPLE_DTYPE.itemsize:
            raise TrackingFormatError(f"TRACKING samples: {len(body)} bytes for {count}")
        return subtype, period_us, decimation, np.frombuffer(body, SAMPLE_DTYPE).copy()
    if subtype == SUBTYPE_TRANSITIONS:
        if len(body) != count * TRANSITION.size:
            raise TrackingFormatError(f"TRACKING transitions: {len(body)} bytes for {count}")
        items = [Transition(*TRANSITION.unpack_from(body, i * 8)[:4]) for i in range(count)]
        return subtype, period_us, decimation, items
    raise TrackingFormatError(f"TRACKING payload subtype {subtype} unknown")


def encode_samples(samples: np.ndarray, period_us: int, decimation: int) -> bytes:
    samples = np.asarray(samples, SAMPLE_DTYPE)
    head = HEADER.pack(VERSION, SUBTYPE_SAMPLES, len(samples), period_us, decimation)
    return head + samples.tobytes()


def encode_transitions(transitions: list[Transition], period_us: int) -> bytes:
    head = HEADER.pack(VERSION, SUBTYPE_TRANSITIONS, len(transitions), period_us, 0)
    return head + b"".join(TRANSITION.pack(t.step, t.old, t.new, t.reason, 0) for t in transitions)


def write_tracking_log(path: Path, payloads: list[bytes]) -> None:
    """A .qrec file of TRACKING records (the container's one writer: host/formats/qrec.py)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    writer = qrec.RecordWriter(path)
    for payload in payloads:
        writer.append(RECORD_KIND_TRACKING, payload)


def read_tracking_log(path: Path) -> tuple[np.ndarray, list[Transition], int, int]:
    """(samples, transitions, period_us, decimation) from a tracking .qrec file.

    A torn or corrupt record (power cut) raises TrackingFormatError naming the file and
    offset: the pointing record must not silently end early."""
    log = qrec.read_records(path)
    if log.problem:
        raise TrackingFormatError(f"{path}: {log.problem}")
    chunks, transitions = [], []
    period_us = decimation = 0
    for record in log.records:
        if record.kind != RECORD_KIND_TRACKING:
            continue
        subtype, period_us, dec, items = decode_payload(record.payload)
        if subtype == SUBTYPE_SAMPLES:
            chunks.append(items)
            decimation = dec
        else:
            transitions.extend(items)
    samples = np.concatenate(chunks) if chunks else np.zeros(0, SAMPLE_DTYPE)
    return samples, transitions, period_us, decimation


def pointing_efficiency(samples: np.ndarray, beam_half_angle_urad: float) -> np.ndarray:
    """Per-sample fraction of on-axis power reaching the station for a Gaussian beam of
    1/e^2 half-angle divergence `beam_half_angle_urad`: exp(-2 theta^2 / theta_0^2), theta
    the pointing error of the sample (the pass simulator's pointing-loss factor)."""
    if beam_half_angle_urad <= 0:
        raise ValueError(f"beam_half_angle_urad={beam_half_angle_urad}: must be positive")
    ex = samples["err_x_nrad"].astype(np.float64) / 1000.0
    ey = samples["err_y_nrad"].astype(np.float64) / 1000.0
    return np.exp(-2.0 * (ex * ex + ey * ey) / beam_half_angle_urad**2)
