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
(what it disclosed is public). Every run writes its own file first and checks all places
again after, so of two runs starting at once the later checker sees the other's file.

The record lives beside Alice's own data: the pass's satellite/ directory, or the pass
directory itself when Alice reads the head's pattern memory and there is no satellite/.
A run refuses a record or marker in either place (a satellite/ made after the first run,
e.g. by a product download, must not hide the record).

A folder is not the raw data, though: with the pattern memory, a second directory holding
the same pass.json (or any pass.json: the memory is read by slot index, whatever
the file says) reaches the same bits. So Alice also keeps a LEDGER (`qkdsat distil
--raw-data-ledger DIR`; the payload processor always gives its key store's): one record
per raw data, named by its FINGERPRINT (raw_data_fingerprint: SHA-256 of the bit values of
slots 0..FINGERPRINT_SLOTS-1, read where Alice reads them, all of them), created
exclusively before the folder's; a run finding its raw data there refuses the pass,
whatever folder and pass.json it was given. (Named by the pass.json's digest, as first
written, it let a changed field through: a cold review made four keys from one run.)
The ledger directory must be private (0700, this user's, not a symlink): whoever can
delete a record can let the raw data in again.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path

import numpy as np

from host.distil.durable import fsync_directory, write_atomic
from host.errors import ProtocolAborted
from host.formats.patterns import symbols_by_slots
from host.protocol.symbols import decode_symbols

RECORD_NAME = "raw-data-used.json"
INSECURE_NAME = "raw-data-disclosed-insecurely.json"
LEDGER_DIR_MODE = 0o700
# Slots whose bit values name a raw data: slots 0..FINGERPRINT_SLOTS-1 of the run, all of
# which the pattern must hold (a prefix shortened by a smaller --slot-count, or a pattern
# file whose first_slot was moved, would otherwise give another name for the same bits).
# The bits only (symbols.decode_symbols: nibble & 1): basis and intensity follow the
# pattern's thresholds, which an edited file and pass.json could change together.
FINGERPRINT_SLOTS = 512
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


def raw_data_fingerprint(patterns) -> str:
    """The ledger's name for Alice's raw data: SHA-256 of the bit values of slots
    0..FINGERPRINT_SLOTS-1 (the run's own first slots, whatever pass.json, the pattern
    file's first_slot or --slot-count says); a pattern not holding them all is refused.
    On board only, in Alice's private ledger: a hash of 512 random bits, which tells
    nothing of them (and no message names it)."""
    slots = np.arange(FINGERPRINT_SLOTS, dtype=np.int64)
    covered, nibbles = symbols_by_slots(patterns, slots)
    if not covered.all():
        raise ProtocolAborted(
            f"the pattern holds {int(covered.sum())} of slots 0-{FINGERPRINT_SLOTS - 1}: "
            "its raw data cannot be named in the raw-data ledger; refusing"
        )
    _, bits, _ = decode_symbols(np.asarray(nibbles, dtype=np.uint8))
    digest = hashlib.sha256(b"qkdsat raw-data ledger v2\0")
    digest.update(np.packbits(bits).tobytes())
    return digest.hexdigest()


def ledger_paths(ledger: str | Path, fingerprint: str) -> tuple[Path, Path]:
    """(record, insecure marker) of a raw data in the ledger (raw_data_fingerprint)."""
    if len(fingerprint) != 64 or not all(c in "0123456789abcdef" for c in fingerprint):
        raise ValueError(f"raw data fingerprint {fingerprint!r}: 64 lowercase hex digits")
    return Path(ledger) / f"{fingerprint}.json", Path(ledger) / f"{fingerprint}.insecure.json"


def _private_ledger(ledger: Path) -> None:
    """The ledger directory, made 0700 if missing (its parent's entry fsync'd), else
    checked: a directory, not a symlink, this user's, no access for group or others."""
    if not os.path.lexists(ledger):
        ledger.parent.mkdir(mode=LEDGER_DIR_MODE, parents=True, exist_ok=True)
        try:
            ledger.mkdir(mode=LEDGER_DIR_MODE)
        except FileExistsError:
            pass  # another run made it: checked below
        else:
            fsync_directory(ledger.parent)
    info = os.lstat(ledger)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ProtocolAborted(
            f"raw-data ledger {ledger}: must be a directory of this user with mode 0700 "
            f"(mode {info.st_mode & 0o777:o}, not a symlink): whoever can delete a record "
            "could let the same raw data be used again"
        )


def claim_raw_data(
    pass_dir: str | Path,
    pass_sha256: str,
    insecure: bool = False,
    ledger=None,
    fingerprint: str | None = None,
) -> Path:
    """Create the record (exclusively, durably), in the ledger first when one is given
    (with the raw data's fingerprint), or raise ProtocolAborted if the pass's raw data was
    used already (a record, or for a secure run an insecure marker, in the ledger or in
    either of the folder's layouts). Returns the folder's record's path (the marker's,
    insecure). insecure: the deterministic test mode (see the module docstring)."""
    pass_dir = Path(pass_dir)
    written = [(record_path(pass_dir), record_directory(pass_dir) / INSECURE_NAME)]
    if ledger is not None:
        if fingerprint is None:
            raise ValueError("a raw-data ledger needs the raw data's fingerprint")
        ledger = Path(ledger)
        _private_ledger(ledger)
        written.insert(0, ledger_paths(ledger, fingerprint))
    checked = written + [
        (d / RECORD_NAME, d / INSECURE_NAME) for d in (pass_dir, pass_dir / "satellite")
    ]
    _refuse_if_used(checked, insecure, ledger)
    body = json.dumps(
        {"pass_sha256": pass_sha256, "claimed_unix_s": time.time(), "pid": os.getpid()},
        sort_keys=True,
    ).encode()
    # (device, inode) of the records this run created: a secure run's only. An insecure
    # run writes no record, so any record it finds is a rival's; its markers are replaced
    # by rename on every rerun, which frees their inodes for the next file made (a rival's
    # record took one, and an insecure run counting its marker as its own went on: a cold
    # review). A record is never replaced or removed by a run, so its inode stays its own.
    own = set()
    for record, marker in written:
        mine = marker if insecure else record
        try:
            if insecure:
                write_atomic(marker, body, 0o600)
            else:
                _create_exclusively(record, body, _said(record, ledger))
                own.add(_identity(record))
        except OSError as error:  # not FileExistsError: _create_exclusively refused that
            # named as the refusals are (a ledger's file name is the raw data's fingerprint)
            raise ProtocolAborted(
                f"{_said(mine, ledger)}: cannot write this run's "
                f"{'marker' if insecure else 'record'} ({error.strerror or type(error).__name__})"
                "; refusing"
            ) from None
    # Checked again now that ours is durable. Two runs that both checked before either
    # wrote (a secure and an insecure one, or two secure ones given the pass in its two
    # layouts without a ledger: O_EXCL then guards two different files) would both go on;
    # each writes first and checks after, so the later checker always sees the other's.
    # A run that finds one now aborts before any disclosure; its own record stays (the
    # pass is burnt, as after a crash).
    _refuse_if_used(checked, insecure, ledger, own)
    return written[-1][1 if insecure else 0]


def _refuse_if_used(checked, insecure: bool, ledger, own=frozenset()) -> None:
    """ProtocolAborted if any (record, marker) pair of `checked`, other than the records
    this run created (`own`), says the raw data was used: a record for any run, a marker
    for a secure one."""
    for record, marker in checked:
        if os.path.lexists(record) and _identity(record) not in own:
            if insecure:
                raise ProtocolAborted(
                    f"{_said(record, ledger)}: this pass's raw data was used by a secure "
                    "distillation run; a further run would disclose more of the bits its key "
                    "came from; refusing"
                )
            raise ProtocolAborted(f"{_said(record, ledger)}: {_USED}")
        if not insecure and os.path.lexists(marker) and _identity(marker) not in own:
            raise ProtocolAborted(
                f"{_said(marker, ledger)}: an insecure deterministic run disclosed this pass's "
                "raw data (its transcript is public and uncounted); no secure key from it; "
                "refusing"
            )


def _identity(path: Path):
    """The file a path names (its last component not followed): the same file reached
    through another layout (a satellite/ linked to the pass directory) is still ours. A
    path that vanished between the look and this call names nothing of ours."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def _said(path: Path, ledger) -> str:
    """How a message names a record: the ledger's by the ledger alone (the reason reaches
    Bob and the reports; the fingerprint stays on board)."""
    if ledger is not None and path.parent == Path(ledger):
        return f"raw-data ledger {ledger}"
    return str(path)


def _create_exclusively(path: Path, body: bytes, said: str) -> None:
    """path holds body, created here (O_EXCL: of two runs racing, one fails) and durable."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise ProtocolAborted(f"{said}: {_USED}") from None
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_directory(path.parent)
