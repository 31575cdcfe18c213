"""Checks on an output directory before a command touches anything (docs/cli.md): a typo
or an unwritable place is bad input found up front, never a traceback half-way through a
run that already replaced earlier outputs."""

from __future__ import annotations

import os
from pathlib import Path

from host.errors import BadInput


def check_output_dir(out_dir: str | Path, option: str = "--out", files=()) -> None:
    """`out_dir` must be a directory we can create or write into, and none of `files`
    (names inside it) may be a directory. Nothing is created here."""
    out_dir = Path(out_dir)
    probe = out_dir
    while not probe.exists():
        if probe.is_symlink():
            raise BadInput(f"{option} {out_dir}: {probe} is a dangling link")
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise BadInput(f"{option} {out_dir}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput(f"{option} {out_dir}: {probe} is not writable")
    for name in files:
        if (out_dir / name).is_dir():
            raise BadInput(f"{option} {out_dir}: {name} is a directory")


def check_output_file(path: str | Path, option: str = "--out") -> None:
    """`path` must be a file we can create or replace, in a directory that exists."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"{option} {path}: is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise BadInput(f"{option} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{option} {path}: {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise BadInput(f"{option} {path}: not writable")
