"""Key pools of the network: one per (holder, peer) pair, e.g. the satellite's pool for
Jinan and Jinan's pool for the satellite, filled with the same distilled keys in the same
order so that byte i of one is byte i of the other.

Files of a pool `DIR/PEER.pool` (docs/network.md):
  PEER.pool          the key bytes, 0600, append-only;
  PEER.pool.used     the usage record {"used_bytes": N}: the same write-ahead record as the
                     distillation's authentication pool (host/distil/channel.py KeyPool), so
                     a pool file can also serve as `qkdsat distil --auth-pool`;
  PEER.pool.journal  one JSON line per fill and per take: source, offset, bytes, purpose.
                     Never key material.

Power-cut safety, in the order of the writes:
- take: the usage record is moved past the bytes taken and made durable (file and
  directory fsync'd) BEFORE any byte is returned, then the take is journalled. A cut after
  the record and before the journal loses those bytes (counted as `lost_bytes`), never
  serves them twice.
- fill: the bytes are appended and fsync'd, then the fill is journalled (fsync'd). The
  journal's fills define the pool's length: bytes appended by a fill whose journal line
  never landed are cut off when the pool is next opened (they were never served), and
  the same key can be filled again. A source already in the journal is refused, so one
  distilled key never enters a pool twice.
Every operation holds an exclusive flock on the pool file: one writer at a time (the
relay, the key-delivery server and `qkdsat pool` may share a station's pools).

Directions. The two ends of a pair take without talking to each other first (a sender
takes at its own usage record, the receiver at the offset the message names), so a pair
serving both directions from one sequence of bytes would hand the same pad to a send A->B
and a send B->A made before either is received. Each fill is therefore cut in two, the
same way at both ends (the cut depends only on the pair's names and the fill's length,
and is journalled): one part for takes the first end initiates, the other for takes the
second end initiates (split_fill). A take names its initiator; its offset is a position
in that initiator's share (the concatenation of its parts of every fill, in fill order),
and each share has its own position in the usage record. No byte is in two shares, so
no order of sends, crashes or restarts at either end can reuse a pad.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from host.distil import keystore
from host.distil.channel import _fsync_directory, write_usage_record
from host.errors import BadInput

SATELLITE = "satellite"
# skipped ranges of the peer's share kept takeable, per pool: beyond it the oldest are lost
MAX_SKIPPED_RANGES = 256
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PoolShort(BadInput):
    """A pool holds fewer bytes than asked for: nothing was taken."""

    def __init__(self, message: str, available_bytes: int, wanted_bytes: int):
        super().__init__(message)
        self.available_bytes = available_bytes
        self.wanted_bytes = wanted_bytes


def check_name(name: str, what: str = "station") -> str:
    if not _NAME.match(name or ""):
        raise BadInput(f"{what} name {name!r}: letters, digits, '_', '-', '.' only")
    return name


def split_fill(holder: str, peer: str, count: int) -> list[list]:
    """How a fill of `count` bytes into the pair (holder, peer) is cut between the takes
    each end initiates: [[initiator, bytes], [initiator, bytes]], in pool order. Depends
    only on the pair (either order) and the count, so both ends cut alike. Half each (the
    odd byte to the second): either end may initiate on every kind of pair (relays and
    the station's messages or KME on a satellite pair, both stations on a relayed pair).
    The satellite's share comes first on its pairs; between two stations, the share of
    the name that sorts first."""
    first, second = sorted((holder, peer), key=lambda name: (name != SATELLITE, name))
    return [[first, count // 2], [second, count - count // 2]]


@dataclass
class PoolLevel:
    filled_bytes: int
    used_bytes: int  # the usage record: every byte below it is gone
    taken_bytes: int  # journalled takes (used_bytes - taken_bytes were lost in a cut)

    @property
    def available_bytes(self) -> int:
        return self.filled_bytes - self.used_bytes

    @property
    def lost_bytes(self) -> int:
        return self.used_bytes - self.taken_bytes


class StationPool:
    """One pool, opened and locked for one operation: `with StationPool(path) as pool:`."""

    def __init__(self, path: str | Path, create: bool = False):
        self.path = Path(path)
        # NET/HOLDER/PEER.pool: the pair's names decide how its fills are split
        self.holder = self.path.parent.name
        self.peer = self.path.name.removesuffix(".pool")
        self.used_path = Path(f"{self.path}.used")
        self.journal_path = Path(f"{self.path}.journal")
        if self.holder == self.peer:
            raise BadInput(
                f"key pool {self.path}: held by {self.holder} for {self.peer}; a pool is "
                "shared between two different ends"
            )
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:
            self._fd = os.open(self.path, flags, 0o600)
        except FileNotFoundError as error:
            raise BadInput(f"key pool {self.path}: does not exist (fill it first)") from error
        except OSError as error:
            raise BadInput(f"key pool {self.path}: {error.strerror}") from error
        try:
            mode = os.fstat(self._fd).st_mode
            if mode & 0o077:
                raise BadInput(
                    f"key pool {self.path}: readable or writable by group or others "
                    f"(mode {mode & 0o777:o}); it is secret: chmod 600 {self.path}"
                )
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # waits for the other operation to end
            self._load(create)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> StationPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def __del__(self):
        self.close()

    # ---------------------------------------------------------------- state

    def _load(self, create: bool) -> None:
        self.sources: dict[str, int] = {}  # source -> offset of its bytes
        self.filled_bytes = 0
        self.taken_bytes = 0
        unsplit_end = 0  # the end of the last fill journalled before pools were split
        # initiator -> its parts of the fills, (pool offset, bytes), in fill order
        self.shares: dict[str, list[tuple[int, int]]] = {self.holder: [], self.peer: []}
        if self.journal_path.exists():
            self._mend_torn_journal_tail()
            lines = self.journal_path.read_text().splitlines()
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    event, count = entry["event"], int(entry["bytes"])
                except (ValueError, KeyError, TypeError):
                    if number == len(lines):
                        continue  # a line cut by a power loss: its operation never finished
                    raise BadInput(f"{self.journal_path}:{number}: not a journal line") from None
                if event == "fill":
                    if "split" not in entry:
                        unsplit_end = self.filled_bytes + count
                    self.sources[entry["source"]] = self.filled_bytes
                    self._add_shares(self.filled_bytes, count, entry.get("split"))
                    self.filled_bytes += count
                elif event == "take" and not entry.get("from_skipped"):
                    # a take from a skipped range: those bytes were counted when skipped
                    self.taken_bytes += count + int(entry.get("skipped_bytes", 0))
        self.floor_bytes = 0  # every byte below it is gone, whatever its share
        self.positions: dict[str, int] = {}  # initiator -> next position in its share
        # initiator -> [start, end) positions below its position that a take skipped and
        # no take used yet: the peer's messages can arrive out of order (take_checked)
        self.skipped: dict[str, list[list[int]]] = {}
        if self.used_path.exists():
            try:
                record = json.loads(self.used_path.read_text())
                record_bytes = int(record["used_bytes"])
                self.floor_bytes = int(record.get("floor_bytes", record_bytes))
                self.positions = {
                    str(name): int(position)
                    for name, position in record.get("initiator_positions", {}).items()
                }
                self.skipped = {
                    str(name): [[int(start), int(end)] for start, end in ranges]
                    for name, ranges in record.get("skipped_positions", {}).items()
                }
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise BadInput(f"{self.used_path}: not a usage record ({error})") from None
            if min([self.floor_bytes, record_bytes, *self.positions.values()]) < 0:
                raise BadInput(f"{self.used_path}: negative position")
            if record_bytes > self._high_water():
                # moved by another writer of this record (the distillation's auth pool,
                # which keeps used_bytes only) or written before shares existed: every
                # byte below it is gone, in both shares
                self.floor_bytes = record_bytes
        elif create and self.filled_bytes == 0:
            self._write_used()
        else:
            raise BadInput(
                f"key pool {self.path}: its usage record {self.used_path} is missing; without "
                "it the bytes already served would be served again. Restore it"
            )
        # Fills from before the split: both ends took from one sequence, each at its own
        # record, and neither knows how far the other went (a send still in flight). Read
        # as a floor, this end's lower record let it begin its own sends inside the other
        # end's pad: one pad, two files. All of them are gone, at both ends.
        self.floor_bytes = max(self.floor_bytes, unsplit_end)
        size = os.fstat(self._fd).st_size
        if size < self.filled_bytes:
            raise BadInput(
                f"key pool {self.path}: {size} bytes, but its journal records "
                f"{self.filled_bytes} filled: the file was truncated"
            )
        if size > self.filled_bytes:  # a fill cut before its journal line: never served
            os.ftruncate(self._fd, self.filled_bytes)
            os.fsync(self._fd)
        beyond = [n for n, p in self.positions.items() if p > self._share_bytes(n)]
        beyond += [
            name
            for name, ranges in self.skipped.items()
            for start, end in ranges
            if not 0 <= start < end <= self.positions.get(name, 0)
        ]
        if self.floor_bytes > self.filled_bytes or beyond:
            raise BadInput(
                f"key pool {self.path}: usage record beyond the {self.filled_bytes} bytes filled"
            )

    def _mend_torn_journal_tail(self) -> None:
        """A power cut can leave the last journal line without its newline: the next line
        appended would be glued onto it, and that line (a re-run fill's, say) would read
        as garbage, then stop the pool opening once anything follows it. Whole JSON is
        ended with its newline; a cut line is removed (its operation never finished)."""
        with open(self.journal_path, "r+b") as handle:
            data = handle.read()
            if not data or data.endswith(b"\n"):
                return
            cut = data.rfind(b"\n") + 1
            try:
                whole = isinstance(json.loads(data[cut:]), dict)
            except ValueError:
                whole = False
            if whole:
                handle.write(b"\n")
            else:
                handle.truncate(cut)
            handle.flush()
            os.fsync(handle.fileno())

    def _add_shares(self, offset: int, count: int, split) -> None:
        if split and {str(name) for name, _ in split} - {self.holder, self.peer}:
            # the names come from the path: a pool read as held by someone else has no
            # share of its own, and fills journalled without a split would be cut with
            # the wrong names (both ends then take the same half)
            raise BadInput(
                f"key pool {self.path}: its fills are split between "
                f"{' and '.join(str(name) for name, _ in split)}, not {self.holder} (the "
                f"directory) and {self.peer}: a pool must lie at NET/HOLDER/PEER.pool"
            )
        split = split or split_fill(self.holder, self.peer, count)
        if sum(int(part) for _, part in split) != count:
            raise BadInput(f"{self.journal_path}: a fill's split does not add up to its bytes")
        for name, part in split:
            if int(part) > 0:
                self.shares.setdefault(str(name), []).append((offset, int(part)))
            offset += int(part)

    def _share_bytes(self, initiator: str) -> int:
        return sum(count for _, count in self.shares.get(initiator, ()))

    def _pool_end(self, initiator: str, position: int) -> int:
        """The pool offset just past the first `position` bytes of a share (0 for none)."""
        end = 0
        for offset, count in self.shares.get(initiator, ()):
            if position <= 0:
                break
            end = offset + min(count, position)
            position -= count
        return end

    def _high_water(self) -> int:
        """Where the usage record's `used_bytes` stands: past every byte used in any
        share. A reader that knows no shares (the distillation's auth pool) begins there."""
        return max([self.floor_bytes] + [self._pool_end(n, p) for n, p in self.positions.items()])

    def _check_initiator(self, initiator: str | None) -> str:
        initiator = self.holder if initiator is None else initiator
        if initiator not in (self.holder, self.peer):
            raise BadInput(f"key pool {self.path}: {initiator} is neither end of this pool")
        return initiator

    def _below_floor(self, initiator: str) -> int:
        """Positions of `initiator`'s share whose bytes lie below the floor (all gone)."""
        return sum(
            max(0, min(count, self.floor_bytes - offset))
            for offset, count in self.shares.get(initiator, ())
        )

    def position(self, initiator: str | None = None) -> int:
        """The first unused position in `initiator`'s share (default: this pool's holder's)."""
        initiator = self._check_initiator(initiator)
        return max(self.positions.get(initiator, 0), self._below_floor(initiator))

    def _skipped_range(self, initiator: str, offset: int, count: int) -> int | None:
        """Index of the skipped range of `initiator`'s share holding offset..+count whole
        (None: none does). Only the peer's share keeps them: this end takes there only at
        the offsets the peer's messages name, so a message overtaken by a later one still
        finds its bytes, once."""
        if initiator != self.peer:
            return None
        below_floor = self._below_floor(initiator)
        for index, (start, end) in enumerate(self.skipped.get(initiator, ())):
            if max(start, below_floor) <= offset and offset + count <= end:
                return index
        return None

    def available_for(self, initiator: str | None = None) -> int:
        """Bytes left for takes that `initiator` begins (default: this pool's holder)."""
        initiator = self._check_initiator(initiator)
        return self._share_bytes(initiator) - self.position(initiator)

    @property
    def used_bytes(self) -> int:
        """Bytes gone, both shares together."""
        return sum(self.position(name) for name in (self.holder, self.peer))

    def level(self) -> PoolLevel:
        return PoolLevel(self.filled_bytes, self.used_bytes, self.taken_bytes)

    @property
    def available_bytes(self) -> int:
        """Bytes left, both shares together (a take can use only its initiator's share)."""
        return self.filled_bytes - self.used_bytes

    # ---------------------------------------------------------------- writes

    def _write_used(self) -> None:
        """Atomically and durably, by the auth pool's record writer (channel.py): the
        record keeps, beside `used_bytes` (the high-water mark a reader of the plain record,
        the auth pool, must begin after), each share's position and the ranges skipped."""
        extra = {
            "floor_bytes": self.floor_bytes,
            "initiator_positions": dict(sorted(self.positions.items())),
        }
        skipped = {name: ranges for name, ranges in sorted(self.skipped.items()) if ranges}
        if skipped:
            extra["skipped_positions"] = skipped
        write_usage_record(self.path, self._high_water(), **extra)

    def _journal(self, entry: dict) -> None:
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def fill(self, data: bytes, source: str) -> int:
        """Append `data` (distilled key) once per `source`; returns its offset."""
        if source in self.sources:
            raise BadInput(f"key pool {self.path}: {source} was already added to this pool")
        offset = self.filled_bytes
        split = split_fill(self.holder, self.peer, len(data))
        os.lseek(self._fd, offset, os.SEEK_SET)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)
        _fsync_directory(str(self.path))  # a new file's name must survive too
        self._journal({"event": "fill", "source": source, "offset": offset, "bytes": len(data),
                       "split": split})  # fmt: skip
        self.sources[source] = offset
        self._add_shares(offset, len(data), split)
        self.filled_bytes += len(data)
        return offset

    def take(self, count: int, purpose: str, offset: int | None = None,
             initiator: str | None = None) -> bytes:  # fmt: skip
        """`count` bytes of `initiator`'s share (default: this pool's holder's) from
        position `offset` in that share (default: its first unused one), made unusable on
        disk before they are returned. Positions between the first unused one and `offset`
        are skipped and lost (both ends of a pair take the same positions, so they stay
        aligned). A position below it (already used) is refused: nothing is served twice."""
        return self.take_checked(count, purpose, offset, initiator)

    def take_checked(self, count: int, purpose: str, offset: int | None = None,
                     initiator: str | None = None, check=None) -> bytes | None:  # fmt: skip
        """As take; with `check`, a function of the bytes, the take happens only when it
        returns true (under the same lock), and None is returned when it does not: nothing
        is used then."""
        initiator, offset, count, in_skipped = self._bounds(count, offset, initiator)
        data = self._read(initiator, offset, count)
        if check is not None and not check(data):
            return None
        if in_skipped is not None:  # a message overtaken by a later one: its bytes, once
            start, end = self.skipped[initiator].pop(in_skipped)
            rest = [[a, b] for a, b in ((start, offset), (offset + count, end)) if a < b]
            self.skipped[initiator][in_skipped:in_skipped] = rest
            skipped = 0
        else:
            skipped = offset - self.position(initiator)
            if skipped and initiator == self.peer:
                ranges = self.skipped.setdefault(initiator, [])
                ranges.append([self.position(initiator), offset])
                del ranges[:-MAX_SKIPPED_RANGES]  # the oldest beyond the bound: lost
            self.positions[initiator] = offset + count
        self._write_used()  # write-ahead: durable before any byte is used
        # the pool bytes themselves, for audit: which bytes every take consumed
        ranges = [[start, start + size] for start, size in self._pieces(initiator, offset, count)]
        entry = {"event": "take", "purpose": purpose, "initiator": initiator,
                 "position": offset, "bytes": count, "ranges": ranges}  # fmt: skip
        if skipped:
            entry["skipped_bytes"] = skipped
        if in_skipped is not None:
            entry["from_skipped"] = True
        self._journal(entry)
        if in_skipped is None:
            self.taken_bytes += count + skipped
        return data

    def _bounds(self, count: int, offset: int | None, initiator: str | None) -> tuple:
        initiator = self._check_initiator(initiator)
        first = self.position(initiator)
        offset = first if offset is None else int(offset)
        if count <= 0:
            raise BadInput(f"key pool {self.path}: take {count} bytes")
        in_skipped = None
        if offset < first:
            in_skipped = self._skipped_range(initiator, offset, count)
        if offset < first and in_skipped is None:
            raise BadInput(
                f"key pool {self.path}: bytes from {offset} of {initiator}'s share were "
                f"already used (used up to {first}): refused, a key is never served twice"
            )
        share = self._share_bytes(initiator)
        if offset + count > share:
            available = max(share - offset, 0)
            raise PoolShort(
                f"key pool {self.path}: {count} bytes wanted, {available} available "
                f"for {initiator}",
                available,
                count,
            )
        return initiator, offset, count, in_skipped

    def _pieces(self, initiator: str, position: int, count: int) -> list[tuple[int, int]]:
        """(pool offset, bytes) of the pieces that positions position..+count of a share
        occupy in the pool."""
        pieces = []
        for offset, size in self.shares[initiator]:
            if count <= 0:
                break
            if position >= size:
                position -= size
                continue
            length = min(size - position, count)
            pieces.append((offset + position, length))
            count -= length
            position = 0
        return pieces

    def _read(self, initiator: str, position: int, count: int) -> bytes:
        pieces = self._pieces(initiator, position, count)
        return b"".join(os.pread(self._fd, length, offset) for offset, length in pieces)


@contextlib.contextmanager
def pair_lock(network_dir: str | Path, first: str, second: str):
    """One operation at a time that fills both pools of a pair (a pool fill, a relay):
    two at once interleaved their fills (one into the first pool, the other into both,
    then the first into the second) and put two keys in opposite orders in the pair's
    pools, same length, different bytes at every offset. An flock on NET/.pair-A-B.lock
    (names sorted), held across both fills."""
    low, high = sorted((check_name(first), check_name(second)))
    path = Path(network_dir) / f".pair-{low}-{high}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add_network_option(parser) -> None:
    """The `--network` option of every command that reads or writes the pools."""
    parser.add_argument(
        "--network", default="network", help="the network's pool directory (NET/HOLDER/PEER.pool)"
    )


def pool_path(network_dir: str | Path, holder: str, peer: str) -> Path:
    """`NET/HOLDER/PEER.pool`: e.g. NET/satellite/Jinan.pool and NET/Jinan/satellite.pool."""
    return Path(network_dir) / check_name(holder, "holder") / f"{check_name(peer, 'peer')}.pool"


# ------------------------------------------------------------------ filling from distil


def read_distilled_key(out_dir: str | Path, role: str) -> tuple[bytes, str]:
    """(whole key bytes, source id) of `role`'s key in a `qkdsat distil` output directory.
    Only a key the report vouches for: not aborted, not made with replayed (insecure)
    randomness, file length matching the bit count. The partial last byte is dropped (its
    padding bits are not key). The source id is the pass: a second key distilled from the
    same pass is correlated with the first and must never enter a pool as well. A pending
    key (split mode, not yet confirmed with the peer: host/distil/keystore.py) is refused."""
    out_dir = Path(out_dir)
    report_path = out_dir / "report.json"
    try:
        report = json.loads(report_path.read_text())
    except OSError as error:
        raise BadInput(f"{report_path}: {error.strerror}") from error
    except ValueError as error:
        raise BadInput(f"{report_path}: not JSON ({error})") from error
    if report.get("aborted", True):
        raise BadInput(f"{report_path}: the distillation aborted; it made no key")
    if report.get("deterministic_randomness", True):
        raise BadInput(f"{report_path}: made with replayed randomness: a test key, not secret")
    try:
        entry = report["key_files"][role]
        bits = int(entry["bits"])
        key_path = out_dir / entry["file"]
        source = "pass-sha256:" + report["inputs"]["pass_json_sha256"]
    except (KeyError, TypeError, ValueError) as error:
        raise BadInput(f"{report_path}: no {role} key recorded ({error})") from error
    if Path(entry["file"]).name != entry["file"]:
        raise BadInput(f"{report_path}: key file {entry['file']!r} outside the directory")
    keystore.refuse_pending(key_path)  # held by one side only, perhaps (two generals)
    try:
        data = key_path.read_bytes()
    except OSError as error:
        raise BadInput(f"{key_path}: {error.strerror}") from error
    if len(data) != (bits + 7) // 8:
        raise BadInput(f"{key_path}: {len(data)} bytes, the report says {bits} bits")
    return data[: bits // 8], source


def fill_pair(network_dir: str | Path, station: str, alice_dir, bob_dir=None) -> dict:
    """Add one pass's key to the satellite's pool for `station` (Alice's key) and to the
    station's pool for the satellite (Bob's key), at the same offset in both. A pair cut
    half-way (one pool filled) is completed by running the same fill again."""
    if station == SATELLITE:
        raise BadInput(
            f"--station {station}: the satellite's own name; a pool is shared between two "
            "different ends"
        )
    alice_key, alice_source = read_distilled_key(alice_dir, "alice")
    bob_key, bob_source = read_distilled_key(bob_dir or alice_dir, "bob")
    if alice_source != bob_source or len(alice_key) != len(bob_key):
        raise BadInput("the alice and bob keys come from different passes or differ in length")
    with contextlib.ExitStack() as locks:
        key_files = [
            _locked_key_file(Path(alice_dir) / "alice.key", locks),
            _locked_key_file(Path(bob_dir or alice_dir) / "bob.key", locks),
        ]
        records = [_pool_fill_record(path) for path in key_files]
        start = max(record[0] for record in records)
        # the pools' source check is per pool: the same key filled into another network
        # directory, or for another station, would be served once from each. Only the
        # fill the key's record names can be completed.
        destination = f"{Path(network_dir).resolve()} station {station}"
        for path, (_, began_into) in zip(key_files, records, strict=True):
            if began_into is None or began_into == destination:
                continue
            if began_into == "" and _holds_source(network_dir, station, alice_source):
                continue  # a record from before destinations were kept: this very fill
            raise BadInput(
                f"{path}: already filled into {began_into or 'another network or station'}; "
                "a key enters one pair of pools only (nothing is served twice)"
            )
        # the keys again, now that their records are read under the lock: a distillation
        # finishing into the directory since the first reading replaced a key and removed
        # its record, and the old key would be filled from byte 0 (time transfer's included)
        again = (
            read_distilled_key(alice_dir, "alice"),
            read_distilled_key(bob_dir or alice_dir, "bob"),
        )
        if again != ((alice_key, alice_source), (bob_key, bob_source)):
            raise BadInput(f"{key_files[0].parent}: a key was replaced while being filled")
        if start >= len(alice_key):
            raise BadInput(
                f"{key_files[0]}: every byte of this key is used (time transfer, "
                f"{key_files[0]}.used): nothing left for the pools"
            )
        for path in key_files:  # the key's own record first: no other use can take it now
            write_usage_record(
                str(path), path.stat().st_size, pool_fill_from=start, pool_fill_into=destination
            )
        with pair_lock(network_dir, SATELLITE, station):
            return _fill_both(
                network_dir, station, alice_source, alice_key[start:], bob_key[start:]
            )


def _locked_key_file(path: Path, locks: contextlib.ExitStack) -> Path:
    """Hold the flock a time transfer holds on a key it uses (KeyPool.from_file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as error:
        raise BadInput(f"{path}: {error.strerror}") from None
    locks.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BadInput(f"{path}: in use (a time transfer holds it)") from None
    return path


def _pool_fill_record(key_path: Path) -> tuple[int, str | None]:
    """(where the pools' part of a distilled key begins, where an earlier fill of it went).
    The start is after what a time transfer used (its usage record KEY.used, the auth
    pool's format), or where an earlier fill of the same key began (a fill cut between
    the two pools is completed from there). The destination is None when no fill began,
    "" for a fill recorded without one."""
    try:
        record = json.loads(Path(f"{key_path}.used").read_text())
    except FileNotFoundError:
        return 0, None
    except ValueError as error:
        raise BadInput(f"{key_path}.used: not a usage record ({error})") from None
    if "pool_fill_from" not in record:
        return int(record["used_bytes"]), None
    return int(record["pool_fill_from"]), str(record.get("pool_fill_into", ""))


def _holds_source(network_dir, station: str, source: str) -> bool:
    for holder, peer in ((SATELLITE, station), (station, SATELLITE)):
        path = pool_path(network_dir, holder, peer)
        if path.exists():
            with StationPool(path) as pool:
                if source in pool.sources:
                    return True
    return False


def _fill_both(network_dir, station: str, alice_source: str, alice_key: bytes,
               bob_key: bytes) -> dict:  # fmt: skip
    """Both pools of the pair take this pass at the same offset, or neither takes it: each
    at its end, or where the other already holds it (completing a fill cut between the
    two). Checked before either appends: a fill cut between the pools, then another
    pass's fill before it was completed, put that pass at different offsets in the two
    pools (each check after its appends), and completing the first then did the same:
    pools of equal length, different bytes at every offset, and two applications served
    different keys under one key ID (a cold review, session 24)."""
    ends = ((SATELLITE, station, alice_key), (station, SATELLITE, bob_key))
    with contextlib.ExitStack() as stack:
        pools = {
            holder: stack.enter_context(
                StationPool(pool_path(network_dir, holder, peer), create=True)
            )
            for holder, peer, _ in ends
        }
        # a pair already out of step (left so by the check this replaces): any pass both
        # pools hold at different offsets; no fill can mend it
        sat, sta = pools[SATELLITE].sources, pools[station].sources
        apart = sorted(name for name in sat.keys() & sta.keys() if sat[name] != sta[name])
        if apart:
            raise BadInput(
                f"pools of {station} out of step: {', '.join(apart)} sit at different "
                "offsets in the two pools; nothing was added (the pair cannot serve keys)"
            )
        held = {holder: pool.sources.get(alice_source) for holder, pool in pools.items()}
        if None not in held.values() and held[SATELLITE] == held[station]:
            raise BadInput(f"{alice_source} is already in both pools of {station}")
        at = {
            holder: pool.filled_bytes if held[holder] is None else held[holder]
            for holder, pool in pools.items()
        }
        if at[SATELLITE] != at[station]:
            raise BadInput(_out_of_step(station, alice_source, pools, held))
        for holder, _, key in ends:
            if held[holder] is None:
                pools[holder].fill(key, alice_source)
    return {"station": station, "source": alice_source, "bytes": len(alice_key),
            "offset": at[station]}  # fmt: skip


def _out_of_step(station: str, source: str, pools: dict, held: dict) -> str:
    """Why a pair cannot take this pass: where it would sit in each pool, and the passes
    one pool holds beyond the other's end (fills cut between the two, to complete first)."""
    sat, sta = pools[SATELLITE], pools[station]
    where = {
        holder: (f"at byte {held[holder]}" if held[holder] is not None
                 else f"at its end, byte {pools[holder].filled_bytes}")
        for holder in pools
    }  # fmt: skip
    longer, shorter = (sat, sta) if sat.filled_bytes > sta.filled_bytes else (sta, sat)
    beyond = sorted(
        (offset, name) for name, offset in longer.sources.items()
        if offset >= shorter.filled_bytes and name not in shorter.sources
    )  # fmt: skip
    text = (
        f"pools of {station} out of step: {source} would sit {where[SATELLITE]} on the "
        f"satellite and {where[station]} at the station; nothing was added"
    )
    if beyond:
        names = ", ".join(name for _, name in beyond)
        text += f" (complete the fill of {names} first: {longer.path} holds it alone)"
    return text


def network_levels(network_dir: str | Path) -> list[dict]:
    """Every pool under NET with its level (no key material)."""
    levels = []
    for path in sorted(Path(network_dir).glob("*/*.pool")):
        with StationPool(path) as pool:
            level = pool.level()
            shares = {name: pool.available_for(name) for name in (pool.holder, pool.peer)}
        levels.append(
            {
                "holder": path.parent.name,
                "peer": path.stem,
                "filled_bytes": level.filled_bytes,
                "used_bytes": level.used_bytes,
                "available_bytes": level.available_bytes,
                # what takes each end begins can still use (split_fill)
                "available_bytes_by_initiator": shares,
                "lost_bytes": level.lost_bytes,
            }
        )
    return levels
