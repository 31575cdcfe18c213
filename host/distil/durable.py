"""Files that must survive a crash or a power cut whole or not at all: distilled keys,
report.json, the authentication pool's usage record. One writer for all of them.

A temporary file is created afresh beside the target (O_EXCL|O_NOFOLLOW, with the final
mode from the start, so a key is never readable by others even for an instant; a
leftover of a killed run with our pid, or a symlink planted under that name, is removed
first, never followed or truncated), written in full, fsync'd, renamed over the target,
and the directory fsync'd so that the rename itself is durable.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_directory(directory: str | Path) -> None:
    """Make the entries of `directory` (a rename, a new or removed file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: str | Path) -> Path:
    """The temporary file beside `path`: hidden, named after it and this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_temporary(path: str | Path, data: bytes, mode: int, tmp: str | Path | None = None):
    """`data` in a fresh temporary file beside `path` (or at `tmp`), created with `mode`,
    written in full and fsync'd; returns its path. Nothing is left behind on an error."""
    tmp = Path(tmp) if tmp is not None else temporary_name(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def replace_durably(tmp: str | Path, path: str | Path) -> None:
    """Rename a written temporary file over `path` and make the rename durable."""
    os.replace(tmp, path)
    fsync_directory(Path(path).parent)


def write_atomic(path: str | Path, data: bytes, mode: int, tmp: str | Path | None = None):
    """`path` holds `data` (created with `mode`) or its previous content, whatever
    happens; durable once this returns."""
    replace_durably(write_temporary(path, data, mode, tmp), path)
