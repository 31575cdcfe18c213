"""Pending keys and their confirmation at the next contact (`qkdsat keys confirm`).

A key written by one endpoint of a split distillation (`qkdsat distil --role`, the payload
processor) is PENDING: beside KEY sits KEY.pending, created durably before the key is
renamed into place, so no instant exists where the key is there without its marker. The
protocol's last message (Bob's `done`) can be lost with the link (the two generals): Bob
then holds a key Alice does not. Nothing uses a pending key (host/network/pool.py's
reader refuses it, and every consumer reads through it: pool fill, the time transfer,
the campaign). At the next contact the two endpoints exchange, over the authenticated
channel of the distillation (same pool, same tags), the keys they hold for the pair:

- a key both hold, with the same check value, is CONFIRMED (its marker removed);
- a pending key the peer does not hold, or holds with another check value, is DESTROYED
  (overwritten with zeros, fsync'd, unlinked; the report says why).

The key identifier is the pass (`pass-sha256:` of pass.json, what pool fill already uses
as the key's source). The check value is the key's first CHECK_BYTES bytes themselves:
they are sent (authenticated, not encrypted) and then BURNT, marked used in the key's
usage record KEY.used, the record the time transfer and pool fill start after. The key is
the output of privacy amplification, eps-close to uniform and independent of Eve: any
subset of its bytes is independent of the others, so disclosing the first 16 bytes tells
nothing about the rest (information-theoretically, not under a computational assumption
as a MAC or a hash of the key would), and the rest is what is used. Two different keys
agree on 128 bits with probability 2^-128.

Only keys born pending take part (their report's `key_files` entry says `"pending":
true`, set by the split run that wrote them; KEY.pending says whether they still are): a
key that never was pending (local mode, or written before pending keys existed) may have
been used from byte 0 already, so its first bytes are never sent. And a key's check bytes
are burnt (KEY.used, durably) BEFORE they are sent, not at confirmation: a listing that
reaches Eve but not the peer (the contact lost, or a stranger posing as the peer: Alice
speaks first) must not leave disclosed bytes that a later use could take.

Why no one-sided key remains: each side decides only after the peer's list verified;
a key is destroyed only when the peer does not hold it, and a confirmed key was held by
the peer when confirmed, so the peer (which destroys only what WE lack) keeps it too.
If the peer's list never arrives (the contact lost again), nothing changes on this side:
its keys stay pending and the next contact decides. A confirmed key is listed again, so
a peer that missed our list confirms its copy next time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from host.distil import channel as ch
from host.distil.durable import fsync_directory, write_atomic
from host.errors import BadInput, ProtocolAborted

PENDING_SUFFIX = ".pending"
CHECK_BYTES = 16  # burnt per key at confirmation: 128 bits
KEYS_HELD = "keys_held"


def pending_marker(key_path: str | Path) -> Path:
    return Path(f"{key_path}{PENDING_SUFFIX}")


def is_pending(key_path: str | Path) -> bool:
    return pending_marker(key_path).exists()


def refuse_pending(key_path: str | Path) -> None:
    """The one check every consumer makes (through host/network/pool.py's reader)."""
    if is_pending(key_path):
        raise BadInput(
            f"{key_path}: pending, not yet confirmed with the peer (its marker "
            f"{pending_marker(key_path).name}); a pending key is never used: run "
            "`qkdsat keys confirm` with the peer at the next contact"
        )


def write_pending_marker(key_path: str | Path, key_id: str) -> None:
    """Durable before the key is renamed into place (host/distil/run.py finish)."""
    record = {"key_id": key_id, "state": "pending until `qkdsat keys confirm` with the peer"}
    write_atomic(pending_marker(key_path), (json.dumps(record) + "\n").encode(), 0o600)


@dataclass
class HeldKey:
    key_id: str
    path: Path
    report_path: Path
    pending: bool

    def check_value(self) -> bytes:
        return self.path.read_bytes()[:CHECK_BYTES]


def held_keys(store: str | Path, role: str) -> dict[str, HeldKey]:
    """{key id: key} of `role`'s keys under `store` (any depth: a `distil --out` directory,
    or the payload processor's KS/STATION/passes/*), those a report vouches for and that
    were born pending (a split run's; a local-mode or older key is not listed: its first
    bytes may be in use already, and it has no peer to settle with)."""
    store = Path(store)
    if not store.is_dir():
        raise BadInput(f"--store {store}: not a directory")
    keys: dict[str, HeldKey] = {}
    for report_path in sorted(store.rglob("report.json")):
        try:
            report = json.loads(report_path.read_text())
            entry = (report.get("key_files") or {}).get(role)
            if report.get("aborted", True) or entry is None:
                continue
            if entry.get("pending") is not True:
                continue  # never pending: not the confirmation's, its bytes never sent
            key_id = "pass-sha256:" + report["inputs"]["pass_json_sha256"]
            name = entry["file"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not a distillation's report (a time transfer's, a mission's)
        if Path(name).name != name or not (report_path.parent / name).is_file():
            continue
        path = report_path.parent / name
        if key_id in keys:
            raise BadInput(
                f"{store}: two {role} keys of one pass ({keys[key_id].path} and {path}); "
                "they are correlated, keep one"
            )
        keys[key_id] = HeldKey(key_id, path, report_path, is_pending(path))
    return keys


def _listing(keys: dict[str, HeldKey], store_named: bool) -> dict:
    """Our keys_held message; every check value in it is burnt first (module docstring).
    store_named False: this side was given no store (a split run without --key-store), so
    its empty list says nothing about the keys it holds elsewhere."""
    for key in keys.values():
        burn_check(key)
    ids = sorted(keys)
    checks = b"".join(keys[key_id].check_value().ljust(CHECK_BYTES, b"\0") for key_id in ids)
    return {"ids": ids, "checks": checks, "store_named": store_named}


def _peer_listing(fields: dict) -> tuple[dict[str, bytes], bool]:
    """({key id: check value}, whether the peer named its store)."""
    ids, checks = fields.get("ids"), fields.get("checks")
    store_named = fields.get("store_named", True)
    if (
        not isinstance(store_named, bool)
        or not isinstance(ids, list)
        or not all(isinstance(key_id, str) for key_id in ids)
        or not isinstance(checks, bytes)
        or len(checks) != CHECK_BYTES * len(ids)
        or len(set(ids)) != len(ids)
    ):
        raise ProtocolAborted("the peer's list of keys is malformed")
    listing = {
        key_id: checks[CHECK_BYTES * i : CHECK_BYTES * (i + 1)] for i, key_id in enumerate(ids)
    }
    return listing, store_named


def destroy(key: HeldKey, reason: str) -> None:
    """Overwrite with zeros, fsync, unlink (and its records); then the report says why."""
    try:
        with open(key.path, "r+b") as handle:
            handle.write(b"\0" * os.fstat(handle.fileno()).st_size)
            handle.flush()
            os.fsync(handle.fileno())
    except FileNotFoundError:
        pass
    key.path.unlink(missing_ok=True)
    # the key's removal durable before its marker's: a file system free to reorder the
    # two would otherwise leave the zeros, vouched for by the report, without a marker
    fsync_directory(key.path.parent)
    Path(f"{key.path}.used").unlink(missing_ok=True)
    pending_marker(key.path).unlink(missing_ok=True)
    fsync_directory(key.path.parent)
    report = json.loads(key.report_path.read_text())
    role = next(r for r, e in report["key_files"].items() if e["file"] == key.path.name)
    del report["key_files"][role]
    report.setdefault("keys_destroyed", {})[role] = reason
    write_atomic(key.report_path, (json.dumps(report, indent=1) + "\n").encode(), 0o644)


def burn_check(key: HeldKey) -> None:
    """The key's check bytes recorded as used (KEY.used, durably), before they are sent."""
    size = key.path.stat().st_size
    used_path = Path(f"{key.path}.used")
    used = 0
    if used_path.exists():
        used = int(json.loads(used_path.read_text())["used_bytes"])
    if used < min(CHECK_BYTES, size):
        ch.write_usage_record(str(key.path), min(CHECK_BYTES, size))


def confirm(key: HeldKey) -> None:
    """Burn the check bytes (usage record first; done already before they were sent),
    then remove the marker, durably."""
    burn_check(key)
    pending_marker(key.path).unlink(missing_ok=True)
    fsync_directory(key.path.parent)


def decide(
    mine: dict[str, HeldKey], peer: dict[str, bytes], peer_store_named: bool = True
) -> dict:
    """Apply the rule to our keys given the peer's verified list; returns what was done.
    A peer that named no store (a split run without --key-store) lists nothing it holds:
    our pending keys then stay pending for a contact that settles them, never destroyed
    for a list that was never made (a ground station's omitted option would otherwise
    destroy every pass's key the payload processor holds pending)."""
    outcome = {"confirmed": [], "destroyed": [], "kept": [], "peer_only": []}
    for key_id, key in sorted(mine.items()):
        check = key.check_value().ljust(CHECK_BYTES, b"\0")
        if not peer_store_named and key_id not in peer:
            outcome["kept"].append(key_id)
            if key.pending:
                outcome.setdefault("warnings", []).append(
                    f"{key_id}: left pending: the peer named no key store (--key-store)"
                )
        elif key_id in peer and peer[key_id] == check:
            if key.pending:
                confirm(key)
                outcome["confirmed"].append(key_id)
            else:
                outcome["kept"].append(key_id)
        elif key.pending:
            why = (
                "the peer holds no key of this pass"
                if key_id not in peer
                else ("the peer's key of this pass differs (check value)")
            )
            destroy(key, f"destroyed at confirmation: {why}")
            outcome["destroyed"].append({"key_id": key_id, "reason": why})
        else:
            # confirmed earlier: the peer held it then, and the peer destroys only keys we
            # lack; a peer that lists it no more lost its store. Said, never used silently.
            outcome["kept"].append(key_id)
            outcome.setdefault("warnings", []).append(
                f"{key_id}: confirmed earlier but the peer no longer lists it"
            )
    outcome["peer_only"] = sorted(set(peer) - set(mine))
    return outcome


def run_confirm(
    chan: ch.AuthChannel, store: str | Path | None, role: str, store_named: bool = True
) -> dict:
    """One side of the confirmation. Alice speaks first (AuthChannel: Bob sends nothing
    authenticated before Alice's first message verified). store None: this side holds no
    key for the peer (a split distillation's first run into a new directory).
    store_named False: this side was given no store, and says so (decide)."""
    mine = {} if store is None else held_keys(store, role)
    if role == ch.ALICE:
        chan.send(KEYS_HELD, **_listing(mine, store_named))
        peer, peer_named = _peer_listing(chan.recv(KEYS_HELD))
    else:
        peer, peer_named = _peer_listing(chan.recv(KEYS_HELD))
        chan.send(KEYS_HELD, **_listing(mine, store_named))
    return decide(mine, peer, peer_named)
