"""Reading a time-tagger file whole, refusing one that is plainly another format."""

from __future__ import annotations

from pathlib import Path

from host.errors import BadInput

# Headers of the tagged formats that a headerless reader would otherwise misparse.
FOREIGN_MAGICS = {b"PQTTTR\x00\x00": "a PicoQuant PTU file", b"QKDDET\x00\x01": "a .qdet file"}


def read_tagger_bytes(path: Path, expected: str) -> bytes:
    """The file's bytes; BadInput if unreadable or if it starts like another format."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadInput(f"{path}: cannot read ({error.strerror})") from None
    for magic, name in FOREIGN_MAGICS.items():
        if data.startswith(magic):
            raise BadInput(f"{path}: this is {name}, not {expected}")
    return data
