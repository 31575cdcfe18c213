"""Plain CSV time tags (docs/formats.md, "Time-tagger files"): a header line
`time_ps,channel`, then one detection per line as two integers. Parsed as integers end
to end (never floats: 2**53 ps is only 2.5 hours)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from host.errors import BadInput
from host.formats.tagfile import read_tagger_bytes

HEADER = "time_ps,channel"


def write_csv(path: str | Path, time_ps: np.ndarray, channel: np.ndarray) -> None:
    time_ps = np.asarray(time_ps, dtype=np.int64)
    channel = np.asarray(channel, dtype=np.int64)
    with open(path, "w") as handle:
        handle.write(HEADER + "\n")
        for start in range(0, time_ps.size, 1 << 20):
            block = np.stack(
                [time_ps[start : start + (1 << 20)], channel[start : start + (1 << 20)]], axis=1
            )
            handle.write("\n".join(f"{t},{c}" for t, c in block.tolist()))
            handle.write("\n")


def read_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    data = read_tagger_bytes(path, "a CSV file")
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise BadInput(f"{path}: not a text (CSV) file ({error})") from None
    if not lines or lines[0].replace(" ", "").lower() != HEADER:
        raise BadInput(f"{path}: first line must be '{HEADER}' (got {lines[:1]!r})")
    times, channels = [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            times.append(int(parts[0]))
            channels.append(int(parts[1]))
        except ValueError:
            raise BadInput(
                f"{path}: line {number}: expected 'time_ps,channel' integers, got {line!r}"
            ) from None
    try:
        time_ps = np.array(times, dtype=np.int64)
    except OverflowError:  # Python ints are unbounded; a .qdet time is 64-bit
        number = 2 + next(i for i, t in enumerate(times) if not -(2**63) <= t < 2**63)
        raise BadInput(
            f"{path}: line {number}: time_ps outside the 64-bit range (+-9.2e18 ps)"
        ) from None
    try:
        channel = np.array(channels, dtype=np.int64)
    except OverflowError:
        raise BadInput(f"{path}: channel numbers must be 0..32767") from None
    if channel.size and (channel.min() < 0 or channel.max() > np.iinfo(np.int16).max):
        raise BadInput(f"{path}: channel numbers must be 0..32767")
    order = np.argsort(time_ps, kind="stable")
    return time_ps[order], channel[order].astype(np.int16)
