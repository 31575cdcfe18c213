"""qutools quTAG binary time-tag files (docs/formats.md, "Time-tagger files").

The quTAG library's FORMAT_BINARY is a 40-byte header followed by 10-byte records:
u64 time (units of the device time base, 1 ps on the quTAG) + u16 channel, little-endian;
FORMAT_RAW is the same records without the header. The header's content is not
documented publicly: the reader skips it, the writer fills it with an ASCII note. quTAG
inputs are numbered from 1 (0 is the start input), so detector channel c (0 = H .. 3 = A)
is written as input c + 1 and read back as input - 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from host.errors import BadInput
from host.formats.tagfile import read_tagger_bytes

HEADER_BYTES = 40
RECORD_DTYPE = np.dtype([("time", "<u8"), ("channel", "<u2")])
CHANNEL_OFFSET = 1
MAX_INPUT = 20  # quTAG: highest channel number incl. synchronised devices


def write_qutag(
    path: str | Path, time_ps: np.ndarray, channel: np.ndarray, header: bool = True
) -> None:
    time_ps = np.asarray(time_ps, dtype=np.int64)
    if time_ps.size and time_ps.min() < 0:
        raise ValueError("quTAG time stamps are unsigned")
    records = np.empty(time_ps.size, dtype=RECORD_DTYPE)
    records["time"] = time_ps
    records["channel"] = np.asarray(channel, dtype=np.int64) + CHANNEL_OFFSET
    with open(path, "wb") as handle:
        if header:
            handle.write(b"qkdsat quTAG binary, timebase 1 ps".ljust(HEADER_BYTES, b"\x00"))
        handle.write(records.tobytes())


def read_qutag(
    path: str | Path, header: bool = True, timebase_ps: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(time_ps int64 sorted, channel int16). BadInput for a file that is not whole
    records, holds another format, or has channel numbers no quTAG writes."""
    path = Path(path)
    data = read_tagger_bytes(path, "a quTAG binary file")
    skip = HEADER_BYTES if header else 0
    if len(data) < skip:
        raise BadInput(f"{path}: truncated: {len(data)} bytes, shorter than the 40-byte header")
    body = len(data) - skip
    if body % RECORD_DTYPE.itemsize:
        raise BadInput(
            f"{path}: truncated or not quTAG binary: {body} bytes after the header is not a "
            f"whole number of {RECORD_DTYPE.itemsize}-byte records"
        )
    records = np.frombuffer(data, dtype=RECORD_DTYPE, offset=skip)
    inputs = records["channel"].astype(np.int64)
    bad = (inputs < CHANNEL_OFFSET) | (inputs > MAX_INPUT)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise BadInput(
            f"{path}: record {first} has channel {int(inputs[first])}: not a quTAG input "
            f"(1..{MAX_INPUT}); is this a quTAG binary file?"
        )
    if records["time"].size and records["time"].max() >= 2**63 // max(1, timebase_ps):
        raise BadInput(f"{path}: time stamps beyond int64 picoseconds")
    time_ps = records["time"].astype(np.int64) * timebase_ps
    channel = (inputs - CHANNEL_OFFSET).astype(np.int16)
    order = np.argsort(time_ps, kind="stable")
    return time_ps[order], channel[order]
