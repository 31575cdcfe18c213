"""Detection time tags (`.qdet`, docs/formats.md): int64 ps + int16 channel records
after a JSON header. The one reader and writer; other tagger formats convert to this."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from host.distil.durable import replace_durably, temporary_name
from host.errors import BadInput

MAGIC = b"QKDDET\x00\x01"
RECORD_DTYPE = np.dtype([("time_ps", "<i8"), ("channel", "<i2")])
# A live file's last record (LiveDetectionsWriter.end): the tagger's end of the pass. No
# detector or mark has this channel; its time_ps is the end on the tagger's clock, at or
# after every record before it.
END_OF_PASS_CHANNEL = -1
_HEADER_LENGTH = struct.Struct("<I")
MAX_HEADER_BYTES = 1 << 20


def write_detections(
    path: str | Path, time_ps: np.ndarray, channel: np.ndarray, header: dict | None = None
) -> None:
    time_ps = np.asarray(time_ps, dtype=np.int64)
    channel = np.asarray(channel, dtype=np.int16)
    if time_ps.shape != channel.shape:
        raise ValueError("time_ps and channel differ in length")
    if time_ps.size and np.any(np.diff(time_ps) < 0):
        raise ValueError("detections must be sorted by time")
    meta = dict(header or {})
    meta["count"] = int(time_ps.size)
    meta.setdefault("format_version", 1)
    head = json.dumps(meta, sort_keys=True).encode()
    records = np.empty(time_ps.size, dtype=RECORD_DTYPE)
    records["time_ps"] = time_ps
    records["channel"] = channel
    path = Path(path)
    # The channels are the receiver's raw key (basis and bit per click): a fresh temporary
    # created 0600, a leftover or a symlink planted under its name removed first, never
    # written through (host/distil/durable.py's rule; written here in two parts)
    tmp = temporary_name(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(MAGIC + _HEADER_LENGTH.pack(len(head)) + head)
            handle.write(records.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    replace_durably(tmp, path)


def _read_header(path: Path) -> tuple[dict, int, int]:
    """(header, offset of the first record, file size in bytes) of a `.qdet` file, for both
    readers; BadInput naming the file and the fault."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            start = handle.read(len(MAGIC) + _HEADER_LENGTH.size)
            if len(start) < len(MAGIC) + _HEADER_LENGTH.size or start[: len(MAGIC)] != MAGIC:
                raise BadInput(f"{path}: not a .qdet detections file (bad magic)")
            (head_bytes,) = _HEADER_LENGTH.unpack_from(start, len(MAGIC))
            if head_bytes > MAX_HEADER_BYTES:
                raise BadInput(f"{path}: header length {head_bytes} is implausible")
            try:
                header = json.loads(handle.read(head_bytes))
            except ValueError as error:
                raise BadInput(f"{path}: header is not valid JSON ({error})") from None
    except OSError as error:
        raise BadInput(f"{path}: cannot read ({error.strerror})") from None
    return header, len(MAGIC) + _HEADER_LENGTH.size + head_bytes, size


def read_detections(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(time_ps int64, channel int16, header); BadInput naming the file and the fault."""
    path = Path(path)
    header, offset, size = _read_header(path)
    count = header.get("count")
    if count is None and "count" in header:
        return _read_live(path, header, offset, size)
    body = size - offset
    if not isinstance(count, int) or body != count * RECORD_DTYPE.itemsize:
        raise BadInput(
            f"{path}: truncated or padded: header says {count} records, "
            f"{body} bytes hold {body / RECORD_DTYPE.itemsize:g}"
        )
    records = np.fromfile(path, dtype=RECORD_DTYPE, offset=offset)
    return records["time_ps"].astype(np.int64), records["channel"].astype(np.int16), header


def _read_live(path: Path, header: dict, offset: int, size: int):
    """A live tagger's file (count null): complete once its end-of-pass record is there,
    which is not returned."""
    body = size - offset
    records = np.fromfile(path, dtype=RECORD_DTYPE, offset=offset) if body > 0 else None
    if (
        body % RECORD_DTYPE.itemsize
        or records is None
        or int(records["channel"][-1]) != END_OF_PASS_CHANNEL
    ):
        raise BadInput(
            f"{path}: a live tagger's file (count null) without its end-of-pass record at "
            "the end: still being written, or its writer stopped (distil --stream reads "
            "it as it grows)"
        )
    records = records[:-1]
    if np.any(records["channel"] == END_OF_PASS_CHANNEL):
        raise BadInput(f"{path}: an end-of-pass record before the end")
    return records["time_ps"].astype(np.int64), records["channel"].astype(np.int16), header


class LiveDetectionsWriter:
    """The writer of a `.qdet` a time tagger appends during the pass (docs/formats.md,
    "Live files"): the header says `"count": null`; append() adds records as they come
    (a reader may see a write half done: AppendedDetections takes whole records only);
    end(time_ps) appends the end-of-pass record, fsyncs and closes. Created 0600 and
    never over an existing file (the channels are the receiver's raw key)."""

    def __init__(self, path: str | Path, header: dict | None = None):
        meta = {**(header or {}), "count": None}
        meta.setdefault("format_version", 1)
        head = json.dumps(meta, sort_keys=True).encode()
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        self.last_ps = None
        self._write(MAGIC + _HEADER_LENGTH.pack(len(head)) + head)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def append(self, time_ps: np.ndarray, channel: np.ndarray) -> None:
        time_ps = np.asarray(time_ps, dtype=np.int64)
        channel = np.asarray(channel, dtype=np.int16)
        if time_ps.shape != channel.shape:
            raise ValueError("time_ps and channel differ in length")
        if not time_ps.size:
            return
        earlier = self.last_ps is not None and time_ps[0] < self.last_ps
        if earlier or np.any(np.diff(time_ps) < 0):
            raise ValueError("detections must be appended in time order")
        if np.any(channel == END_OF_PASS_CHANNEL):
            raise ValueError(f"channel {END_OF_PASS_CHANNEL} is the end-of-pass record's")
        records = np.empty(time_ps.size, dtype=RECORD_DTYPE)
        records["time_ps"], records["channel"] = time_ps, channel
        self._write(records.tobytes())
        self.last_ps = int(time_ps[-1])

    def end(self, time_ps: int) -> None:
        """The end of the pass on the tagger's clock (loss of signal), after every record."""
        if self.last_ps is not None and time_ps < self.last_ps:
            raise ValueError("the end of the pass precedes a record")
        record = np.zeros(1, dtype=RECORD_DTYPE)
        record["time_ps"], record["channel"] = time_ps, END_OF_PASS_CHANNEL
        self._write(record.tobytes())
        os.fsync(self._fd)
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class AppendedDetections:
    """A `.qdet` file read while its writer may still be appending records (a time tagger
    streaming during the pass): the header is read once; records() maps the whole records
    present now (a partial record at the end is left for the next call). The header's
    count is not checked against the body, which is only final once the writer is done.
    `live`: a live tagger's file (LiveDetectionsWriter: count null, ended by an
    end-of-pass record); otherwise a complete file (replayed in emulation)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header, self.offset, _ = _read_header(self.path)
        self.live = "count" in self.header and self.header["count"] is None

    def records(self) -> np.ndarray:
        """Every whole record in the file now (memory-mapped, read lazily)."""
        count = max(0, (self.path.stat().st_size - self.offset) // RECORD_DTYPE.itemsize)
        if count == 0:
            return np.zeros(0, dtype=RECORD_DTYPE)
        return np.memmap(self.path, dtype=RECORD_DTYPE, mode="r", offset=self.offset, shape=count)
