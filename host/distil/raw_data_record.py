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


def record_directory(pass_dir: str | Path) -> Path:
    pass_dir = Path(pass_dir)
    satellite = pass_dir / "satellite"
    return satellite if satellite.is_dir() else pass_dir


def record_path(pass_dir: str | Path) -> Path:
    return record_directory(pass_dir) / RECORD_NAME


def claim_raw_data(pass_dir: str | Path, pass_sha256: str, insecure: bool = False) -> Path:
    """Create the record (exclusively, durably) or raise ProtocolAborted if the pass's raw
    data was used already. Returns the record's path. insecure: the deterministic test
    mode (see the module docstring)."""
    path = record_path(pass_dir)
    marker = record_directory(pass_dir) / INSECURE_NAME
    body = json.dumps(
        {"pass_sha256": pass_sha256, "claimed_unix_s": time.time(), "pid": os.getpid()},
        sort_keys=True,
    ).encode()
    if insecure:
        if os.path.lexists(path):
            raise ProtocolAborted(
                f"{path}: this pass's raw data was used by a secure distillation run; a "
                "further run would disclose more of the bits its key came from; refusing"
            )
        write_atomic(marker, body, 0o600)
        return marker
    if os.path.lexists(marker):
        raise ProtocolAborted(
            f"{marker}: an insecure deterministic run disclosed this pass's raw data "
            "(its transcript is public and uncounted); no secure key from it; refusing"
        )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise ProtocolAborted(
            f"{path}: this pass's raw data was already used by an earlier distillation run "
            "(a second key from the same raw bits, after fresh disclosures, would hold more "
            "than privacy amplification allows); refusing"
        ) from None
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_directory(path.parent)
    return path
