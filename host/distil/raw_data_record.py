"""Alice's durable record that a pass's raw data has been used for a key.

Every run discloses information about Alice's raw bits (sync answers: intensity classes of
slot windows; sifting: her bases; error correction: syndromes; parameter estimation: a
sample of the bits). Privacy amplification shortens ONE key by what ONE run disclosed; a
second run on the same raw data discloses fresh syndromes and a fresh sample and hashes the
same bits again, so two keys of one pass together hold about twice what is secret. Alice,
who owns the raw data, therefore claims the pass before her first message that depends on
it (the line is the sync service, the first answer that reveals her pattern) by creating
this record exclusively (O_CREAT|O_EXCL), fsync'd with its directory. A run that finds it
refuses the pass. A run killed after the claim leaves the pass used: a crash burns the pass
(the safe side: what it disclosed before dying is unknown).

The insecure deterministic test mode (--insecure-deterministic-seed, whose keys are refused
for any use) is exempt from the exclusivity only: its tests run one pass many times to
compare keys. It still refuses a pass a secure run claimed (its disclosures would weaken
that key), and it leaves its own marker (INSECURE_NAME) that a later secure run refuses
(what it disclosed is public).

The record lives beside Alice's own data: the pass's satellite/ directory, or the pass
directory itself when Alice reads the head's pattern memory and there is no satellite/.
A run refuses a record or marker in either place (a satellite/ made after the first run,
e.g. by a product download, must not hide the record). A folder is not the raw data,
though: with the pattern memory, a second directory holding the same pass.json reaches
the same bits. So Alice also keeps a LEDGER (`qkdsat distil --raw-data-ledger DIR`; the
payload processor always gives its key store's): one record per pass, named by the pass's
digest (pass.json: its times, geometry and intensities, one per physical pass), created
exclusively before the folder's; a run finding the pass in the ledger refuses it,
whatever folder it was given.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from host.distil.durable import fsync_directory, write_atomic
from host.errors import ProtocolAborted

RECORD_NAME = "raw-data-used.json"
INSECURE_NAME = "raw-data-disclosed-insecurely.json"
LEDGER_DIR_MODE = 0o700
_USED = (
    "this pass's raw data was already used by an earlier distillation run (a second key "
    "from the same raw bits, after fresh disclosures, would hold more than privacy "
    "amplification allows); refusing"
)


def record_directory(pass_dir: str | Path) -> Path:
    pass_dir = Path(pass_dir)
    satellite = pass_dir / "satellite"
    return satellite if satellite.is_dir() else pass_dir


def record_path(pass_dir: str | Path) -> Path:
    return record_directory(pass_dir) / RECORD_NAME


def ledger_paths(ledger: str | Path, pass_sha256: str) -> tuple[Path, Path]:
    """(record, insecure marker) of a pass in the ledger, named by its digest
    (protocol.pass_digest: 32 hex digits)."""
    if not 32 <= len(pass_sha256) <= 64 or not all(c in "0123456789abcdef" for c in pass_sha256):
        raise ValueError(f"pass digest {pass_sha256!r}: 32-64 lowercase hex digits expected")
    return Path(ledger) / f"{pass_sha256}.json", Path(ledger) / f"{pass_sha256}.insecure.json"


def claim_raw_data(
    pass_dir: str | Path, pass_sha256: str, insecure: bool = False, ledger=None
) -> Path:
    """Create the record (exclusively, durably), in the ledger first when one is given,
    or raise ProtocolAborted if the pass's raw data was used already (a record, or for a
    secure run an insecure marker, in the ledger or in either of the folder's layouts).
    Returns the folder's record's path (the marker's, insecure). insecure: the
    deterministic test mode (see the module docstring)."""
    pass_dir = Path(pass_dir)
    written = [(record_path(pass_dir), record_directory(pass_dir) / INSECURE_NAME)]
    if ledger is not None:
        written.insert(0, ledger_paths(ledger, pass_sha256))
    checked = written + [
        (d / RECORD_NAME, d / INSECURE_NAME) for d in (pass_dir, pass_dir / "satellite")
    ]
    for record, marker in checked:
        if os.path.lexists(record):
            if insecure:
                raise ProtocolAborted(
                    f"{record}: this pass's raw data was used by a secure distillation run; "
                    "a further run would disclose more of the bits its key came from; refusing"
                )
            raise ProtocolAborted(f"{record}: {_USED}")
        if not insecure and os.path.lexists(marker):
            raise ProtocolAborted(
                f"{marker}: an insecure deterministic run disclosed this pass's raw data "
                "(its transcript is public and uncounted); no secure key from it; refusing"
            )
    if ledger is not None:
        Path(ledger).mkdir(mode=LEDGER_DIR_MODE, parents=True, exist_ok=True)
    body = json.dumps(
        {"pass_sha256": pass_sha256, "claimed_unix_s": time.time(), "pid": os.getpid()},
        sort_keys=True,
    ).encode()
    for record, marker in written:
        if insecure:
            write_atomic(marker, body, 0o600)
        else:
            _create_exclusively(record, body)
    return written[-1][1 if insecure else 0]


def _create_exclusively(path: Path, body: bytes) -> None:
    """path holds body, created here (O_EXCL: of two runs racing, one fails) and durable."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise ProtocolAborted(f"{path}: {_USED}") from None
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_directory(path.parent)
